//! VMDK through a real imgfs mount, with qemu-img as the oracle: every sub-format qemu-img
//! writes reads like `qemu-img convert -O raw`; extent files of split and flat disks do not
//! appear on their own; writes from several threads leave disks that `qemu-img check` passes
//! and `qemu-img compare` finds equal to the expected bytes; parents are served read-only and
//! a parent whose CID changed keeps only its child out.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;

const MIB: u64 = 1 << 20;

/// Creates `name` below `src` with `qemu-img create -f vmdk OPTIONS name size` and fills it.
fn create(src: &Path, name: &str, options: &[&str], size: &str, fills: &[&str]) {
    create_filled(src, "vmdk", name, options, size, fills);
}

const FILLS: &[&str] = &[
    "write -P 0xab 0 1M",
    "write -P 0x12 1000000 1000000",
    "write -P 0x56 3700k 512",
    "write -P 0x78 4095k 1k",
];

/// 4 MiB disks of every sub-format below `src`; returns their names (descriptors only).
fn make_matrix(src: &Path, dir: &TempDir) -> Vec<String> {
    let mut names = Vec::new();
    for subformat in [
        "monolithicSparse",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
    ] {
        let name = format!("{subformat}.vmdk");
        let option = format!("subformat={subformat}");
        create(src, &name, &["-o", &option], "4M", FILLS);
        names.push(name);
    }
    create(src, "zeroed.vmdk", &["-o", "zeroed_grain=on"], "4M", FILLS);
    qemu_io("vmdk", &src.join("zeroed.vmdk"), &["write -z 64k 128k"]);
    names.push("zeroed.vmdk".into());
    let raw = dir.join("source.raw");
    qemu_img(&["create", "-q", "-f", "raw", path_str(&raw), "4M"]);
    qemu_io("raw", &raw, FILLS);
    let stream = src.join("stream.vmdk");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        path_str(&raw),
        path_str(&stream),
    ]);
    names.push("stream.vmdk".into());
    names
}

#[test]
fn every_vmdk_sub_format_reads_like_qemu_img_convert_and_extents_stay_hidden() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("vmdk-read");
    let names = make_matrix(&src, &dir);
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let mut shown: Vec<String> = names.iter().map(|n| format!("{n}.raw")).collect();
    shown.sort();
    assert_eq!(
        ls(&mount.mnt),
        shown,
        "extent files appear only through their disk"
    );
    for name in &names {
        assert_served_like_qemu(&mount, &src, &dir, "vmdk", name);
    }
    let mode = std::fs::metadata(mount.path("stream.vmdk.raw"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o222, 0, "streamOptimized is served read-only");
    mount.unmount();
}

#[test]
fn threaded_writes_into_every_writable_vmdk_pass_qemu_img_check_and_compare() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("vmdk-write");
    let mut names = make_matrix(&src, &dir);
    names.retain(|n| n != "stream.vmdk");
    // A child over a parent, with data of its own and zeroed grains.
    create(&src, "base.vmdk", &[], "4M", &["write -P 0x5b 0 4M"]);
    create(
        &src,
        "child.vmdk",
        &["-o", "zeroed_grain=on", "-b", "base.vmdk", "-F", "vmdk"],
        "4M",
        &["write -P 0x33 1536k 1M", "write -z 3M 128k"],
    );
    names.push("child.vmdk".into());
    let base_before = qemu_raw("vmdk", &src.join("base.vmdk"), &dir);
    let mut expected: Vec<Vec<u8>> = names
        .iter()
        .map(|name| qemu_raw("vmdk", &src.join(name), &dir))
        .collect();
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    for (name, expected) in names.iter().zip(expected.iter_mut()) {
        // Four threads in their own parts of the first 3 MiB, and all four into the grain at
        // 3.5 MiB at once.
        let plans = plan_threaded_writes(expected, 4, 25, 200_000, 3 * MIB, 3 * MIB + MIB / 2);
        let raw = mount.path(&format!("{name}.raw"));
        run_threaded_writes(&raw, &plans);
        assert!(
            std::fs::read(&raw).unwrap() == *expected,
            "{name}: read-back through the mount differs"
        );
    }
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(mount.path("base.vmdk.raw"))
        .unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EROFS),
        "a parent is read-only"
    );
    mount.unmount();

    for (name, expected) in names.iter().zip(&expected) {
        let image = src.join(name);
        assert_check_clean("vmdk", &image);
        assert_compare_equal("vmdk", &image, expected, &dir);
    }
    assert!(qemu_raw("vmdk", &src.join("base.vmdk"), &dir) == base_before);
}

#[test]
fn a_changed_parent_or_an_escaping_extent_keeps_only_that_disk_out() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("vmdk-bad");
    create(&src, "fine.vmdk", &[], "1M", &["write -P 0x5 0 4k"]);
    create(&src, "base.vmdk", &[], "1M", &[]);
    create(
        &src,
        "stale.vmdk",
        &["-b", "base.vmdk", "-F", "vmdk"],
        "1M",
        &[],
    );
    // Writing the parent after the child was made gives it a new CID.
    qemu_io("vmdk", &src.join("base.vmdk"), &["write -P 0x9 0 4k"]);
    let outside = dir.join("outside-flat.vmdk");
    std::fs::write(&outside, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(
        src.join("escape.vmdk"),
        "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n\
         createType=\"monolithicFlat\"\nRW 2048 FLAT \"../outside-flat.vmdk\" 0\n",
    )
    .unwrap();
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    assert_eq!(ls(&mount.mnt), ["base.vmdk.raw", "fine.vmdk.raw"]);
    let log = mount.log_text();
    for expect in ["parentCID", "outside the source tree"] {
        assert!(log.contains(expect), "log should say {expect:?}: {log}");
    }
    mount.unmount();
}
