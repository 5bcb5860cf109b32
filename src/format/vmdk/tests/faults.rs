//! Host faults under VMDK workloads that allocate, flush and allocate again
//! (`testutil::faults`): power lost after every write, every write, sync and read failing, the
//! disk full from every write on, for a monolithicSparse disk and for a disk split into two
//! sparse extents with a descriptor file of its own (the three files watched as one). The
//! disk must stay valid for `qemu-img check` and keep what each successful flush
//! acknowledged; a failed flush makes it read-only.

use std::sync::Arc;

use super::*;
use crate::testutil::faults::{Oracle, Step, Walk};

/// The byte offset of the directory that sector field `field` of the header names.
fn directory_at(bytes: &[u8], field: usize) -> usize {
    u64::from_le_bytes(bytes[field..field + 8].try_into().unwrap()) as usize * 512
}

/// An 8 MiB monolithicSparse disk over a parent full of 0x77 (so a grain lost reads as
/// neither its old nor its new bytes), whose only grain table is not in the directories yet
/// (as writers other than qemu-img leave them), so the first write allocates it.
fn monolithic(dir: &TempDir) -> Option<(PathBuf, PathBuf)> {
    let parent = dir.path().join("p.vmdk");
    create(&parent, "subformat=monolithicSparse", "8M")?;
    qemu_io(&parent, &["write -P 0x77 0 8M"])?;
    let path = dir.path().join("m.vmdk");
    run(
        "qemu-img",
        &format!(
            "create -q -f vmdk -o subformat=monolithicSparse -b p.vmdk -F vmdk {} 8M",
            p(&path)
        ),
    )?;
    let mut bytes = std::fs::read(&path).unwrap();
    for field in [48, 56] {
        let at = directory_at(&bytes, field);
        bytes[at..at + 4].fill(0);
    }
    std::fs::write(&path, &bytes).unwrap();
    Some((path, parent))
}

/// A 16 MiB disk of two 8 MiB sparse extents (qemu-img's twoGbMaxExtentSparse extents, put
/// under one descriptor), with data from QEMU in both.
fn split(dir: &TempDir) -> Option<Vec<PathBuf>> {
    let mut extents = Vec::new();
    let mut text = String::new();
    for name in ["a", "b"] {
        let made = dir.path().join(format!("{name}.vmdk"));
        create(&made, "subformat=twoGbMaxExtentSparse", "8M")?;
        text = std::fs::read_to_string(&made).unwrap();
        std::fs::remove_file(&made).unwrap();
        extents.push(dir.path().join(format!("{name}-s001.vmdk")));
    }
    let text = text.replace(
        "RW 16384 SPARSE \"b-s001.vmdk\"",
        "RW 16384 SPARSE \"a-s001.vmdk\"\nRW 16384 SPARSE \"b-s001.vmdk\"",
    );
    let path = dir.path().join("d.vmdk");
    std::fs::write(&path, text).unwrap();
    qemu_io(&path, &["write -P 0x11 0 64k", "write -P 0x12 9M 4k"])?;
    Some([vec![path], extents].concat())
}

fn open_rw(path: &Path) -> Arc<dyn Image> {
    try_open(path, false).unwrap()
}

/// A new grain table and grains (one write across two), a flush; writes in place, new grains
/// beside them (three whole ones in one host write), a flush.
const MONOLITHIC_STEPS: &[Step] = &[
    Step::Write(MIB + 100, 5000, 0x21),
    Step::Write(3 * MIB - 1000, 3000, 0x22),
    Step::Flush,
    Step::Read(MIB, 8192),
    Step::Write(MIB + 5100, 3000, 0x31),
    Step::Write(5 * MIB, 70_000, 0x32),
    Step::Write(6 * MIB - 100, 200_000, 0x34),
    Step::Write(100, 1000, 0x33),
    Step::Flush,
    Step::Read(3 * MIB - 2000, 5000),
    Step::Read(6 * MIB - 200, 200_200),
];

/// Walks every host fault over `steps` on the split disk, checked by qemu-img.
fn walk_split(steps: &[Step]) {
    let dir = TempDir::in_memory();
    let Some(files) = split(&dir) else {
        return;
    };
    Walk {
        format: "vmdk",
        files,
        parents: Vec::new(),
        open: &open_rw,
        steps,
        oracle: Oracle::Check,
    }
    .all();
}

#[test]
fn every_host_fault_leaves_a_valid_monolithic_disk_with_what_was_flushed() {
    let dir = TempDir::in_memory();
    let Some((path, parent)) = monolithic(&dir) else {
        return;
    };
    Walk {
        format: "vmdk",
        files: vec![path],
        parents: vec![parent],
        open: &open_rw,
        steps: MONOLITHIC_STEPS,
        oracle: Oracle::Check,
    }
    .all();
}

/// New grains in both extents (one write across them), a write in place, a flush; more of
/// both, a flush.
const SPLIT_STEPS: &[Step] = &[
    Step::Write(MIB + 100, 5000, 0x21),
    Step::Write(8 * MIB - 1000, 3000, 0x22),
    Step::Write(100, 1000, 0x23),
    Step::Flush,
    Step::Read(8 * MIB - 2000, 5000),
    Step::Write(9 * MIB + 10, 100, 0x31),
    Step::Write(12 * MIB, 4096, 0x32),
    Step::Write(2 * MIB, 4096, 0x33),
    Step::Flush,
    Step::Read(12 * MIB - 100, 5000),
];

#[test]
fn every_host_fault_leaves_a_valid_split_disk_with_what_was_flushed() {
    walk_split(SPLIT_STEPS);
}

/// New grains, a flush; discards of whole grains in both extents (version 1: punched, left
/// mapped), of a part of one and of grains never written; writes into a punched grain and a
/// new one, a flush.
const DISCARD_STEPS: &[Step] = &[
    Step::Write(MIB, 256 << 10, 0x41),
    Step::Flush,
    Step::Discard(MIB + (64 << 10), 128 << 10),
    Step::Discard(MIB + 1000, 2000),
    Step::Discard(9 * MIB - (64 << 10), 128 << 10),
    Step::Discard(6 * MIB, 64 << 10),
    Step::Read(MIB, 256 << 10),
    Step::Write(MIB + (64 << 10) + 100, 100, 0x42),
    Step::Write(13 * MIB, 4096, 0x43),
    Step::Flush,
    Step::Read(0, 2 * MIB as usize),
];

#[test]
fn every_host_fault_during_a_discard_leaves_a_valid_disk() {
    walk_split(DISCARD_STEPS);
}
