//! Host faults under a qcow2 workload that allocates, flushes and allocates again
//! (`testutil::faults`): power lost after every write, every write, sync and read failing, the
//! disk full from every write on. The workload allocates L2 tables and clusters, rewrites a
//! compressed cluster (a reference dropped after the flush) and grows the refcount table; the
//! image must stay valid for `qemu-img check` and keep what each successful flush
//! acknowledged, and a failed flush makes it read-only.

use super::*;
use crate::testutil::faults::{run_steps, Oracle, Step, Walk};

/// 4 MiB of 512-byte clusters with 64-bit refcounts, so one cluster of refcount table covers
/// 2 MiB of file: QEMU fills the first 1975 KiB of the disk, which leaves the file 14
/// clusters short of that, and compresses 2 KiB at 3 MiB.
fn image(dir: &TempDir) -> Option<PathBuf> {
    let path = dir.path().join("f.qcow2");
    let create = format!(
        "create -q -f qcow2 -o cluster_size=512,refcount_bits=64 {} 4M",
        p(&path)
    );
    run("qemu-img", &create)?;
    qemu_io(&path, &["write -P 0x11 0 1975k", "write -c -P 0x12 3M 2k"])?;
    let header = Qcow2Header::read(&HostFile::open(&path, false).unwrap()).unwrap();
    assert_eq!(header.refcount_table_clusters, 1);
    let left = (2 * MIB - std::fs::metadata(&path).unwrap().len()) / 512;
    assert_eq!(left, 14, "clusters left under the refcount table");
    Some(path)
}

/// A new L2 table and clusters, a compressed cluster rewritten, a write in place, a flush;
/// then clusters next to the new ones and a second new table whose clusters take the file
/// past what the refcount table covers, a flush.
const STEPS: &[Step] = &[
    Step::Write(2 * MIB + 100, 1500, 0x21),
    Step::Write(3 * MIB + 700, 300, 0x22),
    Step::Write(1000, 200, 0x23),
    Step::Flush,
    Step::Read(2 * MIB, 4096),
    Step::Write(2 * MIB + 1600, 2000, 0x31),
    Step::Write(3 * MIB + 512 * KIB, 4096, 0x32),
    Step::Flush,
    Step::Read(3 * MIB - 512, 5000),
    Step::Read(3 * MIB + 512 * KIB - 512, 5000),
];

fn open_rw(path: &Path) -> Arc<dyn Image> {
    let file = HostFile::open(path, true).unwrap();
    let header = Qcow2Header::read(&file).unwrap();
    Arc::new(Qcow2Image::open(file, header, None, None, None).unwrap())
}

/// Walks every host fault over `steps` on the image at `path`.
fn walk(path: PathBuf, steps: &[Step]) {
    let open = |p: &Path| open_rw(p);
    Walk {
        format: "qcow2",
        files: vec![path],
        parents: Vec::new(),
        open: &open,
        steps,
        oracle: Oracle::Check,
    }
    .all();
}

/// Walks every host fault over `steps` on an image with an internal snapshot.
fn walk_with_snapshot(steps: &[Step]) {
    let dir = TempDir::in_memory();
    if let Some(path) = image_with_snapshot(&dir) {
        walk(path, steps);
    }
}

#[test]
fn every_host_fault_leaves_a_valid_image_with_what_was_flushed() {
    let dir = TempDir::in_memory();
    let Some(path) = image(&dir) else {
        return;
    };
    // The workload does grow the refcount table (on a copy).
    let copy = dir.path().join("copy.qcow2");
    std::fs::copy(&path, &copy).unwrap();
    run_steps(open_rw(&copy).as_ref(), STEPS);
    let header = Qcow2Header::read(&HostFile::open(&copy, false).unwrap()).unwrap();
    assert_eq!(header.refcount_table_clusters, 2);
    walk(path, STEPS);
}

/// 1 MiB of 4 KiB clusters whose data QEMU wrote before taking an internal snapshot, so the
/// L1 entries, L2 tables and clusters are shared with it (refcount 2, COPIED clear).
fn image_with_snapshot(dir: &TempDir) -> Option<PathBuf> {
    let path = dir.path().join("s.qcow2");
    run(
        "qemu-img",
        &format!("create -q -f qcow2 -o cluster_size=4k {} 1M", p(&path)),
    )?;
    qemu_io(&path, &["write -P 0x41 0 1M"])?;
    run("qemu-img", &format!("snapshot -c snap {}", p(&path)))?;
    Some(path)
}

/// Writes into clusters and an L2 table shared with a snapshot: the table is copied and the
/// clusters with it, and the references they held are dropped after the flush.
const SNAPSHOT_STEPS: &[Step] = &[
    Step::Write(5000, 1000, 0x51),
    Step::Write(64 * KIB, 4096, 0x52),
    Step::Flush,
    Step::Write(5500, 100, 0x61),
    Step::Write(512 * KIB + 10, 3000, 0x62),
    Step::Flush,
    Step::Read(0, 16 * KIB as usize),
];

#[test]
fn every_host_fault_while_copying_from_a_snapshot_keeps_its_refcounts() {
    walk_with_snapshot(SNAPSHOT_STEPS);
}

/// Discards over clusters shared with a snapshot (the L2 table copied, references dropped)
/// and over the image's own new clusters (freed and punched in the flush), a partial one, then
/// writes that reuse the freed clusters.
const DISCARD_STEPS: &[Step] = &[
    Step::Write(256 * KIB, 64 * KIB as usize, 0x71),
    Step::Flush,
    Step::Discard(0, 16 * KIB),
    Step::Discard(256 * KIB, 32 * KIB),
    Step::Discard(300 * KIB + 100, 1000),
    Step::Flush,
    Step::Write(600 * KIB, 16 * KIB as usize, 0x72),
    Step::Flush,
    Step::Read(0, 320 * KIB as usize),
];

#[test]
fn every_host_fault_during_a_discard_keeps_refcounts_and_data() {
    walk_with_snapshot(DISCARD_STEPS);
}

/// The host faults again on a LUKS-encrypted image, whose writes of partial sectors read,
/// decrypt, merge and encrypt them again: what a flush acknowledged must survive, decrypted
/// by QEMU, and the image must stay valid.
#[test]
fn every_host_fault_leaves_an_encrypted_image_valid_with_what_was_flushed() {
    use crate::meta::keyring::testing::use_passphrases;
    use crate::testutil::encrypted::{create_encrypted, qemu_uses_passphrase};
    let dir = TempDir::in_memory();
    let path = dir.path().join("e.qcow2");
    let fill = ["write -P 0x11 0 300k"];
    if create_encrypted("qcow2", &path, "luks", "faults", "1M", &fill).is_none() {
        return;
    }
    use_passphrases(&[b"faults"]);
    qemu_uses_passphrase("faults");
    let steps = [
        Step::Write(1000, 200, 0x21),
        Step::Write(512 * KIB + 100, 70_000, 0x22),
        Step::Flush,
        Step::Read(0, 4096),
        Step::Write(512 * KIB + 70_050, 10, 0x23),
        Step::Discard(64 * KIB, 64 * KIB),
        Step::Flush,
        Step::Read(512 * KIB, 80_000),
    ];
    walk(path, &steps);
}
