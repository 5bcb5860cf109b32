//! Crash consistency of a VDI flush: the host writes of a flush are recorded, and the image as
//! a crash after each of them would leave it is checked with QEMU (`testutil::crash`). With
//! qemu-img's layout every such image must pass `qemu-img check`; with VirtualBox's, the one
//! step between header and bmap may show a count above the entries, which must stay harmless
//! to QEMU and be repaired by imgfs's next allocation.

use super::*;
use crate::host::fault::{self, Op, Recording};
use crate::testutil::crash::{assert_old_or_new, crash_path, CrashCheck};
use crate::testutil::{assert_qemu_check_clean, qemu_check, qemu_io_on};

/// 260 blocks of 1 MiB (the only block size QEMU reads): a 1040-byte bmap over three sectors.
const BLOCKS: u64 = 260;

/// Writes `(offset, len, byte)` pieces through `img` and into `model`.
fn write_all(img: &VdiImage, model: &mut [u8], pieces: &[(u64, usize, u8)]) {
    for &(offset, len, byte) in pieces {
        img.write_at(&vec![byte; len], offset).unwrap();
        model[offset as usize..offset as usize + len].fill(byte);
    }
}

/// Opens the image at `path` (watched by the caller), writes and flushes a first round,
/// writes a second round into blocks whose entries lie in the first and last bmap sector,
/// and records that round's flush. Returns the disk after each round and the recording.
fn two_rounds(path: &Path) -> (Vec<u8>, Vec<u8>, Recording) {
    let watch = fault::watch(path);
    let img = open_rw(path);
    let mut model = read_all(&img);
    write_all(
        &img,
        &mut model,
        &[(MIB + 100, 5000, 0x21), (9 * MIB, 4096, 0x22)],
    );
    img.flush().unwrap();
    let old = model.clone();
    write_all(
        &img,
        &mut model,
        &[
            (MIB + 200, 300, 0x31),
            (20 * MIB + 7, 70_000, 0x32),
            (258 * MIB - 1000, 3000, 0x33),
        ],
    );
    watch.start();
    img.flush().unwrap();
    let recording = watch.stop();
    (old, model, recording)
}

fn check<'a>(
    old: &'a [u8],
    new: &'a [u8],
    read_ours: &'a dyn Fn(&Path) -> Vec<u8>,
) -> CrashCheck<'a> {
    CrashCheck {
        format: "vdi",
        old,
        new,
        fresh: 200 * MIB,
        read_ours,
    }
}

/// qemu-img's layout (bmap at 512): header and dirty bmap go out in one write, so a crash
/// anywhere leaves an image `qemu-img check` passes and QEMU allocates clear of all data in.
#[test]
fn every_write_of_a_flush_leaves_an_image_qemu_accepts() {
    let dir = TempDir::new();
    let Some(path) = qemu_create(&dir, &[], &format!("{}M", BLOCKS)) else {
        return;
    };
    qemu_io_on(
        "vdi",
        &path,
        &["write -P 0x11 0 64k", "write -P 0x12 5M 4k"],
    )
    .unwrap();
    let (old, new, recording) = two_rounds(&path);
    let ops: Vec<String> = recording.ops().iter().map(|op| format!("{op:?}")).collect();
    assert_eq!(
        ops,
        ["sync", "write 1552 bytes at 0x0", "sync"],
        "data synced, then header and bmap (three sectors, 1040 bytes) in one write"
    );
    let read_ours = |p: &Path| read_all(&open_rw(p));
    check(&old, &new, &read_ours).every_prefix(&path, &recording);
}

/// VirtualBox's layout (bmap at 1 MiB, data at 2 MiB): the header with the new count goes out
/// and is synced before the bmap. A crash in between leaves a count above the entries, which
/// `qemu-img check` reports but which keeps QEMU's next block clear of all data, and which
/// imgfs repairs with its next allocation.
#[test]
fn a_crash_between_header_and_bmap_leaves_a_count_qemu_survives_and_imgfs_repairs() {
    let dir = TempDir::new();
    let mut h = header(ImageType::Dynamic, BLOCKS * MIB, MIB as u32);
    h.offset_bmap = MIB as u32;
    h.offset_data = 2 * MIB as u32;
    h.blocks_allocated = 2;
    let mut entries = vec![U; BLOCKS as usize];
    entries[3] = 0;
    entries[150] = 1;
    let path = write_file(&dir, &image_bytes(&h, &entries, 2));
    if qemu_check("vdi", &path).is_none() {
        return;
    }
    assert_qemu_check_clean("vdi", &path);
    let (old, new, recording) = two_rounds(&path);
    let header_then_bmap = matches!(
        recording.ops(),
        [Op::Sync, Op::Write { offset: 0, .. }, Op::Sync, rest @ .., Op::Sync]
            if rest.len() == 2 && rest.iter().all(|op| matches!(op, Op::Write { .. }))
    );
    assert!(
        header_then_bmap,
        "data synced, header synced, then two bmap pieces: {:?}",
        recording.ops()
    );
    let read_ours = |p: &Path| read_all(&open_rw(p));
    let oracle = check(&old, &new, &read_ours);
    let crashed = crash_path(&path);
    let writes = recording.writes();
    for k in 0..=writes {
        let what = format!("crash after {k} of {writes} writes");
        std::fs::write(&crashed, recording.after_writes(k)).unwrap();
        if k == 0 || k == writes {
            oracle.check(&crashed, k, writes, &what);
            continue;
        }
        assert_count_above_entries(&crashed, &what);
        let theirs = oracle.read_theirs(&crashed);
        assert_old_or_new(&theirs, &old, &new, &what);
        assert!(
            read_ours(&crashed) == theirs,
            "{what}: imgfs reads otherwise"
        );
        oracle.assert_qemu_allocates_elsewhere(&crashed, &theirs, &what);
        // On the same crash, imgfs's next allocation writes a count the entries agree with.
        std::fs::write(&crashed, recording.after_writes(k)).unwrap();
        let img = open_rw(&crashed);
        img.write_at(&[0x44; 512], 100 * MIB).unwrap();
        img.flush().unwrap();
        drop(img);
        assert_qemu_check_clean("vdi", &crashed);
    }
}

/// `qemu-img check` of the image at `path` reports one error, a header count above the
/// allocated entries; QEMU must still put a new block clear of every entry.
fn assert_count_above_entries(path: &Path, what: &str) {
    let (code, text) = qemu_check("vdi", path).unwrap();
    let mismatch = text
        .lines()
        .find_map(|l| l.strip_prefix("ERROR: allocated blocks mismatch, is "))
        .and_then(|rest| rest.split_once(", should be "))
        .map(|(is, should)| (is.trim().parse::<u32>(), should.trim().parse::<u32>()));
    let Some((Ok(entries), Ok(count))) = mismatch else {
        panic!("{what}: qemu-img check: {text}");
    };
    assert!(
        code == Some(2) && text.matches("ERROR").count() == 1 && count > entries,
        "{what}: qemu-img check: {text}"
    );
    let bytes = std::fs::read(path).unwrap();
    let highest = bytes[MIB as usize..(MIB + 4 * BLOCKS) as usize]
        .chunks_exact(4)
        .map(|e| u32::from_le_bytes(e.try_into().unwrap()))
        .filter(|&e| e < D)
        .max()
        .unwrap();
    assert!(
        count > highest,
        "{what}: a count of {count} lets QEMU overwrite block {highest}"
    );
}
