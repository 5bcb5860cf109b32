//! Both front ends in one daemon: `imgfs mount --nbd unix:SOCK` serves the same images through
//! FUSE and NBD with one open instance each, so a write through one is read through the other
//! at once, and `imgfs umount` writes everything back, NBD's writes included.

mod common;
mod nbd_support;

use std::os::unix::fs::FileExt;

use common::*;
use nbd_support::*;

#[test]
fn fuse_and_nbd_share_one_instance_per_image() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("nbd-mount");
    create_filled(&src, "vdi", "disk.vdi", &[], "8M", &["write -P 0x61 0 1M"]);
    let socket = dir.join("nbd.sock");
    let nbd = format!("unix:{}", socket.display());
    let mount = Mount::new(&src, &dir.join("mnt"), &["--nbd", &nbd]);
    let uri = format!("nbd+unix:///disk.vdi?socket={}", socket.display());

    // Written through the mount, read over NBD.
    let raw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mount.path("disk.vdi.raw"))
        .unwrap();
    raw.write_all_at(&[0x62; 65536], 2 << 20).unwrap();
    qemu_io_nbd(&uri, &["read -P 0x62 2M 64k", "read -P 0x61 0 1M"]);
    // Written over NBD, read through the mount.
    qemu_io_nbd(&uri, &["write -P 0x63 3M 4k", "flush"]);
    let mut back = vec![0u8; 4096];
    raw.read_exact_at(&mut back, 3 << 20).unwrap();
    assert!(back.iter().all(|b| *b == 0x63));
    drop(raw);
    mount.unmount();

    let image = src.join("disk.vdi");
    assert_check_clean("vdi", &image);
    let data = qemu_raw("vdi", &image, &dir);
    assert!(data[2 << 20..(2 << 20) + 65536].iter().all(|b| *b == 0x62));
    assert!(data[3 << 20..(3 << 20) + 4096].iter().all(|b| *b == 0x63));
    assert!(!socket.exists(), "the socket is removed on exit");
}
