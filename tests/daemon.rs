//! The daemon and its commands through a real mount: the tree follows the source directory,
//! bad images are reported and skipped, QEMU's locks are honoured both ways, read-only mounts
//! refuse writes, SIGTERM writes back and unmounts, and `imgfs info` agrees with qemu-img.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

fn vdi(path: &Path, size: &str) {
    qemu_img(&["create", "-q", "-f", "vdi", path_str(path), size]);
}

#[test]
fn the_tree_follows_the_source_and_bad_images_are_skipped() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("tree");
    vdi(&src.join("a.vdi"), "1M");
    // Recognised by magic, not by name.
    vdi(&src.join("no-extension"), "1M");
    // A corrupt header: the signature is right, the version is not.
    let broken = src.join("broken.vdi");
    vdi(&broken, "1M");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&broken)
        .unwrap()
        .write_all_at(&[9, 9, 9, 9], 68)
        .unwrap();
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    assert_eq!(ls(&mount.mnt), ["a.vdi.raw", "no-extension.raw"]);
    let log = mount.log_text();
    assert!(
        log.contains("broken.vdi") && log.contains("version"),
        "bad image is logged:\n{log}"
    );

    vdi(&src.join("new.vdi"), "2M");
    std::fs::remove_file(src.join("a.vdi")).unwrap();
    assert_eq!(ls(&mount.mnt), ["new.vdi.raw", "no-extension.raw"]);
    assert_eq!(
        std::fs::metadata(mount.path("new.vdi.raw")).unwrap().len(),
        2 << 20
    );
    assert!(!mount.path("a.vdi.raw").exists());
    mount.unmount();
    assert_eq!(log.matches("broken.vdi").count(), 1, "logged once");
}

#[test]
fn qemu_cannot_write_what_imgfs_serves_and_imgfs_skips_what_qemu_writes() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("locks");
    let served = src.join("served.vdi");
    let held = src.join("held.vdi");
    vdi(&served, "1M");
    vdi(&held, "1M");

    // A QEMU process holding `held.vdi` for writing: once it has written, it holds the lock.
    let mut qemu = Command::new("qemu-io")
        .args(["-f", "vdi"])
        .arg(&held)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = qemu.stdin.take().unwrap();
    writeln!(stdin, "write 0 512").unwrap();
    let mut stdout = BufReader::new(qemu.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("wrote") {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "qemu-io ended early"
        );
    }
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    assert_eq!(
        ls(&mount.mnt),
        ["served.vdi.raw"],
        "an image QEMU writes is not served"
    );
    assert!(
        mount.log_text().contains("for writing"),
        "{}",
        mount.log_text()
    );
    drop(stdin);
    assert!(qemu.wait().unwrap().success());
    assert_eq!(
        ls(&mount.mnt),
        ["held.vdi.raw", "served.vdi.raw"],
        "served once QEMU lets go"
    );

    // While a file is open through the mount, imgfs holds QEMU's lock bytes.
    let open = std::fs::File::open(mount.path("served.vdi.raw")).unwrap();
    let out = Command::new("qemu-io")
        .args(["-f", "vdi", "-c", "write 0 512"])
        .arg(&served)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("lock"),
        "qemu-io must be refused: {text}"
    );
    run(Command::new("qemu-img").args(["info", "-U"]).arg(&served));
    // Closed, written back and let go: an image nobody has open holds no lock and no
    // descriptor, and what QEMU writes then is what the mount serves next.
    drop(open);
    release_idle(&mount.mnt);
    qemu_io("vdi", &served, &["write -P 0x5a 0 512"]);
    assert_eq!(
        read_range(&mount.path("served.vdi.raw"), 0, 512),
        [0x5a; 512]
    );
    mount.unmount();
    qemu_io("vdi", &served, &["write 0 512"]);
}

#[test]
fn read_only_mounts_refuse_writes() {
    if !can_mount() {
        return;
    }
    let (dir, src, image) = source_with_image("ro", "vdi", "disk.vdi", "1M", &[]);
    qemu_io("vdi", &image, &["write -P 0x42 0 4k"]);
    let before = std::fs::read(&image).unwrap();
    let mount = Mount::new(&src, &dir.join("mnt"), &["--read-only"]);
    let raw = mount.path("disk.vdi.raw");
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert_eq!(read_range(&raw, 0, 4), [0x42; 4]);
    // While served read-only, QEMU may read but not write.
    run(Command::new("qemu-img").args(["info"]).arg(&image));
    mount.unmount();
    assert!(std::fs::read(&image).unwrap() == before, "image untouched");
}

#[test]
fn mount_errors_are_clear() {
    let dir = TempDir::new("errors");
    let src = dir.join("src");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let mount = |src: &Path, mnt: &Path| {
        let out = Command::new(IMGFS)
            .arg("mount")
            .arg(src)
            .arg(mnt)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let missing = mount(&dir.join("nope"), &mnt);
    assert!(
        missing.contains("source") && missing.contains("nope"),
        "{missing}"
    );
    std::fs::write(mnt.join("file"), "x").unwrap();
    assert!(mount(&src, &mnt).contains("not empty"));
    let bad_threads = Command::new(IMGFS)
        .args(["mount", "--threads", "0"])
        .arg(&src)
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(!bad_threads.status.success());
    let not_mounted = Command::new(IMGFS)
        .arg("umount")
        .arg(&src)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&not_mounted.stderr).contains("not an imgfs mount"));
}

/// `--foreground` under a service manager: READY=1 once mounted, and SIGTERM writes back and
/// unmounts.
#[test]
fn foreground_daemon_notifies_readiness_and_flushes_on_sigterm() {
    if !can_mount() {
        return;
    }
    let dir = TempDir::new("sigterm");
    let src = dir.join("src");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let image = src.join("disk.vdi");
    vdi(&image, "4M");
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let mut child = Command::new(IMGFS)
        .args(["mount", "--foreground"])
        .arg(&src)
        .arg(&mnt)
        .env("NOTIFY_SOCKET", &socket_path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");

    let payload = b"written before SIGTERM";
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("disk.vdi.raw"))
        .unwrap();
    file.write_all(payload).unwrap();
    drop(file);
    // SAFETY: kill on the pid of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n = socket.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    let status = child.wait().unwrap();
    assert!(status.success(), "daemon exit: {status}");

    let mut expected = vec![0u8; 4 << 20];
    expected[..payload.len()].copy_from_slice(payload);
    assert_check_clean("vdi", &image);
    assert_compare_equal("vdi", &image, &expected, &dir);
}

#[test]
fn info_agrees_with_qemu_img() {
    let dir = TempDir::new("info");
    let image = dir.join("disk.vdi");
    vdi(&image, "10M");
    qemu_io("vdi", &image, &["write 0 1M", "write 5M 4k"]);
    let ours = run(Command::new(IMGFS).args(["info", "--json"]).arg(&image));
    let ours = String::from_utf8(ours.stdout).unwrap();
    let theirs =
        String::from_utf8(qemu_img(&["info", "--output=json", path_str(&image)]).stdout).unwrap();
    for key in [
        "\"virtual-size\": 10485760",
        "\"cluster-size\": 1048576",
        "\"format\": \"vdi\"",
    ] {
        assert!(
            ours.contains(key) && theirs.contains(key),
            "{key}:\n{ours}\n{theirs}"
        );
    }
    assert!(ours.contains("\"allocated-size\": 2097152"), "{ours}");
    let text = run(Command::new(IMGFS).arg("info").arg(&image));
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("file format: vdi") && text.contains("read-only: no"),
        "{text}"
    );
    let bad = Command::new(IMGFS)
        .arg("info")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

/// kill -9 of the daemon: `imgfs umount` removes the stale mount, the image passes
/// `qemu-img check` (a crash may leak a block, never corrupt the map) and fsync'ed data is there.
#[test]
fn a_killed_daemon_leaves_a_consistent_image_and_a_removable_mount() {
    if !can_mount() {
        return;
    }
    let (dir, src, image) = source_with_image("kill", "vdi", "disk.vdi", "8M", &[]);
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let raw = mount.path("disk.vdi.raw");
    let file = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    file.write_all_at(&[0x5a; 4096], 1 << 20).unwrap();
    file.sync_all().unwrap();
    file.write_all_at(&[0x6b; 4096], 5 << 20).unwrap();

    let pid = daemon_pid(&mount.mnt);
    let exit = ExitWatch::new(pid);
    // SAFETY: kill on the daemon's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    exit.wait();
    drop(file);
    run(Command::new(IMGFS).arg("umount").arg(&mount.mnt));
    assert!(!is_mount_point(&mount.mnt));
    mount.forget_unmounted();

    assert_check_clean("vdi", &image);
    qemu_io("vdi", &image, &["read -P 0x5a 1M 4k"]);
}

/// SIGTERM while a raw file is still open: the daemon flushes, detaches the mount, keeps
/// serving the open file, and exits once it is closed, leaving a clean image with the data.
#[test]
fn sigterm_with_an_open_file_detaches_and_exits_after_the_close() {
    if !can_mount() {
        return;
    }
    let (dir, src, image) = source_with_image("busy", "vdi", "disk.vdi", "4M", &[]);
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let pid = daemon_pid(&mount.mnt);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(mount.path("disk.vdi.raw"))
        .unwrap();
    let exit = ExitWatch::new(pid);
    // SAFETY: kill on the daemon's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    file.write_all_at(b"after SIGTERM", 12345).unwrap();
    file.sync_all().unwrap();
    drop(file);
    exit.wait();
    assert!(!is_mount_point(&mount.mnt));
    mount.forget_unmounted();
    assert_check_clean("vdi", &image);
    let mut expected = vec![0u8; 4 << 20];
    expected[12345..12345 + 13].copy_from_slice(b"after SIGTERM");
    assert_compare_equal("vdi", &image, &expected, &dir);
}

/// Other users reach the mount only with `--allow-other`, and then only as the image file's
/// mode allows.
#[test]
fn allow_other_lets_other_users_in_with_the_image_files_permissions() {
    if !can_mount() {
        return;
    }
    let (dir, src, image) = source_with_image("other", "vdi", "disk.vdi", "1M", &[]);
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&image, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let as_nobody = |script: String| {
        Command::new("su")
            .args(["nobody", "-s", "/bin/sh", "-c", &script])
            .status()
            .unwrap()
            .success()
    };
    for allow_other in [false, true] {
        let options: &[&str] = if allow_other { &["--allow-other"] } else { &[] };
        let mount = Mount::new(&src, &dir.join("mnt"), options);
        let raw = mount.path("disk.vdi.raw");
        let read = as_nobody(format!("head -c 1 {} >/dev/null", raw.display()));
        let write = as_nobody(format!("printf x 1<> {}", raw.display()));
        assert_eq!(
            read, allow_other,
            "read by another user, allow_other={allow_other}"
        );
        assert!(!write, "the image file is 0644: no writes by others");
        mount.unmount();
    }
}

#[test]
fn more_images_than_descriptors_are_all_served_and_running_out_fails_one_open_only() {
    if !can_mount() {
        return;
    }
    const IMAGES: usize = 150;
    const FD_LIMIT: u64 = 64;
    let (dir, src) = empty_source("fd-limit");
    let first = src.join("disk000.vdi");
    vdi(&first, "1M");
    qemu_io("vdi", &first, &["write -P 0x3c 0 512"]);
    for i in 1..IMAGES {
        std::fs::copy(&first, src.join(format!("disk{i:03}.vdi"))).unwrap();
    }
    let mount = Mount::with(&src, &dir.join("mnt"), &[], |cmd| {
        let limit = libc::rlimit {
            rlim_cur: FD_LIMIT,
            rlim_max: FD_LIMIT,
        };
        // SAFETY: setrlimit is async-signal-safe and gets a valid pointer.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            });
        }
    });
    let names = ls(&mount.mnt);
    assert_eq!(names.len(), IMAGES, "every image is listed");
    // One after the other: idle images are closed to make room.
    for name in &names {
        assert_eq!(
            read_range(&mount.path(name), 0, 512),
            vec![0x3c; 512],
            "{name}"
        );
    }
    // All at once: the opens past the daemon's limit fail, nothing else does.
    let mut held = Vec::new();
    let mut refused = 0;
    for name in &names {
        match std::fs::File::open(mount.path(name)) {
            Ok(file) => held.push(file),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "{name}: {e}");
                refused += 1;
            }
        }
    }
    assert!(refused > 0 && !held.is_empty(), "{refused} refused");
    // An image added while the daemon has no descriptor to spare is served once it has.
    std::fs::copy(&first, src.join("late.vdi")).unwrap();
    let _ = std::fs::read_dir(&mount.mnt).map(|d| d.count());
    let mut byte = [0u8; 1];
    for file in &held {
        file.read_exact_at(&mut byte, 0).unwrap();
        assert_eq!(byte, [0x3c]);
    }
    drop(held);
    release_idle(&mount.mnt);
    assert_eq!(ls(&mount.mnt).len(), IMAGES + 1);
    assert_eq!(read_range(&mount.path("late.vdi.raw"), 0, 1), [0x3c]);
    assert_eq!(read_range(&mount.path(&names[IMAGES - 1]), 0, 1), [0x3c]);
    mount.unmount();
}

#[test]
fn the_daemon_keeps_no_descriptor_and_no_directory_of_its_caller() {
    if !can_mount() {
        return;
    }
    use std::os::fd::AsRawFd;
    let (dir, src) = empty_source("hygiene");
    vdi(&src.join("a.vdi"), "1M");
    let cwd = dir.join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    // The caller holds a lock through a descriptor its children inherit (`flock 9`-style).
    let lock_path = dir.join("lock");
    let lock = std::fs::File::create(&lock_path).unwrap();
    let fd = lock.as_raw_fd();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(fd, libc::LOCK_EX) }, 0);
    let mount = Mount::with(&src, &dir.join("mnt"), &[], |cmd| {
        cmd.current_dir(&cwd);
        // Inherited by `imgfs mount` only, not by what other tests start meanwhile.
        // SAFETY: fcntl is async-signal-safe; the descriptor is open in the child.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || match libc::fcntl(fd, libc::F_SETFD, 0) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            });
        }
    });
    drop(lock);
    let pid = daemon_pid(&mount.mnt);
    let daemon_cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
    assert_eq!(daemon_cwd, Path::new("/"));
    let inherited = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .filter(|target| target.starts_with(dir.path()) && !target.ends_with("mnt.log"))
        .count();
    assert_eq!(
        inherited, 0,
        "no descriptor of the caller's files, the lock's included"
    );
    // So the lock is free again. Waiting for it, not trying once: a process another test
    // forks meanwhile holds a copy of the descriptor until its exec closes it.
    let again = std::fs::File::open(&lock_path).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    let rc = unsafe { libc::flock(again.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    mount.unmount();
}

#[test]
fn a_directory_of_ten_thousand_files_lists_every_image() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("big-dir");
    for i in 0..10_000 {
        std::fs::write(src.join(format!("note{i:05}.txt")), b"not an image").unwrap();
    }
    vdi(&src.join("disk.vdi"), "1M");
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    assert_eq!(ls(&mount.mnt), ["disk.vdi.raw"]);
    vdi(&src.join("late.vdi"), "1M");
    assert_eq!(ls(&mount.mnt), ["disk.vdi.raw", "late.vdi.raw"]);
    mount.unmount();
}

/// Sets or clears the immutable attribute of `path` (`chattr +i` / `-i`) from this process:
/// a `chattr` child would inherit the raw file's descriptor and close it at exec, and that
/// close writes everything back.
fn set_immutable(path: &Path, on: bool) {
    use std::os::fd::AsRawFd;
    const FS_IMMUTABLE_FL: libc::c_int = 0x10;
    let file = std::fs::File::open(path).unwrap();
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int into `flags`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    if on {
        flags |= FS_IMMUTABLE_FL;
    } else {
        flags &= !FS_IMMUTABLE_FL;
    }
    // SAFETY: FS_IOC_SETFLAGS reads one int from `flags`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

/// A write-back that fails (the image file made immutable under the daemon) stops the image;
/// `imgfs umount` still unmounts, but fails naming the image and saying what may be lost.
#[test]
fn umount_fails_and_names_the_image_whose_write_back_failed() {
    if !can_mount() {
        return;
    }
    // The periodic write-back (every few seconds) may come between the write and the chattr
    // and write the block map in time: then the attempt proves nothing and is made again.
    for _ in 0..3 {
        let (dir, src, image) = source_with_image("lost", "vdi", "disk.vdi", "8M", &[]);
        let mount = Mount::new(&src, &dir.join("mnt"), &[]);
        let raw = mount.path("disk.vdi.raw");
        let file = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
        // A new block: its data is written at once, its block map entry at the next flush
        // (the close would be one: the file stays open until the image is immutable).
        file.write_all_at(&[0x5a; 4096], 1 << 20).unwrap();
        set_immutable(&image, true);
        drop(file);
        let out = Command::new(IMGFS)
            .arg("umount")
            .arg(&mount.mnt)
            .output()
            .unwrap();
        set_immutable(&image, false);
        assert!(!is_mount_point(&mount.mnt), "unmounted in either case");
        mount.forget_unmounted();
        if out.status.success() {
            continue;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("write-back of these images failed")
                && stderr.contains("may be lost")
                && stderr.contains(path_str(&image))
                && stderr.contains("Operation not permitted"),
            "{stderr}"
        );
        // What reached the file is an image as after a crash: consistent, the block leaked
        // at most.
        let check = Command::new("qemu-img")
            .args(["check", "-f", "vdi"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(
            check.status.code() == Some(0) || check.status.code() == Some(3),
            "{}",
            String::from_utf8_lossy(&check.stdout)
        );
        return;
    }
    panic!("the periodic write-back came first in every attempt");
}

/// The background daemon works from /, so relative paths it uses after the fork (overlay
/// directory, NBD socket, pid file) are taken against the caller's directory before it.
#[test]
fn relative_paths_mean_the_callers_directory_and_the_pid_file_is_kept() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("relative");
    vdi(&src.join("a.vdi"), "4M");
    let cwd = dir.join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    let args = [
        "--overlay",
        "changes",
        "--pid-file",
        "imgfs.pid",
        "--nbd",
        "unix:nbd.sock",
    ];
    let mount = Mount::with(&src, &dir.join("mnt"), &args, |cmd| {
        cmd.current_dir(&cwd);
    });
    let cwd = cwd.canonicalize().unwrap();
    let overlay = xattr(&mount.mnt, "user.imgfs.overlay").unwrap_or_default();
    assert_eq!(Path::new(&overlay), cwd.join("changes"));
    let pid = daemon_pid(&mount.mnt);
    let pid_file = cwd.join("imgfs.pid");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap(),
        format!("{pid}\n")
    );
    use std::os::unix::fs::FileTypeExt;
    let socket = std::fs::metadata(cwd.join("nbd.sock")).unwrap();
    assert!(socket.file_type().is_socket());
    let raw = std::fs::OpenOptions::new()
        .write(true)
        .open(mount.path("a.vdi.raw"))
        .unwrap();
    raw.write_all_at(&[0x5a; 4096], 0).unwrap();
    raw.sync_all().unwrap();
    drop(raw);
    assert!(cwd.join("changes/a.vdi.qcow2").exists());

    // A second daemon given the same pid file is refused, and the file stays the first's.
    let other = dir.join("mnt2");
    std::fs::create_dir_all(&other).unwrap();
    let out = Command::new(IMGFS)
        .args(["mount", "--pid-file"])
        .arg(&pid_file)
        .arg(&src)
        .arg(&other)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(text.contains("held by a running daemon"), "{text}");
    assert!(!is_mount_point(&other));
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap(),
        format!("{pid}\n")
    );
    mount.unmount();
    assert!(!pid_file.exists(), "removed when the daemon stops");
}
