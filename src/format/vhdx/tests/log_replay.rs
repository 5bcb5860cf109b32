//! Dirty logs: hand-assembled log entries replayed into the file (writable) or in memory
//! (read-only), and a flush that "crashes" after its log entry is durable.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::super::header::{parse_region_table, BAT_REGION, MIB};
use super::super::log::{build_entry, testing::add_zero_descriptor, EntryParams, SECTOR};
use super::*;
use crate::testutil::TempDir;

const LOG_GUID: Uuid = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);

fn write_at(path: &Path, bytes: &[u8], at: u64) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, at).unwrap();
}

fn bat_offset(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let regions = parse_region_table(&bytes[192 * 1024..256 * 1024]).unwrap();
    regions
        .iter()
        .find(|r| r.guid == BAT_REGION)
        .unwrap()
        .offset
}

/// Names `guid` as the log GUID in a new current header (the other slot, sequence + 1).
fn set_log_guid(path: &Path, guid: Uuid) {
    let (mut header, slot) = current(path);
    header.sequence += 1;
    header.log_guid = guid;
    put_header(path, 1 - slot, &header);
}

/// A qemu-made dynamic 8 MiB image (1 MiB blocks) with block 0 holding 0x5a, a new block of
/// 0x77 appended to the file, and a dirty log of two entries: sequence 5 points BAT entry 2 at
/// the new block, sequence 6 zeroes the second 4 KiB of block 0's data. Returns the path and
/// the new block's file offset.
fn dirty_image(dir: &TempDir) -> Option<(PathBuf, u64)> {
    let path = create(dir, "l.vhdx", "block_size=1M", 8 * MIB)?;
    qemu_io(&path, &["write -P 0x5a 0 1M".to_string()]);
    let block0 = {
        let img = open_ro(&path);
        let runs = img.lookup(0, 1).unwrap();
        match runs[0].kind {
            RunKind::Data { host_offset } => host_offset,
            other => panic!("block 0 is {other:?}"),
        }
    };
    let new_block = std::fs::metadata(&path)
        .unwrap()
        .len()
        .next_multiple_of(MIB);
    write_at(&path, &vec![0x77; MIB as usize], new_block);
    let file_len = new_block + MIB;

    let bat = bat_offset(&path);
    let mut sector = vec![0u8; SECTOR as usize];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut sector, bat)
        .unwrap();
    sector[16..24].copy_from_slice(&(new_block | 6).to_le_bytes());
    let params = |sequence| EntryParams {
        log_guid: LOG_GUID,
        sequence,
        tail: 0,
        flushed_file_offset: file_len,
        last_file_offset: file_len,
    };
    let first = build_entry(&params(5), &[(bat, sector)]).unwrap();
    let mut second = build_entry(&params(6), &[]).unwrap();
    add_zero_descriptor(&mut second, block0 + 4096, 4096);
    let (header, _) = current(&path);
    write_at(&path, &first, header.log_offset);
    write_at(&path, &second, header.log_offset + first.len() as u64);
    set_log_guid(&path, LOG_GUID);
    Some((path, new_block))
}

/// What the disk reads as once the log is replayed.
fn assert_replayed_contents(img: &VhdxImage) {
    let all = read_all(img);
    assert!(all[..4096].iter().all(|&b| b == 0x5a));
    assert!(all[4096..8192].iter().all(|&b| b == 0), "zeroed by entry 6");
    assert!(all[8192..MIB as usize].iter().all(|&b| b == 0x5a));
    assert!(all[MIB as usize..2 * MIB as usize].iter().all(|&b| b == 0));
    assert!(
        all[2 * MIB as usize..3 * MIB as usize]
            .iter()
            .all(|&b| b == 0x77),
        "block 2 from entry 5"
    );
    assert!(all[3 * MIB as usize..].iter().all(|&b| b == 0));
}

#[test]
fn a_writable_image_replays_its_log_into_the_file() {
    let dir = TempDir::new();
    let Some((path, new_block)) = dirty_image(&dir) else {
        return;
    };
    let img = open_rw(&path);
    assert!(detail(&img, "log_replayed").contains("2 entries with 2 changes, into the file"));
    assert_replayed_contents(&img);
    assert_eq!(img.allocated_bytes(), 2 * MIB);
    drop(img);
    for slot in 0..2 {
        assert!(
            header_in(&path, slot).unwrap().log_guid.is_nil(),
            "slot {slot}: log cleared"
        );
    }
    let bytes = std::fs::read(&path).unwrap();
    let at = bat_offset(&path) as usize + 16;
    assert_eq!(
        bytes[at..at + 8],
        (new_block | 6).to_le_bytes(),
        "BAT sector written in place"
    );
    // The next open finds a clean log.
    assert!(detail(&open_rw(&path), "log_replayed").starts_with("no"));
    assert_qemu_check_clean(&path);
    qemu_io(
        &path,
        &["read -P 0x77 2M 1M".into(), "read -P 0 4096 4096".into()],
    );
}

#[test]
fn a_read_only_image_replays_its_log_in_memory_only() {
    let dir = TempDir::new();
    let Some((path, _)) = dirty_image(&dir) else {
        return;
    };
    let before = std::fs::read(&path).unwrap();
    let img = open_ro(&path);
    assert!(
        detail(&img, "log_replayed").contains("in memory only"),
        "{}",
        detail(&img, "log_replayed")
    );
    assert_replayed_contents(&img);
    assert_eq!(
        img.block_status(0, 8 * MIB)
            .unwrap()
            .iter()
            .filter(|e| e.state == ExtentState::Data)
            .count(),
        2
    );
    drop(img);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the file is untouched"
    );
}

#[test]
fn qemu_replays_the_log_entries_we_assemble() {
    let dir = TempDir::new();
    let Some((path, _)) = dirty_image(&dir) else {
        return;
    };
    // A read-write open makes QEMU replay the log.
    qemu_io(
        &path,
        &[
            "read -P 0x77 2M 1M".into(),
            "read -P 0 4096 4096".into(),
            "read -P 0x5a 8192 4096".into(),
        ],
    );
    assert!(current(&path).0.log_guid.is_nil());
    assert_replayed_contents(&open_rw(&path));
}

#[test]
fn logs_that_cannot_be_replayed_are_refused_clearly() {
    let dir = TempDir::new();
    let Some(path) = create(&dir, "b.vhdx", "block_size=1M", 8 * MIB) else {
        return;
    };
    let pristine = std::fs::read(&path).unwrap();
    let refused = |needle: &str| {
        let e = try_open(&path).err().expect("must be refused");
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(
            e.to_string().contains(needle),
            "{e} should mention {needle}"
        );
        std::fs::write(&path, &pristine).unwrap();
    };
    let (header, slot) = current(&path);
    let log = header.log_offset;

    // The header points the log outside the file.
    let mut outside = header.clone();
    outside.sequence += 1;
    outside.log_offset = 64 * MIB;
    put_header(&path, 1 - slot, &outside);
    refused("log at 0x4000000, 1048576 bytes, lies outside the file");

    // A log GUID with nothing valid in the log.
    set_log_guid(&path, LOG_GUID);
    refused("holds no valid sequence");

    let params = EntryParams {
        log_guid: LOG_GUID,
        sequence: 1,
        tail: 0,
        flushed_file_offset: MIB,
        last_file_offset: 8 * MIB,
    };
    // An entry writing into the headers.
    let entry = build_entry(&params, &[(64 * 1024, vec![0; SECTOR as usize])]).unwrap();
    write_at(&path, &entry, log);
    set_log_guid(&path, LOG_GUID);
    refused("writes 0x10000..0x11000, into the file identifier or the headers");

    // An entry saying the file was longer than it is.
    let long = EntryParams {
        flushed_file_offset: 64 * MIB,
        ..params
    };
    write_at(&path, &build_entry(&long, &[]).unwrap(), log);
    set_log_guid(&path, LOG_GUID);
    refused("truncated");

    // An entry pointing beyond the end of the file.
    let entry = build_entry(&params, &[(100 * MIB, vec![0; SECTOR as usize])]).unwrap();
    write_at(&path, &entry, log);
    set_log_guid(&path, LOG_GUID);
    refused("beyond the end of the file");
}

#[test]
fn a_flush_that_crashes_after_its_log_entry_leaves_a_replayable_image() {
    let dir = TempDir::new();
    let Some(path) = create(&dir, "c.vhdx", "block_size=1M", 8 * MIB) else {
        return;
    };
    let img = open_rw(&path);
    img.write_at(&[0x31; MIB as usize], 3 * MIB).unwrap();
    img.write_at(&[0x32; 1000], 6 * MIB + 5).unwrap();
    img.crash_after_log_entry
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let e = img.flush().unwrap_err();
    assert!(e.to_string().contains("simulated crash"), "{e}");
    drop(img);
    let (header, _) = current(&path);
    assert!(!header.log_guid.is_nil(), "the header names the entry");
    let bat = bat_offset(&path);
    let mut entry = [0u8; 8];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut entry, bat + 3 * 8)
        .unwrap();
    assert_eq!(
        u64::from_le_bytes(entry) & 7,
        2,
        "the BAT itself was not written yet"
    );

    let check = |img: &VhdxImage| {
        let all = read_all(img);
        assert!(all[3 * MIB as usize..4 * MIB as usize]
            .iter()
            .all(|&b| b == 0x31));
        assert!(all[6 * MIB as usize + 5..6 * MIB as usize + 1005]
            .iter()
            .all(|&b| b == 0x32));
        assert_eq!(all.iter().filter(|&&b| b != 0).count(), MIB as usize + 1000);
    };
    let copy = |name: &str| {
        let to = dir.path().join(name);
        std::fs::copy(&path, &to).unwrap();
        to
    };
    let (for_qemu, for_us) = (copy("q.vhdx"), copy("w.vhdx"));

    let before = std::fs::read(&path).unwrap();
    check(&open_ro(&path));
    assert_eq!(std::fs::read(&path).unwrap(), before);

    check(&open_rw(&for_us));
    assert!(current(&for_us).0.log_guid.is_nil());
    assert_qemu_check_clean(&for_us);

    let out = qemu(
        "qemu-img",
        &["check", "-r", "leaks", "-f", "vhdx", path_str(&for_qemu)],
    )
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    qemu_io(
        &for_qemu,
        &[
            "read -P 0x31 3M 1M".into(),
            "read -P 0x32 6291461 1000".into(),
        ],
    );
    check(&open_rw(&for_qemu));
}

/// A fuzz seed (see `scripts/fuzz-seeds.sh`): a small dynamic image whose dirty log points
/// a BAT entry at a block appended to the file and zeroes part of block 0, so fuzzing starts
/// from a log that replays.
#[test]
#[ignore = "writes a fuzz seed; run by scripts/fuzz-seeds.sh"]
fn fuzz_seed_dirty_log() {
    let dir = TempDir::new();
    let Some(path) = create(&dir, "l.vhdx", "block_size=1M", 3 * MIB) else {
        return;
    };
    qemu_io(&path, &["write -P 0x5a 0 8k".to_string()]);
    let block0 = {
        let img = open_ro(&path);
        match img.lookup(0, 1).unwrap()[0].kind {
            RunKind::Data { host_offset } => host_offset,
            other => panic!("block 0 is {other:?}"),
        }
    };
    let new_block = std::fs::metadata(&path)
        .unwrap()
        .len()
        .next_multiple_of(MIB);
    write_at(&path, &[0x77; 4096], new_block);
    let file_len = new_block + MIB;
    let bat = bat_offset(&path);
    let mut sector = vec![0u8; SECTOR as usize];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut sector, bat)
        .unwrap();
    sector[16..24].copy_from_slice(&(new_block | 6).to_le_bytes());
    let params = |sequence| EntryParams {
        log_guid: LOG_GUID,
        sequence,
        tail: 0,
        flushed_file_offset: file_len,
        last_file_offset: file_len,
    };
    let first = build_entry(&params(5), &[(bat, sector)]).unwrap();
    let mut second = build_entry(&params(6), &[]).unwrap();
    add_zero_descriptor(&mut second, block0 + 4096, 2048);
    let (header, _) = current(&path);
    write_at(&path, &first, header.log_offset);
    write_at(&path, &second, header.log_offset + first.len() as u64);
    set_log_guid(&path, LOG_GUID);
    let mut image = std::fs::read(&path).unwrap();
    image.resize(file_len as usize, 0);
    crate::fuzzing::tests::write_seed("vhdx", "dirty-log", &[image]);
}

#[test]
fn check_reports_a_dirty_log_and_its_repair_replays_it() {
    use crate::format::check::Repair;
    let dir = TempDir::new();
    let Some((path, _)) = dirty_image(&dir) else {
        return;
    };
    let file = HostFile::open(&path, false).unwrap();
    let report = super::super::check(file, None, &|_, _| {}).unwrap();
    // qemu-img check refuses such an image read-only: an error, exit 1.
    assert_eq!(report.exit_code(), 1, "{:?}", report.messages);
    assert_eq!(report.corruptions, 0, "the BAT as replayed is sound");
    let file = HostFile::open(&path, true).unwrap();
    let report = super::super::check(file, Some(Repair::All), &|_, _| {}).unwrap();
    assert_eq!((report.exit_code(), report.corruptions_fixed), (0, 1));
    assert!(header_in(&path, 0).unwrap().log_guid.is_nil());
    let file = HostFile::open(&path, false).unwrap();
    let report = super::super::check(file, None, &|_, _| {}).unwrap();
    assert_eq!(report.exit_code(), 0, "{:?}", report.messages);
    assert_qemu_check_clean(&path);
}
