//! QCOW2 through a real imgfs mount, with qemu-img as the oracle: every sub-format the issue
//! names reads the same as `qemu-img convert -O raw` (and `-l` for internal snapshots); backing
//! files are served read-only; broken chains keep only their own image out.

mod common;

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::*;

/// Creates `name` below `src` with `qemu-img create -f qcow2 OPTIONS name size` and fills it.
fn create(src: &Path, name: &str, options: &[&str], size: &str, fills: &[&str]) {
    create_filled(src, "qcow2", name, options, size, fills);
}

/// Fills that are unaligned, cross cluster boundaries, leave holes and zero clusters (kept and
/// unmapped, over data and over nothing).
const FILLS: &[&str] = &[
    "write -P 0xab 0 1M",
    "write -z 64k 128k",
    "write -z -u 512k 64k",
    "write -P 0x12 1000000 1000000",
    "write -z 3M 64k",
    "write -P 0x56 3700k 512",
];

/// A raw file with `FILLS`, for `qemu-img convert` into compressed images.
fn raw_source(dir: &TempDir) -> std::path::PathBuf {
    let raw = dir.join("source.raw");
    qemu_img(&["create", "-q", "-f", "raw", path_str(&raw), "4M"]);
    qemu_io("raw", &raw, FILLS);
    raw
}

/// 4 MiB images of every sub-format the issue names below `src`, filled with `FILLS` where
/// qemu-io can write them; returns their names.
fn make_matrix(src: &Path, dir: &TempDir) -> Vec<String> {
    let mut names = Vec::new();
    for (name, options) in [
        ("v2-c512.qcow2", &["-o", "compat=0.10,cluster_size=512"][..]),
        ("v3-c4k.qcow2", &["-o", "compat=1.1,cluster_size=4096"][..]),
        ("v3-c64k.qcow2", &[][..]),
        ("v3-c2m.qcow2", &["-o", "cluster_size=2M"][..]),
        ("rc1.qcow2", &["-o", "refcount_bits=1"][..]),
        (
            "rc64-c512.qcow2",
            &["-o", "refcount_bits=64,cluster_size=512"][..],
        ),
        ("extl2.qcow2", &["-o", "extended_l2=on"][..]),
        (
            "extl2-c2m.qcow2",
            &["-o", "extended_l2=on,cluster_size=2M"][..],
        ),
    ] {
        create(src, name, options, "4M", FILLS);
        names.push(name.to_string());
    }
    // Zeroed subclusters inside otherwise allocated clusters.
    create(
        src,
        "zero-extl2.qcow2",
        &["-o", "extended_l2=on"],
        "4M",
        &["write -P 0x77 0 1M", "write -z 6k 10k", "write -z 2M 4k"],
    );
    names.push("zero-extl2.qcow2".into());
    // Compressed clusters, zlib and zstd.
    let raw = raw_source(dir);
    for (name, extra) in [("zlib.qcow2", ""), ("zstd.qcow2", ",compression_type=zstd")] {
        let options = format!("cluster_size=65536{extra}");
        qemu_img(&[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &options,
            path_str(&raw),
            path_str(&src.join(name)),
        ]);
        names.push(name.to_string());
    }
    // External data files, plain and raw.
    for (name, extra) in [("ext.qcow2", ""), ("extraw.qcow2", ",data_file_raw=on")] {
        let data = src.join(format!("{name}.data"));
        let options = format!("data_file={}{extra}", data.display());
        create(src, name, &["-o", &options], "4M", FILLS);
        names.push(name.to_string());
    }
    // Lazy refcounts left dirty by a crash.
    let lazy = src.join("lazy.qcow2");
    create(src, "lazy.qcow2", &["-o", "lazy_refcounts=on"], "4M", &[]);
    let _ = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x99 100k 300k",
            "-c",
            "abort",
        ])
        .arg(&lazy)
        .output()
        .unwrap();
    assert_eq!(
        std::fs::read(&lazy).unwrap()[79] & 1,
        1,
        "qemu-io abort left the dirty bit set"
    );
    names.push("lazy.qcow2".into());
    names
}

#[test]
fn every_qcow2_sub_format_reads_like_qemu_img_convert() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("qcow2-read");
    let names = make_matrix(&src, &dir);
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    for name in &names {
        assert_served_like_qemu(&mount, &src, &dir, "qcow2", name);
    }
    // Data files are part of their image and do not appear on their own.
    assert!(!mount.path("ext.qcow2.data.raw").exists());
    mount.unmount();
}

#[test]
fn a_chain_three_deep_mixing_formats_reads_and_writes_through_with_lower_layers_read_only() {
    if !can_mount() {
        return;
    }
    let dir = TempDir::new("qcow2-chain");
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("layers")).unwrap();
    let base = src.join("layers/base.vdi");
    qemu_img(&["create", "-q", "-f", "vdi", path_str(&base), "6M"]);
    qemu_io("vdi", &base, &["write -P 0x11 0 6M"]);
    create(
        &src,
        "layers/mid.qcow2",
        &["-b", "base.vdi", "-F", "vdi"],
        "6M",
        &["write -P 0x22 1M 1M", "write -z 5M 4k"],
    );
    // The top is larger than its backing file: what lies past the backing file reads as zeros.
    create(
        &src,
        "top.qcow2",
        &["-b", "layers/mid.qcow2", "-F", "qcow2"],
        "8M",
        &["write -P 0x33 1536k 1M", "write -P 0x44 7M 4k"],
    );
    let lower_before = [
        qemu_raw("qcow2", &src.join("layers/mid.qcow2"), &dir),
        qemu_raw("vdi", &base, &dir),
    ];
    let mut expected = qemu_raw("qcow2", &src.join("top.qcow2"), &dir);
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    assert_served_like_qemu(&mount, &src, &dir, "qcow2", "top.qcow2");
    assert_served_like_qemu(&mount, &src, &dir, "qcow2", "layers/mid.qcow2");
    for lower in ["layers/mid.qcow2.raw", "layers/base.vdi.raw"] {
        let mode = std::fs::metadata(mount.path(lower))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o222, 0, "{lower} is a backing file: read-only");
        let err = std::fs::OpenOptions::new()
            .write(true)
            .open(mount.path(lower))
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{lower}");
    }
    // Writes into the top copy what lies below (three layers, and zeros past them) into
    // the clusters they touch partly; the layers below stay as they were.
    const MIB: u64 = 1 << 20;
    let plans = plan_threaded_writes(&mut expected, 4, 25, 200_000, 7 * MIB, 7 * MIB + MIB / 2);
    run_threaded_writes(&mount.path("top.qcow2.raw"), &plans);
    mount.unmount();
    let top = src.join("top.qcow2");
    assert_check_clean("qcow2", &top);
    assert_compare_equal("qcow2", &top, &expected, &dir);
    assert!(qemu_raw("qcow2", &src.join("layers/mid.qcow2"), &dir) == lower_before[0]);
    assert!(qemu_raw("vdi", &base, &dir) == lower_before[1]);
}

#[test]
fn broken_chains_keep_only_their_own_image_out() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("qcow2-badchain");
    create(&src, "fine.qcow2", &[], "1M", &["write -P 0x5 0 4k"]);
    // a -> b -> a
    create(&src, "a.qcow2", &[], "1M", &[]);
    create(
        &src,
        "b.qcow2",
        &["-b", "a.qcow2", "-F", "qcow2"],
        "1M",
        &[],
    );
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        path_str(&src.join("a.qcow2")),
    ]);
    // A backing file outside the source tree, and one that does not exist.
    let outside = dir.join("outside.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", path_str(&outside), "1M"]);
    create(
        &src,
        "escape.qcow2",
        &["-b", path_str(&outside), "-F", "qcow2"],
        "1M",
        &[],
    );
    create(
        &src,
        "orphan.qcow2",
        &["-b", "gone.qcow2", "-F", "qcow2", "-u"],
        "1M",
        &[],
    );

    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    assert_eq!(ls(&mount.mnt), ["fine.qcow2.raw"]);
    let log = mount.log_text();
    for expect in ["loops", "outside the source tree", "does not exist"] {
        assert!(log.contains(expect), "log should say {expect:?}: {log}");
    }
    mount.unmount();
}

#[test]
fn internal_snapshots_are_served_read_only_beside_the_image() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("qcow2-snap");
    let image = src.join("vm.qcow2");
    create(&src, "vm.qcow2", &[], "4M", &["write -P 0x01 0 1M"]);
    qemu_img(&["snapshot", "-c", "first", path_str(&image)]);
    qemu_io("qcow2", &image, &["write -P 0x02 512k 1M"]);
    qemu_img(&["snapshot", "-c", "second", path_str(&image)]);
    qemu_io("qcow2", &image, &["write -P 0x03 1M 2M"]);

    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    assert_served_like_qemu(&mount, &src, &dir, "qcow2", "vm.qcow2");
    assert_eq!(
        ls(&mount.path("vm.qcow2.snapshots")),
        ["first.raw", "second.raw"]
    );
    for snapshot in ["first", "second"] {
        let out = dir.join("snapshot.raw");
        qemu_img(&[
            "convert",
            "-U",
            "-f",
            "qcow2",
            "-l",
            &format!("snapshot.name={snapshot}"),
            "-O",
            "raw",
            path_str(&image),
            path_str(&out),
        ]);
        let oracle = std::fs::read(&out).unwrap();
        let served = mount.path(&format!("vm.qcow2.snapshots/{snapshot}.raw"));
        assert!(
            std::fs::read(&served).unwrap() == oracle,
            "snapshot {snapshot} differs"
        );
        let mode = std::fs::metadata(&served).unwrap().permissions().mode();
        assert_eq!(mode & 0o222, 0, "snapshots are read-only");
    }
    mount.unmount();
}

#[test]
fn encrypted_images_are_served_with_their_passphrase() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("qcow2-luks");
    let image = src.join("secret.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=123456",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        path_str(&image),
        "4M",
    ]);
    let [object, secret, opts, image_opts] = qemu_encrypted_qcow2(&image, "123456");
    run(Command::new("qemu-io").args([
        &object,
        &secret,
        &opts,
        &image_opts,
        "-c",
        "write -P 0x5e 3000 1M",
    ]));
    // What QEMU decrypts, converted into `name`.
    let plain = |name: &str| {
        let out = dir.join(name);
        let convert = ["convert", &object, &secret, &opts, &image_opts, "-O", "raw"];
        run(Command::new("qemu-img").args(convert).arg(&out));
        std::fs::read(&out).unwrap()
    };
    let expected = plain("expected.raw");

    // Without the passphrase, `imgfs info` and `imgfs check` still read the metadata, as
    // qemu-img info does; a mount does not serve the image.
    let info = run(Command::new(IMGFS).arg("info").arg(&image));
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(text.contains("encryption: LUKS, locked"), "{text}");
    run(Command::new(IMGFS).arg("check").arg(&image));
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    assert!(!mount.path("secret.qcow2.raw").exists());
    let log = mount.log_text();
    assert!(
        log.contains("secret.qcow2") && log.contains("give its passphrase with --key-file"),
        "{log}"
    );
    mount.unmount();

    // As a mount option (fstab), the passphrase file ending in a newline as `echo` writes it.
    let key = dir.join("key");
    std::fs::write(&key, "123456\n").unwrap();
    let option = format!("key_file={}", path_str(&key));
    let mount = Mount::new(&src, &dir.join("mnt2"), &["-o", &option]);
    let raw = mount.path("secret.qcow2.raw");
    assert!(std::fs::read(&raw).unwrap() == expected);
    assert!(expected[3000..3000 + (1 << 20)].iter().all(|&b| b == 0x5e));
    // Writes are encrypted as QEMU encrypts: qemu-img checks the image and reads them back.
    let mut expected = expected;
    let file = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    for (at, len, byte) in [(100, 300, 0x61), ((2 << 20) - 7, 70_000, 0x62)] {
        file.write_all_at(&vec![byte; len], at as u64).unwrap();
        expected[at..at + len].fill(byte);
    }
    file.sync_all().unwrap();
    drop(file);
    mount.unmount();
    let file = std::fs::read(&image).unwrap();
    assert!(file
        .windows(512)
        .all(|w| w != [0x5e; 512] && w != [0x62; 512]));
    run(Command::new("qemu-img").args(["check", &object, &secret, &opts, &image_opts]));
    assert!(plain("after.raw") == expected);
}

/// The content of internal snapshot `name` of `image`, as qemu-img reads it.
fn snapshot_raw(image: &Path, name: &str, dir: &TempDir) -> Vec<u8> {
    let out = dir.join("snapshot.raw");
    qemu_img(&[
        "convert",
        "-U",
        "-f",
        "qcow2",
        "-l",
        &format!("snapshot.name={name}"),
        "-O",
        "raw",
        path_str(image),
        path_str(&out),
    ]);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

#[test]
fn threaded_random_writes_to_every_sub_format_pass_qemu_img_check_and_compare() {
    if !can_mount() {
        return;
    }
    const MIB: u64 = 1 << 20;
    let (dir, src) = empty_source("qcow2-write");
    let mut names = make_matrix(&src, &dir);
    // Over a raw backing file.
    let base = src.join("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", path_str(&base), "4M"]);
    qemu_io("raw", &base, &["write -P 0x5b 0 4M"]);
    create(
        &src,
        "top.qcow2",
        &["-b", "base.raw", "-F", "raw"],
        "4M",
        &["write -P 0x33 1536k 1M", "write -z 3M 64k"],
    );
    names.push("top.qcow2".into());
    // Two internal snapshots sharing clusters with the active layer.
    let snap = src.join("snap.qcow2");
    create(&src, "snap.qcow2", &[], "4M", FILLS);
    qemu_img(&["snapshot", "-c", "s1", path_str(&snap)]);
    qemu_io("qcow2", &snap, &["write -P 0x44 2M 1M"]);
    qemu_img(&["snapshot", "-c", "s2", path_str(&snap)]);
    names.push("snap.qcow2".into());
    let snapshots: Vec<(&str, Vec<u8>)> = ["s1", "s2"]
        .into_iter()
        .map(|s| (s, snapshot_raw(&snap, s, &dir)))
        .collect();

    let mut expected: Vec<Vec<u8>> = names
        .iter()
        .map(|name| qemu_raw("qcow2", &src.join(name), &dir))
        .collect();
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    for (name, expected) in names.iter().zip(expected.iter_mut()) {
        // Four threads in their own parts of the first 3 MiB, and all four into the
        // cluster at 3.5 MiB at once.
        let plans = plan_threaded_writes(expected, 4, 25, 200_000, 3 * MIB, 3 * MIB + MIB / 2);
        let raw = mount.path(&format!("{name}.raw"));
        run_threaded_writes(&raw, &plans);
        assert!(
            std::fs::read(&raw).unwrap() == *expected,
            "{name}: read-back through the mount differs"
        );
    }
    mount.unmount();

    for (name, expected) in names.iter().zip(&expected) {
        let image = src.join(name);
        assert_check_clean("qcow2", &image);
        assert_compare_equal("qcow2", &image, expected, &dir);
    }
    for (name, before) in &snapshots {
        assert!(
            snapshot_raw(&snap, name, &dir) == *before,
            "snapshot {name} changed"
        );
    }
}
