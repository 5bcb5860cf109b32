//! Tests of the VHD driver through the `Image` trait, with qemu-img and qemu-io as the oracle:
//! fixed and dynamic images (CHS-rounded and force_size) read like `qemu-img convert` and
//! have the size `qemu-img info` gives for every creator; writes allocate blocks QEMU reads
//! back, from several threads at once; a damaged footer falls back to its copy and is
//! repaired; sectors whose bitmap bits are clear read as zeros and are filled up on write.

mod crash;
mod differencing;
mod faults;
mod hostile;
mod resize;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};

use super::footer::testing::with_sizing;
use super::*;
use crate::error::ErrorKind;
use crate::image::ExtentState;
use crate::testutil::{
    assert_qemu_compare_equal, path_str, qemu, qemu_io_on, qemu_raw_of, qemu_run, Rng, TempDir,
};

pub const MIB: u64 = 1 << 20;

/// `qemu-img create -f vpc` with `options` (e.g. "subformat=fixed,force_size=on"); `None`
/// when qemu-img is missing.
pub fn create(dir: &TempDir, name: &str, options: &str, size: u64) -> Option<PathBuf> {
    let path = dir.path().join(name);
    let options = if options.is_empty() {
        String::new()
    } else {
        format!("-o {options}")
    };
    qemu_run(
        "qemu-img",
        &format!("create -q -f vpc {options} {} {size}", path_str(&path)),
    )?;
    Some(path)
}

/// Runs qemu-io commands on the VHD at `path`.
pub fn qemu_io(path: &Path, commands: &[&str]) {
    qemu_io_on("vpc", path, commands).expect("qemu-io exists when qemu-img does");
}

/// The disk as `qemu-img convert -f vpc -O raw` reads it.
pub fn qemu_bytes(path: &Path) -> Vec<u8> {
    qemu_raw_of(path, "-f vpc").expect("qemu-img exists")
}

/// The virtual size `qemu-img info -f vpc` gives, or its error text.
pub fn qemu_size(path: &Path) -> Option<Result<u64, String>> {
    let out = qemu(
        "qemu-img",
        &["info", "-U", "-f", "vpc", "--output=json", path_str(path)],
    )?;
    if !out.status.success() {
        return Some(Err(String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // The image's own size comes after its children's (the file node's).
    let size = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("\"virtual-size\": "))
        .next_back()
        .and_then(|v| v.trim_end_matches(',').parse().ok())
        .expect("qemu-img info gives a virtual size");
    Some(Ok(size))
}

pub fn try_open(path: &Path) -> Result<VhdImage> {
    VhdImage::open(HostFile::open(path, true)?, None, None)
}

/// Bytes of the blocks the BAT maps (`allocated_bytes` gives the host file's smaller count
/// when blocks are only partly written).
pub fn mapped_bytes(img: &VhdImage) -> u64 {
    img.sparse
        .as_ref()
        .map_or(0, |s| s.read_bat().allocated() * s.geometry.block_size)
}

pub fn open_rw(path: &Path) -> VhdImage {
    try_open(path).unwrap()
}

pub fn open_ro(path: &Path) -> VhdImage {
    let file = HostFile::open(path, false).unwrap();
    VhdImage::open(file, None, Some("served read-only by request".into())).unwrap()
}

pub fn read_all(img: &VhdImage) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(&mut buf, 0).unwrap();
    buf
}

pub fn detail(img: &VhdImage, key: &str) -> String {
    img.info()
        .details
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no detail {key}"))
}

pub fn write_at(path: &Path, bytes: &[u8], at: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, at).unwrap();
}

/// The BAT entry of block `index` of a qemu-img dynamic VHD (BAT at 1536).
pub fn bat_entry(path: &Path, index: u64) -> u32 {
    let bytes = std::fs::read(path).unwrap();
    let at = 1536 + 4 * index as usize;
    u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap())
}

/// qemu-io writes spread over a disk of `size` bytes: the first sector, a piece across a
/// 2 MiB block boundary, the last sector.
fn fill(path: &Path, size: u64) {
    let middle = format!("write -P 0x12 {} 100000", (size / 2) & !511);
    let last = format!("write -P 0x34 {} 512", size - 512);
    qemu_io(path, &["write -P 0xab 0 4k", &middle, &last]);
}

#[test]
fn qemu_images_read_like_qemu_img_convert_and_have_its_size() {
    let dir = TempDir::new();
    let cases = [
        ("dynamic.vhd", "subformat=dynamic", 10 * MIB),
        ("dynamic-odd.vhd", "subformat=dynamic", 7 * MIB + 12345),
        (
            "dynamic-force.vhd",
            "subformat=dynamic,force_size=on",
            9 * MIB + 512,
        ),
        ("fixed.vhd", "subformat=fixed", 10 * MIB),
        (
            "fixed-force.vhd",
            "subformat=fixed,force_size=on",
            6 * MIB + 4096,
        ),
    ];
    for (name, options, size) in cases {
        let Some(path) = create(&dir, name, options, size) else {
            return;
        };
        let expected_size = qemu_size(&path).unwrap().unwrap();
        fill(&path, expected_size);
        let img = open_ro(&path);
        assert_eq!(img.size(), expected_size, "{name}");
        let theirs = qemu_bytes(&path);
        assert!(
            read_all(&img) == theirs,
            "{name}: differs from qemu-img convert"
        );
        let info = img.info();
        let fixed = options.contains("fixed");
        assert_eq!(info.format, "vpc");
        assert_eq!(info.subformat, if fixed { "fixed" } else { "dynamic" });
        assert_eq!(info.cluster_size, (!fixed).then_some(2 * MIB), "{name}");
        let app = if options.contains("force_size") {
            "qem2"
        } else {
            "qemu"
        };
        assert_eq!(detail(&img, "creator_app"), app);
        let from = detail(&img, "size_from");
        let rule = if app == "qemu" {
            "CHS geometry"
        } else {
            "current_size (creator \"qem2\")"
        };
        assert!(from.starts_with(rule), "{name}: {from}");
        // qemu-img leaves the unwritten parts of a fixed image and of its blocks as holes in
        // the file: they report as zeros stored in this image, not as data.
        let extents = img.block_status(0, u64::MAX).unwrap();
        let sum = |keep: &dyn Fn(ExtentState) -> bool| -> u64 {
            extents
                .iter()
                .filter(|e| keep(e.state))
                .map(|e| e.len)
                .sum()
        };
        let data = sum(&|s| s == ExtentState::Data);
        let stored = sum(&|s| s != ExtentState::Unallocated);
        assert!(data > 0 && data < stored, "{name}: {extents:?}");
        if fixed {
            assert_eq!(stored, expected_size, "{name}");
        } else {
            // The three pieces touch three of the 2 MiB blocks (the last two may be one).
            assert!(
                (2 * 2 * MIB..=3 * 2 * MIB).contains(&stored),
                "{name}: {extents:?}"
            );
        }
    }
}

#[test]
fn the_virtual_size_follows_qemu_for_every_creator_and_geometry() {
    let dir = TempDir::new();
    let Some(fixed) = create(&dir, "f.vhd", "subformat=fixed,force_size=on", 12 * MIB) else {
        return;
    };
    let dynamic = create(&dir, "d.vhd", "force_size=on", 12 * MIB).unwrap();
    let chs = (301u16, 4u8, 17u8); // 10479616 bytes, below both sizes tried
    let max = (65535u16, 16u8, 255u8);
    for path in [&fixed, &dynamic] {
        let bytes = std::fs::read(path).unwrap();
        let end = bytes.len() - 512;
        let original = bytes[end..].to_vec();
        for app in [
            b"vpc ", b"qemu", b"qem2", b"win ", b"d2v ", b"tap\0", b"vbox",
        ] {
            // 10 MiB and 12 MiB - 512: a 1 MiB-aligned size (Azure's fixed disks) and not.
            for (current, geometry) in [(10 * MIB, chs), (12 * MIB - 512, chs), (10 * MIB, max)] {
                let footer = with_sizing(&original, app, current, geometry);
                write_at(path, &footer, end as u64);
                if !path.ends_with("f.vhd") {
                    write_at(path, &footer, 0);
                }
                let theirs = qemu_size(path).unwrap().unwrap();
                let img = open_ro(path);
                let what = format!("{} {app:?} {current} {geometry:?}", path.display());
                assert_eq!(img.size(), theirs, "{what}");
                assert!(read_all(&img) == qemu_bytes(path), "{what}");
            }
        }
    }
}

#[test]
fn fixed_disks_are_found_by_their_last_sector_and_written_in_place() {
    let dir = TempDir::new();
    let Some(path) = create(&dir, "disk.img", "subformat=fixed", 4 * MIB) else {
        return;
    };
    let len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(
        crate::format::probe_file(&path).unwrap(),
        Some(crate::format::Format::Vhd),
        "no magic at offset 0: the footer at the end"
    );
    let short = dir.path().join("short");
    std::fs::write(&short, b"conectix").unwrap();
    assert_eq!(
        crate::format::probe_file(&short).unwrap(),
        Some(crate::format::Format::Vhd)
    );
    std::fs::write(&short, b"conecti").unwrap();
    assert_eq!(crate::format::probe_file(&short).unwrap(), None);
    let mut links = crate::format::links::PlainLinks::new(dir.path(), false).unwrap();
    let options = crate::format::OpenOptions::default();
    let img = crate::format::open(&path, &options, &mut links).unwrap();
    assert_eq!(img.read_only_reason(), None);
    let size = img.size();
    img.write_at(&[0x5a; 8192], 4096 + 100).unwrap();
    img.write_at(&[0xa5; 512], size - 512).unwrap();
    assert!(!img.is_dirty(), "no metadata in a fixed disk");
    img.flush().unwrap();
    drop(img);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
    let mut expected = vec![0u8; size as usize];
    expected[4196..4196 + 8192].fill(0x5a);
    expected[size as usize - 512..].fill(0xa5);
    assert!(qemu_bytes(&path) == expected);
}

#[test]
fn writes_allocate_blocks_that_qemu_reads_back() {
    let dir = TempDir::new();
    let Some(path) = create(&dir, "w.vhd", "", 20 * MIB) else {
        return;
    };
    qemu_io(&path, &["write -P 0x11 3M 64k"]);
    let img = open_rw(&path);
    let size = img.size();
    let mut model = read_all(&img);
    let mut write = |offset: u64, len: usize, byte: u8| {
        img.write_at(&vec![byte; len], offset).unwrap();
        model[offset as usize..offset as usize + len].fill(byte);
    };
    write(100, 700, 0x21); // a new block, unaligned
    write(3 * MIB + 4096, 8192, 0x22); // in QEMU's block, in place
    write(6 * MIB - 1000, 3 * MIB as usize, 0x23); // three new blocks in one request
    write(size - 1, 1, 0x24); // the last byte
    assert!(
        !img.is_dirty(),
        "entries are written as their blocks are made"
    );
    assert!(read_all(&img) == model, "before flush");
    assert_eq!(mapped_bytes(&img), 6 * 2 * MIB);
    assert!(img.allocated_bytes() <= 6 * 2 * MIB);
    img.flush().unwrap();
    assert!(!img.is_dirty());
    drop(img);

    let bytes = std::fs::read(&path).unwrap();
    let footer = &bytes[bytes.len() - 512..];
    assert_eq!(&footer[..8], b"conectix", "the footer moved to the end");
    assert_eq!(footer, &bytes[..512], "and equals its copy");
    // Our first block follows QEMU's densely, its bitmap all ones.
    let entry = u64::from(bat_entry(&path, 0)) * 512;
    assert_eq!(entry, u64::from(bat_entry(&path, 1)) * 512 + 512 + 2 * MIB);
    assert!(bytes[entry as usize..entry as usize + 512]
        .iter()
        .all(|&b| b == 0xff));
    assert!(qemu_bytes(&path) == model, "QEMU reads what we wrote");
    assert!(read_all(&open_rw(&path)) == model, "after reopen");
    // QEMU appends after our blocks, and we read what it wrote.
    qemu_io(&path, &["write -P 0x31 14M 4k"]);
    model[14 * MIB as usize..14 * MIB as usize + 4096].fill(0x31);
    assert!(read_all(&open_rw(&path)) == model);
    assert!(qemu_bytes(&path) == model);
}

#[test]
fn threaded_unaligned_writes_compare_equal_in_qemu() {
    const THREADS: u64 = 4;
    let dir = TempDir::new();
    let Some(path) = create(&dir, "t.vhd", "force_size=on", 32 * MIB) else {
        return;
    };
    let img = Arc::new(open_rw(&path));
    let mut expected = vec![0u8; 32 * MIB as usize];
    let mut plans = Vec::new();
    for t in 0..THREADS {
        let mut rng = Rng(0x7a5 + t);
        let mut writes = Vec::new();
        for _ in 0..40 {
            let len = 1 + rng.below(200_000);
            let region = 28 * MIB / THREADS;
            let offset = t * region + rng.below(region - len);
            writes.push((offset, rng.bytes(len as usize)));
        }
        // All threads into one new block at once.
        writes.push((30 * MIB + t * 1000 + 7, vec![0xe0 + t as u8; 999]));
        for (offset, data) in &writes {
            expected[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
        }
        plans.push(writes);
    }
    let barrier = Arc::new(Barrier::new(THREADS as usize));
    std::thread::scope(|scope| {
        for writes in &plans {
            let (img, barrier) = (Arc::clone(&img), Arc::clone(&barrier));
            scope.spawn(move || {
                barrier.wait();
                for (offset, data) in writes {
                    img.write_at(data, *offset).unwrap();
                }
            });
        }
    });
    assert!(read_all(&img) == expected, "read back");
    img.flush().unwrap();
    drop(img);
    assert_qemu_compare_equal("vpc", &path, &expected);
    assert!(read_all(&open_rw(&path)) == expected, "after reopen");
}

#[test]
fn a_damaged_last_footer_falls_back_to_the_copy_and_is_repaired_after_a_write() {
    let dir = TempDir::new();
    let Some(path) = create(&dir, "f.vhd", "", 8 * MIB) else {
        return;
    };
    qemu_io(&path, &["write -P 0x42 1M 1M"]);
    let len = std::fs::metadata(&path).unwrap().len();
    write_at(&path, b"garbage!", len - 512);
    let img = open_rw(&path);
    assert!(detail(&img, "footer").contains("the copy at offset 0 is used"));
    let before = read_all(&img);
    img.flush().unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        len,
        "no write, no repair"
    );
    img.write_at(&[7; 512], 1024 * 1024).unwrap();
    assert!(img.is_dirty(), "the repair is pending");
    img.flush().unwrap();
    assert!(!img.is_dirty());
    drop(img);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(
        &bytes[bytes.len() - 512..],
        &bytes[..512],
        "repaired at the end"
    );
    let img = open_rw(&path);
    assert!(detail(&img, "footer").contains("at the end of the file"));
    let mut expected = before;
    expected[MIB as usize..MIB as usize + 512].fill(7);
    assert!(read_all(&img) == expected);

    // A damaged copy: the last footer is used, the copy rewritten after a write.
    write_at(&path, &[0x55], 100);
    let img = open_rw(&path);
    assert!(detail(&img, "footer").contains("copy at offset 0 is damaged"));
    img.write_at(&[8; 512], 0).unwrap();
    img.flush().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[bytes.len() - 512..], &bytes[..512], "copy repaired");
    assert_eq!(qemu_size(&path).unwrap().unwrap(), img.size());
}

#[test]
fn clear_bitmap_bits_read_as_zeros_and_writes_fill_whole_sectors() {
    let dir = TempDir::new();
    let Some(path) = create(&dir, "b.vhd", "force_size=on", 4 * MIB) else {
        return;
    };
    qemu_io(&path, &["write -P 0x66 0 2M"]);
    let bitmap = u64::from(bat_entry(&path, 0)) * 512;
    // Sectors 8..16 (bits of byte 1) and sector 17 (bit 0x40 of byte 2) leave the file.
    write_at(&path, &[0x00, 0xbf], bitmap + 1);
    let img = open_rw(&path);
    let mut expected = vec![0x66u8; 2 * MIB as usize];
    expected.extend(vec![0u8; 2 * MIB as usize]);
    expected[8 * 512..16 * 512].fill(0);
    expected[17 * 512..18 * 512].fill(0);
    assert!(read_all(&img) == expected);
    let status = img.block_status(0, 2 * MIB).unwrap();
    assert_eq!(status[1].offset, 8 * 512);
    assert_eq!(status[1].state, ExtentState::Unallocated);
    // A write of 100 bytes into sector 9 makes the sector present, the rest of it zeros.
    img.write_at(&[0x77; 100], 9 * 512 + 10).unwrap();
    expected[9 * 512 + 10..9 * 512 + 110].fill(0x77);
    assert!(img.is_dirty());
    img.flush().unwrap();
    drop(img);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(
        &bytes[bitmap as usize + 1..bitmap as usize + 3],
        &[0x40, 0xbf]
    );
    assert!(read_all(&open_rw(&path)) == expected);
}

#[test]
fn read_only_images_refuse_writes_and_never_touch_the_file() {
    let dir = TempDir::new();
    let Some(path) = create(&dir, "r.vhd", "", 4 * MIB) else {
        return;
    };
    let before = std::fs::read(&path).unwrap();
    let img = open_ro(&path);
    let e = img.write_at(&[1], 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
    img.flush().unwrap();
    let alone = VhdImage::open(HostFile::open(&path, false).unwrap(), None, None).unwrap();
    assert!(alone.read_only_reason().unwrap().contains("read-only"));
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn info_shows_creator_geometry_and_layout() {
    let dir = TempDir::new();
    let Some(path) = create(&dir, "i.vhd", "", 10 * MIB) else {
        return;
    };
    let img = open_ro(&path);
    assert_eq!(detail(&img, "creator_app"), "qemu");
    assert_eq!(detail(&img, "creator_os"), "Wi2k");
    assert!(
        detail(&img, "chs_geometry").starts_with("302/4/17"),
        "{}",
        detail(&img, "chs_geometry")
    );
    assert!(detail(&img, "size_from").starts_with("CHS geometry"));
    assert_eq!(detail(&img, "bat"), "6 entries at 0x600");
    assert_eq!(detail(&img, "blocks_allocated"), "0");
    assert_eq!(detail(&img, "uuid").len(), 36);
}

fn discard_case(options: &str) {
    use crate::testutil::discard::{exercise_discard, DiscardCase};
    let dir = TempDir::new();
    let Some(path) = create(&dir, "d.vhd", options, 16 * MIB) else {
        return;
    };
    let case = DiscardCase {
        format: "vpc",
        path: &path,
        unit: 2 * MIB,
        check: false,
        data_file: None,
    };
    exercise_discard(&case, &|p| Ok(std::sync::Arc::new(try_open(p)?)));
}

#[test]
fn discard_punches_dynamic_blocks() {
    discard_case("");
}

#[test]
fn discard_punches_a_fixed_disk() {
    discard_case("subformat=fixed");
}
