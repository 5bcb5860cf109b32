//! Hostile and corrupt images: refused with the field named, or failing only the reads that
//! touch the bad entry; and a mutation loop that must never panic.

use super::*;

#[test]
fn corrupt_images_are_refused_or_fail_reads_with_the_field() {
    let dir = TempDir::new();
    let Some(path) = small_image(&dir) else {
        return;
    };
    let good = std::fs::read(&path).unwrap();
    let l1_at = be64(&good, 40) as usize;
    let l2_at = (be64(&good, l1_at) & OFFSET_MASK) as usize;
    let bad = dir.path().join("bad.qcow2");
    let open_bad = |bytes: &[u8]| {
        std::fs::write(&bad, bytes).unwrap();
        try_open_with(&bad, None)
    };
    let refused = |patch: &dyn Fn(&mut Vec<u8>), kind: ErrorKind, needle: &str| {
        let mut b = good.clone();
        patch(&mut b);
        let e = open_bad(&b).err().expect("image must be refused");
        assert_eq!(e.kind(), kind, "{e}");
        let text = e.to_string();
        assert!(text.contains(needle), "{text} should mention {needle}");
        assert!(text.contains("bad.qcow2"), "{text} should name the file");
    };
    refused(
        &|b| put_u32(b, 20, 30),
        ErrorKind::Corrupt,
        "cluster_bits 30",
    );
    refused(
        &|b| put_u32(b, 36, 0x0100_0000),
        ErrorKind::Corrupt,
        "l1_size",
    );
    refused(
        &|b| put_u64(b, 40, 1 << 40),
        ErrorKind::Corrupt,
        "l1_table_offset",
    );
    refused(
        &|b| put_u64(b, 40, 0x30200),
        ErrorKind::Corrupt,
        "not aligned",
    );
    refused(
        &|b| put_u64(b, 48, 0),
        ErrorKind::Corrupt,
        "overlap the header",
    );
    refused(
        &|b| put_u64(b, 72, 1 << 7),
        ErrorKind::Unsupported,
        "incompatible qcow2 feature bit 7",
    );
    refused(
        &|b| put_u32(b, 32, 3),
        ErrorKind::Unsupported,
        "crypt_method 3",
    );
    refused(
        &|b| put_u32(b, 60, 1 << 20),
        ErrorKind::Corrupt,
        "nb_snapshots",
    );
    refused(&|b| b.truncate(100), ErrorKind::Corrupt, "");

    // Bad L1 and L2 entries fail the reads that need them, not the open.
    let read_fails = |patch: &dyn Fn(&mut Vec<u8>), needle: &str| {
        let mut b = good.clone();
        patch(&mut b);
        let img = open_bad(&b).unwrap();
        let e = img.read_at(&mut [0u8; 512], 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(
            e.to_string().contains(needle),
            "{e} should mention {needle}"
        );
        // Other parts of the disk stay readable.
        img.read_at(&mut [0u8; 512], (1 << 30) - 512).unwrap();
    };
    read_fails(&|b| put_u64(b, l1_at, 1 << 40), "L1 entry 0");
    read_fails(
        &|b| put_u64(b, l1_at, l2_at as u64 + 512),
        "not cluster aligned",
    );
    read_fails(
        &|b| put_u64(b, l2_at, (1 << 63) | (1 << 40)),
        "past the end",
    );
    read_fails(
        &|b| put_u64(b, l2_at, (1 << 63) | 0x50200),
        "not cluster aligned",
    );
    read_fails(&|b| put_u64(b, l2_at, (1 << 62) | 0x3_0000), "inflate");
}

#[test]
fn corrupt_bit_serves_read_only_with_the_reason() {
    let dir = TempDir::new();
    let Some(path) = patched_small_image(&dir, |bytes| {
        put_u64(bytes, 72, header::INCOMPAT_CORRUPT);
    }) else {
        return;
    };
    let file = HostFile::open(&path, false).unwrap();
    let header = Qcow2Header::read(&file).unwrap();
    let img = Qcow2Image::open(file, header, None, None, Some("by request".into())).unwrap();
    let reason = img.read_only_reason().unwrap();
    assert!(
        reason.starts_with("the image is marked corrupt; by request"),
        "{reason}"
    );
    let mut buf = [0u8; 4096];
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0x42; 4096]);
}

/// Hostile images: thousands of deterministic mutations of a valid image with data,
/// compressed and zero clusters and a snapshot. Opening must give an image or a clean error;
/// an image that opens must serve reads, block status and its snapshots without a panic.
#[test]
fn mutated_images_never_panic() {
    const INTERESTING: [u64; 10] = [
        0,
        1,
        511,
        512,
        4096,
        0x7fff_ffff,
        0x8000_0000_0000_0000,
        0xffff_ffff,
        u64::MAX,
        0x4000_0000_0001_0000,
    ];
    let dir = TempDir::new();
    let src = dir.path().join("src.qcow2");
    let base_path = dir.path().join("base.qcow2");
    if run(
        "qemu-img",
        &format!("create -q -f qcow2 -o cluster_size=4k {} 256k", p(&src)),
    )
    .is_none()
    {
        return;
    }
    qemu_io(&src, &["write -P 0x11 0 64k", "write -P 0x22 128k 8k"]).unwrap();
    run(
        "qemu-img",
        &format!(
            "convert -c -O qcow2 -o cluster_size=4k {} {}",
            p(&src),
            p(&base_path)
        ),
    )
    .unwrap();
    qemu_io(&base_path, &["write -P 0x33 32k 4k", "write -z 128k 4k"]).unwrap();
    run("qemu-img", &format!("snapshot -c snap {}", p(&base_path))).unwrap();
    qemu_io(&base_path, &["write -P 0x44 192k 8k"]).unwrap();
    let base = std::fs::read(&base_path).unwrap();
    let header_len = 4096;

    let path = dir.path().join("m.qcow2");
    let mutate = |bytes: &mut Vec<u8>, rng: &mut Rng| {
        for _ in 0..1 + rng.below(4) {
            // Mostly the header cluster, sometimes the tables and data anywhere.
            let span = if rng.below(3) == 0 {
                bytes.len()
            } else {
                header_len
            };
            let at = (rng.below(span as u64 - 8) as usize) & !3;
            let value = INTERESTING[rng.below(INTERESTING.len() as u64) as usize];
            match rng.below(3) {
                0 => bytes[at..at + 8].copy_from_slice(&value.to_be_bytes()),
                1 => bytes[at..at + 4].copy_from_slice(&(value as u32).to_be_bytes()),
                _ => bytes[at] = rng.next() as u8,
            }
        }
    };
    let rounds = std::sync::atomic::AtomicU32::new(0);
    let written = std::sync::atomic::AtomicU32::new(0);
    assert_mutations_never_panic(&base, &path, 2000, mutate, |path| {
        let Ok(img) = try_open_with(path, None) else {
            return false;
        };
        exercise(&img);
        for index in 0..img.snapshots().len().min(4) {
            if let Ok(snap) = img.snapshot_image(index) {
                exercise(&snap);
            }
        }
        drop(img);
        let round = rounds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if round % 4 == 0 && write_exercise(path) {
            written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        true
    });
    let written = written.into_inner();
    assert!(written > 20, "only {written} mutated images took writes");
}

/// Opens the image writable and writes into its start, middle and end (unaligned, crossing
/// clusters), then flushes; errors are fine, panics are not. Says whether everything
/// succeeded.
fn write_exercise(path: &Path) -> bool {
    let Ok(file) = HostFile::open(path, true) else {
        return false;
    };
    let Ok(header) = Qcow2Header::read(&file) else {
        return false;
    };
    let Ok(img) = Qcow2Image::open(file, header, None, None, None) else {
        return false;
    };
    let mut ok = true;
    let size = img.size();
    let buf = vec![0x5au8; 9000];
    for offset in [100, size / 2, size.saturating_sub(9000)] {
        let len = buf.len().min((size - offset.min(size)) as usize);
        ok &= img.write_at(&buf[..len], offset).is_ok();
    }
    ok &= img.flush().is_ok();
    exercise(&img);
    ok
}

/// Reads the start, middle and end of an image, asks for its status and its refcounts.
fn exercise(img: &Qcow2Image) {
    exercise_image(img, false);
    let _ = img.block_status(0, img.size().min(1 << 40));
    for host in [0, 5 << 12, 1 << 40, u64::MAX] {
        let _ = img.refcount(host);
    }
}

/// Found by fuzzing: refcounts that call the header, L1 table and refcount structures free
/// made the allocator put new tables and data over them. Such clusters are refused now, and
/// the metadata stays as it was.
#[test]
fn refcounts_calling_metadata_free_do_not_get_it_overwritten() {
    let dir = TempDir::new();
    let Some(path) = small_image(&dir) else {
        return;
    };
    let mut bytes = std::fs::read(&path).unwrap();
    let table_at = be64(&bytes, 48) as usize;
    let block_at = (be64(&bytes, table_at) & OFFSET_MASK) as usize;
    bytes[block_at..block_at + 65536].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    let img = open_writable(&path);
    let e = img.write_at(&[7; 512], 512 << 20).unwrap_err();
    assert!(
        e.to_string().contains("refcount 0 but holds the header"),
        "{e}"
    );
    let mut back = vec![0u8; 65536];
    img.read_at(&mut back, 0).unwrap();
    assert!(back.iter().all(|&b| b == 0x42));
    drop(img);
    assert!(
        std::fs::read(&path).unwrap()[..65536] == bytes[..65536],
        "header untouched"
    );
}

/// Found by fuzzing: an L1 entry naming the L1 table itself as an L2 table made a write put
/// L2 entries over the L1 table, so the image read differently once reopened. Writes to such
/// an image are refused now, and the tables stay as they were.
#[test]
fn an_l2_table_on_the_l1_table_refuses_writes() {
    let dir = TempDir::new();
    let Some(path) = small_image(&dir) else {
        return;
    };
    let mut bytes = std::fs::read(&path).unwrap();
    let l1_at = be64(&bytes, 40) as usize;
    // The second L1 entry (guest 512 MiB and up) names the L1 table, COPIED set.
    bytes[l1_at + 8..l1_at + 16].copy_from_slice(&((l1_at as u64) | 1 << 63).to_be_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let img = open_writable(&path);
    let e = img.write_at(&[7; 512], 512 << 20).unwrap_err();
    assert!(
        e.to_string().contains("an L2 table at") && e.to_string().contains("the L1 table"),
        "{e}"
    );
    assert!(img.write_at(&[7; 512], 0).is_err(), "no write at all");
    drop(img);
    assert!(
        std::fs::read(&path).unwrap() == bytes,
        "the file is untouched"
    );
}

/// Found by fuzzing: an L2 entry naming the L1 table as data (COPIED clear, so a write copies
/// it) dropped the L1 table's only reference when the write replaced the entry; the flush then
/// freed the L1 table and punched a hole in it, and the image read as empty once reopened. The
/// L1 table keeps its reference now.
#[test]
fn overwriting_an_entry_that_names_the_l1_table_keeps_the_table() {
    let dir = TempDir::new();
    let Some(path) = small_image(&dir) else {
        return;
    };
    let mut bytes = std::fs::read(&path).unwrap();
    let l1_at = be64(&bytes, 40);
    let l2_at = (be64(&bytes, l1_at as usize) & OFFSET_MASK) as usize;
    // Guest cluster 1 (64 KiB) reads the L1 table.
    bytes[l2_at + 8..l2_at + 16].copy_from_slice(&l1_at.to_be_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let img = open_writable(&path);
    img.write_at(&[7; 4096], 64 * KIB).unwrap();
    img.flush().unwrap();
    assert_eq!(
        img.refcount(l1_at).unwrap(),
        1,
        "the L1 table's own reference"
    );
    drop(img);
    let img = open(&path);
    let mut back = vec![0u8; 4096];
    img.read_at(&mut back, 0).unwrap();
    assert!(back.iter().all(|&b| b == 0x42), "data before the entry");
    img.read_at(&mut back, 64 * KIB).unwrap();
    assert!(back.iter().all(|&b| b == 7), "the write");
}

/// Found by fuzzing: an L2 entry (COPIED set) naming an L2 table as its data cluster let a
/// write go in place over the table, changing it on disk behind its cached copy: the image
/// read differently once reopened. Writes and punching discards through such an entry are
/// refused, and the table stays as it was.
#[test]
fn data_in_place_over_an_l2_table_is_refused() {
    let dir = TempDir::new();
    let Some((path, mut bytes, l2_at)) = image_and_l2_table(&dir) else {
        return;
    };
    // Guest cluster 1 (64 KiB) is "stored" in the L2 table itself.
    let slot = l2_at as usize + 8;
    bytes[slot..slot + 8].copy_from_slice(&(l2_at | 1 << 63).to_be_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let img = open_writable(&path);
    for e in [
        img.write_at(&[7; 512], 64 * KIB).unwrap_err(),
        // Part of a cluster is punched in place; a whole one just loses its entry.
        img.discard(64 * KIB + 512, 512).unwrap_err(),
    ] {
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains("which holds an L2 table"), "{e}");
    }
    img.write_at(&[9; 512], 0).unwrap();
    img.flush().unwrap();
    drop(img);
    assert_l2_table_untouched(&path, &bytes, l2_at);
    let img = open(&path);
    let mut back = vec![0u8; 1024];
    img.read_at(&mut back, 0).unwrap();
    assert!(back[..512].iter().all(|&b| b == 9) && back[512..].iter().all(|&b| b == 0x42));
}

/// Found by fuzzing: a table of 65,536 blank snapshots (the most a header may claim). Naming
/// them compared every pair, and listing them opened each, which took minutes; every name is
/// now found in one pass, ids that repeat fall back to the table index, and the listing comes
/// from the table alone.
#[test]
fn a_table_of_65536_blank_snapshots_gets_distinct_names_in_one_pass() {
    let dir = TempDir::new();
    let Some(path) = patched_small_image(&dir, |bytes| {
        let table_at = bytes.len().next_multiple_of(65536);
        bytes.resize(table_at + 65536 * 40, 0);
        put_u32(bytes, 60, 65536);
        put_u64(bytes, 64, table_at as u64);
    }) else {
        return;
    };
    let img = open(&path);
    let names = img.snapshot_names();
    assert_eq!(names.len(), 65536);
    let distinct: std::collections::HashSet<&String> = names.iter().collect();
    assert_eq!(distinct.len(), 65536);
    assert_eq!(names[65535], "snapshot-#65535");
    let entries = img.snapshot_entries();
    assert_eq!(entries.len(), 65536);
    assert_eq!(entries[7].name, "snapshot-#7");
    let view = img.snapshot("snapshot-#65535").unwrap();
    assert!(view.snapshot_names().is_empty());
    assert!(img.snapshot("snapshot-#65536").is_err());
}

/// Found by fuzzing: a dirty image whose refcount table names its L2 table as a refcount
/// block. The refcount rebuild of the first write wrote that block (all zeros) over the L2
/// table, and the image read as empty once reopened. Overlapping metadata is now refused
/// before the rebuild, as it was after it.
#[test]
fn a_dirty_image_with_a_refcount_block_on_its_l2_table_is_not_rebuilt() {
    let dir = TempDir::new();
    let Some((path, mut bytes, l2_at)) = image_and_l2_table(&dir) else {
        return;
    };
    let table_at = be64(&bytes, 48) as usize;
    put_u64(&mut bytes, table_at + 8, l2_at);
    put_u64(&mut bytes, 72, header::INCOMPAT_DIRTY);
    std::fs::write(&path, &bytes).unwrap();
    let img = open_writable(&path);
    let e = img.write_at(&[7; 512], 0).unwrap_err();
    assert!(e.to_string().contains("lies on a refcount block"), "{e}");
    drop(img);
    assert_l2_table_untouched(&path, &bytes, l2_at);
}

/// `small_image` with its bytes and the offset of its (only) L2 table.
fn image_and_l2_table(dir: &TempDir) -> Option<(PathBuf, Vec<u8>, u64)> {
    let path = small_image(dir)?;
    let bytes = std::fs::read(&path).unwrap();
    let l1_at = be64(&bytes, 40) as usize;
    let l2_at = be64(&bytes, l1_at) & OFFSET_MASK;
    Some((path, bytes, l2_at))
}

/// A small image (`small_image`) with its bytes changed by `patch`.
fn patched_small_image(dir: &TempDir, patch: impl FnOnce(&mut Vec<u8>)) -> Option<PathBuf> {
    let path = small_image(dir)?;
    let mut bytes = std::fs::read(&path).unwrap();
    patch(&mut bytes);
    std::fs::write(&path, &bytes).unwrap();
    Some(path)
}

/// The L2 table at `l2_at` in the file at `path` is what it is in `bytes`.
fn assert_l2_table_untouched(path: &Path, bytes: &[u8], l2_at: u64) {
    let after = std::fs::read(path).unwrap();
    let table = l2_at as usize..l2_at as usize + 65536;
    assert_eq!(
        after[table.clone()],
        bytes[table],
        "the L2 table is untouched"
    );
}
