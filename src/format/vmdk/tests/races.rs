//! Races replayed with a pause point: a reader parked between reading a grain table and
//! caching it while a writer allocates a grain in that table, flushes, and the table is
//! evicted.

use super::{create, qemu_io, try_open, KIB, MIB};
use crate::meta::table_cache::PAUSE_LOADED;
use crate::testutil::pause::Pause;
use crate::testutil::{assert_qemu_check_clean, TempDir};

/// The reader's copy of the table predates the allocation; cached after the eviction, it
/// would hide the new grain from reads, and the next write-back of the table would drop the
/// grain on disk while `qemu-img check` still finds no error.
#[test]
fn a_grain_table_read_before_an_allocation_and_its_eviction_is_not_cached() {
    let dir = TempDir::new();
    let path = dir.path().join("race.vmdk");
    // 1280 grain tables of 32 MiB, all preallocated by qemu-img; the cache keeps 1024.
    if create(&path, "subformat=monolithicSparse", "40G").is_none() {
        return;
    }
    qemu_io(&path, &["write -P 0x11 0 64k"]).unwrap();
    let img = try_open(&path, false).unwrap();
    let grain2 = 128 * KIB;
    let pause = Pause::new();
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            pause.arm(PAUSE_LOADED);
            img.read_at(&mut [0u8; 4096], grain2).unwrap();
        });
        pause.wait_parked();
        img.write_at(&[0xaa; 64 * KIB as usize], grain2).unwrap();
        img.flush().unwrap();
        // Touching 1100 other tables evicts the first one.
        for table in 1..=1100u64 {
            img.read_at(&mut [0u8; 1], table * 32 * MIB).unwrap();
        }
        pause.release();
        reader.join().unwrap();
    });
    let mut buf = vec![0u8; 64 * KIB as usize];
    img.read_at(&mut buf, grain2).unwrap();
    assert!(buf.iter().all(|&b| b == 0xaa), "the new grain reads back");
    // Another allocation in the same table writes it back again.
    img.write_at(&[0xbb; 64 * KIB as usize], grain2 + 64 * KIB)
        .unwrap();
    img.flush().unwrap();
    drop(img);
    qemu_io(
        &path,
        &[
            "read -P 0x11 0 64k",
            "read -P 0xaa 128k 64k",
            "read -P 0xbb 192k 64k",
        ],
    )
    .unwrap();
    assert_qemu_check_clean("vmdk", &path);
}
