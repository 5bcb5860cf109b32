//! imgfs mounted the way FUSE file systems are: `mount -t fuse`, an fstab line (`mount -T`),
//! `-o` options, and unmounted with plain `umount` or `fusermount3 -u`, which write everything
//! back like `imgfs umount`.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::*;

/// The source `IMGFS#SRC` that mount.fuse3 turns into `IMGFS SRC MNT -o OPTIONS` (an
/// installed imgfs is found by name: `mount -t fuse.imgfs SRC MNT`).
fn helper_source(src: &Path) -> String {
    format!("{IMGFS}#{}", src.display())
}

/// Waits until the daemon serving `mnt` has exited after an unmount started by `unmount`.
fn unmount_and_wait(mnt: &Path, unmount: &mut Command) {
    let exit = ExitWatch::new(daemon_pid(mnt));
    run_while_busy(unmount);
    exit.wait();
    assert!(!is_mount_point(mnt));
}

#[test]
fn mount_t_fuse_takes_mount_options() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("mount-t");
    create_filled(&src, "vdi", "a.vdi", &[], "8M", &["write -P 0x42 0 4k"]);
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let pid_file = dir.join("imgfs.pid");
    run(Command::new("mount")
        .args(["-t", "fuse"])
        .arg(helper_source(&src))
        .arg(&mnt)
        .arg("-o")
        .arg(format!(
            "ro,threads=2,uid=1234,gid=4321,umask=077,nosuid,nodev,pid_file={}",
            pid_file.display()
        )));
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap(),
        format!("{}\n", daemon_pid(&mnt))
    );
    let raw = mnt.join("a.vdi.raw");
    let meta = std::fs::metadata(&raw).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1234, 4321));
    assert_eq!(meta.permissions().mode() & 0o777, 0o400, "ro and umask 077");
    assert_eq!(read_range(&raw, 0, 4096), vec![0x42; 4096]);
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    unmount_and_wait(&mnt, Command::new("umount").arg(&mnt));
    assert!(!pid_file.exists());
}

#[test]
fn an_fstab_line_mounts_and_plain_umount_writes_everything_back() {
    if !can_mount() {
        return;
    }
    for unmount in ["umount", "fusermount3"] {
        let (dir, src) = empty_source(&format!("fstab-{unmount}"));
        create_filled(&src, "qcow2", "disk.qcow2", &[], "16M", &[]);
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let fstab = dir.join("fstab");
        let line = format!(
            "{} {} fuse rw,nofail,threads=3,log_file={} 0 0\n",
            helper_source(&src),
            mnt.display(),
            dir.join("imgfs.log").display()
        );
        std::fs::write(&fstab, line).unwrap();
        run(Command::new("mount").arg("-T").arg(&fstab).arg(&mnt));
        let raw = std::fs::OpenOptions::new()
            .write(true)
            .open(mnt.join("disk.qcow2.raw"))
            .unwrap();
        // No fsync: the unmount itself must write back what only the daemon holds.
        raw.write_all_at(&[0x77; 65536], 1 << 20).unwrap();
        drop(raw);
        let mut cmd = match unmount {
            "umount" => Command::new("umount"),
            _ => {
                let mut cmd = Command::new("fusermount3");
                cmd.arg("-u");
                cmd
            }
        };
        unmount_and_wait(&mnt, cmd.arg(&mnt));
        assert_check_clean("qcow2", &src.join("disk.qcow2"));
        qemu_io("qcow2", &src.join("disk.qcow2"), &["read -P 0x77 1M 64k"]);
    }
}

#[test]
fn unknown_mount_options_are_refused_by_name() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("bad-option");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let out = Command::new(IMGFS)
        .arg("mount")
        .args(["-o", "ro,frobnicate"])
        .arg(&src)
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("\"frobnicate\""), "{text}");
    assert!(!is_mount_point(&mnt));
}

#[test]
fn the_install_script_puts_everything_in_place() {
    if std::env::var("CI").as_deref() != Ok("true") && !Path::new("target/release/imgfs").exists() {
        eprintln!("skipping: needs a release build (scripts/test.sh makes one)");
        return;
    }
    let dir = TempDir::new("install");
    let out = Command::new("bash")
        .arg("scripts/install.sh")
        .env("DESTDIR", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "install.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for file in [
        "usr/local/bin/imgfs",
        "usr/local/share/man/man1/imgfs.1",
        "usr/local/share/man/man1/imgfs-mount.1",
        "usr/local/share/bash-completion/completions/imgfs",
        "usr/local/share/zsh/site-functions/_imgfs",
        "usr/local/share/fish/vendor_completions.d/imgfs.fish",
        "etc/systemd/system/imgfs@.service",
    ] {
        let meta = std::fs::metadata(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(meta.len() > 0, "{file} is empty");
    }
    let helper = std::fs::read_link(dir.join("usr/sbin/mount.fuse.imgfs")).unwrap();
    assert_eq!(helper, Path::new("/usr/local/bin/imgfs"));
    let bash =
        std::fs::read_to_string(dir.join("usr/local/share/bash-completion/completions/imgfs"));
    assert!(bash.unwrap().contains("umount"));
}
