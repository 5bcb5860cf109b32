//! The tree changing under a real mount: images overwritten in place or half copied in,
//! moved away or replaced under open descriptors, made writable, named oddly or twice.

mod common;

use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::*;

/// The size of `path` as a freshly opened descriptor sees it.
fn opened_len(path: &Path) -> u64 {
    std::fs::File::open(path).unwrap().metadata().unwrap().len()
}

fn vdi(path: &Path, size: &str) {
    qemu_img(&["create", "-q", "-f", "vdi", path_str(path), size]);
}

#[test]
fn an_image_overwritten_in_place_is_served_anew_and_never_rewritten_from_stale_metadata() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("overwrite");
    let disk = src.join("disk.vdi");
    vdi(&disk, "64M");
    qemu_io("vdi", &disk, &["write -P 0x11 0 1M"]);
    let bigger = dir.join("bigger.vdi");
    vdi(&bigger, "128M");
    qemu_io("vdi", &bigger, &["write -P 0x22 5M 1M"]);
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let raw = mount.path("disk.vdi.raw");
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 64 << 20);
    let old = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    old.write_all_at(&[0x33; 4096], 0).unwrap();
    old.sync_all().unwrap();

    // `cp` truncates and rewrites the same inode.
    let inode = std::fs::metadata(&disk).unwrap().ino();
    run(Command::new("cp").arg(&bigger).arg(&disk));
    assert_eq!(std::fs::metadata(&disk).unwrap().ino(), inode);
    // (`stat` may show cached attributes for a second; an open asks the daemon.)
    assert_eq!(opened_len(&raw), 128 << 20);
    // The descriptor opened on the old content can no longer write into the new one.
    let err = old.write_all_at(&[0x44; 4096], 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE));
    assert!(old.sync_all().is_err());
    drop(old);

    let new = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    new.write_all_at(&[0x55; 4096], 10 << 20).unwrap();
    new.sync_all().unwrap();
    drop(new);
    mount.unmount();
    assert_check_clean("vdi", &disk);
    qemu_io(
        "vdi",
        &disk,
        &[
            "read -P 0x22 5M 1M",
            "read -P 0x55 10M 4k",
            "read -P 0 0 1M",
        ],
    );
}

#[test]
fn an_image_copied_in_halfway_is_served_once_complete() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("half-copied");
    let whole = dir.join("whole.vmdk");
    create_filled(
        dir.path(),
        "vmdk",
        "whole.vmdk",
        &[],
        "16M",
        &["write -P 0x66 3M 1M"],
    );
    let bytes = std::fs::read(&whole).unwrap();
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let copy = src.join("disk.vmdk");
    std::fs::write(&copy, &bytes[..bytes.len() / 2]).unwrap();
    // Whatever half of it looks like, it is looked at again once the copy is complete.
    ls(&mount.mnt);
    std::fs::write(&copy, &bytes).unwrap();
    assert_eq!(ls(&mount.mnt), ["disk.vmdk.raw"]);
    assert_served_like_qemu(&mount, &src, &dir, "vmdk", "disk.vmdk");
    mount.unmount();
}

#[test]
fn an_open_descriptor_keeps_its_size_when_the_image_moves_or_is_replaced() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("fstat");
    let disk = src.join("disk.vdi");
    vdi(&disk, "64M");
    qemu_io("vdi", &disk, &["write -P 0x12 0 4k"]);
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let raw = mount.path("disk.vdi.raw");
    let mut file = std::fs::File::open(&raw).unwrap();
    let moved = dir.join("moved.vdi");
    std::fs::rename(&disk, &moved).unwrap();
    assert_eq!(
        file.metadata().unwrap().len(),
        64 << 20,
        "fstat after a move"
    );
    assert_eq!(file.seek(SeekFrom::End(0)).unwrap(), 64 << 20);
    let mut head = [0u8; 4];
    file.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, [0x12; 4]);

    vdi(&disk, "1G");
    assert_eq!(opened_len(&raw), 1 << 30);
    assert_eq!(
        file.metadata().unwrap().len(),
        64 << 20,
        "fstat after a replace"
    );
    assert_eq!(file.seek(SeekFrom::End(0)).unwrap(), 64 << 20);
    file.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, [0x12; 4]);
    drop(file);
    mount.unmount();
}

#[test]
fn a_moved_away_image_is_let_go_once_closed() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("let-go");
    let disk = src.join("disk.vdi");
    vdi(&disk, "8M");
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let raw = mount.path("disk.vdi.raw");
    let file = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    file.write_all_at(&[0x21; 4096], 0).unwrap();
    let moved = dir.join("moved.vdi");
    std::fs::rename(&disk, &moved).unwrap();
    file.write_all_at(&[0x22; 4096], 4096).unwrap();
    file.sync_all().unwrap();
    drop(file);
    // No directory listed: closing is enough for the image to be written back and let go.
    release_idle(&mount.mnt);
    qemu_io(
        "vdi",
        &moved,
        &["read -P 0x21 0 4k", "read -P 0x22 4k 4k", "write 8k 4k"],
    );
    assert_check_clean("vdi", &moved);
    mount.unmount();
}

#[test]
fn a_snapshot_named_like_a_snapshots_directory_is_reachable() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("snapname");
    let image = src.join("vm.qcow2");
    create_filled(
        &src,
        "qcow2",
        "vm.qcow2",
        &[],
        "4M",
        &["write -P 0x31 0 1M"],
    );
    qemu_img(&["snapshot", "-c", "old.snapshots", path_str(&image)]);
    qemu_io("qcow2", &image, &["write -P 0x32 0 1M"]);
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    assert_eq!(ls(&mount.path("vm.qcow2.snapshots")), ["old.snapshots.raw"]);
    let snapshot = mount.path("vm.qcow2.snapshots/old.snapshots.raw");
    assert_eq!(std::fs::metadata(&snapshot).unwrap().len(), 4 << 20);
    assert_eq!(read_range(&snapshot, 0, 4096), vec![0x31; 4096]);
    mount.unmount();
}

#[test]
fn an_image_made_writable_while_mounted_is_served_writable() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("immutable");
    let disk = src.join("disk.vdi");
    vdi(&disk, "8M");
    // Root ignores permission bits; an immutable file is one even root cannot write.
    run(Command::new("chattr").arg("+i").arg(&disk));
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let raw = mount.path("disk.vdi.raw");
    assert_eq!(
        std::fs::metadata(&raw).unwrap().permissions().mode() & 0o222,
        0
    );
    read_range(&raw, 0, 512);
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    run(Command::new("chattr").arg("-i").arg(&disk));
    let file = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    file.write_all_at(&[0x61; 512], 0).unwrap();
    file.sync_all().unwrap();
    drop(file);
    mount.unmount();
    qemu_io("vdi", &disk, &["read -P 0x61 0 512"]);
}

#[test]
fn odd_names_long_ones_and_second_names_are_handled() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("names");
    let longest = "l".repeat(251);
    vdi(&src.join(&longest), "1M");
    vdi(&src.join("m".repeat(252)), "1M");
    std::fs::create_dir(src.join("sub")).unwrap();
    vdi(&src.join("a.vdi"), "1M");
    std::fs::hard_link(src.join("a.vdi"), src.join("sub/b.vdi")).unwrap();
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    assert_eq!(
        ls(&mount.mnt),
        ["a.vdi.raw".into(), format!("{longest}.raw"), "sub".into()]
    );
    assert!(
        mount.log_text().contains("too long"),
        "{}",
        mount.log_text()
    );
    read_range(&mount.path(&format!("{longest}.raw")), 0, 512);

    // One file under two names: both served, both writable, one instance.
    let a = std::fs::OpenOptions::new()
        .write(true)
        .open(mount.path("a.vdi.raw"))
        .unwrap();
    let b = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mount.path("sub/b.vdi.raw"))
        .unwrap();
    a.write_all_at(&[0x71; 512], 0).unwrap();
    let mut seen = [0u8; 512];
    b.read_exact_at(&mut seen, 0).unwrap();
    assert_eq!(seen, [0x71; 512]);
    drop((a, b));
    mount.unmount();
    assert_check_clean("vdi", &src.join("a.vdi"));
    assert!(!mount_log_mentions_qemu(&dir));
}

/// Whether the daemon blamed QEMU for anything (it must not, for a file under two names).
fn mount_log_mentions_qemu(dir: &TempDir) -> bool {
    std::fs::read_to_string(dir.join("mnt.log"))
        .unwrap_or_default()
        .contains("QEMU")
}

#[test]
fn a_mount_whose_source_directory_went_away_still_unmounts() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("gone");
    vdi(&src.join("disk.vdi"), "8M");
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    // Before anything in the mount is looked at, so no attributes are cached.
    std::fs::remove_dir_all(&src).unwrap();
    // The root shows the source's attributes from the start, so the mount stays reachable.
    let root = std::fs::metadata(mount.path("")).unwrap();
    assert!(root.is_dir());
    mount.unmount();
}
