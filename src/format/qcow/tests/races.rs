//! Races replayed with a pause point: a reader parked between reading an L2 table and keeping
//! it while a writer allocates into that table, flushes, and the table is dropped from memory.

use super::*;
use crate::testutil::pause::Pause;

/// The reader's copy of the table predates the allocation; kept after the table was dropped,
/// it would hide the new cluster from reads, and the next write-back of the table would drop
/// the cluster's entry on disk.
#[test]
fn a_table_read_before_an_allocation_and_its_eviction_is_not_kept() {
    let dir = TempDir::new();
    let path = dir.path().join("race.qcow");
    let Some(()) = qemu_create(&path, "8M", None) else {
        return;
    };
    // L2 tables of 2 MiB (4 KiB clusters) for the first two ranges.
    qemu_io(&path, &["write -P 0x11 0 4k", "write -P 0x22 2M 4k"]).unwrap();
    let img = open_rw(&path, None);
    img.set_table_capacity(1);
    let c2 = 8192;
    let pause = Pause::new();
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            pause.arm(PAUSE_L2_READ);
            img.read_at(&mut [0u8; 4096], c2).unwrap();
        });
        pause.wait_parked();
        img.write_at(&[0xaa; 4096], c2).unwrap();
        // An allocation in the other table ends the first one's pin; once both are written
        // back, the first is dropped (room for one).
        img.write_at(&[0x33; 4096], 2 * MIB + 4096).unwrap();
        img.flush().unwrap();
        assert_eq!(
            img.read_tables().table_state(0).unwrap(),
            TableState::OnDisk(4096),
            "dropped"
        );
        pause.release();
        reader.join().unwrap();
    });
    let mut buf = [0u8; 4096];
    img.read_at(&mut buf, c2).unwrap();
    assert!(buf.iter().all(|&b| b == 0xaa), "the new cluster reads back");
    // Another allocation in the same table writes it back again.
    img.write_at(&[0xbb; 4096], c2 + 4096).unwrap();
    img.flush().unwrap();
    drop(img);
    qemu_io(
        &path,
        &[
            "read -P 0x11 0 4k",
            "read -P 0xaa 8k 4k",
            "read -P 0xbb 12k 4k",
            "read -P 0x33 2052k 4k",
        ],
    )
    .unwrap();
}
