//! Corrupt and hostile images: bad checksums, overlapping regions, BAT entries and logs
//! pointing outside their place, bad metadata values, and a mutation loop that must never
//! panic.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::super::header::{
    parse_region_table, seal, testing::region_table, BAT_REGION, METADATA_REGION, MIB,
    REGION_TABLE_LEN, REGION_TABLE_SLOTS,
};
use super::super::metadata;
use super::*;
use crate::testutil::TempDir;

fn write_at(path: &Path, bytes: &[u8], at: u64) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, at).unwrap();
}

/// A qemu-made dynamic 6 MiB image with 1 MiB blocks and data in blocks 0 and 3.
fn base(dir: &TempDir) -> Option<PathBuf> {
    let path = create(dir, "h.vhdx", "block_size=1M", 6 * MIB)?;
    qemu_io(
        &path,
        &[
            "write -P 0x5a 0 1M".into(),
            "write -P 0x6b 3145828 1000".into(),
        ],
    );
    Some(path)
}

fn regions_of(path: &Path) -> Vec<super::super::header::RegionEntry> {
    let bytes = std::fs::read(path).unwrap();
    parse_region_table(&bytes[192 * 1024..256 * 1024]).unwrap()
}

fn region_offset(path: &Path, guid: Uuid) -> u64 {
    regions_of(path)
        .iter()
        .find(|r| r.guid == guid)
        .unwrap()
        .offset
}

/// The file offset of metadata item `item`.
fn item_offset(path: &Path, item: Uuid) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let meta = region_offset(path, METADATA_REGION);
    let table = &bytes[meta as usize..meta as usize + metadata::TABLE_LEN];
    let entries = metadata::parse_table(table, MIB).unwrap();
    meta + u64::from(entries.iter().find(|e| e.item == item).unwrap().offset)
}

fn assert_refused(path: &Path, kind: ErrorKind, needle: &str) {
    let e = try_open(path).err().expect("the image must be refused");
    assert_eq!(e.kind(), kind, "{e}");
    let text = e.to_string();
    assert!(text.contains(needle), "{text} should mention {needle}");
    assert!(text.contains("h.vhdx"), "{text} should name the file");
}

#[test]
fn a_bad_header_falls_back_to_the_other_and_two_are_refused() {
    let dir = TempDir::new();
    let Some(path) = base(&dir) else {
        return;
    };
    let (good, slot) = current(&path);
    let other = header_in(&path, 1 - slot).unwrap();
    write_at(&path, &[0xff], HEADER_SLOTS[slot] + 200);
    let img = open_ro(&path);
    assert_eq!(detail(&img, "header_sequence"), other.sequence.to_string());
    assert_ne!(other.sequence, good.sequence);
    assert!(read_all(&img)[..MIB as usize].iter().all(|&b| b == 0x5a));
    write_at(&path, b"HEAD", HEADER_SLOTS[1 - slot]);
    assert_refused(&path, ErrorKind::Corrupt, "neither VHDX header is valid");
}

#[test]
fn corrupt_structures_are_refused_with_the_field() {
    let dir = TempDir::new();
    let Some(path) = base(&dir) else {
        return;
    };
    let pristine = std::fs::read(&path).unwrap();
    let restore = || std::fs::write(&path, &pristine).unwrap();
    let bat = region_offset(&path, BAT_REGION);

    // Region tables: one bad copy is survivable, two are not; overlaps are refused.
    write_at(&path, &[1], REGION_TABLE_SLOTS[0] + 40);
    assert!(try_open(&path).is_ok(), "the second copy is used");
    write_at(&path, &[1], REGION_TABLE_SLOTS[1] + 40);
    assert_refused(
        &path,
        ErrorKind::Corrupt,
        "neither VHDX region table is valid",
    );
    restore();
    let mut entries = regions_of(&path);
    for e in entries.iter_mut().filter(|e| e.guid == METADATA_REGION) {
        e.offset = bat;
    }
    for at in REGION_TABLE_SLOTS {
        write_at(&path, &region_table(&entries), at);
    }
    assert_refused(&path, ErrorKind::Corrupt, "overlaps the BAT region");
    restore();

    // A BAT entry beyond the end of the file, and one over the metadata region.
    write_at(&path, &((100 * MIB) | 6).to_le_bytes(), bat + 8);
    assert_refused(
        &path,
        ErrorKind::Corrupt,
        "payload block 1 points at file offset 0x6400000, beyond the end",
    );
    write_at(
        &path,
        &(region_offset(&path, METADATA_REGION) | 6).to_le_bytes(),
        bat + 8,
    );
    assert_refused(&path, ErrorKind::Corrupt, "overlaps the metadata region");
    restore();

    // Metadata values.
    let params = item_offset(&path, metadata::FILE_PARAMETERS);
    for (value, needle) in [
        (3 * MIB as u32, "block size 3145728"),
        (512 << 20, "block size 536870912"),
    ] {
        write_at(&path, &value.to_le_bytes(), params);
        assert_refused(&path, ErrorKind::Corrupt, needle);
    }
    restore();
    write_at(
        &path,
        &1024u32.to_le_bytes(),
        item_offset(&path, metadata::LOGICAL_SECTOR_SIZE),
    );
    assert_refused(
        &path,
        ErrorKind::Corrupt,
        "logical sector size 1024 is neither 512 nor 4096",
    );
    restore();

    write_at(&path, b"vhdxfilX", 0);
    assert_refused(&path, ErrorKind::Corrupt, "no \"vhdxfile\" signature");
    std::fs::write(&path, &pristine[..MIB as usize - 1]).unwrap();
    assert_refused(
        &path,
        ErrorKind::Corrupt,
        "shorter than the 1 MiB VHDX header section",
    );
}

#[test]
fn blocks_sharing_file_space_serve_read_only() {
    let dir = TempDir::new();
    let Some(path) = base(&dir) else {
        return;
    };
    let bat = region_offset(&path, BAT_REGION);
    let mut entry = [0u8; 8];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut entry, bat)
        .unwrap();
    write_at(&path, &entry, bat + 5 * 8);
    let img = open_rw(&path);
    let reason = img.read_only_reason().unwrap();
    assert!(
        reason.contains("BAT entries 0 and 5 share file space"),
        "{reason}"
    );
    assert_eq!(
        img.write_at(&[1], 0).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    let all = read_all(&img);
    assert_eq!(all[..MIB as usize], all[5 * MIB as usize..]);
}

/// Re-seals the CRCs of both headers and both region tables, so mutations reach the parsers
/// behind them.
fn reseal(bytes: &mut [u8]) {
    for at in HEADER_SLOTS {
        seal(&mut bytes[at as usize..at as usize + HEADER_LEN], 4).unwrap();
    }
    for at in REGION_TABLE_SLOTS {
        seal(&mut bytes[at as usize..at as usize + REGION_TABLE_LEN], 4).unwrap();
    }
}

/// Hostile images: deterministic mutations of valid images (one with a clean log, one with a
/// dirty log) in the headers, region tables, log, BAT and metadata, sometimes with the
/// checksums fixed up. Opening must give an image or a clean error, and an image that opens
/// must serve reads, block status, writes and flushes without a panic.
#[test]
fn mutated_images_never_panic() {
    const INTERESTING: [u64; 12] = [
        0,
        1,
        6,
        7,
        512,
        4096,
        MIB,
        MIB | 6,
        0x7fff_ffff,
        0xffff_ffff,
        u64::MAX,
        1 << 46,
    ];
    let dir = TempDir::new();
    let Some(clean) = base(&dir) else {
        return;
    };
    let clean_bytes = std::fs::read(&clean).unwrap();
    // The dirty variant: a flush that stopped after its log entry.
    let dirty = dir.path().join("dirty.vhdx");
    std::fs::copy(&clean, &dirty).unwrap();
    let img = open_rw(&dirty);
    img.write_at(&[0x42; 5000], 2 * MIB - 100).unwrap();
    img.crash_after_log_entry
        .store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(img.flush().is_err());
    drop(img);
    let dirty_bytes = std::fs::read(&dirty).unwrap();
    let (log, bat, meta) = (MIB as usize, 2 * MIB as usize, 3 * MIB as usize);
    assert_eq!(
        region_offset(&clean, BAT_REGION),
        bat as u64,
        "qemu-img's layout"
    );
    // Where mutations land: (start, length) of the interesting bytes.
    let areas = [
        (HEADER_SLOTS[0] as usize, 80),
        (HEADER_SLOTS[1] as usize, 80),
        (REGION_TABLE_SLOTS[0] as usize, 96),
        (REGION_TABLE_SLOTS[1] as usize, 96),
        (log, 2 * 4096),
        (bat, 64),
        (meta, 256),
        (meta + metadata::TABLE_LEN, 64),
        (0, 4 * MIB as usize),
    ];

    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let path = dir.path().join("m.vhdx");
    let (mut opened, mut refused) = (0, 0);
    for round in 0..1000 {
        let base = if next() % 2 == 0 {
            &clean_bytes
        } else {
            &dirty_bytes
        };
        let mut bytes = base.clone();
        for _ in 0..1 + next() % 4 {
            let (start, len) = areas[next() as usize % areas.len()];
            let at = (start + next() as usize % len) & !7;
            if next() % 2 == 0 {
                let value = INTERESTING[next() as usize % INTERESTING.len()];
                let width = [1, 2, 4, 8][next() as usize % 4];
                bytes[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
            } else {
                bytes[at] = next() as u8;
            }
        }
        if next() % 2 == 0 {
            reseal(&mut bytes);
        }
        if next() % 16 == 0 {
            bytes.truncate(next() as usize % bytes.len());
        }
        std::fs::write(&path, &bytes).unwrap();
        let writable = next() % 4 == 0;
        let outcome = std::panic::catch_unwind(|| {
            let file = HostFile::open(&path, true).unwrap();
            let reason = (!writable).then(|| "mutation test".to_string());
            let Ok(img) = VhdxImage::open(file, None, reason) else {
                return false;
            };
            let size = img.size();
            let mut buf = vec![0u8; 4 * MIB as usize];
            for offset in [0, size / 2, size.saturating_sub(buf.len() as u64)] {
                let len = buf.len().min((size - offset.min(size)) as usize);
                let _ = img.read_at(&mut buf[..len], offset);
            }
            let _ = img.block_status(0, size);
            let _ = img.info();
            if writable && size > 0 && img.info().cluster_size.unwrap_or(u64::MAX) <= 8 * MIB {
                let _ = img.write_at(&[0x5a; 700], (size - 1) / 2);
                let _ = img.write_at(&[0xa5; 1], size - 1);
                let _ = img.flush();
            }
            true
        });
        match outcome {
            Ok(true) => opened += 1,
            Ok(false) => refused += 1,
            Err(_) => panic!(
                "round {round} panicked; mutated image left at {}",
                path.display()
            ),
        }
    }
    assert!(
        opened > 100 && refused > 100,
        "opened {opened}, refused {refused}"
    );
}

/// A BAT that would take more than the per-image table budget (read whole, then decoded) is
/// refused before it is read: 17 TiB in 1 MiB blocks needs 136 MiB of BAT.
#[test]
fn bats_beyond_the_memory_budget_are_refused() {
    let dir = TempDir::new();
    let Some(path) = create(&dir, "big.vhdx", "block_size=1M", 17 << 40) else {
        return;
    };
    let e = try_open(&path).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("VHDX BAT would take"), "{e}");
}
