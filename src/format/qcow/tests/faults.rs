//! Host faults under a QCOW v1 workload that allocates, flushes and allocates again
//! (`testutil::faults`): power lost after every write, every write, sync and read failing, the
//! disk full from every write on. qemu-img cannot check qcow v1 images, so QEMU reads each one
//! back and writes a cluster into it, which must land on no data.

use super::*;
use crate::testutil::faults::{Oracle, Step, Walk};

/// 8 MiB with 4 KiB clusters (2 MiB per L2 table): 64 KiB of compressed clusters at 0 and
/// one at 1 MiB, written by `qemu-img convert -c`.
fn image(dir: &TempDir) -> Option<PathBuf> {
    let raw = dir.path().join("src.raw");
    let mut bytes = vec![0u8; 8 * MIB as usize];
    bytes[..64 << 10].fill(0x11);
    bytes[MIB as usize..MIB as usize + 4096].fill(0x12);
    std::fs::write(&raw, &bytes).unwrap();
    let path = dir.path().join("f.qcow");
    qemu_compress(&raw, &path)?;
    std::fs::remove_file(&raw).unwrap();
    Some(path)
}

/// A new L2 table and clusters, compressed clusters rewritten (one wholly, one in part), a
/// flush; then clusters next to the new ones and two new tables, a flush.
const STEPS: &[Step] = &[
    Step::Write(2 * MIB + 100, 5000, 0x21),
    Step::Write(MIB + 10, 100, 0x22),
    Step::Write(8192, 4096, 0x23),
    Step::Flush,
    Step::Read(2 * MIB, 8192),
    Step::Write(2 * MIB + 5100, 3000, 0x31),
    Step::Write(6 * MIB - 100, 200, 0x32),
    Step::Write(MIB + 200, 100, 0x33),
    Step::Flush,
    Step::Read(6 * MIB - 4096, 8192),
];

/// Walks every host fault over `steps` on a fresh copy of `image`, QEMU reading and writing.
fn walk(steps: &[Step]) {
    let dir = TempDir::in_memory();
    let Some(path) = image(&dir) else {
        return;
    };
    let open = |p: &Path| -> Arc<dyn Image> { Arc::new(open_rw(p, None)) };
    Walk {
        format: "qcow",
        files: vec![path],
        parents: Vec::new(),
        open: &open,
        steps,
        oracle: Oracle::ReadAndWrite { fresh: 7 * MIB },
    }
    .all();
}

#[test]
fn every_host_fault_leaves_an_image_qemu_reads_with_what_was_flushed() {
    walk(STEPS);
}

/// New clusters, a flush; discards of whole clusters (punched, left mapped) and of a part of
/// one, of a compressed cluster and of clusters never written; writes into a punched cluster
/// and a new one, a flush.
const DISCARD_STEPS: &[Step] = &[
    Step::Write(2 * MIB, 64 << 10, 0x41),
    Step::Flush,
    Step::Discard(2 * MIB + 4096, 8192),
    Step::Discard(2 * MIB + 20_000, 1000),
    Step::Discard(0, 4096),
    Step::Discard(5 * MIB, 8192),
    Step::Read(2 * MIB, 64 << 10),
    Step::Write(2 * MIB + 4096, 100, 0x42),
    Step::Write(3 * MIB, 4096, 0x43),
    Step::Flush,
    Step::Read(0, 4 * MIB as usize),
];

#[test]
fn every_host_fault_during_a_discard_leaves_an_image_qemu_reads() {
    walk(DISCARD_STEPS);
}
