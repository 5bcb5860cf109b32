//! FUSE passthrough: a read-only flat VMDK (one extent file holding the disk at its own
//! offsets) is read by the kernel from that file, with no request to the daemon per read;
//! everything else, and every image that can be written, still goes through the daemon.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;

/// Whether this kernel offers passthrough (6.9+) to this process (root: registering a backing
/// file needs CAP_SYS_ADMIN).
fn passthrough_offered() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    // SAFETY: geteuid has no preconditions.
    version >= (6, 9) && unsafe { libc::geteuid() } == 0
}

fn passthrough_opens(mount: &Mount) -> u64 {
    xattr(&mount.mnt, "user.imgfs.passthrough-opens")
        .expect("the root answers user.imgfs.passthrough-opens")
        .parse()
        .unwrap()
}

/// A source with a filled 8 MiB monolithicFlat VMDK and a sparse one.
fn source(tag: &str) -> (TempDir, std::path::PathBuf) {
    let (dir, src) = empty_source(tag);
    let fills = ["write -P 0x5a 0 1M", "write -P 0xa5 5M 64k"];
    create_filled(
        &src,
        "vmdk",
        "flat.vmdk",
        &["-o", "subformat=monolithicFlat"],
        "8M",
        &fills,
    );
    create_filled(&src, "vmdk", "sparse.vmdk", &[], "8M", &fills);
    (dir, src)
}

/// Reads `raw` whole, through mmap and past its end, checking it against qemu-img's view.
fn assert_reads_like_qemu(raw: &Path, image: &Path, dir: &TempDir) {
    let expected = qemu_raw("vmdk", image, dir);
    assert_eq!(std::fs::read(raw).unwrap(), expected, "{}", raw.display());
    let file = std::fs::File::open(raw).unwrap();
    let mut past = [0u8; 512];
    assert_eq!(file.read_at(&mut past, expected.len() as u64).unwrap(), 0);
    // SAFETY: a private read-only mapping of a file that stays open while it is mapped.
    let mapped = unsafe {
        use std::os::fd::AsRawFd;
        let p = libc::mmap(
            std::ptr::null_mut(),
            expected.len(),
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        let bytes = std::slice::from_raw_parts(p.cast::<u8>(), expected.len()).to_vec();
        libc::munmap(p, expected.len());
        bytes
    };
    assert_eq!(mapped, expected, "mapped {}", raw.display());
}

#[test]
fn a_read_only_flat_vmdk_is_read_by_passthrough_and_a_sparse_one_is_not() {
    if !can_mount() {
        return;
    }
    let (dir, src) = source("passthrough-ro");
    let mount = Mount::new(&src, &dir.join("mnt"), &["--read-only"]);
    assert_eq!(passthrough_opens(&mount), 0);
    assert_reads_like_qemu(
        &mount.path("sparse.vmdk.raw"),
        &src.join("sparse.vmdk"),
        &dir,
    );
    assert_eq!(
        passthrough_opens(&mount),
        0,
        "a sparse VMDK needs the daemon"
    );
    assert_reads_like_qemu(&mount.path("flat.vmdk.raw"), &src.join("flat.vmdk"), &dir);
    let opens = passthrough_opens(&mount);
    if passthrough_offered() {
        // `fs::read` opened it, then the file read past its end and mapped.
        assert_eq!(opens, 2, "the flat VMDK's opens went by passthrough");
    } else {
        assert_eq!(opens, 0);
    }
    // Files open at once share the inode's one backing file, which the kernel requires.
    let raw = mount.path("flat.vmdk.raw");
    let (first, second) = (
        std::fs::File::open(&raw).unwrap(),
        std::fs::File::open(&raw).unwrap(),
    );
    let mut bytes = [0u8; 4];
    first.read_exact_at(&mut bytes, 0).unwrap();
    assert_eq!(bytes, [0x5a; 4]);
    drop(first);
    second.read_exact_at(&mut bytes, 5 << 20).unwrap();
    assert_eq!(bytes, [0xa5; 4]);
    drop(second);
    let more = if passthrough_offered() { 2 } else { 0 };
    assert_eq!(passthrough_opens(&mount), opens + more);
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    mount.unmount();
}

#[test]
fn writable_flat_vmdks_go_through_the_daemon_and_a_flat_backing_file_by_passthrough() {
    if !can_mount() {
        return;
    }
    let (dir, src) = source("passthrough-rw");
    // A child above flat.vmdk makes it a backing file: served read-only.
    create_filled(
        &src,
        "vmdk",
        "base.vmdk",
        &["-o", "subformat=monolithicFlat"],
        "8M",
        &["write -P 0x11 1M 1M"],
    );
    let out = qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        path_str(&src.join("child.vmdk")),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);

    // Writable: read-only opens too go through the daemon, which cuts writes at the end.
    assert_reads_like_qemu(&mount.path("flat.vmdk.raw"), &src.join("flat.vmdk"), &dir);
    assert_eq!(passthrough_opens(&mount), 0);
    let raw = std::fs::OpenOptions::new()
        .write(true)
        .open(mount.path("flat.vmdk.raw"))
        .unwrap();
    raw.write_all_at(b"written", 4 << 20).unwrap();
    let err = raw.write_at(b"past", 8 << 20).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    drop(raw);

    assert!(xattr(&mount.path("base.vmdk.raw"), "user.imgfs.read-only-reason").is_some());
    assert_reads_like_qemu(&mount.path("base.vmdk.raw"), &src.join("base.vmdk"), &dir);
    let expected = if passthrough_offered() { 2 } else { 0 };
    assert_eq!(passthrough_opens(&mount), expected);
    assert_reads_like_qemu(&mount.path("child.vmdk.raw"), &src.join("child.vmdk"), &dir);
    assert_eq!(passthrough_opens(&mount), expected);

    // The child goes, so the base may be written; not while a reader has it by passthrough,
    // since the kernel would send that writer's writes to the file too, past the disk's end.
    let base = mount.path("base.vmdk.raw");
    let reader = std::fs::File::open(&base).unwrap();
    std::fs::remove_file(src.join("child.vmdk")).unwrap();
    // Closes the child's idle instance, which holds the base as its backing file.
    flush_mount(&mount.mnt);
    assert!(!ls(&mount.mnt).contains(&"child.vmdk.raw".to_string()));
    assert_eq!(xattr(&base, "user.imgfs.read-only-reason"), None);
    let opened = std::fs::OpenOptions::new().write(true).open(&base);
    if passthrough_offered() {
        assert_eq!(opened.unwrap_err().raw_os_error(), Some(libc::EBUSY));
        let log = mount.log_text();
        let why = "base.vmdk for writing while it is open for reading by passthrough";
        assert!(log.contains(why), "{log}");
    } else {
        drop(opened.unwrap());
    }
    drop(reader);
    release_idle(&mount.mnt);
    let writer = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
    writer.write_all_at(b"base", 0).unwrap();
    drop(writer);
    mount.unmount();
    assert_eq!(read_range(&src.join("base-flat.vmdk"), 0, 4), b"base");
    assert_eq!(
        read_range(&src.join("flat-flat.vmdk"), 4 << 20, 7),
        b"written"
    );
    assert_check_clean("vmdk", &src.join("flat.vmdk"));
}

#[test]
fn no_passthrough_reads_every_file_through_the_daemon() {
    if !can_mount() {
        return;
    }
    let (dir, src) = source("passthrough-off");
    let mount = Mount::new(&src, &dir.join("mnt"), &["--read-only", "--no-passthrough"]);
    assert_reads_like_qemu(&mount.path("flat.vmdk.raw"), &src.join("flat.vmdk"), &dir);
    assert_eq!(passthrough_opens(&mount), 0);
    mount.unmount();
}

#[test]
fn a_read_only_qcow2_with_a_raw_data_file_is_read_by_passthrough() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("passthrough-qcow2");
    // QEMU opens a relative data file name from its working directory, imgfs next to the
    // image: both find it when they run in the image's directory.
    let in_src = |program: &str, args: &[&str]| {
        let out = std::process::Command::new(program)
            .current_dir(&src)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let data = "data_file=disk.data,data_file_raw=on";
    in_src(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            data,
            "disk.qcow2",
            "8M",
        ],
    );
    in_src(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -z 1M 64k",
            "-c",
            "write -P 0xa5 5M 64k",
            "disk.qcow2",
        ],
    );
    let expected = dir.join("expected.raw");
    in_src(
        "qemu-img",
        &["convert", "-O", "raw", "disk.qcow2", path_str(&expected)],
    );
    let mount = Mount::new(&src, &dir.join("mnt"), &["--read-only"]);
    assert_eq!(ls(&mount.mnt), ["disk.qcow2.raw"]);
    let raw = std::fs::read(mount.path("disk.qcow2.raw")).unwrap();
    assert!(
        raw == std::fs::read(&expected).unwrap(),
        "reads like qemu-img convert"
    );
    let opens = if passthrough_offered() { 1 } else { 0 };
    assert_eq!(passthrough_opens(&mount), opens);
    mount.unmount();
}

/// A raw disk named as the source and served read-only is read by passthrough.
#[test]
fn a_raw_disk_named_as_the_source_is_read_by_passthrough() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("passthrough-raw");
    let disk = src.join("disk.img");
    let bytes: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&disk, &bytes).unwrap();
    let mount = Mount::new(&disk, &dir.join("mnt"), &["--read-only"]);
    assert!(std::fs::read(mount.path("disk.img.raw")).unwrap() == bytes);
    let expected = u64::from(passthrough_offered());
    assert_eq!(passthrough_opens(&mount), expected);
    mount.unmount();
}
