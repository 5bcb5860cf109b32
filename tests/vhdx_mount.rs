//! VHDX through a real imgfs mount, with qemu-img as the oracle: fixed and dynamic images of
//! several block sizes read like `qemu-img convert -O raw`, and writes from several threads
//! leave images that `qemu-img check` passes and `qemu-img compare` finds equal to the
//! expected bytes.

mod common;

use std::path::Path;

use common::*;

const MIB: u64 = 1 << 20;

/// (file name, qemu-img options, virtual size): fixed and dynamic, block sizes from 1 to 256
/// MiB, sizes that are not a multiple of the block size.
const IMAGES: [(&str, &str, u64); 6] = [
    (
        "dynamic-1m.vhdx",
        "subformat=dynamic,block_size=1M",
        5 * MIB + 512,
    ),
    (
        "dynamic-8m.vhdx",
        "subformat=dynamic,block_size=8M",
        20 * MIB + 4096,
    ),
    (
        "dynamic-32m.vhdx",
        "subformat=dynamic,block_size=32M",
        70 * MIB,
    ),
    (
        "dynamic-256m.vhdx",
        "subformat=dynamic,block_size=256M",
        260 * MIB,
    ),
    (
        "fixed-1m.vhdx",
        "subformat=fixed,block_size=1M",
        5 * MIB + 512,
    ),
    (
        "fixed-8m.vhdx",
        "subformat=fixed,block_size=8M,block_state_zero=off",
        20 * MIB + 4096,
    ),
];

fn make(src: &Path, name: &str, options: &str, size: u64) {
    let path = src.join(name);
    let size_arg = size.to_string();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        options,
        path_str(&path),
        &size_arg,
    ]);
    let fills = [
        "write -P 0xab 0 4k".to_string(),
        format!("write -P 0x12 {} 100000", size / 2 + 1000),
        format!("write -P 0x34 {} 4096", size - 4096),
    ];
    let fills: Vec<&str> = fills.iter().map(String::as_str).collect();
    qemu_io("vhdx", &path, &fills);
}

#[test]
fn fixed_and_dynamic_vhdx_images_read_like_qemu_img_convert() {
    if !can_mount() {
        return;
    }
    let dir = TempDir::new("vhdx-read");
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    for (name, options, size) in IMAGES {
        make(&src, name, options, size);
    }
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let mut expected: Vec<String> = IMAGES.iter().map(|(n, _, _)| format!("{n}.raw")).collect();
    expected.sort();
    assert_eq!(ls(&mount.mnt), expected);
    for (name, _, size) in IMAGES {
        let raw = mount.path(&format!("{name}.raw"));
        assert_eq!(std::fs::metadata(&raw).unwrap().len(), size, "{name}");
        assert_served_like_qemu(&mount, &src, &dir, "vhdx", name);
    }
    mount.unmount();
    for (name, _, _) in IMAGES {
        assert_check_clean("vhdx", &src.join(name));
    }
}

#[test]
fn threaded_random_writes_pass_qemu_check_and_compare_equal() {
    if !can_mount() {
        return;
    }
    let dir = TempDir::new("vhdx-write");
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let names = ["dynamic-1m.vhdx", "dynamic-8m.vhdx", "fixed-8m.vhdx"];
    let mut expected = Vec::new();
    for name in names {
        let (_, options, size) = IMAGES.iter().find(|(n, _, _)| *n == name).unwrap();
        make(&src, name, options, *size);
        expected.push(qemu_raw("vhdx", &src.join(name), &dir));
    }
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    for (i, name) in names.iter().enumerate() {
        let size = expected[i].len() as u64;
        let plan = plan_threaded_writes(&mut expected[i], 4, 30, 100_000, size - 8192, 2 * MIB);
        run_threaded_writes(&mount.path(&format!("{name}.raw")), &plan);
    }
    for (i, name) in names.iter().enumerate() {
        let served = std::fs::read(mount.path(&format!("{name}.raw"))).unwrap();
        assert!(
            served == expected[i],
            "{name}: read-back through the mount differs"
        );
    }
    mount.unmount();
    for (i, name) in names.iter().enumerate() {
        assert_check_clean("vhdx", &src.join(name));
        assert_compare_equal("vhdx", &src.join(name), &expected[i], &dir);
    }
}
