//! Races replayed with a pause point: a reader parked between reading an L2 slice and caching
//! it while a writer allocates into the same slice, flushes, and the slice is evicted.

use super::*;
use crate::meta::table_cache::PAUSE_LOADED;
use crate::testutil::assert_qemu_check_clean;
use crate::testutil::pause::Pause;

/// The reader's copy of the slice predates the allocation; cached after the eviction, it
/// would hide the new cluster from reads, and the next write-back of the slice would drop the
/// cluster's entry on disk.
#[test]
fn a_slice_read_before_an_allocation_and_its_eviction_is_not_cached() {
    let dir = TempDir::new();
    let path = dir.path().join("race.qcow2");
    let create = format!("create -q -f qcow2 -o cluster_size=4k {} 8M", p(&path));
    if run("qemu-img", &create).is_none() {
        return;
    }
    // Two L2 tables (2 MiB each at 4 KiB clusters), one slice each.
    qemu_io(&path, &["write -P 0x11 0 4k", "write -P 0x22 2M 4k"]).unwrap();
    let file = HostFile::open(&path, true).unwrap();
    let header = Qcow2Header::read(&file).unwrap();
    let parts = OpenParts {
        file,
        header,
        data_file: None,
        backing: None,
        read_only_reason: None,
    };
    // Room for one slice: loading the other table's evicts the first.
    let img = Qcow2Image::open_parts(parts, 4 * KIB).unwrap();
    let slice = img.l2_table_offset(0).unwrap().unwrap();
    let c2 = 8 * KIB;
    let pause = Pause::new();
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            pause.arm(PAUSE_LOADED);
            img.read_at(&mut [0u8; 4096], c2).unwrap();
        });
        pause.wait_parked();
        img.write_at(&[0xaa; 4096], c2).unwrap();
        img.flush().unwrap();
        img.read_at(&mut [0u8; 512], 2 * MIB).unwrap();
        assert!(img.shared.l2_cache.get(slice).is_none(), "evicted");
        pause.release();
        reader.join().unwrap();
    });
    let mut buf = [0u8; 4096];
    img.read_at(&mut buf, c2).unwrap();
    assert!(buf.iter().all(|&b| b == 0xaa), "the new cluster reads back");
    // Another allocation in the same slice writes it back again.
    img.write_at(&[0xbb; 4096], c2 + 4 * KIB).unwrap();
    img.flush().unwrap();
    drop(img);
    qemu_io(
        &path,
        &[
            "read -P 0x11 0 4k",
            "read -P 0xaa 8k 4k",
            "read -P 0xbb 12k 4k",
        ],
    )
    .unwrap();
    assert_qemu_check_clean("qcow2", &path);
}
