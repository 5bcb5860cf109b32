//! The FUSE transports: `--transport uring` serves over FUSE over io_uring where the kernel
//! offers it and refuses to mount where it does not, `auto` falls back to /dev/fuse, `dev`
//! never asks. The rest of the mount suite runs once more over io_uring (scripts/test.sh).
//!
//! Whether the kernel offers io_uring is the fuse module's `enable_uring` parameter, which
//! this test sets for each case and restores; it is one test so that nothing else in this
//! binary runs meanwhile.

mod common;

use std::path::Path;

use common::*;

const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Sets `enable_uring` and puts the value it found back on drop.
struct EnableUring(String);

impl EnableUring {
    fn set(value: &str) -> Self {
        let before = std::fs::read_to_string(ENABLE_URING).unwrap();
        std::fs::write(ENABLE_URING, value).unwrap();
        EnableUring(before.trim().to_string())
    }
}

impl Drop for EnableUring {
    fn drop(&mut self) {
        let _ = std::fs::write(ENABLE_URING, &self.0);
    }
}

fn source(tag: &str) -> (TempDir, std::path::PathBuf) {
    let (dir, src) = empty_source(tag);
    let fills = ["write -P 0x5a 0 1M", "write -P 0xa5 3M 200k"];
    create_filled(&src, "qcow2", "disk.qcow2", &[], "8M", &fills);
    create_filled(&src, "vdi", "disk.vdi", &[], "8M", &fills);
    (dir, src)
}

/// Reads both images like QEMU, writes across clusters and blocks, unmounts, and has QEMU
/// check and compare them.
fn read_write_check(mount: Mount, src: &Path, dir: &TempDir) {
    for (format, name) in [("qcow2", "disk.qcow2"), ("vdi", "disk.vdi")] {
        assert_served_like_qemu(&mount, src, dir, format, name);
    }
    let mut expected = Vec::new();
    for (format, name) in [("qcow2", "disk.qcow2"), ("vdi", "disk.vdi")] {
        let mut bytes = qemu_raw(format, &src.join(name), dir);
        let plans = plan_threaded_writes(&mut bytes, 4, 20, 200_000, 6 << 20, 7 << 20);
        run_threaded_writes(&mount.path(&format!("{name}.raw")), &plans);
        let raw = std::fs::read(mount.path(&format!("{name}.raw"))).unwrap();
        assert!(raw == bytes, "{name}: read back after the writes");
        expected.push((format, name, bytes));
    }
    mount.unmount();
    for (format, name, bytes) in expected {
        assert_check_clean(format, &src.join(name));
        assert_compare_equal(format, &src.join(name), &bytes, dir);
    }
}

#[test]
fn each_transport_serves_or_refuses_as_the_kernel_allows() {
    if !can_mount() {
        return;
    }
    if !Path::new(ENABLE_URING).exists() {
        // Linux before 6.14: no FUSE over io_uring to test.
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI's kernel must have FUSE over io_uring"
        );
        eprintln!("skipping: this kernel has no FUSE over io_uring");
        return;
    }

    // Offered: `uring` serves every request of these over the rings (Mount::unmount checks
    // the count when IMGFS_TEST_TRANSPORT says so; here the log is read directly).
    let enabled = EnableUring::set("Y");
    let (dir, src) = source("transport-uring");
    let mount = Mount::new(&src, &dir.join("mnt"), &["--transport", "uring"]);
    let log_path = mount.log.clone();
    read_write_check(mount, &src, &dir);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("FUSE over io_uring: "), "{log}");
    let served: u64 = log
        .lines()
        .find_map(|l| l.split("FUSE over io_uring served ").nth(1))
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no count of ring requests:\n{log}"));
    assert!(served > 100, "{served} requests over io_uring:\n{log}");

    // `dev` never asks, even where the kernel offers it.
    let (dir, src) = source("transport-dev");
    let mount = Mount::new(&src, &dir.join("mnt"), &["--transport", "dev"]);
    let log_path = mount.log.clone();
    read_write_check(mount, &src, &dir);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(!log.contains("FUSE over io_uring"), "{log}");
    drop(enabled);

    // Not offered: `uring` refuses to mount and says why; `auto` serves over /dev/fuse.
    let _disabled = EnableUring::set("N");
    let (dir, src) = source("transport-none");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let out = std::process::Command::new(IMGFS)
        .args(["mount", "--transport", "uring", "--log-file"])
        .arg(dir.join("refused.log"))
        .arg(&src)
        .arg(&mnt)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mounted without io_uring: {stderr}");
    assert!(stderr.contains("enable_uring"), "{stderr}");
    assert!(!is_mount_point(&mnt), "left mounted after refusing");
    let mount = Mount::new(&src, &mnt, &["--transport", "auto"]);
    let log_path = mount.log.clone();
    read_write_check(mount, &src, &dir);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(!log.contains("FUSE over io_uring"), "{log}");
}
