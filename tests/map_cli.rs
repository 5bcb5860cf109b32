//! `imgfs map` against `qemu-img map`: the same data ranges, chain depths and host offsets for
//! every format.

mod common;

use std::process::Command;

use common::*;

/// The ranges holding data, merged where they touch, with their depth: (start, end, depth).
fn data_ranges(json: &[u8]) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for (start, end, depth, _) in stored_ranges(json) {
        match out.last_mut() {
            Some(last) if last.1 == start && last.2 == depth => last.1 = end,
            _ => out.push((start, end, depth)),
        }
    }
    out
}

/// The ranges holding data with where they are stored, merged where they touch on the disk
/// and in the file: (start, end, depth, offset).
fn stored_ranges(json: &[u8]) -> Vec<(u64, u64, u64, Option<u64>)> {
    let entries: Vec<serde_json::Value> = serde_json::from_slice(json).unwrap();
    let mut out: Vec<(u64, u64, u64, Option<u64>)> = Vec::new();
    for e in entries.iter().filter(|e| e["data"] == true) {
        let start = e["start"].as_u64().unwrap();
        let end = start + e["length"].as_u64().unwrap();
        let depth = e["depth"].as_u64().unwrap();
        let offset = e["offset"].as_u64();
        match out.last_mut() {
            Some(last)
                if last.1 == start
                    && last.2 == depth
                    && last
                        .3
                        .zip(offset)
                        .is_some_and(|(a, b)| a + (start - last.0) == b) =>
            {
                last.1 = end
            }
            _ => out.push((start, end, depth, offset)),
        }
    }
    out
}

#[test]
fn imgfs_map_finds_the_data_qemu_img_map_finds() {
    let (dir, src) = empty_source("map");
    let fills = ["write -P 1 0 64k", "write -P 2 3M 1M", "write -z 5M 1M"];
    create_filled(&src, "qcow2", "base.qcow2", &[], "8M", &fills);
    let over = ["-b", "base.qcow2", "-F", "qcow2"];
    create_filled(
        &src,
        "qcow2",
        "top.qcow2",
        &over,
        "8M",
        &["write -P 3 4M 64k"],
    );
    create_filled(&src, "vdi", "disk.vdi", &[], "8M", &fills);
    create_filled(&src, "vmdk", "disk.vmdk", &[], "8M", &fills);
    let vhdx = ["-o", "block_size=1M"];
    create_filled(&src, "vhdx", "disk.vhdx", &vhdx, "8M", &fills);
    // QEMU's VHDX driver reports every byte as data (it has no block status): imgfs's map
    // is checked against the blocks written instead.
    let vhdx_map = run(Command::new(IMGFS)
        .args(["map", "--json"])
        .arg(src.join("disk.vhdx")));
    assert_eq!(
        data_ranges(&vhdx_map.stdout),
        [
            (0, 1 << 20, 0),
            (3 << 20, 4 << 20, 0),
            (5 << 20, 6 << 20, 0)
        ]
    );
    for name in ["base.qcow2", "top.qcow2", "disk.vdi", "disk.vmdk"] {
        let image = src.join(name);
        let ours = run(Command::new(IMGFS).args(["map", "--json"]).arg(&image));
        let theirs = qemu_img(&["map", "--output=json", path_str(&image)]);
        // The same ranges, stored at the same offsets of the same layer's file.
        assert_eq!(
            stored_ranges(&ours.stdout),
            stored_ranges(&theirs.stdout),
            "{name}"
        );
    }
    let human = run(Command::new(IMGFS).arg("map").arg(src.join("top.qcow2")));
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("0x400000") && text.contains("data"), "{text}");
    assert!(text.contains("Mapped to"), "{text}");
    drop(dir);
}
