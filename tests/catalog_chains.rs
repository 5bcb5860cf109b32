//! Backing files through a real mount: read-only from the first look whatever is looked up
//! first, shared with the images above, kept writable while a writer has them open (the new
//! image above waits), and writable again once the images above are gone.

mod common;

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::*;

/// `chain/base.qcow2` (with an internal snapshot) and `chain/overlay.qcow2` over it, plus
/// `other/deep.qcow2` over the base from another directory; as the demo builds them.
fn chain_source(tag: &str) -> (TempDir, std::path::PathBuf) {
    let (dir, src) = empty_source(tag);
    let chain = src.join("chain");
    std::fs::create_dir_all(&chain).unwrap();
    std::fs::create_dir_all(src.join("other")).unwrap();
    create_filled(
        &chain,
        "qcow2",
        "base.qcow2",
        &[],
        "8M",
        &["write -P 0x11 0 2M"],
    );
    qemu_img(&[
        "snapshot",
        "-c",
        "before",
        path_str(&chain.join("base.qcow2")),
    ]);
    qemu_io("qcow2", &chain.join("base.qcow2"), &["write -P 0x22 0 1M"]);
    let overlay = ["-b", "base.qcow2", "-F", "qcow2"];
    create_filled(
        &chain,
        "qcow2",
        "overlay.qcow2",
        &overlay,
        "8M",
        &["write -P 0x33 1M 1M"],
    );
    let deep = ["-b", "../chain/base.qcow2", "-F", "qcow2"];
    create_filled(&src.join("other"), "qcow2", "deep.qcow2", &deep, "8M", &[]);
    (dir, src)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode()
}

fn assert_refuses_writes(path: &Path) {
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{}", path.display());
}

/// The overlay still reads as qemu-io wrote it: its backing file never changed.
fn assert_overlay_intact(src: &Path) {
    qemu_io(
        "qcow2",
        &src.join("chain/overlay.qcow2"),
        &["read -P 0x22 0 1M", "read -P 0x33 1M 1M", "read -P 0 2M 1M"],
    );
}

#[test]
fn a_backing_file_is_read_only_whatever_is_looked_up_first() {
    if !can_mount() {
        return;
    }
    // Each order of first looks, in a fresh mount: the base's own raw file, its snapshots,
    // its directory, a directory holding only another image above it.
    let orders: [&[&str]; 4] = [
        &["chain/base.qcow2.raw"],
        &[
            "chain/base.qcow2.snapshots",
            "chain/base.qcow2.snapshots/before.raw",
        ],
        &["chain"],
        &["other"],
    ];
    for (i, order) in orders.iter().enumerate() {
        let (dir, src) = chain_source(&format!("order{i}"));
        let mount = Mount::new(&src, &dir.join("mnt"), &[]);
        for first in *order {
            std::fs::symlink_metadata(mount.path(first)).unwrap();
            if mount.path(first).is_dir() {
                ls(&mount.path(first));
            }
        }
        let base = mount.path("chain/base.qcow2.raw");
        assert_eq!(mode(&base) & 0o222, 0, "order {order:?}: base is read-only");
        assert_refuses_writes(&base);
        assert_eq!(
            ls(&mount.path("chain")),
            [
                "base.qcow2.raw",
                "base.qcow2.snapshots",
                "overlay.qcow2.raw"
            ],
            "order {order:?}: the overlay is listed"
        );
        assert_ne!(mode(&mount.path("chain/overlay.qcow2.raw")) & 0o200, 0);
        assert_served_like_qemu(&mount, &src, &dir, "qcow2", "chain/overlay.qcow2");
        assert_served_like_qemu(&mount, &src, &dir, "qcow2", "other/deep.qcow2");
        mount.unmount();
        assert_overlay_intact(&src);
        assert_check_clean("qcow2", &src.join("chain/base.qcow2"));
    }
}

#[test]
fn an_image_above_a_file_open_for_writing_waits_until_the_writer_closes() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("writer-base");
    create_filled(
        &src,
        "qcow2",
        "base.qcow2",
        &[],
        "4M",
        &["write -P 0x11 0 1M"],
    );
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let base = mount.path("base.qcow2.raw");
    let writer = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
    writer.write_all_at(&[0x44; 4096], 0).unwrap();
    writer.sync_all().unwrap();

    // Made without opening the base, which imgfs holds for writing.
    let top = src.join("top.qcow2");
    qemu_img(
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
        ]
        .into_iter()
        .chain([path_str(&top), "4M"])
        .collect::<Vec<_>>(),
    );
    assert_eq!(ls(&mount.mnt), ["base.qcow2.raw"], "the new image waits");
    writer.write_all_at(&[0x55; 4096], 4096).unwrap();
    drop(writer);
    // The kernel sends RELEASE after close() returns: wait until the daemon has seen it.
    release_idle(&mount.mnt);
    assert_eq!(ls(&mount.mnt), ["base.qcow2.raw", "top.qcow2.raw"]);
    assert_eq!(mode(&base) & 0o222, 0, "a backing file now");
    assert_refuses_writes(&base);
    let mut head = read_range(&mount.path("top.qcow2.raw"), 0, 8192);
    assert!(head[..4096].iter().all(|&b| b == 0x44));
    assert!(head.drain(4096..).all(|b| b == 0x55));
    mount.unmount();
    assert_check_clean("qcow2", &src.join("base.qcow2"));
    qemu_io("qcow2", &top, &["read -P 0x44 0 4k", "read -P 0x55 4k 4k"]);
}

#[test]
fn a_backing_file_is_writable_again_once_its_images_above_are_gone() {
    if !can_mount() {
        return;
    }
    let (dir, src) = chain_source("base-freed");
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let base = mount.path("chain/base.qcow2.raw");
    assert_refuses_writes(&base);
    // Read through the overlay, so the base is open as its backing file.
    read_range(&mount.path("chain/overlay.qcow2.raw"), 0, 4096);
    std::fs::remove_file(src.join("chain/overlay.qcow2")).unwrap();
    std::fs::remove_file(src.join("other/deep.qcow2")).unwrap();
    ls(&mount.path("chain"));
    ls(&mount.path("other"));
    // (Its mode is not checked here: the kernel may show cached attributes for a second.)
    let file = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
    file.write_all_at(&[0x77; 512], 0).unwrap();
    file.sync_all().unwrap();
    drop(file);
    mount.unmount();
    assert_check_clean("qcow2", &src.join("chain/base.qcow2"));
    qemu_io(
        "qcow2",
        &src.join("chain/base.qcow2"),
        &["read -P 0x77 0 512"],
    );
}

#[test]
fn info_on_a_raw_file_shows_its_image_and_why_it_is_read_only() {
    if !can_mount() {
        return;
    }
    let (dir, src) = chain_source("info-raw");
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let info = |args: &[&str], raw: &str| {
        let out = run(Command::new(IMGFS)
            .arg("info")
            .args(args)
            .arg(mount.path(raw)));
        String::from_utf8(out.stdout).unwrap()
    };
    let base = info(&[], "chain/base.qcow2.raw");
    let source = src.join("chain/base.qcow2");
    assert!(
        base.contains(&format!("image: {}\n", source.display())),
        "{base}"
    );
    assert!(
        base.contains("read-only: it is the backing file of "),
        "{base}"
    );
    // Its backing file lies above its directory: found in the mount's source tree.
    let deep = info(&["--json"], "other/deep.qcow2.raw");
    assert!(deep.contains("\"virtual-size\": 8388608"), "{deep}");
    assert!(deep.contains("base.qcow2"), "{deep}");
    assert!(
        deep.contains("\"read-only-reason\": null"),
        "writable: {deep}"
    );
    mount.unmount();
}
