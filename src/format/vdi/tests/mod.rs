//! Tests of the VDI driver through the `Image` trait: qemu-img images, corrupt files, reads,
//! allocation and write-back, concurrent writers, read-only images, and qemu-img / qemu-io as
//! the oracle for what we wrote.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};

use super::header::testing::{header, image_bytes, patch_u32};
use super::header::{ImageType, DISCARDED as D, UNALLOCATED as U};
use super::*;
use crate::error::ErrorKind;
mod crash;
mod differencing;
mod faults;

use crate::testutil::{
    assert_mutations_never_panic, assert_qemu_check_clean, exercise_image, qemu, Rng, TempDir,
};

const MIB: u64 = 1 << 20;

fn try_open(path: &Path) -> Result<VdiImage> {
    VdiImage::open(HostFile::open(path, true)?, None)
}

fn open_rw(path: &Path) -> VdiImage {
    try_open(path).unwrap()
}

fn write_file(dir: &TempDir, bytes: &[u8]) -> PathBuf {
    let path = dir.path().join("t.vdi");
    std::fs::write(&path, bytes).unwrap();
    path
}

/// An image of `blocks` blocks of `block_size` with bmap `entries` and `data_blocks` physical
/// blocks (physical block i filled with byte i + 1).
fn fixture(dir: &TempDir, block_size: u32, entries: &[u32], data_blocks: u32) -> PathBuf {
    let mut h = header(
        ImageType::Dynamic,
        entries.len() as u64 * u64::from(block_size),
        block_size,
    );
    h.blocks_allocated = entries.iter().filter(|&&e| e < D).count() as u32;
    write_file(dir, &image_bytes(&h, entries, data_blocks))
}

fn qemu_create(dir: &TempDir, options: &[&str], size: &str) -> Option<PathBuf> {
    let path = dir.path().join("q.vdi");
    let mut args: Vec<&OsStr> = ["create", "-q", "-f", "vdi"]
        .iter()
        .chain(options)
        .map(OsStr::new)
        .collect();
    args.extend([path.as_os_str(), OsStr::new(size)]);
    let out = qemu("qemu-img", &args)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(path)
}

/// Asserts with qemu-io that `len` bytes at `offset` all equal `pattern`.
fn assert_qemu_reads(path: &Path, pattern: u8, offset: u64, len: u64) {
    let cmd = format!("read -P {pattern:#x} {offset} {len}");
    let args = [
        "-f".as_ref(),
        "vdi".as_ref(),
        "-c".as_ref(),
        OsStr::new(&cmd),
        path.as_os_str(),
    ];
    let Some(out) = qemu("qemu-io", &args) else {
        return;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("failed"),
        "qemu-io {cmd}: {stdout}"
    );
}

fn read_all(img: &VdiImage) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(&mut buf, 0).unwrap();
    buf
}

fn bmap_entry(path: &Path, offset_bmap: u64, block: u64) -> u32 {
    let bytes = std::fs::read(path).unwrap();
    let at = (offset_bmap + 4 * block) as usize;
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn extent(offset: u64, len: u64, state: ExtentState) -> Extent {
    Extent {
        offset,
        len,
        state,
        layer: 0,
        host: None,
    }
}

/// An extent stored at `host` in the image file.
fn stored(offset: u64, len: u64, state: ExtentState, host: u64) -> Extent {
    Extent {
        host: Some(host),
        ..extent(offset, len, state)
    }
}

/// The fixture's `offset_data` (`header`): where physical block 0 starts.
const FIXTURE_DATA: u64 = 1024;

#[test]
fn qemu_dynamic_image_opens_empty() {
    let dir = TempDir::new();
    let Some(path) = qemu_create(&dir, &[], "10M") else {
        return;
    };
    let img = open_rw(&path);
    assert_eq!(img.size(), 10 * MIB);
    assert_eq!(img.read_only_reason(), None);
    assert!(!img.is_dirty());
    assert_eq!(img.allocated_bytes(), 0);
    assert_eq!(
        img.block_status(0, u64::MAX).unwrap(),
        [extent(0, 10 * MIB, ExtentState::Unallocated)]
    );
    let mut buf = vec![0xffu8; 3 * MIB as usize];
    img.read_at(&mut buf, MIB / 2).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let info = img.info();
    assert_eq!((info.format, info.subformat.as_str()), ("vdi", "dynamic"));
    assert_eq!(info.cluster_size, Some(MIB));
    let detail = |k| {
        info.details
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(detail("blocks_in_image").as_deref(), Some("10"));
    assert_eq!(detail("offset_data").as_deref(), Some("0x400"));
    assert_eq!(detail("uuid").unwrap().len(), 36);
    assert_eq!(
        img.read_at(&mut [0; 512], 10 * MIB).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
}

#[test]
fn qemu_static_image_is_data_and_written_in_place() {
    let dir = TempDir::new();
    let Some(path) = qemu_create(&dir, &["-o", "static=on"], "4M") else {
        return;
    };
    let len_before = std::fs::metadata(&path).unwrap().len();
    // The blocks fill the file after the header and bmap.
    let data_at = len_before - 4 * MIB;
    let img = open_rw(&path);
    assert_eq!(img.info().subformat, "static");
    // qemu-img leaves the blocks of a static image as a hole in the file: stored, but zeros.
    assert_eq!(
        img.block_status(0, 4 * MIB).unwrap(),
        [stored(0, 4 * MIB, ExtentState::StoredZeros, data_at)]
    );
    assert!(img.allocated_bytes() < MIB, "{}", img.allocated_bytes());
    img.write_at(&[0xab; 8192], 3 * MIB - 4096).unwrap();
    assert!(!img.is_dirty(), "no allocation, no metadata");
    assert_eq!(
        img.block_status(3 * MIB - 4096, 8192).unwrap(),
        [stored(
            3 * MIB - 4096,
            8192,
            ExtentState::Data,
            data_at + 3 * MIB - 4096
        )]
    );
    assert!(img.allocated_bytes() >= 8192);
    img.flush().unwrap();
    drop(img);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len_before);
    assert_qemu_check_clean("vdi", &path);
    assert_qemu_reads(&path, 0xab, 3 * MIB - 4096, 8192);
    assert_qemu_reads(&path, 0, 0, 3 * MIB - 4096);
}

#[test]
fn odd_disk_size_is_rounded_up_to_a_sector() {
    let dir = TempDir::new();
    // qemu-img rounds the size when creating; VBoxManage convertfromraw does not.
    let h = header(ImageType::Dynamic, 1_000_001, 1 << 20);
    let path = write_file(&dir, &image_bytes(&h, &[U], 0));
    let img = open_rw(&path);
    assert_eq!(img.size(), 1_000_448);
    img.write_at(&[7; 512], 1_000_448 - 512).unwrap();
    assert_eq!(
        img.write_at(&[7; 512], 1_000_448 - 511).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    img.flush().unwrap();
    drop(img);
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(
        u64::from_le_bytes(on_disk[368..376].try_into().unwrap()),
        1_000_001,
        "size kept"
    );
    let img = open_rw(&path);
    let mut buf = [0u8; 1024];
    img.read_at(&mut buf, 1_000_448 - 1024).unwrap();
    assert_eq!(&buf[..512], &[0; 512]);
    assert_eq!(&buf[512..], &[7; 512]);
}

#[test]
fn corrupt_files_are_refused_with_the_field_and_path() {
    let dir = TempDir::new();
    let good = image_bytes(
        &header(ImageType::Dynamic, 4 * MIB, MIB as u32),
        &[0, U, U, U],
        1,
    );
    let check = |bytes: &[u8], kind: ErrorKind, needle: &str| {
        let path = write_file(&dir, bytes);
        let e = try_open(&path).err().expect("image must be refused");
        assert_eq!(e.kind(), kind, "{e}");
        let text = e.to_string();
        assert!(text.contains(needle), "{text} should mention {needle}");
        assert!(text.contains("t.vdi"), "{text} should name the file");
    };
    check(
        &good[..300],
        ErrorKind::Corrupt,
        "shorter than the 512-byte VDI header",
    );
    let mut b = good.clone();
    patch_u32(&mut b, 64, 0xdead_beef);
    check(&b, ErrorKind::Corrupt, "signature");
    let mut b = good.clone();
    patch_u32(&mut b, 68, 0x0002_0000);
    check(&b, ErrorKind::Unsupported, "version 2.0");
    let mut b = good.clone();
    patch_u32(&mut b, 344, 1000);
    check(&b, ErrorKind::Corrupt, "offset_data 0x3e8");
    let mut b = good.clone();
    patch_u32(&mut b, 344, 0x1000_0000);
    check(
        &b,
        ErrorKind::Corrupt,
        "offset_data 0x10000000 is beyond the end of the file",
    );
    let mut b = good.clone();
    patch_u32(&mut b, 384, 3);
    check(
        &b,
        ErrorKind::Corrupt,
        "disk_size 4194304 is larger than blocks_in_image 3",
    );
    let mut b = good.clone();
    patch_u32(&mut b, 384, 1000);
    check(&b, ErrorKind::Corrupt, "overlaps offset_data");
    let mut b = good.clone();
    patch_u32(&mut b, 512 + 8, 1);
    check(
        &b,
        ErrorKind::Corrupt,
        "bmap entry 2 points to physical block 1",
    );
    let mut b = good.clone();
    b[440] = 0x42;
    check(&b, ErrorKind::Unsupported, "parent UUID");
}

#[test]
fn duplicate_entries_serve_read_only() {
    let dir = TempDir::new();
    let path = fixture(&dir, 4096, &[1, U, 1, 0], 2);
    let before = std::fs::read(&path).unwrap();
    let img = open_rw(&path);
    let reason = img.read_only_reason().unwrap();
    assert!(reason.contains("duplicate block map entries"), "{reason}");
    assert!(reason.contains("virtual blocks 0 and 2"), "{reason}");
    let e = img.write_at(&[1; 512], 4096).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
    assert!(e.to_string().contains("duplicate"), "{e}");
    let mut buf = [0u8; 4096];
    img.read_at(&mut buf, 2 * 4096).unwrap();
    assert_eq!(buf, [2; 4096], "reads still follow the map");
    img.flush().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn reads_follow_the_map_and_block_status_merges() {
    let dir = TempDir::new();
    // Virtual 2,3 -> physical 1,2 (adjacent on disk), virtual 4 -> physical 0.
    let path = fixture(&dir, 4096, &[U, D, 1, 2, 0, U], 3);
    let img = open_rw(&path);
    let all = read_all(&img);
    let block = |i: usize| &all[i * 4096..(i + 1) * 4096];
    assert!(block(0).iter().chain(block(1)).all(|&b| b == 0));
    assert!(block(2).iter().all(|&b| b == 2));
    assert!(block(3).iter().all(|&b| b == 3));
    assert!(block(4).iter().all(|&b| b == 1));
    let mut span = [0u8; 200];
    img.read_at(&mut span, 4 * 4096 - 100).unwrap();
    assert_eq!(
        (&span[..100], &span[100..]),
        (&[3u8; 100][..], &[1u8; 100][..])
    );
    assert_eq!(
        img.block_status(100, 10 * 4096).unwrap(),
        [
            extent(100, 4096 - 100, ExtentState::Unallocated),
            extent(4096, 4096, ExtentState::Zero),
            stored(2 * 4096, 2 * 4096, ExtentState::Data, FIXTURE_DATA + 4096),
            stored(4 * 4096, 4096, ExtentState::Data, FIXTURE_DATA),
            extent(5 * 4096, 4096, ExtentState::Unallocated),
        ]
    );
    assert!(img.block_status(6 * 4096, 10).unwrap().is_empty());
    assert_eq!(img.allocated_bytes(), 3 * 4096);
}

/// Writes a mix of partial, whole and multi-block pieces into an image with unallocated,
/// discarded and allocated blocks, checks them against a model before and after a reopen.
fn allocation_round_trip(block_size: u32) {
    let bs = block_size as usize;
    let dir = TempDir::new();
    let path = fixture(&dir, block_size, &[U, U, U, 0, D, U, U, U, U, U], 1);
    let img = open_rw(&path);
    let mut model = read_all(&img);
    let mut write = |img: &VdiImage, offset: usize, len: usize, byte: u8| {
        img.write_at(&vec![byte; len], offset as u64).unwrap();
        model[offset..offset + len].fill(byte);
    };
    write(&img, bs + 100, 200, 0x11); // inside one block
    write(&img, 2 * bs, bs, 0x22); // exactly one block
    write(&img, 3 * bs + 7, 5, 0x33); // allocated block: in place
    write(&img, 4 * bs - 1, 2, 0x44); // allocated + discarded
    write(&img, 5 * bs + bs / 2, 3 * bs, 0x55); // half, two whole, half
    assert!(img.is_dirty());
    assert_eq!(read_all(&img), model, "before flush");
    assert_eq!(img.allocated_bytes(), 8 * block_size as u64);
    img.flush().unwrap();
    assert!(!img.is_dirty());
    drop(img);

    let img = open_rw(&path);
    assert_eq!(read_all(&img), model, "after reopen");
    let info = img.info();
    let blocks_allocated = info
        .details
        .iter()
        .find(|(k, _)| *k == "blocks_allocated")
        .unwrap();
    assert_eq!(blocks_allocated.1, "8");
    // Physical blocks were handed out in order after the existing block 0.
    let entries: Vec<u32> = (0..10).map(|i| bmap_entry(&path, 512, i)).collect();
    assert_eq!(entries, [U, 1, 2, 0, 3, 4, 5, 6, 7, U]);
    let len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(
        len,
        1024 + 8 * block_size as u64,
        "exactly eight physical blocks"
    );
}

#[test]
fn allocation_round_trip_512_byte_blocks() {
    allocation_round_trip(512);
}

#[test]
fn allocation_round_trip_4k_blocks() {
    allocation_round_trip(4096);
}

#[test]
fn allocation_round_trip_1m_blocks() {
    allocation_round_trip(1 << 20);
}

/// Blocks larger than what is padded in memory get their zeros from a bounded buffer: the
/// bytes around a partial write still read as zeros, in the image and after a reopen.
#[test]
fn partial_writes_into_large_fresh_blocks_are_padded_with_zeros() {
    let dir = TempDir::new();
    let block = 4 << 20;
    let path = fixture(&dir, block, &[U, U], 0);
    let img = open_rw(&path);
    let at = u64::from(block) + 3 * MIB + 7;
    img.write_at(&[0xab; 1000], at).unwrap();
    img.flush().unwrap();
    drop(img);
    let img = open_rw(&path);
    let all = read_all(&img);
    let start = at as usize;
    assert!(all[..start].iter().all(|&b| b == 0));
    assert!(all[start..start + 1000].iter().all(|&b| b == 0xab));
    assert!(all[start + 1000..].iter().all(|&b| b == 0));
    let file_len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(
        file_len % u64::from(block),
        512 + 512,
        "the block is written whole"
    );
}

#[test]
fn unflushed_allocation_is_not_referenced_on_disk() {
    let dir = TempDir::new();
    let path = fixture(&dir, 4096, &[U, U], 0);
    let img = open_rw(&path);
    img.write_at(&[9; 100], 4096 + 50).unwrap();
    assert!(img.is_dirty());
    drop(img);
    let grown = std::fs::metadata(&path).unwrap().len();
    assert_eq!(grown, 1024 + 4096, "the data block was written");
    assert_eq!(bmap_entry(&path, 512, 1), U, "but not referenced");

    let img = open_rw(&path);
    assert!(read_all(&img).iter().all(|&b| b == 0));
    assert_eq!(img.allocated_bytes(), 0);
    assert_eq!(
        img.block_status(4096, 4096).unwrap()[0].state,
        ExtentState::Unallocated
    );
    // The leaked block is taken again by the next allocation.
    img.write_at(&[5; 4096], 0).unwrap();
    img.flush().unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), grown);
    assert_eq!(bmap_entry(&path, 512, 0), 0);
}

#[test]
fn concurrent_writers_allocate_each_block_once() {
    const THREADS: usize = 8;
    const ROUNDS: u64 = 16;
    let dir = TempDir::new();
    let path = fixture(&dir, 1 << 20, &[U; ROUNDS as usize], 0);
    let img = Arc::new(open_rw(&path));
    for round in 0..ROUNDS {
        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (img, barrier) = (Arc::clone(&img), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    barrier.wait();
                    let at = round * MIB + t as u64 * 4096;
                    img.write_at(&[t as u8 + 1; 4096], at).unwrap();
                })
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
        assert_eq!(img.allocated_bytes(), (round + 1) * MIB, "round {round}");
    }
    img.flush().unwrap();
    drop(img);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1024 + ROUNDS * MIB);
    let img = open_rw(&path);
    for round in 0..ROUNDS {
        let mut buf = vec![0u8; MIB as usize];
        img.read_at(&mut buf, round * MIB).unwrap();
        for t in 0..THREADS {
            let piece = &buf[t * 4096..(t + 1) * 4096];
            assert!(
                piece.iter().all(|&b| b == t as u8 + 1),
                "round {round} thread {t} lost"
            );
        }
        assert!(buf[THREADS * 4096..].iter().all(|&b| b == 0));
    }
    drop(img);
    assert_qemu_check_clean("vdi", &path);
}

#[test]
fn read_only_image_refuses_writes() {
    let dir = TempDir::new();
    let path = fixture(&dir, 4096, &[U, 0], 1);
    let file = HostFile::open(&path, false).unwrap();
    let img = VdiImage::open(file, Some("served read-only by request".into())).unwrap();
    assert_eq!(
        img.read_only_reason().as_deref(),
        Some("served read-only by request")
    );
    for offset in [0, 4096] {
        let e = img.write_at(&[1; 10], offset).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReadOnly);
        assert!(e.to_string().contains("served read-only by request"), "{e}");
    }
    img.flush().unwrap();
    assert_eq!(
        img.info().read_only_reason.as_deref(),
        Some("served read-only by request")
    );

    // A read-only file without a reason from the caller is still never written.
    let img = VdiImage::open(HostFile::open(&path, false).unwrap(), None).unwrap();
    assert!(img.read_only_reason().is_some());
    assert_eq!(
        img.write_at(&[1; 10], 0).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
}

#[test]
fn flush_of_a_clean_image_writes_nothing() {
    let dir = TempDir::new();
    let path = fixture(&dir, 4096, &[U, 0], 1);
    let img = open_rw(&path);
    // Garbage in the bmap padding must survive: flush writes only the dirty entries.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[1000] = 0x77;
    std::fs::write(&path, &bytes).unwrap();
    img.flush().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    img.write_at(&[3; 4096], 0).unwrap();
    img.flush().unwrap();
    let after = std::fs::read(&path).unwrap();
    assert_eq!(after[1000], 0x77);
    assert_eq!(
        u32::from_le_bytes(after[388..392].try_into().unwrap()),
        2,
        "blocks_allocated"
    );
    img.flush().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), after);
}

#[test]
fn allocation_stops_at_blocks_in_image() {
    let dir = TempDir::new();
    // Physical block 0 is leaked below the highest entry, so the next index would be 2 of 2.
    let mut h = header(ImageType::Dynamic, 2 * 4096, 4096);
    h.blocks_allocated = 2;
    let path = write_file(&dir, &image_bytes(&h, &[U, 1], 2));
    let img = open_rw(&path);
    let e = img.write_at(&[1; 512], 0).unwrap_err();
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    assert!(!img.is_dirty());
    img.write_at(&[1; 512], 4096).unwrap();
}

/// A block map beyond the per-image table budget is refused before it is read, even when the
/// (sparse) file is long enough to hold it.
#[test]
fn block_maps_beyond_the_memory_budget_are_refused() {
    let dir = TempDir::new();
    let blocks = (crate::meta::budget::MAX_TABLE_MEMORY / 4) as u32 + 1;
    let h = header(ImageType::Dynamic, u64::from(blocks) * 512, 512);
    let path = write_file(&dir, &h.to_bytes().unwrap());
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(u64::from(h.offset_data)).unwrap();
    let e = try_open(&path).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(
        e.to_string().contains("VDI block map would take 257 MiB"),
        "{e}"
    );
}

#[test]
fn qemu_sees_what_we_wrote_and_we_see_what_qemu_wrote() {
    let dir = TempDir::new();
    let Some(path) = qemu_create(&dir, &[], "10M") else {
        return;
    };
    let cmd = "write -P 0x5a 7M 64k";
    let out = qemu(
        "qemu-io",
        &[
            "-f".as_ref(),
            "vdi".as_ref(),
            "-c".as_ref(),
            OsStr::new(cmd),
            path.as_os_str(),
        ],
    )
    .unwrap();
    assert!(out.status.success());

    let img = open_rw(&path);
    let mut buf = vec![0u8; 64 << 10];
    img.read_at(&mut buf, 7 * MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    img.write_at(&[0xab; 4096], 0).unwrap();
    img.write_at(&[0xcd; 8192], 5 * MIB - 4096).unwrap();
    img.write_at(&[0xef; 512], 7 * MIB + 512).unwrap();
    img.flush().unwrap();
    drop(img);

    assert_qemu_check_clean("vdi", &path);
    assert_qemu_reads(&path, 0xab, 0, 4096);
    assert_qemu_reads(&path, 0, 4096, MIB - 4096);
    assert_qemu_reads(&path, 0xcd, 5 * MIB - 4096, 8192);
    assert_qemu_reads(&path, 0x5a, 7 * MIB, 512);
    assert_qemu_reads(&path, 0xef, 7 * MIB + 512, 512);
}

#[test]
fn virtualbox_layout_with_other_offsets_round_trips() {
    // VirtualBox writes header_size 400, LCHS geometry after the UUIDs and its own offsets.
    let dir = TempDir::new();
    let mut h = header(ImageType::Dynamic, 4 * MIB, MIB as u32);
    h.offset_bmap = 1024;
    h.offset_data = 8192;
    let mut bytes = image_bytes(&h, &[U, U, U, U], 0);
    patch_u32(&mut bytes, 72, 400);
    bytes[456..472].copy_from_slice(&[9; 16]);
    let path = write_file(&dir, &bytes);
    let img = open_rw(&path);
    img.write_at(&[0xab; 4096], 0).unwrap();
    img.write_at(&[0xcd; 512], 3 * MIB).unwrap();
    img.flush().unwrap();
    drop(img);
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[456..472], &[9; 16], "geometry kept");
    assert_eq!(bmap_entry(&path, 1024, 0), 0);
    assert_eq!(bmap_entry(&path, 1024, 3), 1);
    assert_eq!(on_disk.len() as u64, 8192 + 2 * MIB);
    assert_eq!(&on_disk[8192..8192 + 4096], &[0xab; 4096]);
    assert_qemu_check_clean("vdi", &path);
    assert_qemu_reads(&path, 0xab, 0, 4096);
    assert_qemu_reads(&path, 0xcd, 3 * MIB, 512);
}

/// Hostile images: thousands of deterministic mutations of a valid image (random bytes and
/// boundary values in the header and the bmap). Opening must give an image or a clean error,
/// and an image that opens must serve reads, block status, writes and flushes without a panic.
#[test]
fn mutated_images_never_panic() {
    const INTERESTING: [u32; 10] = [
        0,
        1,
        511,
        512,
        4096,
        0x7fff_ffff,
        0x8000_0000,
        0xffff_fffe,
        0xffff_ffff,
        0x1fff_ff80,
    ];
    let dir = TempDir::new();
    let base = {
        let entries = [0, U, 1, D, 2, U, 3, U];
        let mut h = header(ImageType::Dynamic, 8 * 4096, 4096);
        h.blocks_allocated = 4;
        image_bytes(&h, &entries, 4)
    };
    let path = dir.path().join("m.vdi");
    let mutate = |bytes: &mut Vec<u8>, rng: &mut Rng| {
        for _ in 0..1 + rng.below(4) {
            // Mostly the header fields and the bmap, sometimes anywhere.
            let span = if rng.below(4) == 0 { bytes.len() } else { 1024 };
            let at = (rng.below(span as u64) as usize) & !3;
            if rng.below(2) == 0 {
                let value = INTERESTING[rng.below(INTERESTING.len() as u64) as usize];
                bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
            } else {
                bytes[at] = rng.next() as u8;
            }
        }
    };
    assert_mutations_never_panic(&base, &path, 3000, mutate, |path| {
        let Ok(img) = try_open(path) else {
            return false;
        };
        // Writes into images of huge blocks would make the test slow, not better.
        let write = img.info().cluster_size.unwrap_or(u64::MAX) <= MIB;
        exercise_image(&img, write);
        true
    });
}

fn discard_case(image_type: &str) {
    use crate::testutil::discard::{exercise_discard, qemu_create, DiscardCase};
    let dir = TempDir::new();
    let path = dir.path().join("d.vdi");
    let options = format!(
        "static={}",
        if image_type == "static" { "on" } else { "off" }
    );
    if qemu_create("vdi", &options, &path, 12 * MIB).is_none() {
        return;
    }
    let case = DiscardCase {
        format: "vdi",
        path: &path,
        unit: MIB,
        check: true,
        data_file: None,
    };
    exercise_discard(&case, &|p| Ok(std::sync::Arc::new(try_open(p)?)));
}

#[test]
fn discard_frees_blocks_and_keeps_them_dense() {
    discard_case("dynamic");
}

#[test]
fn discard_of_a_static_image_punches_in_place() {
    discard_case("static");
}

#[test]
fn discard_is_refused_read_only() {
    let dir = TempDir::new();
    let path = fixture(&dir, MIB as u32, &[0, U], 1);
    let img = VdiImage::open(HostFile::open(&path, false).unwrap(), None).unwrap();
    assert_eq!(img.discard(0, MIB).unwrap_err().kind(), ErrorKind::ReadOnly);
}

#[test]
fn resize_grows_where_the_bmap_has_room() {
    let dir = TempDir::new();
    let Some(path) = qemu_create(&dir, &[], "16M") else {
        return;
    };
    let img = open_rw(&path);
    img.write_at(&[0x21; 4096], 15 * MIB).unwrap();
    assert_eq!(
        img.resize(8 * MIB).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    // qemu-img leaves the bmap one sector: 128 blocks.
    assert_eq!(
        img.resize(200 * MIB).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    img.resize(100 * MIB).unwrap();
    assert_eq!(img.size(), 100 * MIB);
    img.write_at(&[0x22; 4096], 99 * MIB).unwrap();
    img.flush().unwrap();
    drop(img);
    let img = open_rw(&path);
    assert_eq!(img.size(), 100 * MIB);
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 99 * MIB).unwrap();
    assert_eq!(buf, vec![0x22; 4096]);
    drop(img);
    assert_qemu_check_clean("vdi", &path);
    assert_qemu_reads(&path, 0x21, 15 * MIB, 4096);
    assert_qemu_reads(&path, 0x22, 99 * MIB, 4096);
    assert_qemu_reads(&path, 0, 50 * MIB, MIB);
}

#[test]
fn every_host_fault_during_a_resize_leaves_the_old_or_the_new_image() {
    use crate::testutil::resize::{Oracle, ResizeWalk};
    let dir = TempDir::in_memory();
    let Some(path) = qemu_create(&dir, &[], "16M") else {
        return;
    };
    let img = open_rw(&path);
    img.write_at(&[0x21; 4096], 15 * MIB).unwrap();
    img.write_at(&[0x23; 100], 3 * MIB + 7).unwrap();
    img.flush().unwrap();
    drop(img);
    let open = |p: &Path| -> Arc<dyn Image> { Arc::new(open_rw(p)) };
    ResizeWalk {
        format: "vdi",
        path,
        parents: Vec::new(),
        open: &open,
        new_size: 100 * MIB,
        oracle: Oracle::Check,
    }
    .all();
}
