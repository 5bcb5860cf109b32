//! Host faults under VHD workloads that allocate, flush, discard and allocate again
//! (`testutil::faults`): power lost after every write, every write, sync and read failing, the
//! disk full from every write on. qemu-img cannot check VHD, so QEMU reads each state back and
//! writes a block into it, which must land on no data; a failed metadata write or sync makes
//! the disk read-only.

use super::*;
use crate::testutil::faults::{Oracle, Step, Walk};

/// A 16 MiB dynamic disk (2 MiB blocks, force_size), blocks 0 and 2 allocated by QEMU.
fn image(dir: &TempDir) -> Option<PathBuf> {
    let path = create(dir, "f.vhd", "force_size=on", 16 * MIB)?;
    qemu_io(&path, &["write -P 0x11 0 64k", "write -P 0x12 5M 4k"]);
    Some(path)
}

/// New blocks (one write across two), writes in place, a flush; a discard of a whole block
/// and of a part of one; more of both, a flush.
const STEPS: &[Step] = &[
    Step::Write(2 * MIB + 100, 5000, 0x21),
    Step::Write(8 * MIB - 1000, 3000, 0x22),
    Step::Write(100, 1000, 0x23),
    Step::Flush,
    Step::Read(2 * MIB, 8192),
    Step::Discard(6 * MIB, 2 * MIB),
    Step::Discard(2 * MIB + 1000, 2000),
    Step::Write(2 * MIB + 5100, 3000, 0x31),
    Step::Write(10 * MIB, 4096, 0x32),
    Step::Write(5 * MIB + 4096, 512, 0x33),
    Step::Flush,
    Step::Read(8 * MIB - 2000, 5000),
];

#[test]
fn every_host_fault_leaves_a_disk_qemu_reads_with_what_was_flushed() {
    let dir = TempDir::in_memory();
    let Some(path) = image(&dir) else {
        return;
    };
    let open = |p: &Path| -> Arc<dyn Image> { Arc::new(open_rw(p)) };
    Walk {
        format: "vpc",
        files: vec![path],
        parents: Vec::new(),
        open: &open,
        steps: STEPS,
        oracle: Oracle::ReadAndWrite { fresh: 14 * MIB },
    }
    .all();
}
