//! A source given as one image file, as qemu-nbd, xmount and the libyal mounters take one:
//! `imgfs mount disk.qcow2 MNT` and `imgfs nbd disk.qcow2` serve that image alone (over its
//! backing file beside it), show nothing else of its directory, and refuse a file that is
//! no image.

mod common;
mod nbd_support;

use std::os::unix::fs::FileExt;
use std::process::Command;

use common::*;
use nbd_support::*;

/// `dir/src` with `top.qcow2` over `base.qcow2`, another image and a sub-directory of images
/// beside them.
fn source(tag: &str) -> (TempDir, std::path::PathBuf) {
    let (dir, src) = empty_source(tag);
    create_filled(
        &src,
        "qcow2",
        "base.qcow2",
        &[],
        "8M",
        &["write -P 0x11 0 4M"],
    );
    let over_base = ["-b", "base.qcow2", "-F", "qcow2"];
    create_filled(
        &src,
        "qcow2",
        "top.qcow2",
        &over_base,
        "8M",
        &["write -P 0x22 1M 1M"],
    );
    create_filled(&src, "vdi", "other.vdi", &[], "4M", &[]);
    std::fs::create_dir_all(src.join("sub")).unwrap();
    create_filled(&src.join("sub"), "vdi", "deep.vdi", &[], "4M", &[]);
    (dir, src)
}

#[test]
fn a_mount_of_one_image_serves_it_alone_over_its_backing_file() {
    if !can_mount() {
        return;
    }
    let (dir, src) = source("single-mount");
    let top = src.join("top.qcow2");
    let mut expected = qemu_raw("qcow2", &top, &dir);
    // The mount point may lie beside the image: nothing of that directory is looked at.
    let mount = Mount::new(&top, &src.join("mnt"), &[]);
    assert_eq!(ls(&mount.mnt), ["top.qcow2.raw"]);
    for hidden in ["base.qcow2.raw", "other.vdi.raw", "sub", "mnt"] {
        assert!(!mount.path(hidden).exists(), "{hidden}");
    }
    let raw = mount.path("top.qcow2.raw");
    assert!(std::fs::read(&raw).unwrap() == expected);
    let file = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    file.write_all_at(&[0x33; 70_000], (3 << 20) - 5000)
        .unwrap();
    file.sync_all().unwrap();
    drop(file);
    expected[(3 << 20) - 5000..(3 << 20) + 65_000].fill(0x33);
    mount.unmount();
    assert_check_clean("qcow2", &top);
    assert_compare_equal("qcow2", &top, &expected, &dir);
}

#[test]
fn a_file_that_is_no_image_is_refused_by_name() {
    if !can_mount() {
        return;
    }
    let (dir, src) = source("single-refused");
    let notes = src.join("notes.txt");
    std::fs::write(&notes, "not an image").unwrap();
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let out = Command::new(IMGFS)
        .arg("mount")
        .arg("--log-file")
        .arg(dir.join("mnt.log"))
        .arg(&notes)
        .arg(&mnt)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(text.contains("notes.txt is not an image"), "{text}");
    assert!(!is_mount_point(&mnt));
}

#[test]
fn nbd_of_one_image_is_its_only_and_default_export() {
    if !have_libnbd_tools() {
        return;
    }
    let (dir, src) = source("single-nbd");
    let top = src.join("top.qcow2");
    let expected = qemu_raw("qcow2", &top, &dir);
    let server = NbdServer::unix(&top, dir.path(), &[]);
    let listed = client("nbdinfo", &["--list", &server.uri("")]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains("export=\"top.qcow2\""), "{text}");
    assert!(
        !text.contains("other.vdi") && !text.contains("base.qcow2"),
        "{text}"
    );
    assert!(read_nbd(&server.uri(""), &dir.join("default.raw")) == expected);
    server.stop();
}
