//! imgfs mounted and unmounted by a user without root, as on a desktop: mount(2) is refused
//! to them, so the mount goes through the setuid `fusermount3`, and so do `imgfs umount` and
//! a plain `fusermount3 -u`, which must both write everything back.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// The unprivileged user the tests run imgfs as: `nobody`.
const USER: u32 = 65534;

/// Makes /dev/fuse readable and writable by everyone while it lives, as the udev rule of
/// every distribution that ships FUSE does (some containers leave it 0600). The tests that
/// need it take turns: one restoring the mode would pull it from under another's mount.
struct OpenDevFuse {
    restore: Option<u32>,
    _turn: std::sync::MutexGuard<'static, ()>,
}

static DEV_FUSE_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl OpenDevFuse {
    fn new() -> Self {
        let turn = DEV_FUSE_TURN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let dev = Path::new("/dev/fuse");
        let mode = std::fs::metadata(dev).unwrap().permissions().mode() & 0o7777;
        if mode & 0o666 == 0o666 {
            return OpenDevFuse {
                restore: None,
                _turn: turn,
            };
        }
        std::fs::set_permissions(dev, std::fs::Permissions::from_mode(0o666)).unwrap();
        OpenDevFuse {
            restore: Some(mode),
            _turn: turn,
        }
    }
}

impl Drop for OpenDevFuse {
    fn drop(&mut self) {
        if let Some(mode) = self.restore {
            let _ = std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(mode));
        }
    }
}

/// `cmd`, run as `USER` (std drops the supplementary groups with the uid).
fn as_user(cmd: &mut Command) -> &mut Command {
    cmd.uid(USER).gid(USER)
}

/// A tree `USER` owns: a copy of the imgfs binary (the build directory may lie where they
/// cannot go), `src` with a qcow2 and a VDI image filled by qemu-io, and `mnt`.
struct UserTree {
    dir: TempDir,
    imgfs: PathBuf,
    src: PathBuf,
    mnt: PathBuf,
}

impl UserTree {
    fn new() -> Self {
        let dir = TempDir::new("unprivileged");
        let src = dir.join("src");
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        create_filled(
            &src,
            "qcow2",
            "a.qcow2",
            &[],
            "8M",
            &["write -P 0x5a 0 100k"],
        );
        create_filled(&src, "vdi", "b.vdi", &[], "8M", &["write -P 0x3c 1M 1M"]);
        let imgfs = dir.join("imgfs");
        std::fs::copy(IMGFS, &imgfs).unwrap();
        std::fs::set_permissions(&imgfs, std::fs::Permissions::from_mode(0o755)).unwrap();
        run(Command::new("chown")
            .arg("-R")
            .arg(format!("{USER}:{USER}"))
            .arg(dir.path()));
        UserTree {
            dir,
            imgfs,
            src,
            mnt,
        }
    }

    /// `imgfs mount src mnt` as `USER`; checks the kernel records them as the mount's owner.
    fn mount(&self) {
        self.mount_with(&[]);
    }

    /// `mount`, with `extra` arguments.
    fn mount_with(&self, extra: &[&str]) {
        let log = self.log();
        run(as_user(
            Command::new(&self.imgfs)
                .arg("mount")
                .args(extra)
                .arg("--log-file")
                .arg(&log)
                .arg(&self.src)
                .arg(&self.mnt),
        ));
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        let line = mounts
            .lines()
            .find(|l| l.split(' ').nth(1) == Some(path_str(&self.mnt)))
            .unwrap_or_else(|| panic!("{} is not mounted:\n{mounts}", self.mnt.display()));
        assert!(line.contains(&format!("user_id={USER}")), "{line}");
    }

    fn log(&self) -> PathBuf {
        self.dir.join("mnt.log")
    }

    /// The raw file `name` of the mount, read whole by `USER` (only the user who mounted may
    /// look inside a mount without allow_other, root included).
    fn read_raw(&self, name: &str) -> Vec<u8> {
        let copy = self.dir.join("copy.raw");
        run(as_user(
            Command::new("cp").arg(self.mnt.join(name)).arg(&copy),
        ));
        let data = std::fs::read(&copy).unwrap();
        std::fs::remove_file(&copy).unwrap();
        data
    }

    /// Writes `data` at byte `offset` of raw file `name` as `USER`, with an fsync, and applies
    /// it to `expected`.
    fn write_raw(&self, name: &str, offset: u64, data: &[u8], expected: &mut [u8]) {
        let pattern = self.dir.join("pattern");
        std::fs::write(&pattern, data).unwrap();
        run(as_user(
            Command::new("dd")
                .arg(format!("if={}", pattern.display()))
                .arg(format!("of={}", self.mnt.join(name).display()))
                .arg(format!("bs={}", data.len()))
                .arg(format!("seek={offset}"))
                .args(["oflag=seek_bytes", "conv=notrunc,fsync", "status=none"]),
        ));
        let at = offset as usize;
        expected[at..at + data.len()].copy_from_slice(data);
    }

    /// The pid of the daemon serving `mnt`, found by its command line: root may not ask the
    /// mount itself.
    fn daemon_pid(&self) -> i32 {
        let wanted = ["mount", path_str(&self.src), path_str(&self.mnt)];
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let args: Vec<_> = cmdline
                .split(|&b| b == 0)
                .map(String::from_utf8_lossy)
                .collect();
            if args.first().map(|a| a.as_ref()) == Some(path_str(&self.imgfs))
                && wanted.iter().all(|w| args.iter().any(|a| a == w))
            {
                return pid;
            }
        }
        panic!("no imgfs daemon serves {}", self.mnt.display());
    }

    /// Both images must pass `qemu-img check` and hold `expected`.
    fn assert_written_back(&self, expected: &[(&str, &str, &[u8])]) {
        assert!(!is_mount_point(&self.mnt));
        for &(format, name, bytes) in expected {
            let image = self.src.join(name);
            assert_check_clean(format, &image);
            assert_compare_equal(format, &image, bytes, &self.dir);
        }
    }
}

#[test]
fn a_user_without_root_mounts_writes_and_unmounts_through_fusermount3() {
    if !can_mount() {
        return;
    }
    let _dev = OpenDevFuse::new();
    let tree = UserTree::new();
    let mut qcow2 = qemu_raw("qcow2", &tree.src.join("a.qcow2"), &tree.dir);
    let mut vdi = qemu_raw("vdi", &tree.src.join("b.vdi"), &tree.dir);
    let mut rng = Rng::new(0x6e6f626f6479);

    tree.mount();
    assert_eq!(tree.read_raw("a.qcow2.raw"), qcow2);
    assert_eq!(tree.read_raw("b.vdi.raw"), vdi);
    // Unaligned, across a qcow2 cluster and across a VDI block.
    tree.write_raw("a.qcow2.raw", 65536 - 1000, &rng.bytes(5000), &mut qcow2);
    tree.write_raw("b.vdi.raw", (1 << 20) - 7, &rng.bytes(70_000), &mut vdi);
    assert_eq!(tree.read_raw("a.qcow2.raw"), qcow2);
    run(as_user(
        Command::new(&tree.imgfs).arg("umount").arg(&tree.mnt),
    ));
    tree.assert_written_back(&[("qcow2", "a.qcow2", &qcow2), ("vdi", "b.vdi", &vdi)]);

    // Again, unmounted with fusermount3 itself, which the daemon sees only as the end of its
    // session: it writes back before it exits.
    tree.mount();
    tree.write_raw("a.qcow2.raw", 3 << 20, &rng.bytes(131_072), &mut qcow2);
    tree.write_raw("b.vdi.raw", 5 << 20, &rng.bytes(513), &mut vdi);
    let exit = ExitWatch::new(tree.daemon_pid());
    run(as_user(
        Command::new("fusermount3").arg("-u").arg(&tree.mnt),
    ));
    exit.wait();
    tree.assert_written_back(&[("qcow2", "a.qcow2", &qcow2), ("vdi", "b.vdi", &vdi)]);
}

#[test]
fn without_root_passthrough_is_refused_and_reads_go_through_the_daemon() {
    if !can_mount() {
        return;
    }
    let _dev = OpenDevFuse::new();
    let tree = UserTree::new();
    let flat = ["-o", "subformat=monolithicFlat"];
    create_filled(
        &tree.src,
        "vmdk",
        "f.vmdk",
        &flat,
        "8M",
        &["write -P 0x66 1M 3M"],
    );
    run(Command::new("chown")
        .arg("-R")
        .arg(format!("{USER}:{USER}"))
        .arg(&tree.src));
    let expected = qemu_raw("vmdk", &tree.src.join("f.vmdk"), &tree.dir);

    // Registering a backing file needs CAP_SYS_ADMIN: the first open turns passthrough off for
    // the mount and is served by the daemon, as is every open after it.
    tree.mount_with(&["--read-only"]);
    assert_eq!(tree.read_raw("f.vmdk.raw"), expected);
    assert_eq!(tree.read_raw("f.vmdk.raw"), expected);
    let opens = as_user(
        Command::new("getfattr")
            .args(["-n", "user.imgfs.passthrough-opens", "--only-values"])
            .arg(&tree.mnt),
    )
    .output()
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&opens.stdout), "0");
    run(as_user(
        Command::new(&tree.imgfs).arg("umount").arg(&tree.mnt),
    ));
    let log = std::fs::read_to_string(tree.log()).unwrap();
    assert_eq!(
        log.matches("FUSE passthrough refused").count(),
        1,
        "said once:\n{log}"
    );
}
