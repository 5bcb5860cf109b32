//! `truncate -s BIGGER` on raw files through a mount grows qcow2, VDI, VHDX, VHD (dynamic)
//! and qcow v1 images, as `qemu-img resize` would: the mount shows the new size at once,
//! writes past the old end land, and qemu-img info, check (where it can check the format)
//! and io agree after unmounting. Shrinking, and formats and sub-formats that cannot grow
//! (VMDK, static VDI, fixed VHD and VHDX), are refused with EOPNOTSUPP.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use common::*;

const MIB: u64 = 1 << 20;

/// The virtual size `qemu-img info` reports.
fn qemu_virtual_size(format: &str, image: &Path) -> u64 {
    let out = qemu_img(&["info", "-f", format, "--output=json", path_str(image)]);
    let text = String::from_utf8_lossy(&out.stdout);
    // The top level's, not the one of the file node under "children".
    let key = "\n    \"virtual-size\":";
    let at = text.find(key).expect("virtual-size in qemu-img info");
    text[at + key.len()..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a number")
}

fn truncate(raw: &Path, size: u64) -> std::process::Output {
    Command::new("truncate")
        .arg("-s")
        .arg(size.to_string())
        .arg(raw)
        .output()
        .unwrap()
}

/// `qemu-img check` passes, or cannot check the format (vpc, qcow v1).
fn assert_check_clean_if_checkable(format: &str, image: &Path) {
    let out = qemu_img_output(&["check", "-f", format, path_str(image)]);
    let text = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(63) && text.contains("does not support checks") {
        return;
    }
    assert_check_clean(format, image);
}

fn qemu_img_output(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img").args(args).output().unwrap()
}

fn grow_case(format: &str, name: &str, options: &[&str], new_size: u64) {
    let (dir, src) = empty_source(&format!("resize-{format}"));
    create_filled(
        &src,
        format,
        name,
        options,
        "16M",
        &["write -P 0x61 15M 1M"],
    );
    let image = src.join(name);
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let raw = mount.path(&format!("{name}.raw"));
    let out = truncate(&raw, new_size);
    assert!(
        out.status.success(),
        "{format}: truncate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), new_size, "{format}");
    let file = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    file.write_all_at(&[0x62; 4096], new_size - 4096).unwrap();
    file.sync_all().unwrap();
    drop(file);
    assert_eq!(read_range(&raw, 20 * MIB, 4096), vec![0; 4096], "{format}");
    // Shrinking is refused.
    assert!(
        !truncate(&raw, 8 * MIB).status.success(),
        "{format}: shrink"
    );
    mount.unmount();
    assert_eq!(qemu_virtual_size(format, &image), new_size, "{format}");
    assert_check_clean_if_checkable(format, &image);
    let end = format!("read -P 0x62 {} 4k", new_size - 4096);
    qemu_io(
        format,
        &image,
        &["read -P 0x61 15M 1M", &end, "read -P 0 16M 1M"],
    );
}

#[test]
fn truncate_grows_qcow2_and_vdi() {
    if !can_mount() {
        return;
    }
    grow_case("qcow2", "g.qcow2", &[], 2 << 30);
    grow_case("vdi", "g.vdi", &[], 100 * MIB);
}

/// VHDX (up to what its BAT region holds), dynamic VHD (up to the BAT's last sector: 256 MiB
/// from 16 MiB; force_size, so any size in whole sectors) and qcow v1 (up to the first L2
/// table: 1012 MiB from 16 MiB).
#[test]
fn truncate_grows_vhdx_vhd_and_qcow() {
    if !can_mount() {
        return;
    }
    grow_case("vhdx", "g.vhdx", &[], 3 << 30);
    let vpc = ["-o", "subformat=dynamic,force_size=on"];
    grow_case("vpc", "g.vhd", &vpc, 200 * MIB + 512);
    grow_case("qcow", "g.qcow", &[], 1000 * MIB);
}

#[test]
fn truncate_of_formats_that_cannot_grow_is_refused() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("resize-refused");
    create_filled(&src, "vmdk", "f.vmdk", &[], "16M", &[]);
    create_filled(&src, "vdi", "s.vdi", &["-o", "static=on"], "16M", &[]);
    let fixed = ["-o", "subformat=fixed,force_size=on"];
    create_filled(&src, "vpc", "x.vhd", &fixed, "16M", &[]);
    create_filled(
        &src,
        "vhdx",
        "x.vhdx",
        &["-o", "subformat=fixed"],
        "16M",
        &[],
    );
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    for name in ["f.vmdk", "s.vdi", "x.vhd", "x.vhdx"] {
        let raw = mount.path(&format!("{name}.raw"));
        let out = truncate(&raw, 32 * MIB);
        assert!(!out.status.success(), "{name}: truncate should fail");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("not supported"),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(std::fs::metadata(&raw).unwrap().len(), 16 * MIB);
    }
    let log = mount.log_text();
    mount.unmount();
    assert!(log.contains("refusing to resize"), "{log}");
}
