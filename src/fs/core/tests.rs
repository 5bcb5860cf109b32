//! FsCore tests: the whole filesystem logic on fake in-memory images, no FUSE involved.

use super::*;
use crate::catalog::Catalog;
use crate::testutil::{FakeOpener, TempDir};

fn mounted(read_only: bool) -> (TempDir, FsCore) {
    let dir = TempDir::new();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("disk.img"), "FAKEIMG 65536").unwrap();
    std::fs::write(dir.path().join("ro.img"), "FAKEIMG 4096 ").unwrap();
    std::fs::write(dir.path().join("sub/x.vdi"), "FAKEIMG 10000").unwrap();
    let catalog = Catalog::new(dir.path(), Box::new(FakeOpener::default()), read_only).unwrap();
    (dir, FsCore::new(catalog))
}

fn disk_ino(core: &FsCore) -> u64 {
    core.lookup(ROOT_INO, OsStr::new("disk.img.raw"))
        .unwrap()
        .ino
}

fn names(core: &FsCore, ino: u64) -> Vec<String> {
    let fh = core.opendir(ino).unwrap();
    let names = core
        .readdir(fh)
        .unwrap()
        .iter()
        .map(|(_, _, n)| n.to_string_lossy().into_owned())
        .collect();
    core.releasedir(fh);
    names
}

#[test]
fn lookup_readdir_and_getattr_show_virtual_sizes() {
    let (_dir, core) = mounted(false);
    assert_eq!(
        names(&core, ROOT_INO),
        [".", "..", "disk.img.raw", "ro.img.raw", "sub"]
    );
    let attr = core.lookup(ROOT_INO, OsStr::new("disk.img.raw")).unwrap();
    assert_eq!(
        (attr.kind, attr.size, attr.blocks),
        (NodeKind::File, 65536, 0)
    );
    assert_eq!(core.getattr(attr.ino, None).unwrap().ino, attr.ino);
    let sub = core.lookup(ROOT_INO, OsStr::new("sub")).unwrap();
    assert_eq!(sub.kind, NodeKind::Dir);
    assert_eq!(
        core.lookup(sub.ino, OsStr::new("x.vdi.raw")).unwrap().size,
        10000
    );
    assert_eq!(
        core.lookup(ROOT_INO, OsStr::new("nope.raw")),
        Err(Errno(libc::ENOENT))
    );
    let again = core.lookup(ROOT_INO, OsStr::new("disk.img.raw")).unwrap();
    assert_eq!(again.ino, attr.ino, "inode numbers are stable");
}

#[test]
fn read_write_roundtrip_clips_at_the_end_of_the_disk() {
    let (_dir, core) = mounted(false);
    let ino = disk_ino(&core);
    let fh = core.open(ino, true).unwrap();
    assert_eq!(core.write(fh, 4000, b"hello").unwrap(), 5);
    assert_eq!(core.read(fh, 3998, 9).unwrap(), b"\0\0hello\0\0");
    assert_eq!(
        core.write(fh, 65534, b"abcd").unwrap(),
        2,
        "short write at the end"
    );
    assert_eq!(core.write(fh, 65536, b"x"), Err(Errno(libc::ENOSPC)));
    assert_eq!(core.read(fh, 65530, 100).unwrap().len(), 6);
    assert!(core.read(fh, 70000, 10).unwrap().is_empty());
    assert_eq!(
        core.getattr(ino, None).unwrap().blocks,
        16,
        "two 4 KiB blocks, in 512 B units"
    );
    core.flush(fh).unwrap();
    core.release(fh).unwrap();
    assert_eq!(core.read(fh, 0, 1), Err(Errno(libc::EBADF)));
}

#[test]
fn write_access_is_refused_on_read_only_images_and_mounts() {
    let (_dir, core) = mounted(false);
    let ro = core.lookup(ROOT_INO, OsStr::new("ro.img.raw")).unwrap();
    assert_eq!(ro.perm & 0o222, 0, "read-only images show no write bits");
    assert_eq!(core.open(ro.ino, true), Err(Errno(libc::EROFS)));
    let fh = core.open(ro.ino, false).unwrap();
    assert_eq!(core.write(fh, 0, b"x"), Err(Errno(libc::EBADF)));

    let (_dir2, ro_mount) = mounted(true);
    let ino = ro_mount
        .lookup(ROOT_INO, OsStr::new("disk.img.raw"))
        .unwrap()
        .ino;
    assert_eq!(ro_mount.open(ino, true), Err(Errno(libc::EROFS)));
    assert!(ro_mount.open(ino, false).is_ok());
}

#[test]
fn lseek_finds_data_and_holes() {
    let (_dir, core) = mounted(false);
    let ino = disk_ino(&core);
    let fh = core.open(ino, true).unwrap();
    core.write(fh, 8192 + 10, b"data").unwrap();
    assert_eq!(core.lseek(fh, 0, libc::SEEK_DATA), Ok(8192));
    assert_eq!(core.lseek(fh, 8200, libc::SEEK_DATA), Ok(8200));
    assert_eq!(core.lseek(fh, 0, libc::SEEK_HOLE), Ok(0));
    assert_eq!(core.lseek(fh, 8192, libc::SEEK_HOLE), Ok(12288));
    assert_eq!(
        core.lseek(fh, 12288, libc::SEEK_DATA),
        Err(Errno(libc::ENXIO))
    );
    assert_eq!(
        core.lseek(fh, 65536, libc::SEEK_HOLE),
        Err(Errno(libc::ENXIO))
    );
    assert_eq!(core.lseek(fh, 0, libc::SEEK_SET), Err(Errno(libc::EINVAL)));
}

#[test]
fn setattr_refuses_resize_but_accepts_same_size_and_times() {
    let (dir, core) = mounted(false);
    let ino = disk_ino(&core);
    assert_eq!(
        core.setattr(ino, Some(0), None, None),
        Err(Errno(libc::EOPNOTSUPP))
    );
    assert_eq!(
        core.setattr(ino, Some(65536), None, None).unwrap().size,
        65536
    );
    let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
    assert_eq!(core.setattr(ino, None, Some(t), Some(t)).unwrap().mtime, t);
    let meta = std::fs::metadata(dir.path().join("disk.img")).unwrap();
    assert_eq!(meta.modified().unwrap(), t, "times go to the image file");
}

#[test]
fn a_raw_file_of_a_read_only_mount_says_why_it_is_read_only() {
    let (_dir, core) = mounted(true);
    let reason = core
        .getxattr(disk_ino(&core), OsStr::new(XATTR_READ_ONLY_REASON))
        .unwrap();
    assert_eq!(reason, b"served read-only by request");
}

#[test]
fn control_xattrs_report_pid_and_flush_everything() {
    use std::os::unix::ffi::OsStrExt;
    let (_dir, core) = mounted(false);
    names(&core, ROOT_INO);
    let pid = core.getxattr(ROOT_INO, OsStr::new(XATTR_PID)).unwrap();
    assert_eq!(pid, std::process::id().to_string().into_bytes());
    assert_eq!(
        core.getxattr(ROOT_INO, OsStr::new("user.other")),
        Err(Errno(libc::ENODATA))
    );
    // The root and each raw file name what they show of the source tree.
    let source = core.getxattr(ROOT_INO, OsStr::new(XATTR_SOURCE)).unwrap();
    assert_eq!(source, core.catalog.root().as_os_str().as_bytes());
    let ino = disk_ino(&core);
    let source = core.getxattr(ino, OsStr::new(XATTR_SOURCE)).unwrap();
    assert_eq!(
        source,
        core.catalog.root().join("disk.img").as_os_str().as_bytes()
    );
    assert_eq!(
        core.getxattr(ino, OsStr::new(XATTR_READ_ONLY_REASON)),
        Err(Errno(libc::ENODATA)),
        "a writable image has no reason"
    );
    core.setxattr(ROOT_INO, OsStr::new(XATTR_FLUSH)).unwrap();
    assert_eq!(
        core.setxattr(2, OsStr::new(XATTR_FLUSH)),
        Err(Errno(libc::ENOTSUP))
    );
}

#[test]
fn removed_images_disappear_but_open_handles_keep_working() {
    let (dir, core) = mounted(false);
    let ino = disk_ino(&core);
    let fh = core.open(ino, true).unwrap();
    std::fs::remove_file(dir.path().join("disk.img")).unwrap();
    assert_eq!(names(&core, ROOT_INO), [".", "..", "ro.img.raw", "sub"]);
    assert_eq!(
        core.lookup(ROOT_INO, OsStr::new("disk.img.raw")),
        Err(Errno(libc::ENOENT))
    );
    assert_eq!(core.write(fh, 0, b"still").unwrap(), 5);
    assert_eq!(core.read(fh, 0, 5).unwrap(), b"still");
    std::fs::write(dir.path().join("added.img"), "FAKEIMG 512").unwrap();
    assert!(names(&core, ROOT_INO).contains(&"added.img.raw".to_string()));
}

#[test]
fn snapshots_are_read_only_files_in_a_directory_beside_the_image() {
    let dir = TempDir::new();
    std::fs::write(
        dir.path().join("d.img"),
        "FAKEIMG 8192\nsnapshot s1\nsnapshot old.snapshots",
    )
    .unwrap();
    let catalog = Catalog::new(dir.path(), Box::new(FakeOpener::default()), false).unwrap();
    let core = FsCore::new(catalog);
    assert_eq!(
        names(&core, ROOT_INO),
        [".", "..", "d.img.raw", "d.img.snapshots"]
    );
    let snaps = core
        .lookup(ROOT_INO, OsStr::new("d.img.snapshots"))
        .unwrap();
    assert_eq!(snaps.kind, NodeKind::Dir);
    assert_eq!(
        names(&core, snaps.ino),
        [".", "..", "old.snapshots.raw", "s1.raw"]
    );
    let old = core
        .lookup(snaps.ino, OsStr::new("old.snapshots.raw"))
        .unwrap();
    assert_eq!(core.getattr(old.ino, None).unwrap().size, 8192);
    let fh = core.open(old.ino, false).unwrap();
    assert_eq!(core.read(fh, 0, 2).unwrap(), [2, 2]);
    let s1 = core.lookup(snaps.ino, OsStr::new("s1.raw")).unwrap();
    assert_eq!(
        (s1.kind, s1.size, s1.perm & 0o222),
        (NodeKind::File, 8192, 0)
    );
    assert_eq!(core.getattr(s1.ino, None).unwrap().size, 8192);
    assert_eq!(core.open(s1.ino, true), Err(Errno(libc::EROFS)));
    let fh = core.open(s1.ino, false).unwrap();
    assert_eq!(core.read(fh, 4000, 4).unwrap(), [1, 1, 1, 1]);
}

#[test]
fn an_open_file_keeps_its_attributes_when_its_image_moves_or_is_replaced() {
    let (dir, core) = mounted(false);
    let ino = disk_ino(&core);
    let fh = core.open(ino, true).unwrap();
    std::fs::rename(dir.path().join("disk.img"), dir.path().join("sub/moved")).unwrap();
    // fstat (no handle) and lseek(SEEK_END) (with the handle) on the descriptor.
    assert_eq!(core.getattr(ino, None).unwrap().size, 65536);
    assert_eq!(core.getattr(ino, Some(fh)).unwrap().size, 65536);

    std::fs::write(dir.path().join("disk.img"), "FAKEIMG 1048576").unwrap();
    let new = core.lookup(ROOT_INO, OsStr::new("disk.img.raw")).unwrap();
    assert_ne!(new.ino, ino, "a new file is a new inode");
    assert_eq!(new.size, 1 << 20);
    assert_eq!(core.getattr(ino, None).unwrap().size, 65536);
    assert_eq!(core.write(fh, 0, b"old").unwrap(), 3);
    assert_eq!(core.read(fh, 0, 3).unwrap(), b"old");
    core.release(fh).unwrap();
}

#[test]
fn forgotten_inodes_are_dropped() {
    let (_dir, core) = mounted(false);
    let before = core.inode_count();
    let ino = disk_ino(&core);
    disk_ino(&core);
    assert_eq!(core.inode_count(), before + 1);
    core.forget(ino, 1);
    assert!(core.getattr(ino, None).is_ok(), "one lookup left");
    core.forget(ino, 1);
    assert_eq!(core.getattr(ino, None), Err(Errno(libc::ENOENT)));
    assert_eq!(core.inode_count(), before);
    core.forget(ROOT_INO, 100);
    assert!(
        core.getattr(ROOT_INO, None).is_ok(),
        "the root is never forgotten"
    );
}

#[test]
fn a_directory_is_listed_once_per_opendir() {
    let (dir, core) = mounted(false);
    let fh = core.opendir(ROOT_INO).unwrap();
    std::fs::write(dir.path().join("late.img"), "FAKEIMG 512").unwrap();
    let listing = core.readdir(fh).unwrap();
    assert_eq!(listing.len(), 5, "taken at opendir");
    assert!(listing.iter().all(|(ino, _, _)| *ino != 0));
    core.releasedir(fh);
    assert_eq!(core.readdir(fh), Err(Errno(libc::EBADF)));
    assert!(names(&core, ROOT_INO).contains(&"late.img.raw".to_string()));
}

const MIB: u64 = 1 << 20;

/// A qemu-img VDI of 16 MiB served through a real catalog, with a fault watch on its file;
/// `None` without qemu-img (outside CI).
fn mounted_vdi() -> Option<(
    TempDir,
    FsCore,
    std::sync::Arc<crate::host::fault::Watch>,
    u64,
)> {
    let dir = TempDir::in_memory();
    let path = dir.path().join("d.vdi");
    let args = [
        "create",
        "-q",
        "-f",
        "vdi",
        crate::testutil::path_str(&path),
        "16M",
    ];
    let out = crate::testutil::qemu("qemu-img", &args)?;
    assert!(out.status.success());
    let watch = crate::host::fault::watch(&path);
    let opener = Box::new(crate::catalog::FormatOpener);
    let core = FsCore::new(Catalog::new(dir.path(), opener, false).unwrap());
    let ino = core.lookup(ROOT_INO, OsStr::new("d.vdi.raw")).unwrap().ino;
    Some((dir, core, watch, ino))
}

#[test]
fn host_errors_reach_the_writer_with_their_errno() {
    use crate::host::fault::{Fault, OpKind};
    let Some((_dir, core, watch, ino)) = mounted_vdi() else {
        return;
    };
    let fh = core.open(ino, true).unwrap();
    watch.arm(Some(Fault::NoSpace { nth: 0 }));
    assert_eq!(core.write(fh, 0, &[1; 4096]), Err(Errno(libc::ENOSPC)));
    watch.arm(Some(Fault::Fail {
        kind: OpKind::Write,
        nth: 0,
        errno: libc::EIO,
    }));
    assert_eq!(core.write(fh, 0, &[2; 4096]), Err(Errno(libc::EIO)));
    watch.arm(Some(Fault::Fail {
        kind: OpKind::Read,
        nth: 0,
        errno: libc::EIO,
    }));
    core.write(fh, MIB, &[3; 4096]).unwrap();
    assert_eq!(core.read(fh, MIB, 4096), Err(Errno(libc::EIO)));
    // A failed data write fails only its request.
    assert_eq!(core.read(fh, MIB, 4096).unwrap(), [3; 4096]);
    core.flush(fh).unwrap();
    core.release(fh).unwrap();
}

#[test]
fn a_failed_write_back_is_reported_once_per_open_file_and_leaves_the_image_read_only() {
    use crate::host::fault::{Fault, OpKind};
    let Some((_dir, core, watch, ino)) = mounted_vdi() else {
        return;
    };
    let (first, second) = (core.open(ino, true).unwrap(), core.open(ino, true).unwrap());
    let reader = core.open(ino, false).unwrap();
    let reason_xattr = OsStr::new(XATTR_READ_ONLY_REASON);
    assert_eq!(core.getxattr(ino, reason_xattr), Err(Errno(libc::ENODATA)));
    core.write(first, 0, &[1; 4096]).unwrap();
    core.flush(first).unwrap();
    core.write(second, 2 * MIB, &[2; 4096]).unwrap();
    watch.arm(Some(Fault::Fail {
        kind: OpKind::Sync,
        nth: 0,
        errno: libc::EIO,
    }));
    // Whichever handle flushes, each one that was open for writing hears of it once.
    assert_eq!(core.flush(first), Err(Errno(libc::EIO)));
    assert_eq!(core.flush(first), Ok(()));
    assert_eq!(core.flush(second), Err(Errno(libc::EIO)));
    assert_eq!(core.flush(second), Ok(()));
    assert_eq!(core.flush(reader), Ok(()));
    // Read-only now, with the reason; reads go on.
    assert_eq!(core.write(first, 0, &[3; 512]), Err(Errno(libc::EROFS)));
    assert_eq!(core.read(reader, 0, 4096).unwrap(), [1; 4096]);
    let handle = core.handle(first).unwrap();
    let reason = handle.image.image().info().read_only_reason.unwrap();
    assert!(reason.contains("metadata write or sync failed"), "{reason}");
    drop(handle);
    // No new writer builds on it while a file on it is open.
    assert_eq!(core.open(ino, true), Err(Errno(libc::EROFS)));
    // `imgfs info` on the raw file shows it too, through the attribute.
    let shown = core.getxattr(ino, reason_xattr).unwrap();
    assert_eq!(String::from_utf8(shown).unwrap(), reason);
    assert!(String::from_utf8(core.listxattr(ino))
        .unwrap()
        .contains(XATTR_READ_ONLY_REASON));
    // Nothing is left to write back on close.
    for fh in [first, second, reader] {
        core.release(fh).unwrap();
    }
    assert_eq!(watch.counts().syncs, 1);
    // The loss is remembered after the instance is closed, for `imgfs umount` to report.
    assert_eq!(core.catalog.close_idle(Duration::ZERO), 1);
    assert_eq!(
        core.setxattr(ROOT_INO, OsStr::new(XATTR_FLUSH)),
        Err(Errno(libc::EIO))
    );
    let lost = core
        .getxattr(ROOT_INO, OsStr::new(XATTR_LOST_WRITE_BACKS))
        .unwrap();
    let lost = String::from_utf8(lost).unwrap();
    assert_eq!(lost.lines().count(), 1, "{lost}");
    assert!(
        lost.contains("d.vdi: ") && lost.contains("Input/output error"),
        "{lost}"
    );
    // Opened again, the image is writable and flushes, but the loss stays reported.
    let fh = core.open(ino, true).unwrap();
    core.write(fh, 0, &[4; 512]).unwrap();
    core.flush(fh).unwrap();
    core.release(fh).unwrap();
    assert_eq!(
        core.setxattr(ROOT_INO, OsStr::new(XATTR_FLUSH)),
        Err(Errno(libc::EIO))
    );
}

#[test]
fn the_flush_xattr_succeeds_and_lists_no_loss_when_every_write_back_worked() {
    let Some((_dir, core, _watch, ino)) = mounted_vdi() else {
        return;
    };
    let fh = core.open(ino, true).unwrap();
    core.write(fh, 0, &[1; 4096]).unwrap();
    core.release(fh).unwrap();
    core.setxattr(ROOT_INO, OsStr::new(XATTR_FLUSH)).unwrap();
    let lost = core.getxattr(ROOT_INO, OsStr::new(XATTR_LOST_WRITE_BACKS));
    assert_eq!(lost, Ok(Vec::new()));
}

#[test]
fn sequential_reads_are_read_ahead_and_never_stale() {
    let dir = TempDir::new();
    let size = 4 << 20;
    std::fs::write(dir.path().join("big.img"), format!("FAKEIMG {size}")).unwrap();
    let catalog = Catalog::new(dir.path(), Box::new(FakeOpener::default()), false).unwrap();
    let core = FsCore::new(catalog);
    let ino = core
        .lookup(ROOT_INO, OsStr::new("big.img.raw"))
        .unwrap()
        .ino;
    let writer = core.open(ino, true).unwrap();
    let reader = core.open(ino, false).unwrap();
    let mut expected: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(core.write(writer, 0, &expected).unwrap() as usize, size);
    let chunk = 256 << 10;
    let mut buf = AlignedBuffer::default();
    for (i, offset) in (0..size).step_by(chunk).enumerate() {
        let n = core
            .read_into(reader, offset as u64, chunk as u32, i % 3 == 0, &mut buf)
            .unwrap();
        assert_eq!(n, chunk);
        assert!(buf.filled(n) == &expected[offset..offset + n], "chunk {i}");
        if i == 5 {
            // The next chunk is being read ahead: a write into it must still be seen.
            let at = offset + chunk + 100;
            core.write(writer, at as u64, b"fresh").unwrap();
            expected[at..at + 5].copy_from_slice(b"fresh");
        }
    }
    // Read ahead from the third chunk on (the second read makes a stream), but not those
    // read ahead when the write came (any write makes all of them stale). A read that came
    // before its fetch started read for itself.
    assert_eq!(
        core.read_ahead_hits() + core.read_ahead_unstarted(),
        16 - 2 - readahead::DEPTH as u64
    );
    // A reader that jumps around gets nothing read ahead.
    let hits = core.read_ahead_hits();
    for offset in [3 << 20, 0, 2 << 20, 1 << 20, 3 << 20] {
        let n = core
            .read_into(reader, offset, chunk as u32, false, &mut buf)
            .unwrap();
        assert!(buf.filled(n) == &expected[offset as usize..offset as usize + n]);
    }
    assert_eq!(core.read_ahead_hits(), hits);
    core.release(reader).unwrap();
    core.release(writer).unwrap();
}
