//! VDI through a real imgfs mount, with qemu-img as the oracle: reads equal `qemu-img convert`,
//! writes from several threads leave an image that `qemu-img check` passes and `qemu-img
//! compare` finds equal to the expected bytes; a loop device with ext4 on it survives a remount.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use common::*;

const MIB: u64 = 1 << 20;

/// Images of every kind the issue names: dynamic and static, several sizes, odd ones, filled
/// with qemu-io patterns that are unaligned and cross block boundaries.
fn make_images(src: &Path) -> Vec<(&'static str, u64)> {
    let specs: [(&str, &str, &[&str]); 5] = [
        (
            "dynamic.vdi",
            "64M",
            &[
                "write -P 0xab 0 4k",
                "write -P 0x12 1048000 100k",
                "write -P 0x34 40M 3M",
            ],
        ),
        ("static.vdi", "3M", &["write -P 0x56 512 1536k"]),
        (
            "odd.vdi",
            "1000001",
            &["write -P 0x78 999424 512", "write -P 0x9a 0 512"],
        ),
        ("empty.vdi", "5M", &[]),
        ("sub/nested.vdi", "2M", &["write -P 0xcd 1M 1M"]),
    ];
    std::fs::create_dir_all(src.join("sub")).unwrap();
    let mut made = Vec::new();
    for (name, size, fills) in specs {
        let path = src.join(name);
        let mut args = vec!["create", "-q", "-f", "vdi"];
        if name.starts_with("static") {
            args.extend(["-o", "static=on"]);
        }
        args.extend([path_str(&path), size]);
        qemu_img(&args);
        qemu_io("vdi", &path, fills);
        let size: u64 = match size.strip_suffix('M') {
            Some(m) => m.parse::<u64>().unwrap() * MIB,
            None => size.parse::<u64>().unwrap().div_ceil(512) * 512,
        };
        made.push((name, size));
    }
    made
}

#[test]
fn reads_equal_qemu_img_convert_for_every_kind_of_vdi() {
    if !can_mount() {
        return;
    }
    let dir = TempDir::new("read");
    let src = dir.join("src");
    let images = make_images(&src);
    std::fs::write(src.join("readme.txt"), "not an image").unwrap();
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);

    assert_eq!(
        ls(&mount.mnt),
        [
            "dynamic.vdi.raw",
            "empty.vdi.raw",
            "odd.vdi.raw",
            "static.vdi.raw",
            "sub"
        ]
    );

    for (name, size) in images {
        let raw = mount.path(&format!("{name}.raw"));
        assert_eq!(std::fs::metadata(&raw).unwrap().len(), size, "{name}: size");
        let ours = std::fs::read(&raw).unwrap();
        let oracle = qemu_raw("vdi", &src.join(name), &dir);
        assert!(
            ours == oracle,
            "{name}: content differs from qemu-img convert"
        );
    }
    // A read spanning two allocated blocks and an unaligned tail.
    let raw = mount.path("dynamic.vdi.raw");
    assert_eq!(
        read_range(&raw, 1048000 - 10, 20),
        [&[0u8; 10][..], &[0x12; 10][..]].concat()
    );
    mount.unmount();
}

/// Random unaligned writes, crossing block boundaries, into allocated and unallocated blocks,
/// from four threads on disjoint regions plus all four into the same unallocated block.
#[test]
fn threaded_random_writes_pass_qemu_img_check_and_compare() {
    if !can_mount() {
        return;
    }
    let (dir, src, image) = source_with_image("write", "vdi", "disk.vdi", "32M", &[]);
    qemu_io(
        "vdi",
        &image,
        &["write -P 0x11 0 3M", "write -P 0x22 20M 1M"],
    );
    let mut expected = qemu_raw("vdi", &image, &dir);
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let raw = mount.path("disk.vdi.raw");

    // Four threads on disjoint regions of the first 28 MiB, plus all four into block 30, which
    // nobody allocated yet: it must be allocated exactly once.
    let plans = plan_threaded_writes(&mut expected, 4, 40, 300_000, 28 * MIB, 30 * MIB);
    run_threaded_writes(&raw, &plans);
    // What the mount serves right away, before any write-back.
    assert!(
        std::fs::read(&raw).unwrap() == expected,
        "read-back through the mount differs"
    );
    mount.unmount();

    assert_check_clean("vdi", &image);
    assert_compare_equal("vdi", &image, &expected, &dir);
    // At most the 28 blocks of the threads' regions, the shared block 30 and block 20 (blocks
    // 0-2 were already allocated and lie inside the regions): each allocated once.
    let len = std::fs::metadata(&image).unwrap().len();
    assert!(
        len <= 1024 + 29 * MIB + MIB,
        "blocks allocated twice? image is {len} bytes"
    );
}

#[test]
fn dd_through_the_mount_like_the_readme() {
    if !can_mount() {
        return;
    }
    let (dir, src, image) = source_with_image("dd", "vdi", "disk.vdi", "16M", &[]);
    let payload = dir.join("payload");
    std::fs::write(&payload, Rng::new(7).bytes(5 * MIB as usize)).unwrap();
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let raw = mount.path("disk.vdi.raw");
    run(Command::new("dd")
        .arg(format!("if={}", payload.display()))
        .arg(format!("of={}", raw.display()))
        .args([
            "bs=1M",
            "seek=3",
            "count=5",
            "conv=notrunc,fsync",
            "status=none",
        ]));
    mount.unmount();

    let mut expected = vec![0u8; 16 * MIB as usize];
    expected[3 * MIB as usize..8 * MIB as usize].copy_from_slice(&std::fs::read(&payload).unwrap());
    assert_check_clean("vdi", &image);
    assert_compare_equal("vdi", &image, &expected, &dir);
}

/// A reader that opened the raw file with `O_DIRECT` has its large reads served bypassing the
/// host page cache, several ranges read ahead (qemu-img's VDI data starts at 0x1200: sector
/// aligned, not page aligned): it must see every byte a buffered reader sees, writes still dirty
/// in the host page cache included, whatever its request size.
#[test]
fn direct_readers_see_what_buffered_readers_see() {
    if !can_mount() {
        return;
    }
    let (dir, src, image) = source_with_image("direct", "vdi", "disk.vdi", "24M", &[]);
    qemu_io(
        "vdi",
        &image,
        &[
            "write -P 0x11 0 5M",
            "write -P 0x22 7M 3M",
            "write -P 0x33 12345 70000",
            "write -P 0x44 20M 4M",
        ],
    );
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let raw = mount.path("disk.vdi.raw");
    let writer = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    let written = Rng::new(3).bytes(3 * MIB as usize + 100);
    writer.write_all_at(&written, 9 * MIB - 50).unwrap();
    let buffered = std::fs::read(&raw).unwrap();
    assert!(buffered[9 * MIB as usize - 50..][..written.len()] == written[..]);
    for bs in ["1M", "256K", "64K", "3M"] {
        let direct = run(Command::new("dd")
            .arg(format!("if={}", raw.display()))
            .args([&format!("bs={bs}"), "iflag=direct", "status=none"]))
        .stdout;
        assert!(direct == buffered, "dd iflag=direct bs={bs} differs");
    }
    drop(writer);
    mount.unmount();
    assert_check_clean("vdi", &image);
    assert_compare_equal("vdi", &image, &buffered, &dir);
}

/// A writer that opened the raw file with `O_DIRECT` has the whole host pages of its large
/// writes written bypassing the host page cache and the partly covered ones through it (VDI
/// blocks start mid-page): the image must end up as written, in allocated blocks and new ones.
#[test]
fn direct_writers_leave_the_image_as_written() {
    if !can_mount() {
        return;
    }
    let (dir, src, image) = source_with_image("directw", "vdi", "disk.vdi", "24M", &[]);
    qemu_io(
        "vdi",
        &image,
        &["write -P 0x11 0 5M", "write -P 0x22 9M 2M"],
    );
    let mut expected = qemu_raw("vdi", &image, &dir);
    let payload = Rng::new(11).bytes(12 * MIB as usize);
    let input = dir.join("payload");
    std::fs::write(&input, &payload).unwrap();
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let raw = mount.path("disk.vdi.raw");
    // 1 MiB writes from 3 MiB on, over allocated and new blocks; then writes of 300,000
    // bytes (not even sector multiples) from 15,000,000 on.
    for (bs, seek, count) in [(MIB as usize, 3, 6), (300_000, 50, 20)] {
        run(Command::new("dd")
            .arg(format!("if={}", input.display()))
            .arg(format!("of={}", raw.display()))
            .args([
                format!("bs={bs}"),
                format!("seek={seek}"),
                format!("count={count}"),
                "oflag=direct".into(),
                "conv=notrunc".into(),
                "status=none".into(),
            ]));
        let at = bs * seek;
        expected[at..at + bs * count].copy_from_slice(&payload[..bs * count]);
    }
    assert!(
        std::fs::read(&raw).unwrap() == expected,
        "read back through the mount"
    );
    mount.unmount();
    assert_check_clean("vdi", &image);
    assert_compare_equal("vdi", &image, &expected, &dir);
}

#[test]
fn static_vdi_is_written_in_place_and_refuses_resizing() {
    if !can_mount() {
        return;
    }
    let (dir, src, image) =
        source_with_image("static", "vdi", "fixed.vdi", "4M", &["-o", "static=on"]);
    let file_len = std::fs::metadata(&image).unwrap().len();
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let raw = mount.path("fixed.vdi.raw");
    let file = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    file.write_all_at(b"across the block boundary", MIB - 10)
        .unwrap();
    drop(file);

    // Resizing is refused clearly; times and statfs work.
    let truncate = Command::new("truncate")
        .args(["-s", "1M"])
        .arg(&raw)
        .output()
        .unwrap();
    assert!(!truncate.status.success());
    assert!(String::from_utf8_lossy(&truncate.stderr).contains("not supported"));
    run(Command::new("touch").args(["-d", "@981173106"]).arg(&raw));
    let mtime = std::fs::metadata(&image).unwrap().modified().unwrap();
    assert_eq!(
        mtime,
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(981173106)
    );
    run(Command::new("df").arg(&mount.mnt));
    mount.unmount();
    assert_eq!(
        std::fs::metadata(&image).unwrap().len(),
        file_len,
        "no new blocks"
    );
    let mut expected = vec![0u8; 4 * MIB as usize];
    expected[MIB as usize - 10..MIB as usize + 15].copy_from_slice(b"across the block boundary");
    assert_check_clean("vdi", &image);
    assert_compare_equal("vdi", &image, &expected, &dir);
}

/// SEEK_DATA / SEEK_HOLE and st_blocks come from the block map.
#[test]
fn holes_and_allocation_are_visible() {
    if !can_mount() {
        return;
    }
    let (dir, src, image) = source_with_image("seek", "vdi", "sparse.vdi", "8M", &[]);
    qemu_io("vdi", &image, &["write -P 1 2M 1M", "write -P 2 5M 4k"]);
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let raw = mount.path("sparse.vdi.raw");
    let meta = std::fs::metadata(&raw).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::blocks(&meta), 2 * MIB / 512);

    let file = std::fs::File::open(&raw).unwrap();
    let seek = |offset: u64, whence| {
        use std::os::fd::AsRawFd;
        // SAFETY: lseek on a descriptor we own.
        unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) }
    };
    assert_eq!(seek(0, libc::SEEK_DATA), 2 * MIB as i64);
    assert_eq!(seek(2 * MIB, libc::SEEK_HOLE), 3 * MIB as i64);
    assert_eq!(seek(3 * MIB, libc::SEEK_DATA), 5 * MIB as i64);
    assert_eq!(
        seek(6 * MIB, libc::SEEK_DATA),
        -1,
        "no data after the last block"
    );
    drop(file);

    // cp --sparse keeps the holes and the bytes.
    let copy = dir.join("copy.raw");
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(&raw)
        .arg(&copy));
    assert!(std::fs::read(&copy).unwrap() == qemu_raw("vdi", &image, &dir));
    mount.unmount();
}

/// losetup, mkfs.ext4 and a mounted file system on the raw file; unmount everything, remount,
/// and the files are still there.
#[test]
fn ext4_on_a_loop_device_survives_a_remount() {
    if !can_mount() {
        return;
    }
    let (dir, src, image) = source_with_image("loop", "vdi", "guest.vdi", "64M", &[]);
    let guest = dir.join("guest");
    std::fs::create_dir_all(&guest).unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| {
            (
                format!("file{i}"),
                Rng::new(100 + i).bytes(300_000 + i as usize * 7777),
            )
        })
        .collect();

    for round in 0..2 {
        let mount = Mount::new(&src, &dir.join("mnt"), &[]);
        let raw = mount.path("guest.vdi.raw");
        let out = run(Command::new("losetup").args(["--show", "-f"]).arg(&raw));
        let loopdev = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let result = std::panic::catch_unwind(|| {
            if round == 0 {
                run(Command::new("mkfs.ext4").args(["-q", "-F", &loopdev]));
            }
            run(Command::new("mount").arg(&loopdev).arg(&guest));
            for (name, data) in &files {
                if round == 0 {
                    std::fs::write(guest.join(name), data).unwrap();
                } else {
                    assert!(
                        std::fs::read(guest.join(name)).unwrap() == *data,
                        "{name} differs"
                    );
                }
            }
            run(Command::new("umount").arg(&guest));
        });
        let _ = Command::new("umount").arg(&guest).output();
        run(Command::new("losetup").arg("-d").arg(&loopdev));
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
        mount.unmount();
        assert_check_clean("vdi", &image);
    }
}
