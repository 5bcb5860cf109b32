//! `imgfs mount --nbd ... --overlay DIR`: NBD writes land in the overlays like the mount's,
//! and the originals never change. (Its own test binary: a test that holds files open on a
//! mount must not share its process with tests that fork while it unmounts.)

mod common;
mod nbd_support;

use common::*;
use nbd_support::*;

#[test]
fn nbd_writes_into_overlays_like_the_mount_does() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("nbd-overlay");
    create_filled(&src, "vdi", "disk.vdi", &[], "8M", &["write -P 0x41 0 1M"]);
    let original = std::fs::read(src.join("disk.vdi")).unwrap();
    let changes = dir.join("changes");
    let socket = dir.join("nbd.sock");
    let nbd = format!("unix:{}", socket.display());
    let mount = Mount::new(
        &src,
        &dir.join("mnt"),
        &["--nbd", &nbd, "--overlay", path_str(&changes)],
    );
    let uri = format!("nbd+unix:///disk.vdi?socket={}", socket.display());
    qemu_io_nbd(&uri, &["write -P 0x42 512k 64k", "flush"]);
    assert_eq!(
        read_range(&mount.path("disk.vdi.raw"), 512 << 10, 4),
        [0x42; 4]
    );
    mount.unmount();
    assert!(std::fs::read(src.join("disk.vdi")).unwrap() == original);
    let overlay = changes.join("disk.vdi.qcow2");
    assert_check_clean("qcow2", &overlay);
    qemu_io(
        "qcow2",
        &overlay,
        &["read -P 0x42 512k 64k", "read -P 0x41 0 512k"],
    );
}
