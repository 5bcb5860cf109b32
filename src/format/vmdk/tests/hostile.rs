//! Corrupt and hostile VMDK disks: each gives a clear error naming the problem, and no
//! mutation of a valid disk ever panics. Also the builder of VMware-style streams.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use super::{create, qemu_io, try_open};
use crate::format::vmdk::{VmdkImage, VmdkTop};
use crate::host::HostFile;
use crate::image::Image;
use crate::testutil::{assert_mutations_never_panic, exercise_image, Rng, TempDir};

const SECTOR: usize = 512;
const GRAIN: usize = 64 << 10;

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn marker(val: u64, size: u32, kind: u32) -> Vec<u8> {
    let mut m = vec![0u8; SECTOR];
    put_u64(&mut m, 0, val);
    put_u32(&mut m, 8, size);
    put_u32(&mut m, 12, kind);
    m
}

fn pad(buf: &mut Vec<u8>) {
    buf.resize(buf.len().next_multiple_of(SECTOR), 0);
}

/// A streamOptimized extent as VMware writes it: header with the grain directory "at the end",
/// compressed grains behind markers, grain tables and directory behind their markers, then
/// footer, header copy and end-of-stream marker.
pub fn stream_optimized(disk: &[u8]) -> Vec<u8> {
    let sectors = (disk.len() / SECTOR) as u64;
    let header = |gd: u64| {
        let mut h = vec![0u8; SECTOR];
        h[..4].copy_from_slice(b"KDMV");
        put_u32(&mut h, 4, 3);
        put_u32(&mut h, 8, 1 | (1 << 16) | (1 << 17));
        put_u64(&mut h, 12, sectors);
        put_u64(&mut h, 20, (GRAIN / SECTOR) as u64);
        put_u64(&mut h, 28, 1);
        put_u64(&mut h, 36, 20);
        put_u32(&mut h, 44, 512);
        put_u64(&mut h, 56, gd);
        put_u64(&mut h, 64, 128);
        h[73..77].copy_from_slice(b"\n \r\n");
        h[77] = 1;
        h
    };
    let mut out = header(u64::MAX);
    let desc = format!(
        "# Disk DescriptorFile\nversion=1\nCID=1234abcd\nparentCID=ffffffff\n\
         createType=\"streamOptimized\"\nRW {sectors} SPARSE \"stream.vmdk\"\n"
    );
    out.extend_from_slice(desc.as_bytes());
    out.resize(128 * SECTOR, 0);
    let grains = disk.len().div_ceil(GRAIN);
    let mut gtes = vec![0u32; grains.div_ceil(512) * 512];
    for (index, grain) in disk.chunks(GRAIN).enumerate() {
        if grain.iter().all(|&b| b == 0) {
            continue;
        }
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(grain).unwrap();
        let data = z.finish().unwrap();
        gtes[index] = (out.len() / SECTOR) as u32;
        let mut m = marker((index * GRAIN / SECTOR) as u64, data.len() as u32, 0);
        m.truncate(12);
        out.extend_from_slice(&m);
        out.extend_from_slice(&data);
        pad(&mut out);
    }
    let mut gd = Vec::new();
    for table in gtes.chunks(512) {
        if table.iter().all(|&e| e == 0) {
            gd.push(0u32);
            continue;
        }
        out.extend_from_slice(&marker(4, 0, 1));
        gd.push((out.len() / SECTOR) as u32);
        table
            .iter()
            .for_each(|e| out.extend_from_slice(&e.to_le_bytes()));
    }
    out.extend_from_slice(&marker(1, 0, 2));
    let gd_sector = (out.len() / SECTOR) as u64;
    gd.iter()
        .for_each(|e| out.extend_from_slice(&e.to_le_bytes()));
    pad(&mut out);
    out.extend_from_slice(&marker(1, 0, 3));
    out.extend_from_slice(&header(gd_sector));
    out.extend_from_slice(&marker(0, 0, 0));
    out
}

/// A 1 MiB monolithicSparse disk made by qemu-img with some data: (dir, path, bytes).
fn small_sparse() -> Option<(TempDir, std::path::PathBuf, Vec<u8>)> {
    let dir = TempDir::new();
    let path = dir.path().join("h.vmdk");
    create(&path, "", "1M")?;
    qemu_io(&path, &["write -P 0x11 0 100k", "write -P 0x22 700k 5k"])?;
    let bytes = std::fs::read(&path).unwrap();
    Some((dir, path, bytes))
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

fn error_after(path: &Path, bytes: &[u8]) -> String {
    std::fs::write(path, bytes).unwrap();
    match try_open(path, true) {
        Err(e) => e.to_string(),
        Ok(img) => {
            let mut buf = vec![0u8; img.size() as usize];
            img.read_at(&mut buf, 0)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        }
    }
}

#[test]
fn corrupt_tables_give_clear_errors() {
    let Some((_dir, path, good)) = small_sparse() else {
        return;
    };
    let gd = le_u64(&good, 56) as usize * SECTOR;
    let rgd = le_u64(&good, 48) as usize * SECTOR;
    let gt = u32::from_le_bytes(good[gd..gd + 4].try_into().unwrap()) as usize * SECTOR;

    // The grain directory pointing at itself.
    let mut bytes = good.clone();
    put_u32(&mut bytes, gd, (gd / SECTOR) as u32);
    let e = error_after(&path, &bytes);
    assert!(
        e.contains("grain table 0") && e.contains("overlaps the grain directory"),
        "{e}"
    );

    // The redundant directory pointing at the embedded descriptor.
    let mut bytes = good.clone();
    put_u32(&mut bytes, rgd, 1);
    let e = error_after(&path, &bytes);
    assert!(
        e.contains("redundant grain table 0") && e.contains("overlaps the embedded descriptor"),
        "{e}"
    );

    // A grain table entry beyond the end of the file.
    let mut bytes = good.clone();
    put_u32(&mut bytes, gt + 8, 0x7fff_0000);
    let e = error_after(&path, &bytes);
    assert!(
        e.contains("grain table 0 entry 2") && e.contains("beyond the end"),
        "{e}"
    );

    // A huge capacity and grain size.
    let mut bytes = good.clone();
    put_u64(&mut bytes, 12, 1 << 60);
    let e = error_after(&path, &bytes);
    assert!(e.contains("capacity"), "{e}");
    let mut bytes = good.clone();
    put_u64(&mut bytes, 12, 1 << 40);
    let e = error_after(&path, &bytes);
    assert!(e.contains("beyond the end of the file"), "{e}");

    // A compressed grain that does not inflate.
    let mut bytes = good.clone();
    put_u32(&mut bytes, 8, 3 | (1 << 16) | (1 << 17));
    bytes[77] = 1;
    let e = error_after(&path, &bytes);
    assert!(e.contains("grain marker") || e.contains("inflate"), "{e}");
}

#[test]
fn hostile_descriptors_are_refused_with_their_reason() {
    let dir = TempDir::new();
    let root = dir.path().join("tree");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(dir.path().join("outside.raw"), vec![0u8; 4096]).unwrap();
    std::fs::write(root.join("inside.raw"), vec![7u8; 4096]).unwrap();
    let case = |lines: &str| {
        let path = root.join("d.vmdk");
        let text = format!(
            "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n\
             createType=\"monolithicFlat\"\n{lines}\n"
        );
        std::fs::write(&path, text).unwrap();
        try_open(&path, true).map(|img| img.size())
    };
    assert_eq!(case("RW 8 FLAT \"inside.raw\" 0\nRW 4 ZERO").unwrap(), 6144);
    for (lines, expect) in [
        ("RW 8 FLAT \"../outside.raw\" 0", "outside the source tree"),
        ("RW 8 FLAT \"/etc/passwd\" 0", "outside the source tree"),
        ("RW 8 FLAT \"missing.raw\" 0", "does not exist"),
        ("RW 8 FLAT \"d.vmdk\" 0", "names itself"),
        ("RW 8 VMFSRDM \"inside.raw\"", "raw device mapping"),
        ("RW 8 SPARSE \"inside.raw\"", "no KDMV or COWD magic"),
        ("RW 99999999999999 FLAT \"inside.raw\" 0", "outside 1..="),
        (
            "RW 8 FLAT \"inside.raw\" 0\nRW 8 SPARSE \"inside.raw\"",
            "magic",
        ),
    ] {
        let e = case(lines).unwrap_err().to_string();
        assert!(e.contains(expect), "{lines:?}: {e}");
    }
    // A NOACCESS extent makes the disk read-only and refuses reads of its range.
    let path = root.join("d.vmdk");
    case("RW 8 FLAT \"inside.raw\" 0\nNOACCESS 8 FLAT \"inside.raw\" 0").unwrap();
    let img = try_open(&path, false).unwrap();
    let mut buf = [0u8; 512];
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [7u8; 512]);
    let e = img.read_at(&mut buf, 4096).unwrap_err();
    assert!(e.to_string().contains("NOACCESS"), "{e}");
    assert!(img.read_only_reason().unwrap().contains("NOACCESS"));
}

/// A hand-built descriptor mixing RW and RDONLY flat extents (one with an offset into its
/// file) and a ZERO extent: each range reads from its own place, and the disk is read-only
/// because one extent is.
#[test]
fn rdonly_flat_and_zero_extents_read_in_descriptor_order() {
    let dir = TempDir::new();
    let mut first = vec![1u8; 4096];
    first[1024..].fill(2);
    std::fs::write(dir.path().join("a.raw"), &first).unwrap();
    std::fs::write(dir.path().join("b.raw"), vec![3u8; 2048]).unwrap();
    let path = dir.path().join("mixed.vmdk");
    std::fs::write(
        &path,
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
         createType=\"monolithicFlat\"\n\
         RW 2 FLAT \"a.raw\" 0\n\
         RDONLY 4 FLAT \"a.raw\" 2\n\
         RDONLY 3 ZERO\n\
         RW 4 FLAT \"b.raw\" 0\n\
         ddb.adapterType = \"lsilogic\"\n",
    )
    .unwrap();
    let img = try_open(&path, false).unwrap();
    assert_eq!(img.size(), 13 * 512);
    let mut all = vec![0xeeu8; 13 * 512];
    img.read_at(&mut all, 0).unwrap();
    let mut expected = vec![1u8; 1024];
    expected.extend_from_slice(&first[1024..3072]);
    expected.extend_from_slice(&[0u8; 1536]);
    expected.extend_from_slice(&[3u8; 2048]);
    assert!(all == expected, "extents read in descriptor order");
    let reason = img
        .read_only_reason()
        .expect("an RDONLY extent makes the disk read-only");
    assert!(reason.contains("RDONLY"), "{reason}");
    assert!(img.write_at(&[9u8; 10], 0).is_err());
    // An empty range inside an extent has no extents (found by fuzzing: it had one of
    // length 0, which made lseek's caller see a hole of no size).
    for offset in [0, 1536, 5000, 13 * 512] {
        assert_eq!(img.block_status(offset, 0).unwrap(), [], "at {offset}");
    }
    drop(img);
    // Extents sharing bytes of a file are refused writes (found by fuzzing: a write through
    // one changed what the other read). Neighbours in one file are fine.
    let aliased = dir.path().join("aliased.vmdk");
    for (extents, shared) in [
        ("RW 4 FLAT \"a.raw\" 0\nRW 4 FLAT \"a.raw\" 3\n", true),
        (
            "RW 8 FLAT \"a.raw\" 0\nRW 2 FLAT \"b.raw\" 0\nRW 1 FLAT \"a.raw\" 7\n",
            true,
        ),
        (
            "RW 4 FLAT \"a.raw\" 4\nRW 4 FLAT \"a.raw\" 0\nRW 4 FLAT \"b.raw\" 0\n",
            false,
        ),
    ] {
        std::fs::write(
            &aliased,
            format!(
                "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
                 createType=\"monolithicFlat\"\n{extents}"
            ),
        )
        .unwrap();
        let img = try_open(&aliased, false).unwrap();
        let reason = img.read_only_reason().unwrap_or_default();
        assert_eq!(
            reason.contains("share bytes of"),
            shared,
            "{extents}: {reason}"
        );
    }
}

#[test]
fn split_extents_without_a_descriptor_are_not_disks() {
    let dir = TempDir::new();
    let path = dir.path().join("t.vmdk");
    if create(&path, "subformat=twoGbMaxExtentSparse", "1M").is_none() {
        return;
    }
    let extent = dir.path().join("t-s001.vmdk");
    let file = HostFile::open(&extent, false).unwrap();
    assert!(crate::format::vmdk::is_bare_extent(&file).unwrap());
    let e = try_open(&extent, true).err().unwrap();
    assert!(e.to_string().contains("no descriptor of its own"), "{e}");
    let top = HostFile::open(&path, false).unwrap();
    assert!(!crate::format::vmdk::is_bare_extent(&top).unwrap());
    let mono = dir.path().join("m.vmdk");
    create(&mono, "", "1M").unwrap();
    assert!(!crate::format::vmdk::is_bare_extent(&HostFile::open(&mono, false).unwrap()).unwrap());
}

/// Opens a monolithic sparse file directly (no locks, no links).
fn open_direct(path: &Path, writable: bool) -> Option<VmdkImage> {
    let file = Arc::new(HostFile::open(path, writable).ok()?);
    let top = VmdkTop::read(&file).ok()?;
    VmdkImage::open(file, top, Vec::new(), None, None).ok()
}

#[test]
fn mutated_sparse_disks_never_panic() {
    let Some((dir, _path, base)) = small_sparse() else {
        return;
    };
    let path = dir.path().join("m.vmdk");
    const INTERESTING: [u64; 8] = [0, 1, 2, 0x7f, 0x80, 0xffff_ffff, u64::MAX, 1 << 33];
    let mutate = |bytes: &mut Vec<u8>, rng: &mut Rng| {
        for _ in 0..1 + rng.below(4) {
            // Mostly the metadata before the first grain, sometimes anywhere.
            let span = if rng.below(4) == 0 {
                bytes.len()
            } else {
                GRAIN
            };
            let at = (rng.below(span as u64 - 8) as usize) & !3;
            let value = INTERESTING[rng.below(INTERESTING.len() as u64) as usize];
            match rng.below(3) {
                0 => bytes[at..at + 8].copy_from_slice(&value.to_le_bytes()),
                1 => bytes[at..at + 4].copy_from_slice(&(value as u32).to_le_bytes()),
                _ => bytes[at] = rng.next() as u8,
            }
        }
    };
    // "Usable" is: opened, and the whole disk read.
    assert_mutations_never_panic(&base, &path, 1500, mutate, |path| {
        let Some(img) = open_direct(path, false) else {
            return false;
        };
        exercise_image(&img, false);
        let mut all = vec![0u8; img.size().min(1 << 24) as usize];
        let usable = img.read_at(&mut all, 0).is_ok();
        drop(img);
        if let Some(img) = open_direct(path, true) {
            exercise_image(&img, true);
        }
        usable
    });
}

/// Grain directories whose copies would take more than the per-image table budget are
/// refused before they are read, however long the (sparse) file is.
#[test]
fn grain_directories_beyond_the_memory_budget_are_refused() {
    use crate::format::vmdk::header::{testing::header_bytes, SparseHeader};
    use crate::format::vmdk::sparse::SparseExtent;
    let dir = TempDir::new();
    let path = dir.path().join("big.vmdk");
    // 16M directory entries of 8-sector grains and 512-entry tables, both copies in the file.
    let entries: u64 = 16 << 20;
    let capacity = entries * 8 * 512;
    let gd_sectors = entries * 4 / SECTOR as u64;
    let raw = header_bytes(1, 3, capacity, 8, 512, 1, 1 + gd_sectors);
    std::fs::write(&path, &raw).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len((1 + 2 * gd_sectors) * SECTOR as u64).unwrap();
    let header = SparseHeader::parse(&raw).unwrap();
    let file = Arc::new(HostFile::open(&path, false).unwrap());
    header.check(file.len().unwrap()).unwrap();
    let mut budget = crate::meta::budget::TableBudget::default();
    let e = SparseExtent::open(file, header, capacity, &mut budget)
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .contains("VMDK grain directory would take 320 MiB"),
        "{e}"
    );
}

/// The grain directories of all extents of a disk share one budget: two extents that each fit
/// are refused together, before the second directory is read.
#[test]
fn grain_directories_of_all_extents_share_the_memory_budget() {
    use crate::format::vmdk::header::testing::header_bytes;
    let dir = TempDir::new();
    let extent = |name: &str, entries: u64| -> u64 {
        let capacity = entries * 8 * 512;
        let gd_sectors = entries * 4 / SECTOR as u64;
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            header_bytes(1, 3, capacity, 8, 512, 1, 1 + gd_sectors),
        )
        .unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len((1 + 2 * gd_sectors) * SECTOR as u64).unwrap();
        capacity
    };
    // 20 bytes per entry (two decoded copies and the raw one): 20 MiB, then 250 MiB.
    let small = extent("s.vmdk", 1 << 20);
    let large = extent("l.vmdk", 12_500 << 10);
    let path = dir.path().join("two.vmdk");
    std::fs::write(
        &path,
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
             createType=\"twoGbMaxExtentSparse\"\nRW {small} SPARSE \"s.vmdk\"\n\
             RW {large} SPARSE \"l.vmdk\"\n"
        ),
    )
    .unwrap();
    let e = try_open(&path, true).err().unwrap();
    assert!(
        e.to_string()
            .contains("and the image's other tables 20 MiB"),
        "{e}"
    );
}

/// Found by fuzzing: an embedded descriptor whose room (descriptorSize) reached over the grain
/// directories. Each write session renewed the CID by writing the whole room, text padded with
/// zeros, which wiped the directories: what the session before had written read as zeros once
/// reopened. Such a header is refused now, and the CID is renewed by writing the text alone.
#[test]
fn a_descriptor_room_over_a_directory_is_refused_and_the_cid_rewrites_only_the_text() {
    let Some((_dir, path, bytes)) = small_sparse() else {
        return;
    };
    // qemu-img's layout: descriptor in sectors 1..21, redundant directory at 21, primary at 26.
    assert_eq!((le_u64(&bytes, 28), le_u64(&bytes, 36)), (1, 20));
    assert_eq!((le_u64(&bytes, 48), le_u64(&bytes, 56)), (21, 26));
    let mut over = bytes.clone();
    over[36..44].copy_from_slice(&21u64.to_le_bytes());
    let e = error_after(&path, &over);
    assert!(
        e.contains("embedded descriptor (sectors 1..22) overlaps the redundant grain directory"),
        "{e}"
    );

    // Bytes after the text's NUL in the room are not the descriptor's: a CID renewal keeps them.
    let mut junk = bytes.clone();
    let room = &mut junk[SECTOR..21 * SECTOR];
    let text_end = room.iter().position(|&b| b == 0).unwrap();
    room[text_end + 1..].fill(0xee);
    std::fs::write(&path, &junk).unwrap();
    let writes: [(u64, u8); 2] = [(0, 0x33), (900 << 10, 0x55)];
    for (at, fill) in writes {
        let img = try_open(&path, false).unwrap();
        img.write_at(&[fill; 4096], at).unwrap();
        img.flush().unwrap();
    }
    let after = std::fs::read(&path).unwrap();
    assert_ne!(after[..21 * SECTOR], junk[..21 * SECTOR], "the CID changed");
    // qemu-img writes the CID without leading zeros, imgfs with all 8 digits: the text may
    // grow by a few bytes, never more.
    let new_end = after[SECTOR..21 * SECTOR]
        .iter()
        .position(|&b| b == 0)
        .unwrap();
    assert!((text_end..=text_end + 7).contains(&new_end), "{new_end}");
    assert!(after[SECTOR + new_end + 1..21 * SECTOR]
        .iter()
        .all(|&b| b == 0xee));
    let img = try_open(&path, true).unwrap();
    for (at, fill) in writes {
        let mut back = vec![0u8; 4096];
        img.read_at(&mut back, at).unwrap();
        assert!(back.iter().all(|&b| b == fill), "the write at {at}");
    }
}

/// Found by fuzzing: in a descriptor file with a NUL after its text, the first write's longer
/// CID went over the NUL, and the lines after it became part of the descriptor: the disk had
/// grown by the next open.
#[test]
fn a_new_cid_keeps_the_nul_that_ends_a_descriptor_file() {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("inside.raw"), vec![7u8; 4096]).unwrap();
    let path = dir.path().join("d.vmdk");
    let text = b"# Disk DescriptorFile\nversion=1\nCID=fe\nparentCID=ffffffff\n\
                 createType=\"monolithicFlat\"\nRW 8 FLAT \"inside.raw\" 0\n\0\0\
                 RW 8 FLAT \"inside.raw\" 0\n";
    std::fs::write(&path, text).unwrap();
    let img = try_open(&path, false).unwrap();
    assert_eq!(img.size(), 4096);
    img.write_at(&[1u8; 512], 0).unwrap();
    img.flush().unwrap();
    drop(img);
    let img = try_open(&path, true).unwrap();
    assert_eq!(img.size(), 4096);
    let info = img.info();
    let cid = info.details.iter().find(|(k, _)| *k == "CID").unwrap();
    assert_ne!(cid.1, "000000fe");
    let bytes = std::fs::read(&path).unwrap();
    let end = bytes.iter().position(|&b| b == 0).unwrap();
    assert!(std::str::from_utf8(&bytes[..end])
        .unwrap()
        .contains(&format!("CID={}", cid.1)));
}
