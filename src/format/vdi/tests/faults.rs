//! Host faults under a VDI workload that allocates, flushes and allocates again
//! (`testutil::faults`): power lost after every write, every write, sync and read failing, the
//! disk full from every write on. The image must stay valid for `qemu-img check` and keep
//! what each successful flush acknowledged; a failed flush makes it read-only.

use super::*;
use crate::testutil::faults::{Oracle, Step, Walk};
use crate::testutil::qemu_io_on;

/// 16 blocks of 1 MiB in qemu-img's layout (bmap right after the header), blocks 0 and 5
/// allocated by QEMU.
fn image(dir: &TempDir) -> Option<PathBuf> {
    let path = qemu_create(dir, &[], "16M")?;
    qemu_io_on(
        "vdi",
        &path,
        &["write -P 0x11 0 64k", "write -P 0x12 5M 4k"],
    )?;
    Some(path)
}

/// New blocks (one across two), writes in place, a flush, a read back, more of both, a flush.
const STEPS: &[Step] = &[
    Step::Write(MIB + 100, 5000, 0x21),
    Step::Write(9 * MIB, 4096, 0x22),
    Step::Write(100, 1000, 0x23),
    Step::Flush,
    Step::Read(MIB, 8192),
    Step::Write(MIB + 200, 300, 0x31),
    Step::Write(12 * MIB - 1000, 3000, 0x32),
    Step::Write(5 * MIB + 4096, 512, 0x33),
    Step::Flush,
    Step::Read(12 * MIB - 2000, 5000),
];

/// Walks every host fault over `steps` on a fresh copy of `image`, checked by qemu-img.
fn walk(steps: &[Step]) {
    let dir = TempDir::in_memory();
    let Some(path) = image(&dir) else {
        return;
    };
    let open = |p: &Path| -> Arc<dyn Image> { Arc::new(open_rw(p)) };
    Walk {
        format: "vdi",
        files: vec![path],
        parents: Vec::new(),
        open: &open,
        steps,
        oracle: Oracle::Check,
    }
    .all();
}

#[test]
fn every_host_fault_leaves_a_valid_image_with_what_was_flushed() {
    walk(STEPS);
}

/// New blocks, a flush; a discard of two whole blocks in the middle of the file (punched in
/// place) and of the highest ones (released, the count drops), one after the other; a
/// partial one; writes in place and into a new block, which takes released space; a flush.
const DISCARD_STEPS: &[Step] = &[
    Step::Write(MIB, 3 * MIB as usize, 0x41),
    Step::Write(9 * MIB, 4096, 0x42),
    Step::Flush,
    Step::Discard(MIB, 2 * MIB),
    Step::Read(0, 4 * MIB as usize),
    Step::Discard(9 * MIB, MIB),
    Step::Discard(3 * MIB, MIB),
    Step::Discard(5 * MIB + 512, 1024),
    Step::Write(2 * MIB + 100, 5000, 0x43),
    Step::Write(10 * MIB, 4096, 0x44),
    Step::Flush,
    Step::Read(MIB, 10 * MIB as usize),
];

#[test]
fn every_host_fault_during_a_discard_leaves_a_valid_image() {
    walk(DISCARD_STEPS);
}
