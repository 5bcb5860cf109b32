//! Shared harness of the mount tests: temp dirs, qemu-img/qemu-io wrappers, a deterministic
//! random source, and a `Mount` that always unmounts, even when a test fails.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};

pub const IMGFS: &str = env!("CARGO_BIN_EXE_imgfs");

/// Whether mount tests can run here. They may skip without /dev/fuse or root, never in CI.
pub fn can_mount() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let fuse = Path::new("/dev/fuse").exists();
    if root && fuse {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("mount tests need root and /dev/fuse, and CI must run them");
    }
    eprintln!("skipping: mount tests need root and /dev/fuse");
    false
}

pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("imgfs-it-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A temp dir with a `src` directory holding one fresh image `name` made by `qemu-img create`
/// with `options` (e.g. `["-o", "static=on"]`); returns the dir, `src` and the image's path.
pub fn source_with_image(
    tag: &str,
    format: &str,
    name: &str,
    size: &str,
    options: &[&str],
) -> (TempDir, PathBuf, PathBuf) {
    let dir = TempDir::new(tag);
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let image = src.join(name);
    let mut args = vec!["create", "-q", "-f", format];
    args.extend(options);
    args.extend([path_str(&image), size]);
    qemu_img(&args);
    (dir, src, image)
}

/// Runs a command and panics with its output unless it succeeds.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert_succeeded(cmd, out)
}

fn assert_succeeded(cmd: &Command, out: Output) -> Output {
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs an unmount command, again while it says the mount is busy (at most 50 times, 100 ms
/// apart), and returns its last output. A child another test thread forks holds a copy of every
/// open descriptor until it execs, so a file this test has closed can keep the mount busy for a
/// moment under load.
pub fn output_while_busy(cmd: &mut Command) -> Output {
    let mut tries = 1;
    loop {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let busy = String::from_utf8_lossy(&out.stderr).contains("busy");
        if out.status.success() || !busy || tries == 50 {
            return out;
        }
        tries += 1;
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `run` for an unmount command: see `output_while_busy`.
pub fn run_while_busy(cmd: &mut Command) -> Output {
    let out = output_while_busy(cmd);
    assert_succeeded(cmd, out)
}

pub fn qemu_img(args: &[&str]) -> Output {
    run(Command::new("qemu-img").args(args))
}

/// Runs qemu-io commands (`write -P 0xab 0 4k`, ...) on an image.
pub fn qemu_io(format: &str, image: &Path, commands: &[&str]) {
    if commands.is_empty() {
        return;
    }
    let mut cmd = Command::new("qemu-io");
    cmd.arg("-f").arg(format);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    run(cmd.arg(image));
}

/// Creates `src/name` with `qemu-img create -f FORMAT OPTIONS ... SIZE` and fills it with
/// qemu-io commands.
pub fn create_filled(
    src: &Path,
    format: &str,
    name: &str,
    options: &[&str],
    size: &str,
    fills: &[&str],
) {
    let path = src.join(name);
    let mut args = vec!["create", "-q", "-f", format];
    args.extend_from_slice(options);
    args.extend([path_str(&path), size]);
    qemu_img(&args);
    qemu_io(format, &path, fills);
}

/// An empty differencing VHDX `child` in `src` over the VHDX `parent` next to it (qemu-img
/// cannot create one: imgfs's helper links a dynamic one to the parent).
pub fn vhdx_child(src: &Path, parent: &str, child: &str, size: &str) {
    let path = src.join(child);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M,block_state_zero=off",
        path_str(&path),
        size,
    ]);
    let parent_file = imgfs::host::HostFile::open(&src.join(parent), false).unwrap();
    let linkage = imgfs::format::vhdx::data_write_guid_of(&parent_file).unwrap();
    imgfs::format::vhdx::make_differencing(&path, parent, linkage).unwrap();
}

/// The image's content as qemu-img sees it.
pub fn qemu_raw(format: &str, image: &Path, dir: &TempDir) -> Vec<u8> {
    let out = dir.join("oracle.raw");
    qemu_img(&[
        "convert",
        "-U",
        "-f",
        format,
        "-O",
        "raw",
        path_str(image),
        path_str(&out),
    ]);
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

/// `qemu-img check` must report a clean image: no errors, no leaks.
pub fn assert_check_clean(format: &str, image: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", format])
        .arg(image)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "qemu-img check {}: {text}",
        image.display()
    );
    assert!(
        !text.contains("ERROR") && !text.contains("leaked"),
        "qemu-img check: {text}"
    );
}

/// `qemu-img compare` of the image with the expected raw bytes must say identical.
pub fn assert_compare_equal(format: &str, image: &Path, expected: &[u8], dir: &TempDir) {
    let raw = dir.join("expected.raw");
    std::fs::write(&raw, expected).unwrap();
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", format])
        .arg(&raw)
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&raw).unwrap();
}

/// A fresh test directory with an empty source tree `src` in it.
pub fn empty_source(tag: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new(tag);
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    (dir, src)
}

/// The sorted names in directory `dir`.
pub fn ls(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// `name.raw` read through `mount` must equal `qemu-img convert -O raw` of `src/name`.
pub fn assert_served_like_qemu(mount: &Mount, src: &Path, dir: &TempDir, format: &str, name: &str) {
    let ours = std::fs::read(mount.path(&format!("{name}.raw")))
        .unwrap_or_else(|e| panic!("{name}: read through the mount: {e}"));
    let oracle = qemu_raw(format, &src.join(name), dir);
    assert_eq!(ours.len(), oracle.len(), "{name}: size");
    assert!(
        ours == oracle,
        "{name}: content differs from qemu-img convert"
    );
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Writes for `threads` threads: each gets `per_thread` random unaligned writes of up to
/// `max_len` bytes inside its own slice of `[0, span)`, plus `shared_len` bytes of its own
/// inside one shared region at `shared_at` (so all threads allocate the same cluster or
/// block at once). Returns the plans; `expected` is updated with every write.
pub fn plan_threaded_writes(
    expected: &mut [u8],
    threads: u64,
    per_thread: usize,
    max_len: u64,
    span: u64,
    shared_at: u64,
) -> Vec<Vec<(u64, Vec<u8>)>> {
    // Inside the span the shared writes would race the threads' own: no single expected result.
    assert!(
        shared_at >= span,
        "the shared region must lie past the threads' regions"
    );
    let region = span / threads;
    let mut plans = Vec::new();
    for t in 0..threads {
        let mut rng = Rng::new(0x5eed + t);
        let mut writes = Vec::new();
        for _ in 0..per_thread {
            let len = 1 + rng.below(max_len.min(region - 1));
            let offset = t * region + rng.below(region - len);
            writes.push((offset, rng.bytes(len as usize)));
        }
        writes.push((shared_at + t * 1000 + 7, vec![0xe0 + t as u8; 999]));
        plans.push(writes);
    }
    for writes in &plans {
        for (offset, data) in writes {
            expected[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
        }
    }
    plans
}

/// Runs each plan of `plan_threaded_writes` on its own thread against `raw`, each thread with
/// its own file descriptor, ending with an fsync.
pub fn run_threaded_writes(raw: &Path, plans: &[Vec<(u64, Vec<u8>)>]) {
    use std::os::unix::fs::FileExt;
    std::thread::scope(|scope| {
        for writes in plans {
            scope.spawn(move || {
                let file = std::fs::OpenOptions::new().write(true).open(raw).unwrap();
                for (offset, data) in writes {
                    file.write_all_at(data, *offset).unwrap();
                }
                file.sync_all().unwrap();
            });
        }
    });
}

/// A live imgfs mount of `src` on `mnt`; unmounted with `imgfs umount` on drop.
pub struct Mount {
    pub mnt: PathBuf,
    pub log: PathBuf,
    mounted: bool,
}

impl Mount {
    pub fn new(src: &Path, mnt: &Path, extra: &[&str]) -> Self {
        Self::with(src, mnt, extra, |_| {})
    }

    /// `new`, with the `imgfs mount` command adjusted by `configure` first (its limits, its
    /// working directory, ...).
    pub fn with(
        src: &Path,
        mnt: &Path,
        extra: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Self {
        // A file stays one: one image may be mounted on it.
        if !mnt.exists() {
            std::fs::create_dir_all(mnt).unwrap();
        }
        let log = mnt.with_extension("log");
        let mut cmd = Command::new(IMGFS);
        cmd.arg("mount").args(extra);
        // The whole mount suite runs once more over FUSE over io_uring (scripts/test.sh).
        if let Ok(transport) = std::env::var("IMGFS_TEST_TRANSPORT") {
            if !extra.iter().any(|a| a.starts_with("--transport")) {
                cmd.arg("--transport").arg(transport);
            }
        }
        cmd.arg("--log-file").arg(&log).arg(src).arg(mnt);
        configure(&mut cmd);
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "imgfs mount failed: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Mount {
            mnt: mnt.to_path_buf(),
            log,
            mounted: true,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// For a test that unmounted by other means: nothing left to do on drop.
    pub fn forget_unmounted(mut self) {
        self.mounted = false;
    }

    /// `imgfs umount`, which returns once every image is written back and closed.
    pub fn unmount(mut self) {
        let out = output_while_busy(Command::new(IMGFS).arg("umount").arg(&self.mnt));
        // Only a successful unmount relieves `drop` of its fallback.
        self.mounted = !out.status.success();
        assert!(
            out.status.success(),
            "imgfs umount failed: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        let log = self.log_text();
        let unexpected = log
            .lines()
            .filter(|l| l.contains("ERROR") && !l.contains("not serving"));
        assert_eq!(unexpected.count(), 0, "daemon logged errors:\n{log}");
        if std::env::var("IMGFS_TEST_TRANSPORT").as_deref() == Ok("uring") {
            let served = log
                .lines()
                .find_map(|l| l.split("FUSE over io_uring served ").nth(1))
                .and_then(|rest| rest.split(' ').next()?.parse::<u64>().ok());
            assert!(
                served.is_some_and(|n| n > 0),
                "no requests over io_uring:\n{log}"
            );
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            let ok = Command::new(IMGFS)
                .arg("umount")
                .arg(&self.mnt)
                .status()
                .map(|s| s.success());
            if ok.ok() != Some(true) {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
        }
    }
}

/// Reads `len` bytes at `offset` of a file.
pub fn read_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).unwrap();
    buf
}

/// The pid of the daemon serving `mnt`, from the extended attribute imgfs answers on its root.
pub fn daemon_pid(mnt: &Path) -> i32 {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(mnt.as_os_str().as_bytes()).unwrap();
    let mut buf = [0u8; 64];
    // SAFETY: valid NUL-terminated strings and a buffer of the size passed.
    let n = unsafe {
        libc::getxattr(
            c_path.as_ptr(),
            c"user.imgfs.pid".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert!(n > 0, "getxattr: {}", std::io::Error::last_os_error());
    String::from_utf8_lossy(&buf[..n as usize])
        .trim()
        .parse()
        .unwrap()
}

/// The value of extended attribute `name` of `path`, if it has one.
pub fn xattr(path: &Path, name: &str) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let c_name = std::ffi::CString::new(name).unwrap();
    let mut buf = [0u8; 256];
    // SAFETY: valid NUL-terminated strings and a buffer of the size passed.
    let n = unsafe {
        libc::getxattr(
            c_path.as_ptr(),
            c_name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (n >= 0).then(|| String::from_utf8_lossy(&buf[..n as usize]).into_owned())
}

/// Asks the daemon serving `mnt` to write everything back and close the images nobody has
/// open (`user.imgfs.flush`), without waiting for files the kernel has yet to release.
pub fn flush_mount(mnt: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(mnt.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated strings and a value of the length passed.
    let rc = unsafe {
        libc::setxattr(
            c_path.as_ptr(),
            c"user.imgfs.flush".as_ptr(),
            b"1".as_ptr().cast(),
            1,
            0,
        )
    };
    assert_eq!(rc, 0, "setxattr: {}", std::io::Error::last_os_error());
}

/// Asks the daemon serving `mnt` to write everything back and close the images nobody has
/// open (what `imgfs umount` does first, and the daemon does by itself after a few seconds),
/// once the kernel has released every file the test closed: it does so after `close` returns,
/// so this waits (at most 10 s) until the daemon counts no open file.
pub fn release_idle(mnt: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(mnt.as_os_str().as_bytes()).unwrap();
    for _ in 0..1000 {
        let mut buf = [0u8; 32];
        // SAFETY: valid NUL-terminated strings and a buffer of the size passed.
        let n = unsafe {
            libc::getxattr(
                c_path.as_ptr(),
                c"user.imgfs.open-files".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        assert!(n > 0, "getxattr: {}", std::io::Error::last_os_error());
        if &buf[..n as usize] == b"0" {
            return flush_mount(mnt);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("files stayed open on {}", mnt.display());
}

/// Watches a process (not necessarily our child) through a pidfd, to wait for its exit
/// without polling or sleeping.
pub struct ExitWatch(std::os::fd::OwnedFd);

impl ExitWatch {
    pub fn new(pid: i32) -> Self {
        use std::os::fd::FromRawFd;
        // SAFETY: pidfd_open returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
        assert!(fd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
        // SAFETY: the descriptor is new and owned by nobody else.
        ExitWatch(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    }

    /// Waits up to 60 s for the process to exit; panics if it does not.
    pub fn wait(self) {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        assert_eq!(
            unsafe { libc::poll(&mut pfd, 1, 60_000) },
            1,
            "process did not exit"
        );
    }
}

/// Whether `path` is a mount point.
pub fn is_mount_point(path: &Path) -> bool {
    Command::new("mountpoint")
        .arg("-q")
        .arg(path)
        .status()
        .unwrap()
        .success()
}

/// The `--object secret` and `--image-opts` arguments that open the encrypted qcow2 image at
/// `image` with `passphrase` in qemu-img and qemu-io.
pub fn qemu_encrypted_qcow2(image: &Path, passphrase: &str) -> [String; 4] {
    [
        "--object".into(),
        format!("secret,id=sec0,data={passphrase}"),
        "--image-opts".into(),
        format!(
            "driver=qcow2,encrypt.key-secret=sec0,file.filename={}",
            path_str(image)
        ),
    ]
}
