//! Host faults under VHDX workloads that allocate, flush and allocate again
//! (`testutil::faults`): power lost after every write, every write, sync and read failing, the
//! disk full from every write on, for a dynamic and a differencing image. Wherever the log was
//! left, QEMU and imgfs must replay it to the same disk, holding what each successful flush
//! acknowledged; `qemu-img check` must pass on the dynamic image after either replay; a failed
//! flush makes the image read-only.

use std::sync::Arc;

use super::super::header::MIB;
use super::differencing::{open_child, parent_and_child};
use super::*;
use crate::testutil::faults::{Oracle, Step, Walk};
use crate::testutil::TempDir;

/// Blocks written whole and in part (one write across two), a flush; writes in place and new
/// blocks, a flush.
const STEPS: &[Step] = &[
    Step::Write(MIB + 100, 5000, 0x21),
    Step::Write(4 * MIB - 1000, 3000, 0x22),
    Step::Write(100, 1000, 0x23),
    Step::Flush,
    Step::Read(MIB, 8192),
    Step::Write(MIB + 5100, 3000, 0x31),
    Step::Write(6 * MIB + 511, 2, 0x32),
    Step::Write(3 * MIB, 4096, 0x33),
    Step::Flush,
    Step::Read(4 * MIB - 2000, 5000),
];

/// Walks every host fault over `steps` on a dynamic image, replayed by QEMU and imgfs.
fn walk_dynamic(steps: &[Step]) {
    let dir = TempDir::in_memory();
    let Some(path) = create(&dir, "d.vhdx", "block_size=1M,log_size=1M", 8 * MIB) else {
        return;
    };
    qemu_io(&path, &["write -P 0x11 0 64k".into()]);
    let open = |p: &Path| -> Arc<dyn Image> { Arc::new(open_rw(p)) };
    Walk {
        format: "vhdx",
        files: vec![path],
        parents: Vec::new(),
        open: &open,
        steps,
        oracle: Oracle::Replay,
    }
    .all();
}

#[test]
fn every_host_fault_leaves_a_dynamic_image_both_replay_alike() {
    walk_dynamic(STEPS);
}

#[test]
fn every_host_fault_leaves_a_differencing_image_both_replay_alike() {
    let dir = TempDir::in_memory();
    let Some((parent, child)) = parent_and_child(&dir) else {
        return;
    };
    let open = |p: &Path| -> Arc<dyn Image> { Arc::new(open_child(&parent, p)) };
    let replayed = |p: &Path| current(p).0.log_guid.is_nil();
    Walk {
        format: "vhdx",
        files: vec![child],
        parents: vec![parent.clone()],
        open: &open,
        steps: STEPS,
        oracle: Oracle::ReplayOnly {
            replayed: &replayed,
        },
    }
    .all();
}

/// New blocks, a flush, whole blocks discarded (BAT entries to PAYLOAD_BLOCK_ZERO, blocks
/// punched) and a partial one, new blocks again, a flush.
const DISCARD_STEPS: &[Step] = &[
    Step::Write(MIB, 3 * MIB as usize, 0x41),
    Step::Flush,
    Step::Discard(MIB, 2 * MIB),
    Step::Discard(3 * MIB + 100, 1000),
    Step::Read(0, 4 * MIB as usize),
    Step::Write(6 * MIB, 4096, 0x42),
    Step::Flush,
    Step::Read(MIB, 6 * MIB as usize),
];

#[test]
fn every_host_fault_during_a_discard_leaves_an_image_both_replay_alike() {
    walk_dynamic(DISCARD_STEPS);
}
