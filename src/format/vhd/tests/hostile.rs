//! Corrupt and hostile images: bad checksums, structures beyond the file or over each other,
//! absurd block sizes and table sizes, blocks sharing space, and thousands of mutations that
//! must never panic.

use super::*;
use crate::format::vhd::footer::{self, DiskType};
use crate::format::vhd::header::{self, NewHeader};
use crate::testutil::{assert_mutations_never_panic, exercise_image};

const BLOCK: u64 = 4096;
/// Blocks of the small image and its layout: header at 512, BAT at 1536, blocks from 2048.
const BLOCKS: u32 = 8;
const FIRST_BLOCK: u64 = 2048;
const SPAN: u64 = 512 + BLOCK;

/// A small dynamic disk made by hand (4 KiB blocks, which QEMU accepts but never makes):
/// blocks 0, 2 and 5 present, filled with 1, 2, 3; block 5's bitmap has sectors 4..8 clear.
fn small_image() -> Vec<u8> {
    let size = u64::from(BLOCKS) * BLOCK;
    let footer = footer::build(
        DiskType::Dynamic,
        512,
        0,
        *b"win ",
        size,
        (0, 0, 0),
        [9; 16],
    )
    .unwrap();
    let header = header::build(&NewHeader {
        table_offset: 1536,
        max_table_entries: BLOCKS,
        block_size: BLOCK as u32,
        parent_uuid: [0; 16],
        parent_timestamp: 0,
        parent_name: "",
        locators: &[],
    })
    .unwrap();
    let mut bytes = vec![0u8; (FIRST_BLOCK + 3 * SPAN) as usize];
    bytes[..512].copy_from_slice(footer.bytes());
    bytes[512..1536].copy_from_slice(&header);
    let mut bat = vec![0xffu8; 512];
    for (i, (block, fill)) in [(0usize, 1u8), (2, 2), (5, 3)].into_iter().enumerate() {
        let at = FIRST_BLOCK + i as u64 * SPAN;
        bat[block * 4..block * 4 + 4].copy_from_slice(&((at / 512) as u32).to_be_bytes());
        let at = at as usize;
        bytes[at] = if block == 5 { 0xf0 } else { 0xff };
        bytes[at + 512..at + 512 + BLOCK as usize].fill(fill);
    }
    bytes[1536..2048].copy_from_slice(&bat);
    bytes.extend_from_slice(footer.bytes());
    bytes
}

fn refused(dir: &TempDir, bytes: &[u8], kind: ErrorKind, needle: &str) {
    let path = dir.path().join("h.vhd");
    std::fs::write(&path, bytes).unwrap();
    let e = try_open(&path).err().expect("the image must be refused");
    assert_eq!(e.kind(), kind, "{e}");
    let text = e.to_string();
    assert!(text.contains(needle), "{text} should mention {needle}");
    assert!(text.contains("h.vhd"), "{text} should name the file");
}

/// `bytes` with both footers' and the header's checksums fixed up.
fn resealed(mut bytes: Vec<u8>) -> Vec<u8> {
    let end = bytes.len() - 512;
    footer::testing::reseal(&mut bytes[..512]);
    footer::testing::reseal(&mut bytes[end..]);
    header::testing::reseal(&mut bytes[512..1536]);
    bytes
}

/// `bytes` with a big-endian u32 at `at` (both footers get it when `at` is in a footer).
fn with_u32(bytes: &[u8], at: usize, value: u32) -> Vec<u8> {
    let mut bytes = bytes.to_vec();
    bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
    if at < 512 {
        let end = bytes.len() - 512;
        bytes[end + at..end + at + 4].copy_from_slice(&value.to_be_bytes());
    }
    resealed(bytes)
}

#[test]
fn the_hand_made_image_reads_as_built() {
    let dir = TempDir::new();
    let path = dir.path().join("h.vhd");
    std::fs::write(&path, small_image()).unwrap();
    let img = open_rw(&path);
    let all = read_all(&img);
    let block = |i: usize| &all[i * BLOCK as usize..(i + 1) * BLOCK as usize];
    assert!(block(0).iter().all(|&b| b == 1));
    assert!(block(1).iter().all(|&b| b == 0));
    assert!(block(2).iter().all(|&b| b == 2));
    assert!(block(5)[..2048].iter().all(|&b| b == 3));
    assert!(
        block(5)[2048..].iter().all(|&b| b == 0),
        "clear bits read as zeros"
    );
    assert_eq!(img.allocated_bytes(), 3 * BLOCK);
    assert_eq!(img.size(), 8 * BLOCK);
    if let Some(Ok(size)) = qemu_size(&path) {
        assert_eq!(size, img.size());
    }
}

#[test]
fn corrupt_structures_are_refused_with_the_field_and_the_file() {
    let dir = TempDir::new();
    let good = small_image();
    let end = good.len() - 512;

    let mut b = good.clone();
    b[end + 70] ^= 1;
    b[70] ^= 1;
    refused(&dir, &b, ErrorKind::Corrupt, "footer checksum");
    let mut b = good.clone();
    b[600] ^= 1;
    refused(&dir, &b, ErrorKind::Corrupt, "dynamic disk header checksum");
    refused(
        &dir,
        &good[..300],
        ErrorKind::Corrupt,
        "shorter than the 512-byte VHD footer",
    );
    let mut b = good[..end].to_vec();
    b.extend_from_slice(&[0u8; 512]);
    b[..8].copy_from_slice(b"notavhd!");
    refused(&dir, &b, ErrorKind::Corrupt, "no valid VHD footer");
    refused(
        &dir,
        &with_u32(&good, 60, 5),
        ErrorKind::Unsupported,
        "disk type 5",
    );

    // The dynamic header (data offset in the footer), the BAT (table offset in the header).
    refused(
        &dir,
        &with_u32(&good, 20, 0x10_0000),
        ErrorKind::Corrupt,
        "the dynamic disk header (1024 bytes at 0x100000) lies beyond the end",
    );
    refused(
        &dir,
        &with_u32(&good, 20, 0),
        ErrorKind::Corrupt,
        "overlaps the footer copy",
    );
    refused(
        &dir,
        &with_u32(&good, 512 + 20, 0x10_0000),
        ErrorKind::Corrupt,
        "the BAT (32 bytes at 0x100000) lies beyond",
    );
    refused(
        &dir,
        &with_u32(&good, 512 + 20, 1024),
        ErrorKind::Corrupt,
        "the BAT overlaps the dynamic disk header",
    );

    // Block size and table size.
    refused(
        &dir,
        &with_u32(&good, 512 + 32, 0),
        ErrorKind::Corrupt,
        "block size 0 is not a power of two",
    );
    refused(
        &dir,
        &with_u32(&good, 512 + 32, 3000),
        ErrorKind::Corrupt,
        "block size 3000",
    );
    refused(
        &dir,
        &with_u32(&good, 512 + 32, 1 << 30),
        ErrorKind::Unsupported,
        "block size 1073741824",
    );
    refused(
        &dir,
        &with_u32(&good, 512 + 28, 7),
        ErrorKind::Corrupt,
        "less than the virtual size",
    );
    refused(
        &dir,
        &with_u32(&good, 512 + 28, u32::MAX),
        ErrorKind::Unsupported,
        "max table entries",
    );

    // BAT entries beyond the file and over the metadata.
    refused(
        &dir,
        &with_u32(&good, 1536 + 4, 100_000),
        ErrorKind::Corrupt,
        "BAT entry 1 puts block 1 at file offset 0x30d4000",
    );
    refused(
        &dir,
        &with_u32(&good, 1536 + 4, 2),
        ErrorKind::Corrupt,
        "over the dynamic disk header",
    );

    // Sizes: above 2040 GiB, and a fixed disk shorter than its virtual size.
    let huge = footer::testing::with_sizing(&good[end..], b"win ", 3 << 40, (65535, 16, 255));
    let mut b = good.clone();
    b[end..].copy_from_slice(&huge);
    b[..512].copy_from_slice(&huge);
    refused(&dir, &b, ErrorKind::Unsupported, "above the 2040 GiB");
    let fixed = footer::build(
        DiskType::Fixed,
        u64::MAX,
        0,
        *b"win ",
        8192,
        (0, 0, 0),
        [1; 16],
    )
    .unwrap();
    let mut b = vec![0u8; 4096];
    b.extend_from_slice(fixed.bytes());
    refused(
        &dir,
        &b,
        ErrorKind::Corrupt,
        "holds 4096 bytes of data, less than its virtual size 8192",
    );
}

#[test]
fn blocks_sharing_file_space_serve_read_only() {
    let dir = TempDir::new();
    let good = small_image();
    let shared = with_u32(&good, 1536 + 4 * 7, (FIRST_BLOCK / 512) as u32);
    let path = dir.path().join("h.vhd");
    std::fs::write(&path, &shared).unwrap();
    let img = open_rw(&path);
    let reason = img.read_only_reason().unwrap();
    assert!(
        reason.contains("BAT entries 0 and 7 share file space"),
        "{reason}"
    );
    assert_eq!(
        img.write_at(&[1], 0).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    let all = read_all(&img);
    assert_eq!(all[..BLOCK as usize], all[7 * BLOCK as usize..]);
}

/// Hostile images: deterministic mutations of the small image (random bytes and boundary
/// values in the footers, the header, the BAT and the bitmaps), half of them with the
/// checksums fixed up so the checks behind them are reached. Opening must give an image or a
/// clean error, and an image that opens must serve reads, block status, writes and flushes
/// without a panic.
#[test]
fn mutated_images_never_panic() {
    const INTERESTING: [u32; 12] = [
        0,
        1,
        2,
        3,
        4,
        512,
        4096,
        0x8000_0000,
        0xffff_fffe,
        0xffff_ffff,
        0x7fff_ffff,
        0x0010_0000,
    ];
    let dir = TempDir::new();
    let base = small_image();
    let path = dir.path().join("m.vhd");
    let len = base.len();
    let mutate = |bytes: &mut Vec<u8>, rng: &mut Rng| {
        let areas = [
            (0, 96),
            (512, 96),
            (512 + 576, 192),
            (1536, 64),
            (2048, 2),
            (len - 512, 96),
        ];
        for _ in 0..1 + rng.below(4) {
            let (start, span) = areas[rng.below(areas.len() as u64) as usize];
            let at = (start + rng.below(span as u64) as usize) & !3;
            if rng.below(2) == 0 && at + 4 <= bytes.len() {
                let value = INTERESTING[rng.below(INTERESTING.len() as u64) as usize];
                bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
            } else if let Some(b) = bytes.get_mut(at) {
                *b = rng.next() as u8;
            }
        }
        if rng.below(4) == 0 {
            // The copy at 0 follows the last footer, so a mutated footer is not just skipped.
            let end = bytes.len() - 512;
            let (head, tail) = bytes.split_at_mut(end);
            head[..512].copy_from_slice(tail);
        }
        if rng.below(2) == 0 {
            *bytes = resealed(std::mem::take(bytes));
        }
    };
    assert_mutations_never_panic(&base, &path, 3000, mutate, |path| {
        let Ok(img) = try_open(path) else {
            return false;
        };
        exercise_image(&img, img.info().cluster_size.unwrap_or(0) <= MIB);
        true
    });
}
