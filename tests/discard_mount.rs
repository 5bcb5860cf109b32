//! Discard through a mount: `fallocate -p` and `fallocate -z` on the raw file of every writable
//! format (aligned and unaligned ranges) leave zeros, give the image file's space back, move
//! SEEK_HOLE, and leave an image qemu-img checks clean and compares equal; and a guest ext4
//! filesystem on a loop device over a raw file gives its deleted files' space back to the
//! image with `fstrim`.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use common::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

/// Allocated bytes of a host file (st_blocks * 512).
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn fallocate(flag: &str, raw: &Path, offset: u64, len: u64) {
    run(Command::new("fallocate")
        .arg(flag)
        .arg("-o")
        .arg(offset.to_string())
        .arg("-l")
        .arg(len.to_string())
        .arg(raw));
}

/// (format, file name, qemu-img create options, whether qemu-img can check it). Formats that
/// cannot mark a cluster zero (qcow, VMDK version 1, VHD) keep it mapped and punched, and
/// report it as a hole all the same.
const CASES: [(&str, &str, &[&str], bool); 6] = [
    ("qcow2", "d.qcow2", &[], true),
    ("qcow", "d.qcow", &[], false),
    ("vdi", "d.vdi", &[], true),
    ("vhdx", "d.vhdx", &["-o", "block_size=1M"], true),
    ("vmdk", "d.vmdk", &[], true),
    ("vpc", "d.vhd", &["-o", "force_size=on"], false),
];

fn discard_case(format: &str, name: &str, options: &[&str], check: bool) {
    let (dir, src) = empty_source(&format!("discard-{format}"));
    create_filled(
        &src,
        format,
        name,
        options,
        &SIZE.to_string(),
        &["write -P 0x5a 0 16M"],
    );
    let image = src.join(name);
    let before = allocated(&image);
    let mut expected = vec![0x5au8; SIZE as usize];
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let raw = mount.path(&format!("{name}.raw"));
    let raw_before = allocated(&raw);
    // Aligned to every format's cluster, unaligned at both ends, and zeroed, not punched.
    let punches = [
        ("-p", 2 * MIB, 4 * MIB),
        ("-p", 7 * MIB + 1000, 3 * MIB / 2),
        ("-z", 12 * MIB + 512, 2 * MIB),
    ];
    for (flag, offset, len) in punches {
        fallocate(flag, &raw, offset, len);
        expected[offset as usize..(offset + len) as usize].fill(0);
    }
    assert!(
        read_range(&raw, 0, SIZE as usize) == expected,
        "{format}: reads after fallocate"
    );
    let file = std::fs::File::open(&raw).unwrap();
    // SAFETY: lseek on a descriptor we own.
    let hole = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_HOLE) };
    assert_eq!(
        hole as u64,
        2 * MIB,
        "{format}: SEEK_HOLE finds the punched range"
    );
    // SAFETY: as above.
    let data = unsafe { libc::lseek(file.as_raw_fd(), 2 * MIB as i64, libc::SEEK_DATA) };
    assert_eq!(data as u64, 6 * MIB, "{format}: SEEK_DATA skips it");
    drop(file);
    let raw_after = allocated(&raw);
    assert!(
        raw_after + 4 * MIB <= raw_before,
        "{format}: st_blocks of the raw file {raw_before} -> {raw_after} bytes, not 4 MiB less"
    );
    // Preallocating inside the disk is a no-op; growing it this way is refused.
    run(Command::new("fallocate")
        .args(["-o", "0", "-l", "1048576"])
        .arg(&raw));
    let grow = Command::new("fallocate")
        .args(["-o", "0", "-l", &(SIZE + MIB).to_string()])
        .arg(&raw)
        .output()
        .unwrap();
    assert!(!grow.status.success(), "{format}: fallocate past the end");
    mount.unmount();
    let after = allocated(&image);
    println!("{format}: image file allocated {before} -> {after} bytes");
    assert!(
        after + 4 * MIB <= before,
        "{format}: allocated {before} -> {after} bytes, not 4 MiB less"
    );
    if check {
        assert_check_clean(format, &image);
    }
    assert_compare_equal(format, &image, &expected, &dir);
}

#[test]
fn fallocate_punches_and_zeroes_every_writable_format() {
    if !can_mount() {
        return;
    }
    for (format, name, options, check) in CASES {
        discard_case(format, name, options, check);
    }
}

/// Detaches the loop device and unmounts the guest filesystem even when the test fails.
struct Guest {
    loop_dev: String,
    mnt: Option<std::path::PathBuf>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mnt) = self.mnt.take() {
            let _ = Command::new("umount").arg(&mnt).status();
        }
        let _ = Command::new("losetup")
            .args(["-d", &self.loop_dev])
            .status();
    }
}

/// A 256 MiB image with an ext4 filesystem on a loop device over its raw file: 120 MiB
/// written, deleted, `fstrim`: the image file must shrink by at least 100 MiB.
fn fstrim_case(format: &str, name: &str) {
    let (dir, src) = empty_source(&format!("fstrim-{format}"));
    create_filled(&src, format, name, &[], "256M", &[]);
    let image = src.join(name);
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let raw = mount.path(&format!("{name}.raw"));
    let out = run(Command::new("losetup").args(["-f", "--show"]).arg(&raw));
    let mut guest = Guest {
        loop_dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        mnt: None,
    };
    run(Command::new("mkfs.ext4").args(["-q", "-E", "nodiscard", &guest.loop_dev]));
    let fs = dir.join("guest");
    std::fs::create_dir_all(&fs).unwrap();
    run(Command::new("mount").args([&guest.loop_dev, path_str(&fs)]));
    guest.mnt = Some(fs.clone());
    let mut rng = Rng::new(12);
    let file = fs.join("data");
    std::fs::write(&file, rng.bytes(120 * MIB as usize)).unwrap();
    run(Command::new("sync").arg("-f").arg(&file));
    run(Command::new("blockdev").args(["--flushbufs", &guest.loop_dev]));
    // The image's own write-back, so the figure includes its metadata as well.
    run(Command::new("sync").arg(&raw));
    let full = allocated(&image);
    std::fs::remove_file(&file).unwrap();
    run(Command::new("sync").arg("-f").arg(&fs));
    let trim = run(Command::new("fstrim").arg("-v").arg(&fs));
    println!("{format}: {}", String::from_utf8_lossy(&trim.stdout).trim());
    guest.mnt = None;
    run(Command::new("umount").arg(&fs));
    drop(guest);
    mount.unmount();
    let after = allocated(&image);
    println!(
        "{format}: image file allocated {} MiB with the file, {} MiB after fstrim: {} MiB given back",
        full / MIB,
        after / MIB,
        full.saturating_sub(after) / MIB
    );
    assert!(
        after + 100 * MIB <= full,
        "{format}: fstrim gave back only {} MiB",
        full.saturating_sub(after) / MIB
    );
    assert_check_clean(format, &image);
}

#[test]
fn fstrim_in_a_guest_ext4_shrinks_a_vdi() {
    if !can_mount() {
        return;
    }
    fstrim_case("vdi", "guest.vdi");
}

#[test]
fn fstrim_in_a_guest_ext4_shrinks_a_qcow2() {
    if !can_mount() {
        return;
    }
    fstrim_case("qcow2", "guest.qcow2");
}
