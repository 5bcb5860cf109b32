//! Tests of the VHDX driver through the `Image` trait, with qemu-img and qemu-io as the oracle:
//! images of every sub-format, block size and sector size read like `qemu-img convert`, our
//! writes pass `qemu-img check` and `qemu-img compare`, and headers change as the spec says.

mod differencing;
mod differencing_write;
mod faults;
mod hostile;
mod log_replay;
mod resize;

use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use super::header::{Header, HEADER_LEN, HEADER_SLOTS, MIB};
use super::*;
use crate::error::ErrorKind;
use crate::testutil::TempDir;

/// Runs a qemu tool; `None` (the caller skips) when it is missing, except in CI.
pub fn qemu<S: AsRef<OsStr>>(tool: &str, args: &[S]) -> Option<Output> {
    match Command::new(tool).args(args).output() {
        Ok(out) => Some(out),
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipping: {tool} not runnable: {e}");
            None
        }
        Err(e) => panic!("{tool} is required in CI: {e}"),
    }
}

/// Runs qemu-img and requires success; `None` when qemu-img is missing.
pub fn qemu_img(args: &[&str]) -> Option<Output> {
    let out = qemu("qemu-img", args)?;
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(out)
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img create -f vhdx` with `options`; `None` when qemu-img is missing.
pub fn create(dir: &TempDir, name: &str, options: &str, size: u64) -> Option<PathBuf> {
    let path = dir.path().join(name);
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "vhdx"];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.extend([path_str(&path), size.as_str()]);
    qemu_img(&args)?;
    Some(path)
}

/// Runs qemu-io commands on a VHDX image (read-write, so QEMU replays a dirty log first).
pub fn qemu_io(path: &Path, commands: &[String]) -> String {
    let mut args: Vec<&str> = vec!["-f", "vhdx"];
    for c in commands {
        args.extend(["-c", c.as_str()]);
    }
    args.push(path_str(path));
    let out = qemu("qemu-io", &args).expect("qemu-io exists when qemu-img does");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && !stdout.contains("failed") && !stdout.contains("error"),
        "qemu-io {commands:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The image's contents according to `qemu-img convert -O raw`, as a file in `dir`.
pub fn qemu_raw(dir: &TempDir, path: &Path) -> PathBuf {
    let out = dir.path().join("oracle.raw");
    let _ = std::fs::remove_file(&out);
    qemu_img(&[
        "convert",
        "-U",
        "-f",
        "vhdx",
        "-O",
        "raw",
        path_str(path),
        path_str(&out),
    ]);
    out
}

pub fn try_open(path: &Path) -> Result<VhdxImage> {
    VhdxImage::open(HostFile::open(path, true)?, None, None)
}

pub fn open_rw(path: &Path) -> VhdxImage {
    try_open(path).unwrap()
}

pub fn open_ro(path: &Path) -> VhdxImage {
    let file = HostFile::open(path, false).unwrap();
    VhdxImage::open(file, None, Some("served read-only by request".into())).unwrap()
}

pub fn read_all(img: &VhdxImage) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(&mut buf, 0).unwrap();
    buf
}

pub fn detail(img: &VhdxImage, key: &str) -> String {
    img.info()
        .details
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no detail {key}"))
}

/// Compares the whole disk with the raw file `oracle`, in 8 MiB pieces to bound memory.
pub fn assert_reads_like(img: &VhdxImage, oracle: &Path, what: &str) {
    let raw = std::fs::File::open(oracle).unwrap();
    assert_eq!(raw.metadata().unwrap().len(), img.size(), "{what}: size");
    let piece = 8 * MIB;
    let mut ours = vec![0u8; piece as usize];
    let mut theirs = vec![0u8; piece as usize];
    let mut at = 0;
    while at < img.size() {
        let len = piece.min(img.size() - at) as usize;
        img.read_at(&mut ours[..len], at).unwrap();
        raw.read_exact_at(&mut theirs[..len], at).unwrap();
        if ours[..len] != theirs[..len] {
            let first = (0..len).find(|&i| ours[i] != theirs[i]).unwrap();
            panic!("{what}: first difference at {:#x}", at + first as u64);
        }
        at += len as u64;
    }
}

/// The header in slot `slot` of the file at `path`, if valid.
pub fn header_in(path: &Path, slot: usize) -> Option<Header> {
    let bytes = std::fs::read(path).unwrap();
    let at = HEADER_SLOTS[slot] as usize;
    Header::parse(&bytes[at..at + HEADER_LEN]).ok()
}

/// Writes `header` (checksum recomputed) into `slot`.
pub fn put_header(path: &Path, slot: usize, header: &Header) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(&header.to_bytes().unwrap(), HEADER_SLOTS[slot])
        .unwrap();
}

/// The current header and its slot.
pub fn current(path: &Path) -> (Header, usize) {
    match (header_in(path, 0), header_in(path, 1)) {
        (Some(a), Some(b)) if b.sequence > a.sequence => (b, 1),
        (Some(a), _) => (a, 0),
        (None, Some(b)) => (b, 1),
        (None, None) => panic!("no valid header"),
    }
}

/// qemu-io commands writing recognisable patterns around the interesting places of a disk
/// of `size` bytes with `block` byte blocks: the start, a block boundary, the middle
/// (unaligned) and the very end.
fn fill_commands(size: u64, block: u64) -> Vec<String> {
    let mut cmds = vec![format!("write -P 0x11 0 65536")];
    if size > block + 4096 {
        cmds.push(format!("write -P 0x22 {} 8192", block - 4096));
    }
    cmds.push(format!(
        "write -P 0x33 {} 100000",
        (size / 2 / 512) * 512 + 1000
    ));
    cmds.push(format!("write -P 0x44 {} 4096", size - 4096));
    cmds
}

#[test]
fn qemu_images_of_every_subformat_and_block_size_read_like_qemu_img_convert() {
    let cases: [(&str, u64, u64); 8] = [
        ("subformat=dynamic,block_size=1M", MIB, 5 * MIB + 512),
        ("subformat=dynamic,block_size=8M", 8 * MIB, 20 * MIB + 4096),
        ("subformat=dynamic,block_size=32M", 32 * MIB, 70 * MIB + MIB),
        (
            "subformat=dynamic,block_size=256M,log_size=2M",
            256 * MIB,
            256 * MIB + 3 * MIB + 512,
        ),
        ("subformat=fixed,block_size=1M", MIB, 5 * MIB + 512),
        (
            "subformat=fixed,block_size=8M,block_state_zero=off",
            8 * MIB,
            20 * MIB + 4096,
        ),
        (
            "subformat=fixed,block_size=32M,block_state_zero=off",
            32 * MIB,
            40 * MIB,
        ),
        (
            "subformat=dynamic,block_size=1M,block_state_zero=off",
            MIB,
            3 * MIB,
        ),
    ];
    for (options, block, size) in cases {
        let dir = TempDir::new();
        let Some(path) = create(&dir, "d.vhdx", options, size) else {
            return;
        };
        qemu_io(&path, &fill_commands(size, block));
        let oracle = qemu_raw(&dir, &path);
        let img = open_ro(&path);
        assert_eq!(img.size(), size, "{options}");
        let info = img.info();
        assert_eq!(info.format, "vhdx");
        assert_eq!(info.cluster_size, Some(block), "{options}");
        let subformat = if options.contains("fixed") {
            "fixed"
        } else {
            "dynamic"
        };
        assert_eq!(info.subformat, subformat, "{options}");
        assert_eq!(detail(&img, "logical_sector_size"), "512");
        assert_reads_like(&img, &oracle, options);
        // Block status agrees with the reads: everything written is data.
        let extents = img.block_status(0, size).unwrap();
        assert_eq!(
            extents.first().unwrap().state,
            ExtentState::Data,
            "{options}"
        );
        assert_eq!(extents.iter().map(|e| e.len).sum::<u64>(), size);
    }
}

/// Rewrites the logical sector size item of a qemu-img image (whose BAT is still empty, so
/// its layout does not depend on the chunk ratio yet).
pub fn set_logical_sector_size(path: &Path, value: u32) {
    let bytes = std::fs::read(path).unwrap();
    let (regions, _) = (
        super::header::parse_region_table(&bytes[192 * 1024..256 * 1024]).unwrap(),
        (),
    );
    let meta = regions
        .iter()
        .find(|r| r.guid == super::header::METADATA_REGION)
        .unwrap()
        .offset as usize;
    let entries = metadata::parse_table(&bytes[meta..meta + metadata::TABLE_LEN], MIB).unwrap();
    let item = entries
        .iter()
        .find(|e| e.item == metadata::LOGICAL_SECTOR_SIZE)
        .unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(&value.to_le_bytes(), (meta + item.offset as usize) as u64)
        .unwrap();
}

/// The raw BAT entry `index` of the image at `path`.
fn bat_entry(path: &Path, index: u64) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let regions = super::header::parse_region_table(&bytes[192 * 1024..256 * 1024]).unwrap();
    let bat = regions
        .iter()
        .find(|r| r.guid == super::header::BAT_REGION)
        .unwrap()
        .offset;
    let at = (bat + 8 * index) as usize;
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

#[test]
fn images_with_4k_logical_sectors_use_their_chunk_ratio() {
    // QEMU refuses 4 KiB logical sectors, so the oracle is the BAT layout the spec gives: with
    // 1 MiB blocks a chunk holds 2^23 * 4096 / 2^20 = 32768 blocks (4096 with 512-byte sectors),
    // so payload block 32768 has BAT index 32769, after the first sector bitmap entry.
    for (sector, index) in [(4096u32, 32769u64), (512, 32768 + 8)] {
        let dir = TempDir::new();
        let size = 32 * 1024 * MIB + 3 * MIB;
        let Some(path) = create(&dir, "s.vhdx", "block_size=1M,block_state_zero=off", size) else {
            return;
        };
        set_logical_sector_size(&path, sector);
        let img = open_rw(&path);
        assert_eq!(detail(&img, "logical_sector_size"), sector.to_string());
        img.write_at(&[0x5c; 5000], 32 * 1024 * MIB + 77).unwrap();
        img.write_at(&[0x6d; 4096], size - 4096).unwrap();
        img.flush().unwrap();
        drop(img);
        let entry = bat_entry(&path, index);
        assert_eq!(
            entry & 7,
            6,
            "sector {sector}: block 32768 fully present at index {index}"
        );
        let bitmap_index = if sector == 4096 { 32768 } else { 32768 + 7 };
        assert_eq!(
            bat_entry(&path, bitmap_index),
            0,
            "the sector bitmap entry stays empty"
        );
        let img = open_rw(&path);
        let mut buf = vec![0u8; 5100];
        img.read_at(&mut buf, 32 * 1024 * MIB).unwrap();
        assert!(buf[..77].iter().all(|&b| b == 0) && buf[77..5077].iter().all(|&b| b == 0x5c));
        img.read_at(&mut buf[..4096], size - 4096).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0x6d));
        assert_eq!(img.allocated_bytes(), 2 * MIB);
        if sector == 512 {
            drop(img);
            assert_qemu_check_clean(&path);
            let cmd = format!("read -P 0x5c {} 5000", 32 * 1024 * MIB + 77);
            qemu_io(&path, &[cmd]);
        }
    }
}

#[test]
fn writes_allocate_blocks_that_qemu_reads_back() {
    let dir = TempDir::new();
    let size = 10 * MIB + 512;
    let Some(path) = create(&dir, "w.vhdx", "block_size=1M", size) else {
        return;
    };
    qemu_io(&path, &["write -P 0x5a 7M 64k".to_string()]);
    let img = open_rw(&path);
    assert_eq!(img.read_only_reason(), None);
    assert_eq!(img.allocated_bytes(), MIB);
    let mut expected = read_all(&img);
    let mut write = |img: &VhdxImage, offset: u64, data: Vec<u8>| {
        img.write_at(&data, offset).unwrap();
        expected[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    };
    write(&img, 0, vec![0xab; 4096]); // new block
    write(&img, 5 * MIB - 4096, vec![0xcd; 8192]); // two new blocks
    write(&img, 7 * MIB + 512, vec![0xef; 512]); // in place
    write(&img, size - 700, vec![0x99; 700]); // blocks 9 and the short last one
    write(
        &img,
        2 * MIB + 1,
        (0..3 * MIB as usize).map(|i| i as u8).collect(),
    ); // whole blocks
    assert!(img.is_dirty());
    assert_eq!(read_all(&img), expected, "before flush");
    img.flush().unwrap();
    assert!(!img.is_dirty());
    let len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(len % MIB, 0, "blocks are 1 MiB aligned");
    drop(img);

    assert_qemu_check_clean(&path);
    assert_qemu_compare_equal(&dir, &path, &expected);
    let img = open_rw(&path);
    assert_eq!(read_all(&img), expected, "after reopen");
    assert_eq!(img.allocated_bytes(), 8 * MIB, "blocks 0, 2-5, 7, 9, 10");
    let (h, _) = current(&path);
    assert!(h.log_guid.is_nil(), "the log is clean after a flush");
}

/// A sequential stream into a fresh image writes each byte once: a new block at the end of
/// the file is a hole that reads as zeros, not a block of zeros written before the data.
#[test]
fn a_sequential_stream_into_a_fresh_image_writes_its_bytes_once() {
    let dir = TempDir::new();
    let size = 64 * MIB;
    let Some(path) = create(&dir, "s.vhdx", "block_size=8M", size) else {
        return;
    };
    let watch = crate::host::fault::watch(&path);
    let img = open_rw(&path);
    img.write_at(&[1], 63 * MIB).unwrap(); // the GUID renewal, and one block at the end
    watch.start();
    let data: Vec<u8> = (0..20 * MIB as usize)
        .map(|i| (i % 251) as u8 + 1)
        .collect();
    for (i, piece) in data.chunks(MIB as usize).enumerate() {
        img.write_at(piece, 3 * MIB + i as u64 * MIB).unwrap();
    }
    let written: usize = watch
        .stop()
        .ops()
        .iter()
        .map(|op| match op {
            crate::host::fault::Op::Write { data, .. } => data.len(),
            crate::host::fault::Op::Sync => 0,
        })
        .sum();
    assert!(
        (written as u64) < 20 * MIB + 64 * 1024,
        "{written} bytes written for 20 MiB of data"
    );
    img.flush().unwrap();
    let mut expected = vec![0u8; size as usize];
    expected[63 * MIB as usize] = 1;
    expected[3 * MIB as usize..23 * MIB as usize].copy_from_slice(&data);
    assert_eq!(read_all(&img), expected, "before the reopen");
    drop(img);
    assert_qemu_check_clean(&path);
    assert_qemu_compare_equal(&dir, &path, &expected);
}

#[test]
fn first_write_renews_the_guids_in_both_headers() {
    let dir = TempDir::new();
    let Some(path) = create(
        &dir,
        "g.vhdx",
        "subformat=fixed,block_size=1M,block_state_zero=off",
        4 * MIB,
    ) else {
        return;
    };
    let (before, _) = current(&path);
    let bytes_before = std::fs::read(&path).unwrap();
    let img = open_rw(&path);
    assert_eq!(img.data_write_guid(), before.data_write_guid);
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 0).unwrap();
    img.flush().unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes_before,
        "reads and flushes write nothing"
    );

    img.write_at(&[1; 4096], MIB).unwrap();
    assert!(!img.is_dirty(), "a fixed image writes in place");
    let renewed = img.data_write_guid();
    assert_ne!(renewed, before.data_write_guid);
    img.write_at(&[2; 4096], 2 * MIB).unwrap();
    assert_eq!(img.data_write_guid(), renewed, "once per session");
    let (a, b) = (header_in(&path, 0).unwrap(), header_in(&path, 1).unwrap());
    assert_eq!(a.data_write_guid, renewed);
    assert_eq!(b.data_write_guid, renewed);
    assert_ne!(a.file_write_guid, before.file_write_guid);
    assert_eq!(a.sequence.max(b.sequence), before.sequence + 2);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        bytes_before.len() as u64,
        "no growth"
    );
    drop(img);
    assert_qemu_check_clean(&path);
}

#[test]
fn threaded_unaligned_writes_pass_qemu_check_and_compare() {
    for options in [
        "block_size=1M",
        "subformat=fixed,block_size=1M,block_state_zero=off",
        "block_size=8M",
    ] {
        let dir = TempDir::new();
        let size = 24 * MIB + 512;
        let Some(path) = create(&dir, "t.vhdx", options, size) else {
            return;
        };
        qemu_io(&path, &["write -P 0x42 3M 2M".to_string()]);
        let img = Arc::new(open_rw(&path));
        let mut expected = read_all(&img);
        // Thread t owns the quarter t of every MiB: its writes never overlap another thread's,
        // but all four allocate the same blocks at once.
        let stripe = MIB / 4;
        let plans: Vec<Vec<(u64, Vec<u8>)>> = (0..4u64)
            .map(|t| {
                let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (t + 1);
                let mut next = move || {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state
                };
                (0..40)
                    .map(|_| {
                        let mib = next() % (size / MIB);
                        let len = 1 + next() % (stripe - 1);
                        let offset = mib * MIB + t * stripe + next() % (stripe - len);
                        let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                        (offset, data)
                    })
                    .collect()
            })
            .collect();
        std::thread::scope(|scope| {
            for writes in &plans {
                let img = Arc::clone(&img);
                scope.spawn(move || {
                    for (offset, data) in writes {
                        img.write_at(data, *offset).unwrap();
                    }
                });
            }
        });
        for writes in &plans {
            for (offset, data) in writes {
                expected[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            }
        }
        img.flush().unwrap();
        assert_eq!(read_all(&img), expected, "{options}: read back");
        drop(img);
        assert_qemu_check_clean(&path);
        assert_qemu_compare_equal(&dir, &path, &expected);
        assert_eq!(
            read_all(&open_rw(&path)),
            expected,
            "{options}: after reopen"
        );
    }
}

#[test]
fn concurrent_writers_into_one_new_block_allocate_it_once() {
    let dir = TempDir::new();
    let Some(path) = create(&dir, "c.vhdx", "block_size=1M", 8 * MIB) else {
        return;
    };
    let img = Arc::new(open_rw(&path));
    for round in 0..8u64 {
        let barrier = Arc::new(std::sync::Barrier::new(8));
        std::thread::scope(|scope| {
            for t in 0..8u64 {
                let (img, barrier) = (Arc::clone(&img), Arc::clone(&barrier));
                scope.spawn(move || {
                    barrier.wait();
                    img.write_at(&[t as u8 + 1; 4096], round * MIB + t * 4096)
                        .unwrap();
                });
            }
        });
        assert_eq!(img.allocated_bytes(), (round + 1) * MIB);
    }
    img.flush().unwrap();
    drop(img);
    let img = open_rw(&path);
    for round in 0..8u64 {
        let mut buf = vec![0u8; MIB as usize];
        img.read_at(&mut buf, round * MIB).unwrap();
        for t in 0..8usize {
            assert!(buf[t * 4096..(t + 1) * 4096]
                .iter()
                .all(|&b| b == t as u8 + 1));
        }
        assert!(buf[8 * 4096..].iter().all(|&b| b == 0));
    }
    assert_qemu_check_clean(&path);
}

#[test]
fn read_only_images_refuse_writes_and_never_touch_the_file() {
    let dir = TempDir::new();
    let Some(path) = create(&dir, "r.vhdx", "block_size=1M", 4 * MIB) else {
        return;
    };
    let before = std::fs::read(&path).unwrap();
    let img = open_ro(&path);
    let e = img.write_at(&[1; 512], 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
    assert!(e.to_string().contains("served read-only by request"), "{e}");
    img.flush().unwrap();
    assert_eq!(
        img.info().read_only_reason.as_deref(),
        Some("served read-only by request")
    );
    let img = VhdxImage::open(HostFile::open(&path, false).unwrap(), None, None).unwrap();
    assert!(img.read_only_reason().unwrap().contains("opened read-only"));
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

pub fn assert_qemu_check_clean(path: &Path) {
    crate::testutil::assert_qemu_check_clean("vhdx", path);
}

pub fn assert_qemu_compare_equal(_dir: &TempDir, path: &Path, expected: &[u8]) {
    crate::testutil::assert_qemu_compare_equal("vhdx", path, expected);
}

/// A fuzz seed (see `scripts/fuzz-seeds.sh`): a dynamic image with 4 KiB logical sectors, a
/// layout QEMU does not create.
#[test]
#[ignore = "writes a fuzz seed; run by scripts/fuzz-seeds.sh"]
fn fuzz_seed_4k_logical_sectors() {
    let dir = TempDir::new();
    let Some(path) = create(&dir, "s.vhdx", "block_size=1M", 2 * MIB) else {
        return;
    };
    set_logical_sector_size(&path, 4096);
    let img = open_rw(&path);
    img.write_at(&[0x42; 8192], 4096).unwrap();
    img.flush().unwrap();
    drop(img);
    let image = std::fs::read(&path).unwrap();
    crate::fuzzing::tests::write_seed("vhdx", "logical-4k", &[image]);
}

fn discard_case(options: &str) {
    use crate::testutil::discard::{exercise_discard, DiscardCase};
    let dir = TempDir::new();
    let Some(path) = create(&dir, "d.vhdx", options, 16 * MIB) else {
        return;
    };
    let case = DiscardCase {
        format: "vhdx",
        path: &path,
        unit: MIB,
        check: true,
        data_file: None,
    };
    exercise_discard(&case, &|p| Ok(Arc::new(try_open(p)?)));
}

#[test]
fn discard_makes_blocks_zero() {
    discard_case("block_size=1M");
}

#[test]
fn discard_punches_a_fixed_image_in_place() {
    discard_case("subformat=fixed,block_size=1M");
}
