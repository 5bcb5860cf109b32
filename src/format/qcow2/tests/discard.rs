//! Discard through `Qcow2Image`: whole clusters become unallocated (or zero over a backing
//! file), partial ones zeros; refcounts drop and the file's space is given back; snapshots
//! keep their data.

use super::*;
use crate::testutil::discard::{allocated, exercise_discard, qemu_create, DiscardCase};
use crate::testutil::{assert_qemu_check_clean, assert_qemu_compare_equal};

fn open_rw(path: &Path, backing: Option<Backing>) -> Result<Qcow2Image> {
    let file = HostFile::open(path, true)?;
    let header = Qcow2Header::read(&file)?;
    Qcow2Image::open(file, header, None, backing, None)
}

fn case(options: &str, unit: u64) {
    let dir = TempDir::new();
    let path = dir.path().join("d.qcow2");
    if qemu_create("qcow2", options, &path, 16 * unit.max(64 * KIB)).is_none() {
        return;
    }
    let case = DiscardCase {
        format: "qcow2",
        path: &path,
        unit,
        check: true,
        data_file: None,
    };
    exercise_discard(&case, &|p| Ok(std::sync::Arc::new(open_rw(p, None)?)));
}

#[test]
fn discard_v3() {
    case("compat=1.1", 64 * KIB);
}

#[test]
fn discard_v2() {
    case("compat=0.10", 64 * KIB);
}

#[test]
fn discard_extended_l2_and_small_clusters() {
    case("extended_l2=on,cluster_size=128k", 128 * KIB);
    case("cluster_size=4k", 4 * KIB);
}

/// Over a backing file, discarded clusters read as zeros, not as the backing file.
fn backed(compat: &str) {
    let dir = TempDir::new();
    let base = dir.path().join("base.raw");
    let path = dir.path().join("top.qcow2");
    let base_bytes: Vec<u8> = (0..4 * MIB).map(|i| (i / 4096 % 200 + 1) as u8).collect();
    std::fs::write(&base, &base_bytes).unwrap();
    let create = format!(
        "create -q -f qcow2 -o compat={compat} -b {} -F raw {} 4M",
        p(&base),
        p(&path)
    );
    if run("qemu-img", &create).is_none() {
        return;
    }
    let img = open_rw(&path, Some(mem_backing(&base_bytes, &base))).unwrap();
    let mut expected = base_bytes.clone();
    img.write_at(&[0x77; 300 * 1024], MIB).unwrap();
    expected[MIB as usize..MIB as usize + 300 * 1024].fill(0x77);
    // Over written clusters, backed clusters, and unaligned ends.
    for (offset, len) in [(MIB - 1000, 200 * KIB), (2 * MIB, MIB), (3 * MIB + 7, 9)] {
        img.discard(offset, len).unwrap();
        expected[offset as usize..(offset + len) as usize].fill(0);
    }
    assert!(read_all(&img) == expected);
    let status = img.block_status(2 * MIB, MIB).unwrap();
    // Version 2 cannot say "zero": there the clusters hold written zeros.
    let zero_clusters = compat != "0.10";
    assert_eq!(
        status.iter().all(|e| !e.state.is_data()),
        zero_clusters,
        "{status:?}"
    );
    img.flush().unwrap();
    drop(img);
    let img = open_rw(&path, Some(mem_backing(&base_bytes, &base))).unwrap();
    assert!(read_all(&img) == expected);
    drop(img);
    assert_qemu_check_clean("qcow2", &path);
    assert_qemu_compare_equal("qcow2", &path, &expected);
}

#[test]
fn discard_over_a_backing_file_v3_zero_clusters() {
    backed("1.1");
}

#[test]
fn discard_over_a_backing_file_v2_writes_zeros() {
    backed("0.10");
}

#[test]
fn discard_keeps_what_a_snapshot_shares() {
    let dir = TempDir::new();
    let path = dir.path().join("s.qcow2");
    if qemu_create("qcow2", "", &path, 4 * MIB).is_none() {
        return;
    }
    qemu_io(&path, &["write -P 0x33 0 4M"]).unwrap();
    run("qemu-img", &format!("snapshot -c s1 {}", p(&path))).unwrap();
    let img = open_rw(&path, None).unwrap();
    img.discard(0, 2 * MIB).unwrap();
    img.flush().unwrap();
    drop(img);
    let before = allocated(&path);
    let img = open_rw(&path, None).unwrap();
    let got = read_all(&img);
    assert!(got[..2 * MIB as usize].iter().all(|&b| b == 0));
    assert!(got[2 * MIB as usize..].iter().all(|&b| b == 0x33));
    drop(img);
    assert_qemu_check_clean("qcow2", &path);
    let snap = qemu_raw(&path, "-l snapshot.name=s1").unwrap();
    assert!(
        snap.iter().all(|&b| b == 0x33),
        "the snapshot keeps its data"
    );
    assert!(allocated(&path) >= before);
}

#[test]
fn discard_of_a_snapshot_view_is_refused() {
    let dir = TempDir::new();
    let path = dir.path().join("s.qcow2");
    if qemu_create("qcow2", "", &path, MIB).is_none() {
        return;
    }
    run("qemu-img", &format!("snapshot -c s1 {}", p(&path))).unwrap();
    let img = open_rw(&path, None).unwrap();
    let view = img.snapshot_image(0).unwrap();
    assert_eq!(
        view.discard(0, 4096).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
}
