//! Growing a qcow2 image (resize.rs): inside the L1 table's clusters, by moving the table to a
//! larger run of clusters, and refusing what cannot be done; every host fault during either
//! leaves the old or the new image.

use super::*;
use crate::testutil::assert_qemu_check_clean;
use crate::testutil::discard::qemu_create;
use crate::testutil::resize::{Oracle, ResizeWalk};

fn open_rw(path: &Path) -> Result<Qcow2Image> {
    let file = HostFile::open(path, true)?;
    let header = Qcow2Header::read(&file)?;
    Qcow2Image::open(file, header, None, None, None)
}

#[test]
fn resize_grows_inside_the_l1_table_and_refuses_shrinking() {
    let dir = TempDir::new();
    let path = dir.path().join("r.qcow2");
    if qemu_create("qcow2", "", &path, 16 * MIB).is_none() {
        return;
    }
    qemu_io(&path, &["write -P 0x44 15M 1M"]).unwrap();
    let img = open_rw(&path).unwrap();
    assert_eq!(
        img.resize(8 * MIB).unwrap_err().kind(),
        ErrorKind::Unsupported,
        "shrinking"
    );
    assert_eq!(
        img.resize(MIB * 20 + 1).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    img.resize(3 << 30).unwrap();
    assert_eq!(img.size(), 3 << 30);
    let mut buf = vec![0u8; 2 * MIB as usize];
    img.read_at(&mut buf, 15 * MIB).unwrap();
    assert!(buf[..MIB as usize].iter().all(|&b| b == 0x44));
    assert!(buf[MIB as usize..].iter().all(|&b| b == 0));
    img.write_at(&[0x55; 4096], (3 << 30) - 4096).unwrap();
    img.flush().unwrap();
    drop(img);
    let img = open_rw(&path).unwrap();
    assert_eq!(img.size(), 3 << 30);
    drop(img);
    assert_qemu_check_clean("qcow2", &path);
    qemu_io(
        &path,
        &[
            "read -P 0x55 3145724k 4k",
            "read -P 0 16M 1M",
            "read -P 0x44 15M 1M",
        ],
    )
    .unwrap();
}

/// Every host fault while a qcow2 image made with `options`, `size` bytes and written with
/// `fill`, grows to `new_size`.
fn fault_walk(options: &str, size: u64, fill: &str, new_size: u64) {
    let dir = TempDir::in_memory();
    let path = dir.path().join("f.qcow2");
    if qemu_create("qcow2", options, &path, size).is_none() {
        return;
    }
    qemu_io(&path, &[fill]).unwrap();
    let open = |p: &Path| -> std::sync::Arc<dyn Image> { std::sync::Arc::new(open_rw(p).unwrap()) };
    ResizeWalk {
        format: "qcow2",
        path,
        parents: Vec::new(),
        open: &open,
        new_size,
        oracle: Oracle::Check,
    }
    .all();
}

#[test]
fn every_host_fault_during_a_resize_leaves_the_old_or_the_new_image() {
    // 4 KiB clusters: an L2 table covers 2 MiB, so growing from 16 to 64 MiB takes 24 new L1
    // entries in the table's cluster.
    fault_walk(
        "cluster_size=4096",
        16 * MIB,
        "write -P 0x44 15M 1M",
        64 * MIB,
    );
}

/// 512-byte clusters: one L1 cluster maps 2 MiB, so growing a 1 MiB image to 64 MiB moves the
/// table to a run of 32 clusters; the old one is freed by the next flush.
#[test]
fn resize_moves_an_l1_table_that_is_too_small() {
    let dir = TempDir::new();
    let path = dir.path().join("m.qcow2");
    if qemu_create("qcow2", "cluster_size=512", &path, MIB).is_none() {
        return;
    }
    qemu_io(&path, &["write -P 0x44 0 1M"]).unwrap();
    let img = open_rw(&path).unwrap();
    let old_l1 = img.header().l1_table_offset;
    img.resize(2 * MIB).unwrap();
    assert_eq!(img.l1_offset(), old_l1, "2 MiB fits in the table's cluster");
    // A hole inside the file: the moved table goes past the end, the hole stays for data.
    img.discard(0, 64 * KIB).unwrap();
    img.flush().unwrap();
    let file_len = std::fs::metadata(&path).unwrap().len();
    img.resize(64 * MIB).unwrap();
    assert!(img.l1_offset() >= file_len, "the table went past the end");
    assert_eq!(img.size(), 64 * MIB);
    let new_l1 = img.l1_offset();
    assert_ne!(new_l1, old_l1, "the table moved");
    assert_eq!(img.refcount(new_l1).unwrap(), 1);
    let mut buf = vec![0u8; 2 * MIB as usize];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf[..64 * KIB as usize].iter().all(|&b| b == 0));
    assert!(buf[64 * KIB as usize..MIB as usize]
        .iter()
        .all(|&b| b == 0x44));
    assert!(buf[MIB as usize..].iter().all(|&b| b == 0));
    // New L2 tables past the old end, entered in the moved table.
    img.write_at(&[0x55; 4096], 64 * MIB - 4096).unwrap();
    img.write_at(&[0x66; 1000], 40 * MIB + 300).unwrap();
    img.flush().unwrap();
    assert_eq!(img.refcount(old_l1).unwrap(), 0, "the old table is freed");
    drop(img);
    let img = open_rw(&path).unwrap();
    assert_eq!(img.size(), 64 * MIB);
    assert_eq!(img.header().l1_table_offset, new_l1);
    assert_eq!(img.header().l1_size, 2048);
    // Once more from the reopened image: a second move.
    img.resize(200 * MIB).unwrap();
    assert_ne!(img.l1_offset(), new_l1);
    img.write_at(&[0x77; 512], 200 * MIB - 512).unwrap();
    img.flush().unwrap();
    drop(img);
    assert_qemu_check_clean("qcow2", &path);
    qemu_io(
        &path,
        &[
            "read -P 0 0 64k",
            "read -P 0x44 64k 960k",
            "read -P 0 1M 39M",
            "read -P 0x66 41943340 1000",
            "read -P 0x55 65532k 4k",
            "read -P 0x77 209714688 512",
        ],
    )
    .unwrap();
}

#[test]
fn resize_refuses_an_l1_table_it_cannot_place() {
    let dir = TempDir::new();
    let path = dir.path().join("big.qcow2");
    if qemu_create("qcow2", "cluster_size=512", &path, MIB).is_none() {
        return;
    }
    let img = open_rw(&path).unwrap();
    // 2 GiB: 65,536 entries in 1,024 clusters, past the 256 one refcount block covers.
    let e = img.resize(2 << 30).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("refcount blocks"), "{e}");
    // 1 TiB: a 256 MiB table, past QEMU's 32 MiB limit.
    let e = img.resize(1 << 40).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfRange, "{e}");
    assert_eq!(img.size(), MIB);
    img.write_at(&[1; 512], 0).unwrap();
    img.flush().unwrap();
    drop(img);
    assert_qemu_check_clean("qcow2", &path);
}

#[test]
fn every_host_fault_while_the_l1_table_moves_leaves_the_old_or_the_new_image() {
    // 512-byte clusters: growing from 1 to 8 MiB moves the table to a run of 4 clusters.
    fault_walk("cluster_size=512", MIB, "write -P 0x44 512k 512k", 8 * MIB);
}
