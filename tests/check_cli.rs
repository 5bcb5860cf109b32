//! `imgfs check` against `qemu-img check` on the same images: clean images of every format,
//! and images damaged by patching bytes, give the same exit codes (and for qcow2 the same
//! JSON numbers); repairs leave images qemu-img calls clean; an image in use is refused.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn imgfs_check(args: &[&str], image: &Path) -> Output {
    let out = Command::new(IMGFS)
        .arg("check")
        .args(args)
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.code().is_some(), "imgfs check was killed");
    out
}

fn qemu_check(args: &[&str], image: &Path) -> Output {
    Command::new("qemu-img")
        .arg("check")
        .args(args)
        .arg(image)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Both tools give `code` for `image`.
fn assert_same_verdict(image: &Path, code: i32) {
    let ours = imgfs_check(&[], image);
    let theirs = qemu_check(&[], image);
    assert_eq!(
        theirs.status.code(),
        Some(code),
        "qemu-img: {}",
        text(&theirs)
    );
    assert_eq!(ours.status.code(), Some(code), "imgfs: {}", text(&ours));
}

fn read_u32_be(path: &Path, at: u64) -> u32 {
    let mut b = [0u8; 4];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    u32::from_be_bytes(b)
}

fn read_u64_be(path: &Path, at: u64) -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    u64::from_be_bytes(b)
}

fn read_u32_le(path: &Path, at: u64) -> u32 {
    let mut b = [0u8; 4];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    u32::from_le_bytes(b)
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, at).unwrap();
}

fn copy(src: &Path, name: &str, to: &str) -> std::path::PathBuf {
    let to = src.join(to);
    std::fs::copy(src.join(name), &to).unwrap();
    to
}

/// Sets the 16-bit refcount of host cluster `cluster` of a qemu-made qcow2 (its first
/// refcount block covers it).
fn set_qcow2_refcount(path: &Path, cluster: u64, value: u16) {
    let table = read_u64_be(path, 48);
    let block = read_u64_be(path, table) & !0x1ff;
    patch(path, block + cluster * 2, &value.to_be_bytes());
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// The numbers of `qemu-img check --output=json`, without the file name.
fn numbers(value: &serde_json::Value) -> serde_json::Value {
    let mut value = value.clone();
    if let Some(map) = value.as_object_mut() {
        map.remove("filename");
    }
    value
}

#[test]
fn clean_images_of_every_format_are_clean() {
    let (dir, src) = empty_source("check-clean");
    let fills = ["write -P 1 0 64k", "write -P 2 3M 1M"];
    create_filled(&src, "qcow2", "a.qcow2", &[], "8M", &fills);
    create_filled(
        &src,
        "qcow2",
        "b.qcow2",
        &["-o", "compat=0.10"],
        "8M",
        &fills,
    );
    qemu_img(&["snapshot", "-c", "s1", path_str(&src.join("b.qcow2"))]);
    qemu_io("qcow2", &src.join("b.qcow2"), &["write -P 3 0 1M"]);
    let ext = ["-o", "extended_l2=on,cluster_size=128k"];
    create_filled(&src, "qcow2", "c.qcow2", &ext, "8M", &fills);
    create_filled(&src, "qcow2", "bm.qcow2", &[], "8M", &[]);
    qemu_img(&["bitmap", "--add", path_str(&src.join("bm.qcow2")), "b0"]);
    qemu_io("qcow2", &src.join("bm.qcow2"), &fills);
    create_filled(&src, "vdi", "d.vdi", &[], "8M", &fills);
    create_filled(
        &src,
        "vhdx",
        "e.vhdx",
        &["-o", "block_size=1M"],
        "8M",
        &fills,
    );
    create_filled(&src, "vmdk", "f.vmdk", &[], "8M", &fills);
    let split = ["-o", "subformat=twoGbMaxExtentSparse"];
    create_filled(&src, "vmdk", "g.vmdk", &split, "8M", &fills);
    for name in [
        "a.qcow2", "b.qcow2", "c.qcow2", "bm.qcow2", "d.vdi", "e.vhdx", "f.vmdk", "g.vmdk",
    ] {
        let image = src.join(name);
        assert_same_verdict(&image, 0);
        let ours = json(&imgfs_check(&["--json"], &image));
        let theirs = json(&qemu_check(&["--output=json"], &image));
        assert_eq!(numbers(&ours), numbers(&theirs), "{name}");
    }
    // qemu-img cannot check these (exit 63); imgfs can.
    create_filled(&src, "vpc", "h.vhd", &[], "8M", &fills);
    create_filled(&src, "qcow", "i.qcow", &[], "8M", &fills);
    for name in ["h.vhd", "i.qcow"] {
        let image = src.join(name);
        assert_eq!(qemu_check(&[], &image).status.code(), Some(63));
        let ours = imgfs_check(&[], &image);
        assert_eq!(ours.status.code(), Some(0), "{name}: {}", text(&ours));
        assert!(text(&ours).contains("No errors were found on the image."));
    }
    drop(dir);
}

#[test]
fn qcow2_leaks_and_low_refcounts_match_qemu_img_and_repair() {
    let (dir, src) = empty_source("check-qcow2");
    create_filled(&src, "qcow2", "a.qcow2", &[], "64M", &["write -P 1 0 1M"]);
    let base = src.join("a.qcow2");
    let clusters = std::fs::metadata(&base).unwrap().len() / 65536;

    // A leak: one more cluster at the end of the file with refcount 1 and no reference.
    let leaky = copy(&src, "a.qcow2", "leak.qcow2");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&leaky)
        .unwrap()
        .set_len((clusters + 1) * 65536)
        .unwrap();
    set_qcow2_refcount(&leaky, clusters, 1);
    assert_same_verdict(&leaky, 3);
    let ours = imgfs_check(&["--json"], &leaky);
    let theirs = qemu_check(&["--output=json"], &leaky);
    assert_eq!(numbers(&json(&ours)), numbers(&json(&theirs)));
    assert_eq!(json(&ours)["leaks"], 1);
    assert!(text(&ours).contains(&format!("Leaked cluster {clusters} refcount=1 reference=0")));
    let human = text(&imgfs_check(&[], &leaky));
    assert!(human.contains(
        "1 leaked clusters were found on the image.\nThis means waste of disk space, but no \
         harm to data."
    ));

    // A used data cluster (cluster 5, the first data cluster qemu-img lays out) at refcount 0.
    let low = copy(&src, "a.qcow2", "low.qcow2");
    set_qcow2_refcount(&low, 5, 0);
    assert_same_verdict(&low, 2);
    let ours = imgfs_check(&["--json"], &low);
    let theirs = qemu_check(&["--output=json"], &low);
    assert_eq!(numbers(&json(&ours)), numbers(&json(&theirs)));
    assert!(text(&ours).contains("ERROR cluster 5 refcount=0 reference=1"));

    // A refcount bumped to 2: a leak, and a COPIED flag that no longer fits (corruption).
    let bumped = copy(&src, "a.qcow2", "bumped.qcow2");
    set_qcow2_refcount(&bumped, 6, 2);
    assert_same_verdict(&bumped, 2);
    let ours = json(&imgfs_check(&["--json"], &bumped));
    let theirs = json(&qemu_check(&["--output=json"], &bumped));
    assert_eq!(numbers(&ours), numbers(&theirs));

    // --repair leaks gives the leak back; qemu-img check is clean afterwards.
    let out = imgfs_check(&["--repair", "leaks", "--json"], &leaky);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(json(&out)["leaks-fixed"], 1);
    assert_eq!(qemu_check(&[], &leaky).status.code(), Some(0));
    // --repair leaks leaves a refcount that is too low alone and says so.
    let out = imgfs_check(&["-r", "leaks"], &low);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("not repaired"), "{}", text(&out));
    // --repair all rebuilds the refcounts.
    let out = imgfs_check(&["-r", "all"], &low);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("Double checking the fixed image now..."));
    assert_eq!(qemu_check(&[], &low).status.code(), Some(0));
    let out = imgfs_check(&["-r", "all"], &bumped);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(qemu_check(&[], &bumped).status.code(), Some(0));
    qemu_io("qcow2", &low, &["read -P 1 0 1M"]);
    drop(dir);
}

#[test]
fn qcow2_dirty_lazy_refcounts_match_qemu_img_and_repair_clears_the_bit() {
    let (dir, src) = empty_source("check-lazy");
    let image = src.join("lazy.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        path_str(&image),
        "8M",
    ]);
    // qemu-io aborts with the refcounts of its writes not yet written: a crashed QEMU.
    let crashed = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "abort"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(!crashed.status.success());
    assert_same_verdict(&image, 2);
    let ours = json(&imgfs_check(&["--json"], &image));
    let theirs = json(&qemu_check(&["--output=json"], &image));
    assert_eq!(numbers(&ours), numbers(&theirs));
    let out = imgfs_check(&["-r", "all"], &image);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("dirty bit is cleared"),
        "{}",
        text(&out)
    );
    assert_eq!(read_u64_be(&image, 72) & 1, 0, "dirty bit cleared");
    assert_eq!(qemu_check(&[], &image).status.code(), Some(0));
    qemu_io("qcow2", &image, &["read -P 1 0 1M"]);
    drop(dir);
}

#[test]
fn qcow2_tables_past_the_end_are_corruptions() {
    let (dir, src) = empty_source("check-qcow2-past");
    create_filled(&src, "qcow2", "a.qcow2", &[], "64M", &["write -P 1 0 1M"]);
    let image = src.join("a.qcow2");
    // The first L2 table's second entry points far past the end of the file.
    let l1 = read_u64_be(&image, 40);
    let l2 = read_u64_be(&image, l1) & 0x00ff_ffff_ffff_fe00;
    patch(&image, l2 + 8, &(0x8000_0000_4000_0000u64).to_be_bytes());
    let ours = imgfs_check(&["--json"], &image);
    let theirs = qemu_check(&["--output=json"], &image);
    assert_eq!(ours.status.code(), theirs.status.code(), "{}", text(&ours));
    assert_eq!(ours.status.code(), Some(2));
    assert!(text(&ours).contains("exceeding the end of the file"));
    // A leak repair is refused while references cannot all be counted.
    let out = imgfs_check(&["-r", "leaks"], &image);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    drop(dir);
}

#[test]
fn vdi_duplicates_and_counts_match_qemu_img() {
    let (dir, src) = empty_source("check-vdi");
    create_filled(&src, "vdi", "a.vdi", &[], "8M", &["write -P 1 0 3M"]);
    let base = src.join("a.vdi");
    let bmap = u64::from(read_u32_le(&base, 0x154));
    let dup = copy(&src, "a.vdi", "dup.vdi");
    patch(&dup, bmap + 4, &0u32.to_le_bytes());
    assert_same_verdict(&dup, 2);
    let count = copy(&src, "a.vdi", "count.vdi");
    let allocated = read_u32_le(&count, 0x184);
    patch(&count, 0x184, &(allocated + 2).to_le_bytes());
    assert_same_verdict(&count, 2);
    let theirs = json(&qemu_check(&["--output=json"], &count));
    let ours = json(&imgfs_check(&["--json"], &count));
    assert_eq!(numbers(&ours), numbers(&theirs));
    // The count of a dense map is repaired; the duplicate is not.
    let out = imgfs_check(&["--repair", "leaks"], &count);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(qemu_check(&[], &count).status.code(), Some(0));
    let out = imgfs_check(&["--repair", "all"], &dup);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    drop(dir);
}

#[test]
fn vmdk_directory_mismatch_and_vhd_vhdx_bat_past_the_end() {
    let (dir, src) = empty_source("check-bat");
    // VMDK: the redundant directory loses its first entry. qemu-img does not compare the two
    // directories (it calls the image clean); imgfs reports a corruption.
    create_filled(&src, "vmdk", "a.vmdk", &[], "8M", &["write -P 1 0 1M"]);
    let vmdk = src.join("a.vmdk");
    let rgd = {
        let mut b = [0u8; 8];
        std::fs::File::open(&vmdk)
            .unwrap()
            .read_exact_at(&mut b, 48)
            .unwrap();
        u64::from_le_bytes(b) * 512
    };
    patch(&vmdk, rgd, &0u32.to_le_bytes());
    let out = imgfs_check(&[], &vmdk);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("redundant copy disagree"),
        "{}",
        text(&out)
    );

    // VHD: BAT entry 1 points 1 GiB into an 8 MiB file.
    create_filled(&src, "vpc", "b.vhd", &[], "8M", &["write -P 1 0 1M"]);
    let vhd = src.join("b.vhd");
    let header = read_u64_be(&vhd, 16);
    let bat = read_u64_be(&vhd, header + 16);
    patch(&vhd, bat + 4, &(0x0020_0000u32).to_be_bytes());
    let out = imgfs_check(&[], &vhd);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("BAT entry 1"), "{}", text(&out));

    // VHDX: BAT entry 1 fully present 4 GiB into the file: qemu-img agrees.
    create_filled(
        &src,
        "vhdx",
        "c.vhdx",
        &["-o", "block_size=1M"],
        "8M",
        &["write -P 1 0 1M"],
    );
    let vhdx = src.join("c.vhdx");
    let bat = vhdx_bat_offset(&vhdx);
    patch(&vhdx, bat + 8, &((4096u64 << 20) | 6).to_le_bytes());
    assert_same_verdict(&vhdx, 2);
    let ours = json(&imgfs_check(&["--json"], &vhdx));
    let theirs = json(&qemu_check(&["--output=json"], &vhdx));
    assert_eq!(numbers(&ours), numbers(&theirs));
    drop(dir);
}

#[test]
fn vhd_footer_copy_is_repaired_and_qcow_v1_shared_clusters_are_found() {
    let (dir, src) = empty_source("check-vhd-qcow");
    create_filled(&src, "vpc", "a.vhd", &[], "8M", &["write -P 1 0 1M"]);
    let vhd = src.join("a.vhd");
    // One byte of the footer copy at offset 0 changes: its checksum no longer matches.
    patch(&vhd, 100, &[0x55]);
    let out = imgfs_check(&[], &vhd);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("footer copy"), "{}", text(&out));
    let out = imgfs_check(&["-r", "leaks"], &vhd);
    assert_eq!(out.status.code(), Some(2), "only --repair all rewrites it");
    let out = imgfs_check(&["-r", "all"], &vhd);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(imgfs_check(&[], &vhd).status.code(), Some(0));
    qemu_io("vpc", &vhd, &["read -P 1 0 1M"]);

    create_filled(&src, "qcow", "b.qcow", &[], "8M", &["write -P 1 0 64k"]);
    let qcow = src.join("b.qcow");
    // The second cluster of the first L2 table names the first cluster's place again.
    let l1 = read_u64_be(&qcow, 40);
    let l2 = read_u64_be(&qcow, l1);
    let first = read_u64_be(&qcow, l2);
    patch(&qcow, l2 + 8, &first.to_be_bytes());
    let out = imgfs_check(&["--json"], &qcow);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert_eq!(json(&out)["corruptions"], 1);
    assert!(text(&out).contains("share file space"), "{}", text(&out));
    drop(dir);
}

/// The file offset of a VHDX's BAT region, from the first region table.
fn vhdx_bat_offset(path: &Path) -> u64 {
    const BAT: [u8; 16] = [
        0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a,
        0x08,
    ];
    let mut table = vec![0u8; 64 * 1024];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut table, 192 * 1024)
        .unwrap();
    let count = u32::from_le_bytes(table[8..12].try_into().unwrap()) as usize;
    (0..count)
        .map(|i| &table[16 + 32 * i..48 + 32 * i])
        .find(|e| e[..16] == BAT)
        .map(|e| u64::from_le_bytes(e[16..24].try_into().unwrap()))
        .unwrap()
}

#[test]
fn images_in_use_are_refused() {
    let (dir, src) = empty_source("check-busy");
    create_filled(&src, "qcow2", "a.qcow2", &[], "8M", &["write -P 1 0 64k"]);
    let image = src.join("a.qcow2");
    // qemu-io holds the image open for writing (and its lock bytes) while it sleeps.
    let mut holder = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "sleep 3000"])
        .arg(&image)
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let plain = imgfs_check(&[], &image);
    let repair = imgfs_check(&["-r", "leaks"], &image);
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(plain.status.code(), Some(1), "{}", text(&plain));
    assert!(
        text(&plain).contains("open for writing"),
        "{}",
        text(&plain)
    );
    assert_eq!(repair.status.code(), Some(1), "{}", text(&repair));
    assert!(text(&repair).contains("busy"), "{}", text(&repair));
    drop(dir);
}

#[test]
fn an_image_an_imgfs_mount_serves_is_not_repaired() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("check-mounted");
    create_filled(&src, "qcow2", "a.qcow2", &[], "8M", &["write -P 1 0 64k"]);
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    // Opening the raw file makes the mount open (and claim) the image.
    let raw = std::fs::File::open(mount.path("a.qcow2.raw")).unwrap();
    let repair = imgfs_check(&["-r", "all"], &src.join("a.qcow2"));
    drop(raw);
    mount.unmount();
    assert_eq!(repair.status.code(), Some(1), "{}", text(&repair));
    assert!(text(&repair).contains("busy"), "{}", text(&repair));
    drop(dir);
}

#[test]
fn read_u32_helpers_agree() {
    // Guards the byte helpers above against a silent endianness mix-up.
    let (dir, src) = empty_source("check-helpers");
    let path = src.join("x");
    std::fs::write(&path, [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2]).unwrap();
    assert_eq!(read_u32_be(&path, 0), 1);
    assert_eq!(read_u64_be(&path, 4), 2);
    assert_eq!(read_u32_le(&path, 0), 1 << 24);
    drop(dir);
}
