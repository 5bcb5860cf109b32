//! VHD through a real imgfs mount, with qemu-img as the oracle: fixed disks (found by their
//! last sector) and dynamic ones, CHS-rounded and force_size, read like `qemu-img convert -f
//! vpc`; writes from several threads leave images `qemu-img compare` finds equal to the
//! expected bytes; a differencing child reads through its parent, found by locator, which is
//! served read-only and never changes; `imgfs info` shows creator, geometry and parent.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const MIB: u64 = 1 << 20;

/// (file name, qemu-img options, requested size): fixed and dynamic, sizes qemu-img rounds up
/// to a CHS geometry and sizes kept exactly (force_size, creator "qem2").
const IMAGES: [(&str, &str, u64); 5] = [
    ("dynamic.vhd", "subformat=dynamic", 10 * MIB),
    ("dynamic-odd.vhd", "subformat=dynamic", 7 * MIB + 12345),
    (
        "dynamic-force.vhd",
        "subformat=dynamic,force_size=on",
        9 * MIB + 512,
    ),
    ("fixed.vhd", "subformat=fixed", 6 * MIB),
    (
        "fixed-force.img",
        "subformat=fixed,force_size=on",
        5 * MIB + 4096,
    ),
];

/// The virtual size `qemu-img info -f vpc` gives.
fn qemu_size(image: &Path) -> u64 {
    let out = qemu_img(&["info", "-U", "-f", "vpc", "--output=json", path_str(image)]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("\"virtual-size\": "))
        .next_back()
        .and_then(|v| v.trim_end_matches(',').parse().ok())
        .unwrap()
}

fn make(src: &Path, name: &str, options: &str, size: u64) -> u64 {
    let path = src.join(name);
    let size = size.to_string();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        options,
        path_str(&path),
        &size,
    ]);
    let size = qemu_size(&path);
    let fills = [
        "write -P 0xab 0 4k".to_string(),
        format!("write -P 0x12 {} 100000", (size / 2 + 1000) & !511),
        format!("write -P 0x34 {} 4096", size - 4096),
    ];
    let fills: Vec<&str> = fills.iter().map(String::as_str).collect();
    qemu_io("vpc", &path, &fills);
    size
}

#[test]
fn fixed_and_dynamic_vhds_read_like_qemu_img_convert() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("vhd-read");
    let sizes: Vec<u64> = IMAGES
        .iter()
        .map(|(name, options, size)| make(&src, name, options, *size))
        .collect();
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let mut expected: Vec<String> = IMAGES.iter().map(|(n, _, _)| format!("{n}.raw")).collect();
    expected.sort();
    assert_eq!(
        ls(&mount.mnt),
        expected,
        "fixed disks have no magic at offset 0"
    );
    for ((name, _, _), size) in IMAGES.iter().zip(sizes) {
        let raw = mount.path(&format!("{name}.raw"));
        assert_eq!(std::fs::metadata(&raw).unwrap().len(), size, "{name}");
        assert_served_like_qemu(&mount, &src, &dir, "vpc", name);
    }
    mount.unmount();
}

#[test]
fn threaded_random_writes_compare_equal_in_qemu() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("vhd-write");
    let names = ["dynamic.vhd", "dynamic-force.vhd", "fixed.vhd"];
    let mut expected = Vec::new();
    for name in names {
        let (_, options, size) = IMAGES.iter().find(|(n, _, _)| *n == name).unwrap();
        make(&src, name, options, *size);
        expected.push(qemu_raw("vpc", &src.join(name), &dir));
    }
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    for (i, name) in names.iter().enumerate() {
        let size = expected[i].len() as u64;
        let plan =
            plan_threaded_writes(&mut expected[i], 4, 30, 100_000, size - 2 * MIB, size - MIB);
        run_threaded_writes(&mount.path(&format!("{name}.raw")), &plan);
    }
    for (i, name) in names.iter().enumerate() {
        let served = std::fs::read(mount.path(&format!("{name}.raw"))).unwrap();
        assert!(served == expected[i], "{name}: read-back differs");
    }
    mount.unmount();
    for (i, name) in names.iter().enumerate() {
        assert_compare_equal("vpc", &src.join(name), &expected[i], &dir);
    }
    // A second mount reads what the first wrote.
    let mount = Mount::new(&src, &dir.join("mnt2"), &[]);
    for (i, name) in names.iter().enumerate() {
        let served = std::fs::read(mount.path(&format!("{name}.raw"))).unwrap();
        assert!(served == expected[i], "{name}: after a new mount");
    }
    mount.unmount();
}

#[test]
fn a_differencing_child_reads_through_its_read_only_parent() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("vhd-diff");
    std::fs::create_dir_all(src.join("base")).unwrap();
    let parent = src.join("base/parent.vhd");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "force_size=on",
        path_str(&parent),
        "8M",
    ]);
    qemu_io(
        "vpc",
        &parent,
        &["write -P 0x70 0 3M", "write -P 0x71 5M 1M"],
    );
    let child = src.join("child.vhd");
    imgfs::format::vhd::make_differencing(&child, &parent, "base/parent.vhd").unwrap();
    let parent_before = std::fs::read(&parent).unwrap();
    let mut expected = qemu_raw("vpc", &parent, &dir);

    let info = run(Command::new(IMGFS).arg("info").arg(&child));
    let info = String::from_utf8(info.stdout).unwrap();
    for needle in [
        "subformat: differencing",
        "creator_app: qem2",
        "chs_geometry: 65535/16/255",
        "parent_locator: W2ru: .\\base\\parent.vhd",
        "parent: ",
    ] {
        assert!(info.contains(needle), "{needle}: {info}");
    }

    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let raw = mount.path("child.vhd.raw");
    assert!(std::fs::read(&raw).unwrap() == expected, "reads through");
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(mount.path("base/parent.vhd.raw"))
        .unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EROFS),
        "the parent is read-only"
    );
    let size = expected.len() as u64;
    let plan = plan_threaded_writes(&mut expected, 3, 20, 50_000, size - 2 * MIB, size - MIB);
    run_threaded_writes(&raw, &plan);
    assert!(std::fs::read(&raw).unwrap() == expected, "read back");
    mount.unmount();
    assert_eq!(std::fs::read(&parent).unwrap(), parent_before);
    let mount = Mount::new(&src, &dir.join("mnt2"), &[]);
    assert!(
        std::fs::read(mount.path("child.vhd.raw")).unwrap() == expected,
        "after a new mount"
    );
    mount.unmount();
}

#[test]
fn info_shows_the_creator_and_the_geometry_qemu_sizes_by() {
    let (_dir, src) = empty_source("vhd-info");
    make(&src, "d.vhd", "subformat=dynamic", 10 * MIB);
    let out = run(Command::new(IMGFS)
        .args(["info", "--json"])
        .arg(src.join("d.vhd")));
    let json = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "\"format\": \"vpc\"",
        "\"virtual-size\": 10514432",
        "\"subformat\": \"dynamic\"",
        "\"creator_app\": \"qemu\"",
        "\"chs_geometry\": \"302/4/17 (20536 sectors)\"",
        "\"size_from\": \"CHS geometry",
    ] {
        assert!(json.contains(needle), "{needle}: {json}");
    }
}
