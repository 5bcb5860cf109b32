//! Writes into differencing images: only the logical sectors written are stored in the child
//! and flagged in its sector bitmap, whatever the alignment, from several threads at once,
//! across a reopen and across a crash after the log entry; the parent is never written.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};

use super::super::header::MIB;
use super::differencing::{
    block_bits, block_bits_with, block_bytes, open_child, parent_and_child, parent_and_child_with,
    parent_bytes, payload_entry,
};
use super::*;
use crate::format::backing::Backing;
use crate::testutil::TempDir;

#[test]
fn unaligned_writes_read_back_through_the_chain_and_after_reopen() {
    let dir = TempDir::new();
    let Some((parent, child)) = parent_and_child(&dir) else {
        return;
    };
    let parent_before = std::fs::read(&parent).unwrap();
    let img = open_child(&parent, &child);
    let mut expected = parent_bytes();
    let writes: [(u64, usize, u8); 5] = [
        // Partial sectors at both ends, in block 1: sectors 50-51.
        (MIB + 50 * 512 + 3, 700, 0xa1),
        // Across blocks 2 and 3: sectors 2046-2047 of block 2, 0-3 of block 3.
        (3 * MIB - 1000, 3000, 0xa2),
        // Into partially present block 1: sector 51 is here, 52 whole, 53 partly.
        (MIB + 51 * 512 + 500, 600, 0xa3),
        // Aligned: sectors 8-23 of block 5.
        (5 * MIB + 4096, 8192, 0xa4),
        // Two bytes across a sector boundary: sectors 0 and 1 of block 7.
        (7 * MIB + 511, 2, 0xa5),
    ];
    for (offset, len, byte) in writes {
        img.write_at(&vec![byte; len], offset).unwrap();
        expected[offset as usize..offset as usize + len].fill(byte);
        assert!(read_all(&img) == expected, "after the write at {offset}");
    }
    // Unaligned reads across sectors here and in the parent, and across blocks.
    for (offset, len) in [
        (MIB + 50 * 512 - 7, 3000),
        (3 * MIB - 1500, 5000),
        (7 * MIB + 300, 1000),
    ] {
        let mut buf = vec![0u8; len];
        img.read_at(&mut buf, offset).unwrap();
        assert!(
            buf == expected[offset as usize..offset as usize + len],
            "read at {offset}"
        );
    }
    assert_eq!(img.allocated_bytes(), 5 * MIB, "blocks 1, 2, 3, 5 and 7");
    img.flush().unwrap();
    drop(img);

    assert_eq!(block_bits(&child, 1), [50, 51, 52, 53]);
    assert_eq!(block_bits(&child, 2), [2046, 2047]);
    assert_eq!(block_bits(&child, 3), [0, 1, 2, 3]);
    assert_eq!(block_bits(&child, 5), (8..24).collect::<Vec<u64>>());
    assert_eq!(block_bits(&child, 7), [0, 1]);
    for block in [0, 4, 6] {
        assert_eq!(payload_entry(&child, block) & 7, 0, "block {block}");
    }
    for block in [1, 2, 3, 5, 7] {
        assert_eq!(payload_entry(&child, block) & 7, 7, "block {block}");
    }
    // Sectors written hold the parent's bytes where the write left them out; the rest of the
    // block is unused (zeros).
    let bytes = block_bytes(&child, 3);
    assert!(bytes[..2000].iter().all(|&b| b == 0xa2));
    assert!(bytes[2000..2048].iter().all(|&b| b == 0x70));
    assert!(bytes[2048..].iter().all(|&b| b == 0));
    let bytes = block_bytes(&child, 2);
    assert!(bytes[..2046 * 512].iter().all(|&b| b == 0));
    assert!(bytes[2046 * 512..2046 * 512 + 24]
        .iter()
        .all(|&b| b == 0x70));
    assert!(bytes[2046 * 512 + 24..].iter().all(|&b| b == 0xa2));

    assert!(
        read_all(&open_child(&parent, &child)) == expected,
        "after reopen"
    );
    assert!(
        std::fs::read(&parent).unwrap() == parent_before,
        "the parent is unchanged"
    );
}

#[test]
fn concurrent_writers_into_the_same_sectors_lose_no_bytes() {
    let dir = TempDir::new();
    let Some((parent, child)) = parent_and_child(&dir) else {
        return;
    };
    let img = Arc::new(open_child(&parent, &child));
    let mut expected = parent_bytes();
    // Seven threads write 64 bytes each into sectors 3, 10 and 2047 of every block: the first
    // write allocates the block, the others find it partially present with the sector's bit
    // set or clear. The last 64 bytes of each sector come from the parent.
    let threads = 7u64;
    let pieces = |block: u64, t: u64| {
        [3u64, 10, 2047].map(move |sector| block * MIB + sector * 512 + t * 64)
    };
    for block in 0..8u64 {
        let barrier = Arc::new(Barrier::new(threads as usize));
        std::thread::scope(|scope| {
            for t in 0..threads {
                let (img, barrier) = (Arc::clone(&img), Arc::clone(&barrier));
                scope.spawn(move || {
                    barrier.wait();
                    for at in pieces(block, t) {
                        img.write_at(&[0x10 + t as u8; 64], at).unwrap();
                    }
                });
            }
        });
        for t in 0..threads {
            for at in pieces(block, t) {
                expected[at as usize..at as usize + 64].fill(0x10 + t as u8);
            }
        }
    }
    assert!(read_all(&img) == expected, "before flush");
    assert_eq!(img.allocated_bytes(), 8 * MIB);
    img.flush().unwrap();
    drop(img);
    for block in 0..8 {
        assert_eq!(block_bits(&child, block), [3, 10, 2047], "block {block}");
    }
    assert!(
        read_all(&open_child(&parent, &child)) == expected,
        "after reopen"
    );
}

#[test]
fn a_differencing_flush_that_crashes_after_its_log_entry_replays_entries_and_bits() {
    let dir = TempDir::new();
    let Some((parent, child)) = parent_and_child(&dir) else {
        return;
    };
    let img = open_child(&parent, &child);
    let mut expected = parent_bytes();
    let mut write = |img: &VhdxImage, offset: u64, len: usize, byte: u8| {
        img.write_at(&vec![byte; len], offset).unwrap();
        expected[offset as usize..offset as usize + len].fill(byte);
    };
    write(&img, MIB + 700, 5000, 0xb1);
    img.flush().unwrap();
    // New bits in a partially present block, and a write across two new blocks.
    write(&img, MIB + 100_000, 3000, 0xb2);
    write(&img, 4 * MIB - 10, 20, 0xb3);
    img.crash_after_log_entry.store(true, Ordering::Relaxed);
    let e = img.flush().unwrap_err();
    assert!(e.to_string().contains("simulated crash"), "{e}");
    drop(img);

    assert!(
        !current(&child).0.log_guid.is_nil(),
        "the header names the entry"
    );
    let first_bits: Vec<u64> = (1..=11).collect();
    assert_eq!(block_bits(&child, 1), first_bits, "bitmap not written yet");
    assert_eq!(payload_entry(&child, 3) & 7, 0, "BAT not written yet");

    // Read-only, the log is replayed in memory and the file left alone.
    let before = std::fs::read(&child).unwrap();
    let backing = Backing::new(Arc::new(open_ro(&parent)), &parent);
    let ro = VhdxImage::open(
        HostFile::open(&child, false).unwrap(),
        Some(backing),
        Some("served read-only by request".into()),
    )
    .unwrap();
    assert!(read_all(&ro) == expected, "replayed in memory");
    drop(ro);
    assert!(std::fs::read(&child).unwrap() == before);

    // Read-write, into the file.
    let img = open_child(&parent, &child);
    assert!(read_all(&img) == expected, "replayed into the file");
    drop(img);
    assert!(current(&child).0.log_guid.is_nil());
    let bits: Vec<u64> = (1..=11).chain(195..=201).collect();
    assert_eq!(block_bits(&child, 1), bits);
    assert_eq!(block_bits(&child, 3), [2047]);
    assert_eq!(block_bits(&child, 4), [0]);
}

#[test]
fn with_4k_logical_sectors_whole_4k_sectors_are_filled_and_flagged() {
    let dir = TempDir::new();
    let Some((parent, child)) = parent_and_child_with(&dir, None, 4096) else {
        return;
    };
    let img = open_child(&parent, &child);
    assert_eq!(detail(&img, "logical_sector_size"), "4096");
    assert_eq!(detail(&img, "chunk_ratio"), "32768");
    let mut expected = parent_bytes();
    let mut write = |img: &VhdxImage, offset: u64, len: usize, byte: u8| {
        img.write_at(&vec![byte; len], offset).unwrap();
        expected[offset as usize..offset as usize + len].fill(byte);
    };
    // Inside sector 3 of block 1; then across blocks 2 (sector 255) and 3 (sectors 0-1).
    write(&img, MIB + 3 * 4096 + 1000, 700, 0xc4);
    write(&img, 3 * MIB - 100, 5000, 0xc5);
    // A 512-byte write into sector 1 of block 3, already here, and into sector 2, not yet.
    write(&img, 3 * MIB + 2 * 4096 - 512, 1024, 0xc6);
    assert!(read_all(&img) == expected, "before flush");
    img.flush().unwrap();
    drop(img);
    assert_eq!(block_bits_with(&child, 1, 4096), [3]);
    assert_eq!(block_bits_with(&child, 2, 4096), [255]);
    assert_eq!(block_bits_with(&child, 3, 4096), [0, 1, 2]);
    let bytes = block_bytes(&child, 1);
    let sector3 = MIB as usize + 3 * 4096;
    assert!(bytes[3 * 4096..4 * 4096] == expected[sector3..sector3 + 4096]);
    assert!(bytes[..3 * 4096]
        .iter()
        .chain(&bytes[4 * 4096..])
        .all(|&b| b == 0));
    let bytes = block_bytes(&child, 3);
    assert!(
        bytes[2 * 4096 + 512..3 * 4096].iter().all(|&b| b == 0x70),
        "from the parent"
    );
    assert!(
        read_all(&open_child(&parent, &child)) == expected,
        "after reopen"
    );
}

#[test]
fn a_flush_cut_between_log_entries_leaves_bits_only_for_blocks_not_present() {
    let dir = TempDir::new();
    let Some((parent, child)) = parent_and_child(&dir) else {
        return;
    };
    let img = open_child(&parent, &child);
    img.write_at(&[0xd1; 3000], MIB + 100 * 512).unwrap();
    img.write_at(&[0xd2; 1024], 2 * MIB + 10 * 512).unwrap();
    // One sector per entry: the bitmap page goes first, and the crash comes after it.
    img.entry_sector_cap.store(1, Ordering::Relaxed);
    img.crash_after_log_entry.store(true, Ordering::Relaxed);
    assert!(img.flush().is_err());
    drop(img);

    // Replayed: the bits are in place, the BAT entries are not, so the bits are ignored.
    let img = open_child(&parent, &child);
    assert!(
        read_all(&img) == parent_bytes(),
        "the unflushed writes are gone"
    );
    drop(img);
    assert_eq!(payload_entry(&child, 1) & 7, 0);
    assert_eq!(payload_entry(&child, 2) & 7, 0);
    assert_eq!(block_bits(&child, 1), (100..106).collect::<Vec<u64>>());

    // A new life of block 1 takes none of the stale bits.
    let img = open_child(&parent, &child);
    img.write_at(&[0xd3; 512], MIB + 7 * 512).unwrap();
    img.flush().unwrap();
    drop(img);
    assert_eq!(block_bits(&child, 1), [7]);
    assert_eq!(
        block_bits(&child, 2),
        [10, 11],
        "stale, block 2 is not present"
    );
    let mut expected = parent_bytes();
    expected[MIB as usize + 7 * 512..MIB as usize + 8 * 512].fill(0xd3);
    assert!(read_all(&open_child(&parent, &child)) == expected);
}

#[test]
fn discard_hides_the_parent_with_zero_blocks() {
    let dir = TempDir::new();
    let Some((parent, child)) = parent_and_child(&dir) else {
        return;
    };
    let img = open_child(&parent, &child);
    let mut expected = parent_bytes();
    img.write_at(&[0xb1; 4096], MIB).unwrap();
    // Block 1 (partly here), block 2 (all in the parent), and a partial range in block 4.
    for (offset, len) in [(MIB, 2 * MIB), (4 * MIB + 100, 1000)] {
        img.discard(offset, len).unwrap();
        expected[offset as usize..(offset + len) as usize].fill(0);
    }
    assert!(read_all(&img) == expected);
    img.flush().unwrap();
    drop(img);
    assert_eq!(payload_entry(&child, 1) & 7, 2, "PAYLOAD_BLOCK_ZERO");
    assert_eq!(payload_entry(&child, 2) & 7, 2, "PAYLOAD_BLOCK_ZERO");
    let img = open_child(&parent, &child);
    assert!(read_all(&img) == expected, "after reopening");
}
