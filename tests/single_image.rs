//! A source given as one image file, as qemu-nbd, xmount and the libyal mounters take one:
//! `imgfs mount disk.qcow2 MNT` and `imgfs nbd disk.qcow2` serve that image alone (over its
//! backing file beside it), show nothing else of its directory, and refuse a damaged image;
//! a file of no format (a `dd` image) is served as a raw disk.

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

/// A raw file of `len` bytes at `path`, partitioned by sfdisk with `table`.
fn partitioned_raw_disk(path: &std::path::Path, len: u64, table: &str) {
    use std::io::Write;
    std::fs::File::create(path).unwrap().set_len(len).unwrap();
    let mut child = Command::new("sfdisk")
        .args(["-q", "--no-reread"])
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(table.as_bytes()).unwrap();
    drop(stdin);
    assert!(child.wait().unwrap().success(), "sfdisk {}", path.display());
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
fn a_damaged_image_or_a_part_of_one_is_refused_by_name() {
    if !can_mount() {
        return;
    }
    let (dir, src) = source("single-refused");
    // qcow2's magic and a version no driver knows.
    let broken = src.join("broken.qcow2");
    std::fs::write(&broken, b"QFI\xfb\x00\x00\x00\x63 and nothing after").unwrap();
    let split = ["-o", "subformat=twoGbMaxExtentSparse"];
    create_filled(&src, "vmdk", "split.vmdk", &split, "8M", &[]);
    for (file, why) in [
        ("broken.qcow2", "shorter than a qcow2 header"),
        ("split-s001.vmdk", "name the image's descriptor"),
    ] {
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let log = dir.join(&format!("{file}.log"));
        let out = Command::new(IMGFS)
            .arg("mount")
            .arg("--log-file")
            .arg(&log)
            .arg(src.join(file))
            .arg(&mnt)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file}");
        assert!(text.contains(&format!("{file} cannot be served")), "{text}");
        let log = std::fs::read_to_string(&log).unwrap();
        assert!(log.contains("not serving") && log.contains(why), "{log}");
        assert!(!is_mount_point(&mnt));
    }
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

/// A `dd` image (a raw disk with an MBR) named as the source: served read-write with its
/// partitions as files, no root needed; with `--snapshot` the image stays as it was.
#[test]
fn a_raw_disk_named_as_the_source_is_served_with_its_partitions() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("single-raw");
    let disk = src.join("evidence.dd");
    let table = "label: dos\nstart=2048, size=8192, type=83\nstart=10240, size=8192, type=7\n";
    partitioned_raw_disk(&disk, 16 << 20, table);
    let file = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    file.write_all_at(&[0x61; 4096], 2048 * 512).unwrap();
    drop(file);
    let mut expected = std::fs::read(&disk).unwrap();

    let mount = Mount::new(&disk, &dir.join("mnt"), &[]);
    assert_eq!(ls(&mount.mnt), ["evidence.dd.parts", "evidence.dd.raw"]);
    assert!(std::fs::read(mount.path("evidence.dd.raw")).unwrap() == expected);
    let p2 = mount.path("evidence.dd.parts/p2.raw");
    let file = std::fs::OpenOptions::new().write(true).open(&p2).unwrap();
    file.write_all_at(&[0x62; 70_000], 300).unwrap();
    file.sync_all().unwrap();
    drop(file);
    let at = 10240 * 512 + 300;
    expected[at..at + 70_000].fill(0x62);
    mount.unmount();
    assert!(std::fs::read(&disk).unwrap() == expected);

    let mount = Mount::new(&disk, &dir.join("mnt2"), &["--snapshot"]);
    let p1 = mount.path("evidence.dd.parts/p1.raw");
    let file = std::fs::OpenOptions::new().write(true).open(&p1).unwrap();
    file.write_all_at(&[0x63; 5000], 100).unwrap();
    file.sync_all().unwrap();
    drop(file);
    assert_eq!(
        read_range(&p1, 0, 104),
        [&[0x61; 100][..], &[0x63; 4]].concat()
    );
    mount.unmount();
    assert!(std::fs::read(&disk).unwrap() == expected);

    // Kept in an overlay, then committed into the raw file.
    let changes = dir.join("changes");
    let mount = Mount::new(&disk, &dir.join("mnt3"), &["--overlay", path_str(&changes)]);
    let raw = mount.path("evidence.dd.raw");
    let file = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    file.write_all_at(&[0x64; 3000], (1 << 20) - 1000).unwrap();
    file.sync_all().unwrap();
    drop(file);
    mount.unmount();
    assert!(std::fs::read(&disk).unwrap() == expected);
    run(Command::new(IMGFS)
        .args(["overlay", "commit"])
        .arg(&changes)
        .arg("evidence.dd"));
    expected[(1 << 20) - 1000..(1 << 20) + 2000].fill(0x64);
    assert!(std::fs::read(&disk).unwrap() == expected);
}

/// The default export is the one image even when its partitions are exports too.
#[test]
fn the_default_export_is_the_one_image_beside_its_partitions() {
    if !have_libnbd_tools() {
        return;
    }
    let (dir, src) = empty_source("single-nbd-parts");
    let disk = src.join("disk.dd");
    partitioned_raw_disk(
        &disk,
        8 << 20,
        "label: dos\nstart=2048, size=4096, type=83\n",
    );
    let bytes = std::fs::read(&disk).unwrap();
    let server = NbdServer::unix(&disk, dir.path(), &[]);
    let listed = client("nbdinfo", &["--list", &server.uri("")]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains("export=\"disk.dd.parts/p1\""), "{text}");
    assert!(read_nbd(&server.uri(""), &dir.join("default.raw")) == bytes);
    server.stop();
}

/// One image mounted on a regular file, as qemu-storage-daemon's FUSE export mounts one:
/// the file shows the image's raw content, read-write, and goes back to what it was after.
#[test]
fn one_image_mounted_on_a_file_is_that_file() {
    if !can_mount() {
        return;
    }
    let (dir, src) = source("single-on-file");
    let top = src.join("top.qcow2");
    let mut expected = qemu_raw("qcow2", &top, &dir);
    // Beside the image, so in the directory the catalog looks at for backing roles.
    let view = src.join("top.raw");
    std::fs::write(&view, b"").unwrap();
    let mount = Mount::new(&top, &view, &[]);
    let meta = std::fs::metadata(&view).unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.len(), expected.len() as u64);
    assert!(std::fs::read(&view).unwrap() == expected);
    assert_eq!(
        xattr(&view, "user.imgfs.source").as_deref(),
        Some(path_str(&top))
    );
    let file = std::fs::OpenOptions::new().write(true).open(&view).unwrap();
    for (at, len, byte) in [(65_530, 20, 0x41), ((5 << 20) - 3, 130_000, 0x42)] {
        file.write_all_at(&vec![byte; len], at as u64).unwrap();
        expected[at..at + len].fill(byte);
    }
    file.sync_all().unwrap();
    drop(file);
    assert!(std::fs::read(&view).unwrap() == expected);
    mount.unmount();
    assert_eq!(std::fs::metadata(&view).unwrap().len(), 0);
    assert_check_clean("qcow2", &top);
    assert_compare_equal("qcow2", &top, &expected, &dir);
}

/// The file follows its image: an image renamed over it is what the next open reads, while a
/// descriptor opened before keeps the image it was opened on.
#[test]
fn a_file_mount_follows_its_image_replaced_under_it() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("single-on-file-replaced");
    create_filled(&src, "vdi", "disk.vdi", &[], "4M", &["write -P 0x31 0 1M"]);
    create_filled(&src, "vdi", "new.vdi", &[], "4M", &["write -P 0x32 0 1M"]);
    let view = dir.join("disk.view");
    std::fs::write(&view, b"").unwrap();
    let mount = Mount::new(&src.join("disk.vdi"), &view, &[]);
    let before = std::fs::File::open(&view).unwrap();
    assert_eq!(read_range(&view, 0, 4), [0x31; 4]);
    std::fs::rename(src.join("new.vdi"), src.join("disk.vdi")).unwrap();
    assert_eq!(read_range(&view, 4096, 4), [0x32; 4]);
    let mut old = [0u8; 4];
    before.read_exact_at(&mut old, 4096).unwrap();
    assert_eq!(old, [0x31; 4]);
    drop(before);
    mount.unmount();
}

/// A file takes one image, never the image itself nor a directory of them.
#[test]
fn a_file_mount_point_is_refused_for_a_tree_and_for_the_image_itself() {
    let (dir, src) = source("single-on-file-refused");
    let view = dir.join("view.raw");
    std::fs::write(&view, b"").unwrap();
    let top = src.join("top.qcow2");
    let link = src.join("link.qcow2");
    std::fs::hard_link(&top, &link).unwrap();
    for (source, target, why) in [
        (&src, &view, "a directory of images needs a directory"),
        (&top, &top, "is the image itself"),
        (&top, &link, "is the image itself"),
    ] {
        let out = Command::new(IMGFS)
            .arg("mount")
            .arg(source)
            .arg(target)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && text.contains(why), "{text}");
        assert!(!is_mount_point(target));
    }
}

/// A LUKS1 container named as the source, with its passphrase: its payload is the disk,
/// read-write; QEMU reads back what was written.
#[test]
fn a_luks_container_is_served_decrypted_with_its_passphrase() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("single-luks");
    let disk = src.join("disk.luks");
    let secret = ["--object", "secret,id=s,data=hunter2"];
    let opts = format!("driver=luks,key-secret=s,file.filename={}", path_str(&disk));
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "luks"])
        .args(secret)
        .args(["-o", "key-secret=s,iter-time=10", path_str(&disk), "4M"]));
    run(Command::new("qemu-io").args(secret).args([
        "--image-opts",
        &opts,
        "-c",
        "write -P 0x4c 4000 70000",
    ]));
    let plain = |name: &str| {
        let out = dir.join(name);
        run(Command::new("qemu-img").arg("convert").args(secret).args([
            "--image-opts",
            &opts,
            "-O",
            "raw",
            path_str(&out),
        ]));
        std::fs::read(&out).unwrap()
    };
    let mut expected = plain("before.raw");
    let key = dir.join("key");
    std::fs::write(&key, "hunter2\n").unwrap();
    let mount = Mount::new(&disk, &dir.join("mnt"), &["--key-file", path_str(&key)]);
    let raw = mount.path("disk.luks.raw");
    assert!(std::fs::read(&raw).unwrap() == expected);
    let file = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    file.write_all_at(&[0x4d; 1000], 70_123).unwrap();
    file.sync_all().unwrap();
    drop(file);
    expected[70_123..71_123].fill(0x4d);
    mount.unmount();
    assert!(plain("after.raw") == expected);
}
