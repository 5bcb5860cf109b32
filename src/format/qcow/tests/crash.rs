//! Crash consistency of a QCOW v1 flush: the image a crash after each host write of the flush
//! would leave must read, through QEMU and imgfs, as before or after the flush byte for byte,
//! and a cluster QEMU allocates on it must land on no data (`testutil::crash`; qemu-img
//! cannot check qcow v1 images).

use super::*;
use crate::host::fault;
use crate::testutil::crash::CrashCheck;

#[test]
fn every_write_of_a_flush_leaves_an_image_qemu_reads() {
    let dir = TempDir::new();
    let path = dir.path().join("crash.qcow");
    let Some(()) = qemu_create(&path, "64M", None) else {
        return;
    };
    qemu_io(&path, &["write -P 0x11 0 64k", "write -P 0x12 5M 4k"]).unwrap();
    let watch = fault::watch(&path);
    let img = open_rw(&path, None);
    let write = |offset: u64, len: usize, byte: u8| {
        img.write_at(&vec![byte; len], offset).unwrap();
    };
    write(MIB, 10_000, 0x21);
    write(20 * MIB + 3, 5000, 0x22);
    img.flush().unwrap();
    let old = read_all(&img);
    // In place, new clusters in tables that exist, and two new tables.
    write(100, 1000, 0x31);
    write(MIB + 64 * 1024, 3000, 0x32);
    write(5 * MIB + 8192, 4096, 0x33);
    write(30 * MIB - 2000, 4000, 0x34);
    write(40 * MIB, 100_000, 0x35);
    watch.start();
    img.flush().unwrap();
    let recording = watch.stop();
    let new = read_all(&img);
    drop(img);
    assert!(recording.writes() >= 5, "{:?}", recording.ops());
    let read_ours = |p: &Path| read_all(&open_rw(p, None));
    CrashCheck {
        format: "qcow",
        old: &old,
        new: &new,
        fresh: 60 * MIB,
        read_ours: &read_ours,
    }
    .every_prefix(&path, &recording);
}
