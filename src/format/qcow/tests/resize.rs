//! Growing QCOW v1 images (resize.rs): inside the room before the first L2 table, with and
//! without a backing file, refused past it, over a cluster placed in that room, and on a
//! read-only image; and a fault walk over every host write and sync of a resize.

use super::*;
use crate::testutil::resize::{qemu_virtual_size, Oracle, ResizeWalk};

/// A 16 MiB image qemu-img created, with 1 MiB of 0x61 at 15 MiB written by qemu-io: its L1
/// table (8 entries at 48) has room up to the first L2 table at 4 KiB, 506 entries.
fn filled(dir: &TempDir, name: &str) -> Option<PathBuf> {
    let path = dir.path().join(name);
    qemu_create(&path, "16M", None)?;
    qemu_io(&path, &["write -P 0x61 15M 1M"])?;
    Some(path)
}

#[test]
fn resize_grows_where_the_l1_table_has_room() {
    let dir = TempDir::new();
    let Some(path) = filled(&dir, "r.qcow") else {
        return;
    };
    let img = open_rw(&path, None);
    for (size, kind) in [
        (8 * MIB, ErrorKind::Unsupported),
        (20 * MIB + 1, ErrorKind::OutOfRange),
        (1 << 30, ErrorKind::Unsupported),
    ] {
        assert_eq!(img.resize(size).unwrap_err().kind(), kind, "{size}");
        assert_eq!(img.size(), 16 * MIB);
    }
    let e = img.resize(1 << 30).unwrap_err();
    assert!(e.to_string().contains("512 entries"), "{e}");
    img.resize(16 * MIB).unwrap();
    img.resize(1000 * MIB).unwrap();
    assert_eq!(img.size(), 1000 * MIB);
    let mut buf = vec![0u8; 2 * MIB as usize];
    img.read_at(&mut buf, 15 * MIB).unwrap();
    assert!(buf[..MIB as usize].iter().all(|&b| b == 0x61));
    assert!(buf[MIB as usize..].iter().all(|&b| b == 0));
    img.write_at(&[0x62; 4096], 1000 * MIB - 4096).unwrap();
    img.flush().unwrap();
    drop(img);
    let img = open_rw(&path, None);
    assert_eq!(img.size(), 1000 * MIB);
    assert_eq!(img.read_tables().l1().len(), 500);
    drop(img);
    assert_eq!(qemu_virtual_size("qcow", &path), 1000 * MIB);
    qemu_io(
        &path,
        &[
            "read -P 0x61 15M 1M",
            "read -P 0x62 1023996k 4k",
            "read -P 0 16M 1M",
            "read -P 0 999M 1020k",
            "write -P 0x63 500M 64k",
            "read -P 0x63 500M 64k",
        ],
    )
    .unwrap();
    let ours = open_rw(&path, None);
    let mut buf = vec![0u8; 65536];
    ours.read_at(&mut buf, 500 * MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0x63), "QEMU's new cluster");
}

/// An empty image's file ends with its padded L1 table (560 bytes): the grown table reaches
/// past it, and QEMU's next table goes after it.
#[test]
fn resize_of_an_empty_image_grows_the_file_with_the_table() {
    let dir = TempDir::new();
    let path = dir.path().join("e.qcow");
    if qemu_create(&path, "16M", None).is_none() {
        return;
    }
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 560);
    let img = open_rw(&path, None);
    img.resize(1012 * MIB).unwrap();
    drop(img);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 48 + 506 * 8);
    assert_eq!(qemu_virtual_size("qcow", &path), 1012 * MIB);
    qemu_io(&path, &["write -P 0x71 1000M 1M", "read -P 0 0 16M"]).unwrap();
    let img = open_rw(&path, None);
    img.write_at(&[0x72; 8192], 3 * MIB).unwrap();
    img.flush().unwrap();
    drop(img);
    qemu_io(
        &path,
        &[
            "read -P 0x71 1000M 1M",
            "read -P 0x72 3M 8k",
            "read -P 0 4M 996M",
        ],
    )
    .unwrap();
}

/// With a backing file (512-byte clusters, 2 MiB per L1 entry, the first table at 1 KiB):
/// room for 121 entries; the part past the backing file's end reads as zeros.
#[test]
fn resize_over_a_backing_file_reads_zeros_past_its_end() {
    let dir = TempDir::new();
    let base = dir.path().join("base.raw");
    let mut bytes = vec![0u8; 16 * MIB as usize];
    bytes[15 * MIB as usize..].fill(0x44);
    std::fs::write(&base, &bytes).unwrap();
    let path = dir.path().join("c.qcow");
    if qemu_create(&path, "16M", Some(("base.raw", "raw"))).is_none() {
        return;
    }
    let img = open_rw(&path, Some(raw_backing(&base)));
    assert_eq!(
        img.resize(244 * MIB).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    img.resize(242 * MIB).unwrap();
    // A partial cluster past the backing file's end is filled up with zeros.
    img.write_at(&[0x45; 100], 100 * MIB + 10).unwrap();
    img.flush().unwrap();
    let mut buf = vec![0u8; 2 * MIB as usize];
    img.read_at(&mut buf, 15 * MIB).unwrap();
    assert!(buf[..MIB as usize].iter().all(|&b| b == 0x44));
    assert!(buf[MIB as usize..].iter().all(|&b| b == 0));
    drop(img);
    assert_eq!(qemu_virtual_size("qcow", &path), 242 * MIB);
    qemu_io(
        &path,
        &[
            "read -P 0x44 15M 1M",
            "read -P 0 16M 84M",
            "read -P 0 100M 10",
            "read -P 0x45 104857610 100",
            "read -P 0 104857710 402",
        ],
    )
    .unwrap();
}

/// A cluster placed in the room after the L1 table (no tool does this, a hostile image may)
/// stops the table from growing over it.
#[test]
fn resize_refuses_to_grow_the_table_over_a_cluster() {
    let dir = TempDir::new();
    let Some(path) = filled(&dir, "h.qcow") else {
        return;
    };
    // Guest 15 MiB is L1 entry 7, L2 entry 256 of the table at 4 KiB: point it at 512.
    let mut bytes = std::fs::read(&path).unwrap();
    let at = 4096 + 256 * 8;
    bytes[at..at + 8].copy_from_slice(&512u64.to_be_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let img = open_rw(&path, None);
    let e = img.resize(200 * MIB).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("overlaps the L1 table"), "{e}");
    img.resize(100 * MIB).unwrap();
    assert_eq!(img.size(), 100 * MIB);
}

#[test]
fn resize_of_a_read_only_image_is_refused() {
    let dir = TempDir::new();
    let Some(path) = filled(&dir, "ro.qcow") else {
        return;
    };
    let file = HostFile::open(&path, false).unwrap();
    let header = QcowHeader::read(&file).unwrap();
    let img = QcowImage::open(file, header, None, None).unwrap();
    assert_eq!(
        img.resize(32 * MIB).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
}

#[test]
fn every_host_fault_during_a_resize_leaves_the_old_or_the_new_image() {
    let dir = TempDir::in_memory();
    let Some(path) = filled(&dir, "f.qcow") else {
        return;
    };
    let open = |p: &Path| -> Arc<dyn Image> { Arc::new(open_rw(p, None)) };
    ResizeWalk {
        format: "qcow",
        path,
        parents: Vec::new(),
        open: &open,
        new_size: 100 * MIB,
        oracle: Oracle::Check,
    }
    .all();
}
