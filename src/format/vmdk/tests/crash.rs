//! Crash consistency of a VMDK (monolithicSparse) flush: the image a crash after each host
//! write of the flush would leave must pass `qemu-img check`, read through QEMU and imgfs as
//! before or after the flush byte for byte, and take a grain QEMU allocates on it without
//! losing data (`testutil::crash`).

use std::path::Path;

use super::{create, qemu_io, read_all, try_open, MIB};
use crate::host::fault;
use crate::testutil::crash::CrashCheck;
use crate::testutil::TempDir;

/// The flush writes grain tables that exist (both copies) and two new ones (both copies,
/// whole), then both grain directories.
#[test]
fn every_write_of_a_flush_leaves_an_image_qemu_accepts() {
    let dir = TempDir::new();
    let path = dir.path().join("crash.vmdk");
    if create(&path, "subformat=monolithicSparse", "192M").is_none() {
        return;
    }
    qemu_io(&path, &["write -P 0x11 0 64k", "write -P 0x12 5M 4k"]).unwrap();
    // qemu-img preallocates every grain table; other writers leave directory entries empty
    // until a table is needed. Empty the entries of the last two tables (128M..192M).
    let mut bytes = std::fs::read(&path).unwrap();
    let sector =
        |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize * 512;
    let (rgd, gd) = (sector(48), sector(56));
    for directory in [rgd, gd] {
        bytes[directory + 16..directory + 24].fill(0);
    }
    std::fs::write(&path, &bytes).unwrap();

    let watch = fault::watch(&path);
    let img = try_open(&path, false).unwrap();
    let write = |offset: u64, len: usize, byte: u8| {
        img.write_at(&vec![byte; len], offset).unwrap();
    };
    write(MIB, 10_000, 0x21);
    write(40 * MIB + 3, 5000, 0x22);
    img.flush().unwrap();
    let old = read_all(img.as_ref());
    write(100, 1000, 0x31);
    write(MIB + 100_000, 3000, 0x32);
    write(40 * MIB + 200_000, 4096, 0x33);
    write(130 * MIB, 100_000, 0x34);
    write(170 * MIB - 2000, 4000, 0x35);
    watch.start();
    img.flush().unwrap();
    let recording = watch.stop();
    let new = read_all(img.as_ref());
    drop(img);
    assert!(recording.writes() >= 8, "{:?}", recording.ops());
    let read_ours = |p: &Path| read_all(try_open(p, true).unwrap().as_ref());
    CrashCheck {
        format: "vmdk",
        old: &old,
        new: &new,
        fresh: 100 * MIB,
        read_ours: &read_ours,
    }
    .every_prefix(&path, &recording);
}
