//! Crash consistency of a qcow2 flush: the image a crash after each host write of the flush
//! would leave must pass `qemu-img check` (leaks allowed), read through QEMU and imgfs as
//! before or after the flush byte for byte, and take a cluster QEMU allocates on it without
//! losing data (`testutil::crash`).

use super::*;
use crate::host::fault;
use crate::testutil::crash::CrashCheck;

/// The flush writes refcount blocks (a new one, as the file grows past what the first
/// covers), the refcount table, L2 slices of old and new tables, the L1 table, and the
/// refcount of a compressed cluster rewritten as a normal one.
#[test]
fn every_write_of_a_flush_leaves_an_image_qemu_accepts() {
    let dir = TempDir::new();
    let path = dir.path().join("crash.qcow2");
    let create = format!("create -q -f qcow2 -o cluster_size=4k {} 64M", p(&path));
    if run("qemu-img", &create).is_none() {
        return;
    }
    qemu_io(&path, &["write -P 0x11 0 64k", "write -c -P 0x12 5M 4k"]).unwrap();
    let watch = fault::watch(&path);
    let img = open_writable(&path);
    let write = |offset: u64, len: usize, byte: u8| {
        img.write_at(&vec![byte; len], offset).unwrap();
    };
    write(MIB, 10_000, 0x21);
    write(20 * MIB + 3, 5000, 0x22);
    img.flush().unwrap();
    let old = read_all(&img);
    write(100, 1000, 0x31);
    write(MIB + 64 * KIB, 3000, 0x32);
    write(5 * MIB + 100, 200, 0x33);
    write(30 * MIB - 2000, 4000, 0x34);
    write(40 * MIB, 10 * MIB as usize, 0x35);
    watch.start();
    img.flush().unwrap();
    let recording = watch.stop();
    let new = read_all(&img);
    drop(img);
    assert!(recording.writes() >= 8, "{:?}", recording.ops());
    let read_ours = |p: &Path| read_all(&open(p));
    CrashCheck {
        format: "qcow2",
        old: &old,
        new: &new,
        fresh: 60 * MIB,
        read_ours: &read_ours,
    }
    .every_prefix(&path, &recording);
}
