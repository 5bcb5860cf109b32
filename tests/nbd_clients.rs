//! Conformance of `imgfs nbd` against real clients, for every format: qemu-img compare, convert
//! and map over `nbd+unix://`, nbdinfo --list and --map, nbdcopy, qemu-io writes (also from
//! several connections at once), then `qemu-img check` and `qemu-img compare` on the image.
//!
//! `imgfs map` does not exist yet, so the map over NBD is compared with `qemu-img map` of the
//! image file itself.

mod common;
mod nbd_support;

use std::path::Path;

use common::*;
use nbd_support::*;

const MIB: usize = 1 << 20;

/// Writes `pattern` over `len` bytes at `offset` of `expected`.
fn apply(expected: &mut [u8], offset: usize, len: usize, pattern: u8) {
    expected[offset..offset + len].fill(pattern);
}

fn text(out: std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The whole round for one image `name` of `format` made with `options`.
fn conformance(format: &str, name: &str, options: &[&str]) {
    if !have_libnbd_tools() {
        return;
    }
    let (dir, src) = empty_source(&format!("nbd-{name}"));
    create_filled(
        &src,
        format,
        name,
        options,
        "32M",
        &[
            "write -P 0x5a 0 1M",
            "write -P 0xa5 5M 300k",
            "write -z 12M 1M",
            "write -P 0x77 20M 64k",
        ],
    );
    let image = src.join(name);
    let mut expected = qemu_raw(format, &image, &dir);
    let server = NbdServer::unix(&src, dir.path(), &[]);
    let uri = server.uri(name);
    let image_str = path_str(&image);

    // Reads: the same bytes and the same allocation as QEMU sees in the file.
    client(
        "qemu-img",
        &["compare", "-U", "-f", "raw", "-F", format, &uri, image_str],
    );
    check_map(
        &qemu_map(&["-f", "raw", &uri]),
        format,
        &image,
        &expected,
        &dir,
    );
    let list = text(client("nbdinfo", &["--list", &server.uri("")]));
    assert!(list.contains(&format!("export=\"{name}\"")), "{list}");
    assert!(list.contains("export-size: 33554432"), "{list}");
    let map = text(client("nbdinfo", &["--map", &uri]));
    assert!(map.contains("  data"), "{map}");
    let copy = dir.join("copy.raw");
    client("nbdcopy", &[&uri, path_str(&copy)]);
    assert!(std::fs::read(&copy).unwrap() == expected, "nbdcopy");

    // Writes, zeroes and trims from one connection, unaligned ones included.
    qemu_io_nbd(
        &uri,
        &[
            "write -P 0x11 3000 5000",
            "write -z 5M 4096",
            "write -z -u 20M 64k",
            "discard 24M 1M",
            "write -P 0x22 31M 1M",
            "flush",
        ],
    );
    apply(&mut expected, 3000, 5000, 0x11);
    apply(&mut expected, 5 * MIB, 4096, 0);
    apply(&mut expected, 20 * MIB, 65536, 0);
    apply(&mut expected, 31 * MIB, MIB, 0x22);

    // Several connections writing at once, each in its own region.
    std::thread::scope(|scope| {
        for i in 0..4usize {
            let uri = &uri;
            scope.spawn(move || {
                let at = (8 + i) * MIB + 512 * i;
                let cmd = format!("write -P {} {at} 700k", 0x30 + i);
                qemu_io_nbd(uri, &[&cmd, "flush"]);
            });
        }
    });
    for i in 0..4usize {
        apply(
            &mut expected,
            (8 + i) * MIB + 512 * i,
            700 * 1024,
            0x30 + i as u8,
        );
    }
    assert!(
        read_nbd(&uri, &dir.join("back.raw")) == expected,
        "read back over NBD"
    );

    // nbdcopy into the export over 4 connections (multi-conn), then the original back.
    let original = dir.join("original.raw");
    std::fs::write(&original, &expected).unwrap();
    let noise: Vec<u8> = (0..expected.len()).map(|i| (i * 7 % 253) as u8).collect();
    std::fs::write(&copy, &noise).unwrap();
    client(
        "nbdcopy",
        &["--connections=4", "--flush", path_str(&copy), &uri],
    );
    assert!(
        read_nbd(&uri, &dir.join("noise.raw")) == noise,
        "nbdcopy -C 4 into the export"
    );
    client("nbdcopy", &["--flush", path_str(&original), &uri]);

    let log = server.stop();
    assert!(
        log.contains(&format!("attached {name} (read-write)")),
        "{log}"
    );
    // QEMU checks every format but qcow version 1.
    if format != "qcow" {
        assert_check_clean(format, &image);
    }
    assert_compare_equal(format, &image, &expected, &dir);
}

/// The map over NBD (`ours`) against QEMU's view of the file: the same data ranges where QEMU
/// reports allocation for the format (VHDX it reports as all data, so there ours must cover at
/// least the non-zero ranges of its raw conversion), and nothing called a hole or zero that
/// does not read as zeros.
fn check_map(
    ours: &[(u64, u64, bool, bool)],
    format: &str,
    image: &Path,
    content: &[u8],
    dir: &TempDir,
) {
    let data_only = |map: &[(u64, u64, bool, bool)]| {
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        for &(start, len, data, _) in map {
            match out.last_mut() {
                Some(last) if last.2 == data => last.1 += len,
                _ => out.push((start, len, data)),
            }
        }
        out
    };
    for &(start, len, data, zero) in ours {
        if !data || zero {
            let range = &content[start as usize..(start + len) as usize];
            assert!(
                range.iter().all(|b| *b == 0),
                "{start}+{len} is called a hole or zero"
            );
        }
    }
    if format != "vhdx" {
        let file = qemu_map(&["-U", "-f", format, path_str(image)]);
        assert_eq!(
            data_only(ours),
            data_only(&file),
            "data ranges over NBD and in the file"
        );
        return;
    }
    let raw = dir.join("map.raw");
    std::fs::write(&raw, content).unwrap();
    let sparse = dir.join("sparse.raw");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        path_str(&raw),
        path_str(&sparse),
    ]);
    for (start, len, data, _) in qemu_map(&["-f", "raw", path_str(&sparse)]) {
        if data {
            let covered = ours
                .iter()
                .any(|&(s, l, d, _)| d && s <= start && start + len <= s + l);
            assert!(
                covered,
                "{start}+{len} holds data the NBD map does not show"
            );
        }
    }
}

#[test]
fn vdi_dynamic() {
    conformance("vdi", "disk.vdi", &[]);
}

#[test]
fn vdi_static() {
    conformance("vdi", "static.vdi", &["-o", "static=on"]);
}

#[test]
fn qcow2() {
    conformance("qcow2", "disk.qcow2", &[]);
}

#[test]
fn qcow2_small_clusters_compat_0_10() {
    conformance(
        "qcow2",
        "old.qcow2",
        &["-o", "compat=0.10,cluster_size=4096"],
    );
}

#[test]
fn qcow() {
    conformance("qcow", "disk.qcow", &[]);
}

#[test]
fn vhdx() {
    conformance("vhdx", "disk.vhdx", &[]);
}

#[test]
fn vmdk_monolithic_sparse() {
    conformance("vmdk", "disk.vmdk", &["-o", "subformat=monolithicSparse"]);
}

#[test]
fn vmdk_monolithic_flat() {
    conformance("vmdk", "flat.vmdk", &["-o", "subformat=monolithicFlat"]);
}

/// A chain: the top's map says which layer holds what, the base is offered read-only.
#[test]
fn backing_chain_depth_and_read_only_base() {
    if !have_libnbd_tools() {
        return;
    }
    let (dir, src) = empty_source("nbd-chain");
    create_filled(
        &src,
        "qcow2",
        "base.qcow2",
        &[],
        "16M",
        &["write -P 1 0 2M"],
    );
    let top_opts = ["-b", "base.qcow2", "-F", "qcow2"];
    create_filled(
        &src,
        "qcow2",
        "top.qcow2",
        &top_opts,
        "16M",
        &["write -P 2 1M 2M"],
    );
    let server = NbdServer::unix(&src, dir.path(), &[]);
    let depth = text(client(
        "nbdinfo",
        &["--map=qemu:allocation-depth", &server.uri("top.qcow2")],
    ));
    let rows: Vec<Vec<&str>> = depth
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0][..3], ["0", "1048576", "2"], "{depth}");
    assert_eq!(rows[1][..3], ["1048576", "2097152", "1"], "{depth}");
    assert_eq!(rows[2][2], "0", "{depth}");
    let info = text(client("nbdinfo", &[&server.uri("base.qcow2")]));
    assert!(info.contains("is_read_only: true"), "{info}");
    let top = src.join("top.qcow2");
    client(
        "qemu-img",
        &[
            "compare",
            "-U",
            "-f",
            "raw",
            "-F",
            "qcow2",
            &server.uri("top.qcow2"),
            path_str(&top),
        ],
    );
    // A write to the base is refused; the top takes writes.
    let refused = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512", &server.uri("base.qcow2")])
        .output()
        .unwrap();
    assert!(
        !refused.status.success() || String::from_utf8_lossy(&refused.stdout).contains("failed"),
        "a write to a backing file went through"
    );
    qemu_io_nbd(&server.uri("top.qcow2"), &["write -P 3 0 4k"]);
    server.stop();
    assert_check_clean("qcow2", &top);
    assert_check_clean("qcow2", &src.join("base.qcow2"));
}

/// Partitions and `--allow`: exports beside the disk, and only those the globs let through.
#[test]
fn partitions_are_exports_and_allow_filters() {
    if !have_libnbd_tools() {
        return;
    }
    let (dir, src) = empty_source("nbd-parts");
    std::fs::create_dir_all(src.join("vm")).unwrap();
    create_filled(&src, "vdi", "vm/disk.vdi", &[], "16M", &[]);
    create_filled(&src, "qcow2", "other.qcow2", &[], "16M", &[]);
    let table = "label: dos\nstart=2048, size=8192, type=83\nstart=12288, type=83\n";
    let raw = dir.join("table.raw");
    std::fs::write(&raw, vec![0u8; 16 * MIB]).unwrap();
    let mut sfdisk = std::process::Command::new("sfdisk")
        .arg("--quiet")
        .arg(&raw)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(table.as_bytes())
        .unwrap();
    assert!(sfdisk.wait().unwrap().success());
    let disk = src.join("vm/disk.vdi");
    qemu_img(&[
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "vdi",
        path_str(&raw),
        path_str(&disk),
    ]);
    let server = NbdServer::unix(&src, dir.path(), &["--allow", "vm/**"]);
    let list = text(client("nbdinfo", &["--list", &server.uri("")]));
    assert!(list.contains("export=\"vm/disk.vdi\""), "{list}");
    assert!(list.contains("export=\"vm/disk.vdi.parts/p1\""), "{list}");
    assert!(list.contains("export-size: 4194304"), "{list}");
    assert!(
        !list.contains("other.qcow2"),
        "--allow hides other exports: {list}"
    );
    qemu_io_nbd(&server.uri("vm/disk.vdi.parts/p1"), &["write -P 0x44 0 4k"]);
    let hidden = std::process::Command::new("nbdinfo")
        .arg(server.uri("other.qcow2"))
        .output()
        .unwrap();
    assert!(!hidden.status.success());
    server.stop();
    let data = qemu_raw("vdi", &disk, &dir);
    assert!(data[MIB..MIB + 4096].iter().all(|b| *b == 0x44));
    assert_check_clean("vdi", Path::new(&disk));
}
