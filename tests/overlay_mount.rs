//! `imgfs mount --overlay DIR`: writes land in qcow2 overlays (every format, VHD included), the originals stay byte for byte
//! (and mtime for mtime) what they were, the overlays survive a remount, QEMU reads them, and
//! `imgfs overlay commit` writes them into the originals.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const SIZE: u64 = 8 << 20;

/// Every file of `src` with its bytes and mtime.
fn snapshot(src: &Path) -> Vec<(PathBuf, Vec<u8>, i64, i64)> {
    let mut files = Vec::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                dirs.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                files.push((path, bytes, meta.mtime(), meta.mtime_nsec()));
            }
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    files
}

/// One original per format and sub-format: (name in the tree, format, can it be committed).
fn originals(src: &Path) -> Vec<(&'static str, &'static str, bool)> {
    let fill = ["write -P 0x21 0 3M"];
    create_filled(src, "vdi", "disk.vdi", &[], "8M", &fill);
    create_filled(src, "qcow2", "base.qcow2", &[], "8M", &fill);
    let over_base = ["-b", "base.qcow2", "-F", "qcow2"];
    create_filled(
        src,
        "qcow2",
        "top.qcow2",
        &over_base,
        "8M",
        &["write -P 0x22 1M 1M"],
    );
    create_filled(src, "qcow", "old.qcow", &[], "8M", &fill);
    create_filled(
        src,
        "vhdx",
        "disk.vhdx",
        &["-o", "block_size=1M"],
        "8M",
        &fill,
    );
    create_filled(
        src,
        "vhdx",
        "parent.vhdx",
        &["-o", "block_size=1M"],
        "8M",
        &fill,
    );
    vhdx_child(src, "parent.vhdx", "child.vhdx", "8M");
    let split = ["-o", "subformat=twoGbMaxExtentSparse"];
    create_filled(src, "vmdk", "split.vmdk", &split, "8M", &fill);
    create_filled(src, "vmdk", "plain.vmdk", &[], "8M", &fill);
    let vhd = ["-o", "subformat=dynamic,force_size=on"];
    create_filled(src, "vpc", "disk.vhd", &vhd, "8M", &fill);
    let stream = src.join("stream.vmdk");
    qemu_img(&[
        "convert",
        "-q",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        path_str(&src.join("plain.vmdk")),
        path_str(&stream),
    ]);
    vec![
        ("disk.vdi", "vdi", true),
        ("top.qcow2", "qcow2", true),
        ("old.qcow", "qcow", true),
        ("disk.vhdx", "vhdx", true),
        ("child.vhdx", "vhdx", true),
        ("split.vmdk", "vmdk", true),
        ("stream.vmdk", "vmdk", false),
        ("disk.vhd", "vpc", true),
    ]
}

/// Unaligned writes across cluster and block boundaries.
const WRITES: [(u64, usize, u8); 4] = [
    (100, 5000, 0x51),
    ((1 << 20) - 700, 70_000, 0x52),
    (5 << 20, 4096, 0x53),
    ((8 << 20) - 513, 513, 0x54),
];

/// Makes `WRITES` on the raw file of image `name` with an fsync, checks they read back, and
/// returns the disk's bytes now.
fn write_and_read_back(mount: &Mount, name: &str) -> Vec<u8> {
    let raw = mount.path(&format!("{name}.raw"));
    let mut bytes = std::fs::read(&raw).unwrap();
    assert_eq!(bytes.len() as u64, SIZE, "{name}");
    let file = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    for (offset, len, value) in WRITES {
        file.write_all_at(&vec![value; len], offset).unwrap();
        bytes[offset as usize..offset as usize + len].fill(value);
    }
    file.sync_all().unwrap();
    assert!(std::fs::read(&raw).unwrap() == bytes, "{name}: read back");
    bytes
}

#[test]
fn writes_land_in_overlays_and_the_originals_never_change() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("overlay");
    let changes = dir.join("changes");
    let images = originals(&src);
    let before = snapshot(&src);
    let mut expected = Vec::new();
    let mount = Mount::new(&src, &dir.join("mnt"), &["--overlay", path_str(&changes)]);
    for (name, _, _) in &images {
        expected.push(write_and_read_back(&mount, name));
    }
    // `imgfs info` on a raw file of the mount shows what its overlay keeps.
    let info = run(Command::new(IMGFS)
        .arg("info")
        .arg(mount.path("disk.vdi.raw")));
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(
        text.contains("disk.vdi.qcow2, 4194304 bytes changed"),
        "{text}"
    );
    mount.unmount();
    assert!(snapshot(&src) == before, "the originals changed");
    let info = run(Command::new(IMGFS)
        .args(["info", "--overlay"])
        .arg(&changes)
        .arg("--root")
        .arg(&src)
        .arg(src.join("disk.vdi")));
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(
        text.contains("disk.vdi.qcow2, 4194304 bytes changed"),
        "{text}"
    );

    // Remounted: the changes are still there; QEMU reads the overlays alike.
    let mount = Mount::new(&src, &dir.join("mnt2"), &["--overlay", path_str(&changes)]);
    for ((name, _, _), bytes) in images.iter().zip(&expected) {
        assert!(
            std::fs::read(mount.path(&format!("{name}.raw"))).unwrap() == *bytes,
            "{name}"
        );
    }
    mount.unmount();
    assert!(snapshot(&src) == before, "the originals changed");
    for ((name, format, _), bytes) in images.iter().zip(&expected) {
        let overlay = changes.join(format!("{name}.qcow2"));
        if *name == "child.vhdx" {
            // QEMU cannot open differencing VHDX images: the overlay is checked alone.
            let alone = format!(
                "json:{{\"driver\":\"qcow2\",\"file\":{{\"driver\":\"file\",\"filename\":\"{}\"}},\"backing\":null}}",
                overlay.display()
            );
            let out = qemu_img(&["check", &alone]);
            assert!(String::from_utf8_lossy(&out.stdout).contains("No errors"));
        } else {
            assert_check_clean("qcow2", &overlay);
            assert!(
                qemu_raw("qcow2", &overlay, &dir) == *bytes,
                "{name} ({format}) for QEMU"
            );
        }
    }

    for ((name, format, committable), bytes) in images.iter().zip(&expected) {
        let out = Command::new(IMGFS)
            .args(["overlay", "commit"])
            .arg(&changes)
            .arg(name)
            .output()
            .unwrap();
        if !committable {
            assert!(
                !out.status.success(),
                "{name}: a read-only original takes no commit"
            );
            continue;
        }
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!changes.join(format!("{name}.qcow2")).exists());
        if *name == "child.vhdx" {
            let mount = Mount::new(&src, &dir.join("mnt3"), &[]);
            assert!(std::fs::read(mount.path("child.vhdx.raw")).unwrap() == *bytes);
            mount.unmount();
        } else {
            // qemu-img checks neither qcow nor VHD (vpc).
            if !matches!(*format, "qcow" | "vpc") {
                assert_check_clean(format, &src.join(name));
            }
            assert_compare_equal(format, &src.join(name), bytes, &dir);
        }
    }
}

#[test]
fn an_overlay_of_an_original_that_changed_is_refused() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("overlay-stale");
    let changes = dir.join("changes");
    create_filled(&src, "vdi", "disk.vdi", &[], "4M", &[]);
    let mount = Mount::new(&src, &dir.join("mnt"), &["--overlay", path_str(&changes)]);
    let raw = std::fs::OpenOptions::new()
        .write(true)
        .open(mount.path("disk.vdi.raw"))
        .unwrap();
    raw.write_all_at(&[0x61; 4096], 0).unwrap();
    raw.sync_all().unwrap();
    drop(raw);
    mount.unmount();
    qemu_io("vdi", &src.join("disk.vdi"), &["write -P 0x62 1M 4k"]);

    let mount = Mount::new(&src, &dir.join("mnt2"), &["--overlay", path_str(&changes)]);
    assert!(
        ls(&mount.mnt).is_empty(),
        "refused, not laid over other data"
    );
    assert!(
        mount.log_text().contains("changed since the overlay"),
        "{}",
        mount.log_text()
    );
    mount.unmount();
    let out = Command::new(IMGFS)
        .args(["overlay", "commit"])
        .arg(&changes)
        .arg("disk.vdi")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let status = Command::new(IMGFS)
        .args(["overlay", "status"])
        .arg(&changes)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&status.stdout).contains("changed since"));
    let out = Command::new(IMGFS)
        .args(["overlay", "discard"])
        .arg(&changes)
        .arg("disk.vdi")
        .output()
        .unwrap();
    assert!(!out.status.success(), "discard wants --yes");
    run(Command::new(IMGFS)
        .args(["overlay", "discard", "--yes"])
        .arg(&changes)
        .arg("disk.vdi"));
    assert!(!changes.join("disk.vdi.qcow2").exists());
}

#[test]
fn overlays_and_read_only_contradict() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("overlay-ro");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let out = Command::new(IMGFS)
        .args(["mount", "--read-only", "--overlay"])
        .arg(dir.join("changes"))
        .arg(&src)
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("contradict"));
}

#[test]
fn snapshot_mounts_throw_the_changes_away() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("snapshot");
    let images = originals(&src);
    let before = snapshot(&src);
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mount = Mount::with(&src, &dir.join("mnt"), &["--snapshot"], |cmd| {
        cmd.env("TMPDIR", &tmp);
    });
    for (name, _, _) in &images {
        write_and_read_back(&mount, name);
    }
    // The overlays are in one private directory below TMPDIR, which the mount names.
    let scratch: Vec<PathBuf> = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(scratch.len(), 1, "{scratch:?}");
    assert!(scratch[0].join("disk.vdi.qcow2").exists());
    let shown = xattr(&mount.mnt, "user.imgfs.overlay").unwrap_or_default();
    assert_eq!(Path::new(&shown), scratch[0].canonicalize().unwrap());
    mount.unmount();
    assert!(snapshot(&src) == before, "the originals changed");
    assert!(
        std::fs::read_dir(&tmp).unwrap().next().is_none(),
        "the scratch directory is removed at unmount"
    );

    // Mounted again, the images read as they were.
    let mount = Mount::new(&src, &dir.join("mnt2"), &["-o", "ro"]);
    for (name, format, _) in &images {
        if *name == "child.vhdx" {
            continue; // QEMU cannot open differencing VHDX images
        }
        let served = std::fs::read(mount.path(&format!("{name}.raw"))).unwrap();
        assert!(served == qemu_raw(format, &src.join(name), &dir), "{name}");
    }
    mount.unmount();
}

#[test]
fn snapshot_contradicts_overlay_and_read_only() {
    let (dir, src) = empty_source("snapshot-contradict");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    for extra in [
        &["--snapshot", "--read-only"][..],
        &["-o", "snapshot,ro"],
        &["--snapshot", "--overlay", "/nonexistent"],
    ] {
        let out = Command::new(IMGFS)
            .arg("mount")
            .args(extra)
            .arg(&src)
            .arg(&mnt)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{extra:?}");
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(text.contains("contradict"), "{extra:?}: {text}");
    }
}
