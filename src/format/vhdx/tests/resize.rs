//! Growing VHDX images (resize.rs): a dynamic image across a chunk boundary read back by QEMU,
//! stale BAT entries past the old end cleared through the log, a differencing image past its
//! parent keeping its sector bitmaps, 4 KiB logical sectors; refused past the BAT region, for
//! fixed and read-only images; a crash after the size's log entry replayed; and a fault walk
//! over every host write and sync of a resize.

use std::sync::atomic::Ordering;

use super::super::bat::{host_of, state, FULLY_PRESENT, SB_PRESENT};
use super::super::header::{BAT_REGION, MIB};
use super::differencing::{open_child, parent_and_child, parent_and_child_with, region};
use super::*;
use crate::testutil::resize::{qemu_virtual_size, Oracle, ResizeWalk};

const GIB: u64 = 1 << 30;

/// A 16 MiB dynamic image with 1 MiB blocks (1 MiB BAT region: 131072 entries, a sector
/// bitmap entry after every 4096), 1 MiB of 0x61 at 15 MiB.
fn filled(dir: &TempDir, name: &str) -> Option<PathBuf> {
    let path = create(dir, name, "block_size=1M", 16 * MIB)?;
    qemu_io(&path, &["write -P 0x61 15M 1M".into()]);
    Some(path)
}

/// BAT entry `index` of the image at `path`, read from the file.
fn bat_entry(path: &Path, index: u64) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let at = (region(path, BAT_REGION) + index * 8) as usize;
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// Fills BAT entries `range` of the image at `path` with entries no reader may use: blocks
/// far beyond the end of the file (QEMU and imgfs read no entry past the disk's end).
fn put_stale_entries(path: &Path, range: std::ops::Range<u64>) {
    let at = region(path, BAT_REGION) + range.start * 8;
    let junk: Vec<u8> = range
        .flat_map(|i| (((1000 + i) << 20) | FULLY_PRESENT).to_le_bytes())
        .collect();
    super::differencing::write_at(path, &junk, at);
}

#[test]
fn resize_grows_a_dynamic_image_through_the_log() {
    let dir = TempDir::new();
    let Some(path) = filled(&dir, "r.vhdx") else {
        return;
    };
    let img = open_rw(&path);
    let guid = img.data_write_guid();
    for (size, kind) in [
        (8 * MIB, ErrorKind::Unsupported),
        (20 * MIB + 1, ErrorKind::OutOfRange),
        (200 * GIB, ErrorKind::Unsupported),
        (65 << 40, ErrorKind::Unsupported),
    ] {
        assert_eq!(img.resize(size).unwrap_err().kind(), kind, "{size}");
        assert_eq!(img.size(), 16 * MIB);
    }
    let e = img.resize(200 * GIB).unwrap_err();
    assert!(e.to_string().contains("BAT region (1048576 bytes)"), "{e}");
    assert_eq!(img.data_write_guid(), guid, "refusals change nothing");
    // 5 GiB: 5120 blocks, past the sector bitmap entry after block 4095.
    img.resize(5 * GIB).unwrap();
    assert_eq!(img.size(), 5 * GIB);
    assert_ne!(
        img.data_write_guid(),
        guid,
        "the data write GUID is renewed"
    );
    assert!(!img.is_dirty());
    img.write_at(&[0x62; 4096], 5 * GIB - 4096).unwrap();
    img.write_at(&[0x63; 4096], 4 * GIB).unwrap();
    img.flush().unwrap();
    drop(img);
    assert!(current(&path).0.log_guid.is_nil(), "the log is clean");
    let img = open_rw(&path);
    assert_eq!(img.size(), 5 * GIB);
    let mut buf = vec![0u8; 2 * MIB as usize];
    img.read_at(&mut buf, 15 * MIB).unwrap();
    assert!(buf[..MIB as usize].iter().all(|&b| b == 0x61));
    assert!(buf[MIB as usize..].iter().all(|&b| b == 0));
    drop(img);
    assert_qemu_check_clean(&path);
    assert_eq!(qemu_virtual_size("vhdx", &path), 5 * GIB);
    qemu_io(
        &path,
        &[
            "read -P 0x61 15M 1M".into(),
            "read -P 0 16M 1M".into(),
            format!("read -P 0x62 {} 4k", 5 * GIB - 4096),
            format!("read -P 0x63 {} 4k", 4 * GIB),
            "write -P 0x64 3G 64k".into(),
        ],
    );
    let img = open_rw(&path);
    let mut buf = vec![0u8; 65536];
    img.read_at(&mut buf, 3 * GIB).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0x64),
        "QEMU's block past the old end"
    );
}

/// Entries past the old payload blocks are not read before a resize and may hold anything;
/// after it they are NOT_PRESENT on disk, written through the log.
#[test]
fn resize_clears_stale_bat_entries_past_the_old_end() {
    let dir = TempDir::new();
    let Some(path) = filled(&dir, "s.vhdx") else {
        return;
    };
    put_stale_entries(&path, 16..700);
    let img = open_rw(&path);
    img.resize(600 * MIB).unwrap();
    drop(img);
    for index in 16..600 {
        assert_eq!(bat_entry(&path, index), 0, "entry {index}");
    }
    assert_ne!(bat_entry(&path, 600), 0, "past the new end: left alone");
    assert_qemu_check_clean(&path);
    qemu_io(
        &path,
        &["read -P 0 16M 584M".into(), "read -P 0x61 15M 1M".into()],
    );
}

#[test]
fn resize_grows_a_differencing_image_past_its_parent() {
    let dir = TempDir::new();
    let Some((parent, child)) = parent_and_child(&dir) else {
        return;
    };
    let img = open_child(&parent, &child);
    img.write_at(&[0x81; 1000], 3 * MIB + 100).unwrap();
    img.flush().unwrap();
    let bitmap = bat_entry(&child, 4096);
    assert_eq!(state(bitmap), SB_PRESENT, "chunk 0 has a sector bitmap");
    // Past the first chunk (4096 blocks): the new chunk's bitmap entry is 8193.
    img.resize(5 * GIB).unwrap();
    img.write_at(&[0x82; 512], 5 * GIB - 512).unwrap();
    img.write_at(&[0x83; 100], 8 * MIB - 50).unwrap();
    img.flush().unwrap();
    drop(img);
    assert_eq!(bat_entry(&child, 4096), bitmap, "chunk 0 keeps its bitmap");
    assert_eq!(state(bat_entry(&child, 8193)), SB_PRESENT);
    assert_ne!(host_of(bat_entry(&child, 8193)), host_of(bitmap));
    let img = open_child(&parent, &child);
    assert_eq!(img.size(), 5 * GIB);
    let mut expected = super::differencing::parent_bytes();
    expected[3 * MIB as usize + 100..3 * MIB as usize + 1100].fill(0x81);
    expected.resize(16 * MIB as usize, 0);
    expected[8 * MIB as usize - 50..8 * MIB as usize + 50].fill(0x83);
    let mut buf = vec![0u8; 16 * MIB as usize];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf == expected);
    let mut end = vec![0u8; 4096];
    img.read_at(&mut end, 5 * GIB - 4096).unwrap();
    assert!(end[..3584].iter().all(|&b| b == 0) && end[3584..].iter().all(|&b| b == 0x82));
}

#[test]
fn resize_keeps_to_whole_4k_logical_sectors() {
    let dir = TempDir::new();
    let Some((parent, child)) = parent_and_child_with(&dir, None, 4096) else {
        return;
    };
    let img = open_child(&parent, &child);
    let e = img.resize(16 * MIB + 512).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfRange, "{e}");
    img.resize(16 * MIB + 4096).unwrap();
    img.write_at(&[0x91; 4096], 16 * MIB).unwrap();
    img.flush().unwrap();
    drop(img);
    let img = open_child(&parent, &child);
    assert_eq!(img.size(), 16 * MIB + 4096);
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 16 * MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0x91));
}

#[test]
fn resize_of_fixed_and_read_only_images_is_refused() {
    let dir = TempDir::new();
    let Some(fixed) = create(&dir, "f.vhdx", "subformat=fixed,block_size=1M", 16 * MIB) else {
        return;
    };
    let e = open_rw(&fixed).resize(32 * MIB).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("fixed"), "{e}");
    let path = filled(&dir, "ro.vhdx").unwrap();
    let before = std::fs::read(&path).unwrap();
    let e = open_ro(&path).resize(32 * MIB).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
    assert!(std::fs::read(&path).unwrap() == before);
}

/// A crash once the size's log entry is durable, before it is applied: the next open (ours
/// or QEMU's) replays it and finds the new size.
#[test]
fn a_resize_cut_after_its_log_entry_is_replayed_to_the_new_size() {
    let dir = TempDir::new();
    let Some(path) = filled(&dir, "c.vhdx") else {
        return;
    };
    let img = open_rw(&path);
    img.crash_after_log_entry.store(true, Ordering::Relaxed);
    assert!(img.resize(64 * MIB).is_err());
    drop(img);
    assert!(!current(&path).0.log_guid.is_nil(), "the log is dirty");
    let copy = dir.path().join("copy.vhdx");
    std::fs::copy(&path, &copy).unwrap();
    qemu_io(&copy, &["read -P 0x61 15M 1M".into()]);
    assert_eq!(qemu_virtual_size("vhdx", &copy), 64 * MIB, "QEMU's replay");
    let img = open_rw(&path);
    assert_eq!(img.size(), 64 * MIB, "our replay");
    drop(img);
    assert_qemu_check_clean(&path);
}

#[test]
fn every_host_fault_during_a_resize_leaves_the_old_or_the_new_image() {
    let dir = TempDir::in_memory();
    let Some(path) = filled(&dir, "w.vhdx") else {
        return;
    };
    // Stale entries past the old end: cleared in a log entry before the size's.
    put_stale_entries(&path, 16..100);
    let open = |p: &Path| -> Arc<dyn Image> {
        let img = open_rw(p);
        img.entry_sector_cap.store(1, Ordering::Relaxed);
        Arc::new(img)
    };
    ResizeWalk {
        format: "vhdx",
        path,
        parents: Vec::new(),
        open: &open,
        new_size: 64 * MIB,
        oracle: Oracle::Replay,
    }
    .all();
}

fn assert_qemu_check_clean(path: &Path) {
    crate::testutil::assert_qemu_check_clean("vhdx", path);
}
