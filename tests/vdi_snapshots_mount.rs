//! VirtualBox snapshots (differencing VDIs) through a real imgfs mount. QEMU cannot open them,
//! so the oracle is the parent as `qemu-img convert` serves it plus the writes made: a child in
//! `Snapshots/` reads through its parent, found by UUID; threaded writes land in the child and
//! survive a new mount; the parent is served read-only and its bytes never change; a chain of
//! three serves the top and keeps the middle read-only; `imgfs info` shows the parent UUIDs.

mod common;

use std::process::Command;

use common::*;

const MIB: u64 = 1 << 20;

fn assert_read_only(path: &std::path::Path) {
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{}", path.display());
}

#[test]
fn snapshots_read_through_their_parents_and_take_the_writes() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("vdi-snapshots");
    std::fs::create_dir_all(src.join("vm/Snapshots")).unwrap();
    let disk = src.join("vm/disk.vdi");
    qemu_img(&["create", "-q", "-f", "vdi", path_str(&disk), "16M"]);
    qemu_io(
        "vdi",
        &disk,
        &[
            "write -P 0x51 0 5M",
            "write -P 0x52 9M 1536k",
            "write -P 0x53 15M 1M",
        ],
    );
    let disk_before = std::fs::read(&disk).unwrap();
    let mut expected = qemu_raw("vdi", &disk, &dir);
    let size = expected.len() as u64;

    let child = src.join("vm/Snapshots/{4a1c0de5-0000-4000-8000-000000000001}.vdi");
    imgfs::format::vdi::make_differencing(&child, &disk).unwrap();
    let info = run(Command::new(IMGFS)
        .args(["info", "--root"])
        .arg(&src)
        .arg(&child));
    let info = String::from_utf8(info.stdout).unwrap();
    for needle in ["subformat: differencing", "parent_uuid: ", "parent: "] {
        assert!(info.contains(needle), "{needle}: {info}");
    }

    let child_raw = "vm/Snapshots/{4a1c0de5-0000-4000-8000-000000000001}.vdi.raw";
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    assert!(
        std::fs::read(mount.path(child_raw)).unwrap() == expected,
        "reads through"
    );
    assert_read_only(&mount.path("vm/disk.vdi.raw"));
    // Unaligned writes inside allocated and unallocated parent blocks and across blocks.
    let plan = plan_threaded_writes(
        &mut expected,
        3,
        25,
        300_000,
        size - 3 * MIB,
        size - 2 * MIB,
    );
    run_threaded_writes(&mount.path(child_raw), &plan);
    assert!(
        std::fs::read(mount.path(child_raw)).unwrap() == expected,
        "read back"
    );
    mount.unmount();
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        disk_before,
        "the parent is untouched"
    );
    assert_check_clean("vdi", &disk);

    // A snapshot of the snapshot: the middle image becomes read-only, the top takes writes.
    let top = src.join("vm/Snapshots/{4a1c0de5-0000-4000-8000-000000000002}.vdi");
    imgfs::format::vdi::make_differencing(&top, &child).unwrap();
    let child_before = std::fs::read(&child).unwrap();
    let top_raw = "vm/Snapshots/{4a1c0de5-0000-4000-8000-000000000002}.vdi.raw";
    let mount = Mount::new(&src, &dir.join("mnt2"), &[]);
    assert!(
        std::fs::read(mount.path(child_raw)).unwrap() == expected,
        "the middle, after a new mount"
    );
    assert!(
        std::fs::read(mount.path(top_raw)).unwrap() == expected,
        "the top"
    );
    assert_read_only(&mount.path(child_raw));
    let plan = plan_threaded_writes(&mut expected, 2, 20, 200_000, 2 * MIB, 3 * MIB);
    run_threaded_writes(&mount.path(top_raw), &plan);
    mount.unmount();
    assert_eq!(
        std::fs::read(&child).unwrap(),
        child_before,
        "the middle is untouched"
    );
    let mount = Mount::new(&src, &dir.join("mnt3"), &[]);
    assert!(
        std::fs::read(mount.path(top_raw)).unwrap() == expected,
        "the top, after a new mount"
    );
    mount.unmount();
}

#[test]
fn a_snapshot_whose_parent_is_missing_or_ambiguous_is_not_served() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("vdi-orphans");
    let disk = src.join("disk.vdi");
    qemu_img(&["create", "-q", "-f", "vdi", path_str(&disk), "4M"]);
    imgfs::format::vdi::make_differencing(&src.join("snap.vdi"), &disk).unwrap();
    std::fs::copy(&disk, src.join("disk-copy.vdi")).unwrap();
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let names = ls(&mount.path(""));
    assert!(!names.contains(&"snap.vdi.raw".to_string()), "{names:?}");
    assert!(names.contains(&"disk.vdi.raw".to_string()), "{names:?}");
    let log = mount.log_text();
    assert!(
        log.contains("ambiguous") && log.contains("snap.vdi"),
        "{log}"
    );
    mount.unmount();
}
