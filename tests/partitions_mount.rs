//! Partitions as files through a real mount: `x.parts/pN.raw` for MBR (logical partitions too)
//! and GPT disks of any format, sized and placed exactly, read-write and sharing the disk's
//! instance; a table written through the raw file is picked up at once; hostile tables are
//! refused with the reason while the disk is still served.

mod common;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

/// Partitions `raw` (a raw file of the mount) with sfdisk and `script`.
fn sfdisk(raw: &Path, script: &str) {
    let mut child = Command::new("sfdisk")
        .arg("-q")
        .arg("--no-reread")
        .arg(raw)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk {}", raw.display());
}

fn len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

const MBR: &str = "label: dos
start=2048, size=8192, type=83
start=10240, size=40960, type=83
start=51200, size=40960, type=5
start=53248, size=8192, type=83
start=63488, size=8192, type=82
";

#[test]
fn partitions_of_a_table_written_through_the_mount_appear_at_once() {
    if !can_mount() {
        return;
    }
    for (format, name) in [("vdi", "disk.vdi"), ("qcow2", "disk.qcow2")] {
        let (dir, src) = empty_source(&format!("parts-{format}"));
        create_filled(&src, format, name, &[], "64M", &[]);
        let mount = Mount::new(&src, &dir.join("mnt"), &[]);
        let raw = mount.path(&format!("{name}.raw"));
        assert!(!mount.path(&format!("{name}.parts")).exists());
        sfdisk(&raw, MBR);
        let parts = mount.path(&format!("{name}.parts"));
        assert_eq!(ls(&parts), ["p1.raw", "p2.raw", "p5.raw", "p6.raw"]);
        assert_eq!(len(&parts.join("p2.raw")), 40960 * 512);
        assert_eq!(len(&parts.join("p5.raw")), 8192 * 512);

        // A partition file is the disk's bytes at the partition's offset, both ways.
        let p5 = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(parts.join("p5.raw"))
            .unwrap();
        p5.write_all_at(&[0x5a; 4096], 1000).unwrap();
        assert_eq!(read_range(&raw, 53248 * 512 + 1000, 4096), vec![0x5a; 4096]);
        let disk = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
        disk.write_all_at(&[0xa5; 512], 53248 * 512).unwrap();
        let mut seen = [0u8; 512];
        p5.read_exact_at(&mut seen, 0).unwrap();
        assert_eq!(seen, [0xa5; 512]);
        // Nothing past its end.
        let err = p5.write_all_at(&[1; 512], 8192 * 512).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        drop((p5, disk));
        mount.unmount();
        assert_check_clean(format, &src.join(name));
    }
}

#[test]
fn a_file_system_made_on_a_partition_file_is_the_disks() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("parts-fs");
    create_filled(&src, "vdi", "guest.vdi", &[], "64M", &[]);
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let raw = mount.path("guest.vdi.raw");
    sfdisk(
        &raw,
        "label: gpt\nstart=2048, size=8192, name=boot\nstart=10240, size=100000, name=data\n",
    );
    let p2 = mount.path("guest.vdi.parts/p2.raw");
    assert_eq!(xattr(&p2, "user.imgfs.name").as_deref(), Some("data"));
    assert_eq!(
        xattr(&mount.path("guest.vdi.parts/p1.raw"), "user.imgfs.name").as_deref(),
        Some("boot")
    );
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&p2));
    let guest = dir.join("guest");
    std::fs::create_dir_all(&guest).unwrap();
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&p2)
        .arg(&guest));
    std::fs::write(guest.join("hello.txt"), "hello from a partition").unwrap();
    run(Command::new("umount").arg(&guest));
    // The whole disk holds the file system at the partition's offset.
    let whole = read_range(&raw, 10240 * 512, 100000 * 512);
    assert!(whole == std::fs::read(&p2).unwrap());
    let info = Command::new(IMGFS)
        .args(["info"])
        .arg(src.join("guest.vdi"))
        .output()
        .unwrap();
    mount.unmount();
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(
        text.contains("Partitions (gpt):") && text.contains("name \"data\""),
        "{text}"
    );
    run(Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(extract(&src.join("guest.vdi"), &dir)));
}

/// Partition 2 of the disk image `image` as a raw file, extracted with qemu-img.
fn extract(image: &Path, dir: &TempDir) -> std::path::PathBuf {
    let raw = dir.join("whole.raw");
    qemu_img(&["convert", "-O", "raw", path_str(image), path_str(&raw)]);
    let bytes = std::fs::read(&raw).unwrap();
    let part = dir.join("p2.img");
    std::fs::write(&part, &bytes[10240 * 512..(10240 + 100000) * 512]).unwrap();
    part
}

#[test]
fn a_hostile_table_is_refused_and_the_disk_still_served() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("parts-hostile");
    create_filled(&src, "vdi", "bad.vdi", &[], "8M", &[]);
    // Two primary partitions overlapping each other.
    let mut mbr = vec![0u8; 512];
    for (i, (first, count)) in [(2048u32, 4096u32), (4000, 4096)].iter().enumerate() {
        let at = 446 + 16 * i;
        mbr[at + 4] = 0x83;
        mbr[at + 8..at + 12].copy_from_slice(&first.to_le_bytes());
        mbr[at + 12..at + 16].copy_from_slice(&count.to_le_bytes());
    }
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    let table = dir.join("mbr.raw");
    std::fs::write(&table, &mbr).unwrap();
    let write = format!("write -s {} 0 512", path_str(&table));
    qemu_io("vdi", &src.join("bad.vdi"), &[&write]);
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    assert_eq!(ls(&mount.mnt), ["bad.vdi.raw"]);
    assert!(mount.log_text().contains("overlap"), "{}", mount.log_text());
    assert_eq!(read_range(&mount.path("bad.vdi.raw"), 510, 2), [0x55, 0xaa]);
    mount.unmount();
}
