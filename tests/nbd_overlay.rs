//! `imgfs mount --nbd ... --overlay DIR`: NBD writes land in the overlays like the mount's,
//! and the originals never change; `imgfs nbd --snapshot` throws them away at the end. (Its own
//! test binary: a test that holds files open on a mount must not share its process with tests
//! that fork while it unmounts.)

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

#[test]
fn nbd_snapshot_throws_the_changes_away() {
    let (dir, src) = empty_source("nbd-snapshot");
    create_filled(
        &src,
        "qcow2",
        "disk.qcow2",
        &[],
        "8M",
        &["write -P 0x41 0 1M"],
    );
    let original = std::fs::read(src.join("disk.qcow2")).unwrap();
    let server = NbdServer::unix(&src, dir.path(), &["--snapshot"]);
    let uri = server.uri("disk.qcow2");
    qemu_io_nbd(&uri, &["write -P 0x42 512k 64k", "flush"]);
    qemu_io_nbd(&uri, &["read -P 0x42 512k 64k", "read -P 0x41 0 512k"]);
    let log = server.stop();
    let scratch = log
        .lines()
        .find_map(|l| {
            l.split("--snapshot: writes go to ")
                .nth(1)?
                .split(", ")
                .next()
        })
        .expect("the daemon names its scratch directory");
    assert!(!std::path::Path::new(scratch).exists(), "{scratch} is left");
    assert!(std::fs::read(src.join("disk.qcow2")).unwrap() == original);
}

#[test]
fn background_nbd_takes_relative_paths_against_the_callers_directory() {
    let (dir, src) = empty_source("nbd-relative");
    create_filled(&src, "vdi", "disk.vdi", &[], "8M", &[]);
    let cwd = dir.join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    let out = std::process::Command::new(IMGFS)
        .args(["nbd", "--socket", "nbd.sock", "--pid-file", "imgfs.pid"])
        .args(["--overlay", "changes", "--log-file"])
        .arg(dir.join("nbd.log"))
        .arg(&src)
        .current_dir(&cwd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid_file = cwd.join("imgfs.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let exit = ExitWatch::new(pid);
    let uri = format!(
        "nbd+unix:///disk.vdi?socket={}",
        cwd.join("nbd.sock").display()
    );
    qemu_io_nbd(&uri, &["write -P 0x42 0 64k", "flush"]);
    assert!(cwd.join("changes/disk.vdi.qcow2").exists());
    // SAFETY: kill with a pid read from the daemon's own pid file, checked alive above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    exit.wait();
    assert!(!pid_file.exists(), "removed when the daemon stops");
    qemu_io(
        "qcow2",
        &cwd.join("changes/disk.vdi.qcow2"),
        &["read -P 0x42 0 64k"],
    );
}
