//! Tests of the QCOW v1 driver through the `Image` trait, with qemu-img / qemu-io as the oracle:
//! images written by QEMU (normal, compressed, with raw and qcow backing files) read back,
//! concurrent writes compared with `qemu-img compare`, write-back order and read-only images.
//! Corrupt and hostile images are in `hostile.rs`.

mod crash;
mod faults;
mod hostile;
mod races;
mod resize;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Barrier};

use super::*;
use crate::error::ErrorKind;
use crate::testutil::{
    assert_mutations_never_panic, exercise_image, qemu, qemu_io_on, qemu_raw_of, MemImage, Rng,
    TempDir,
};

const MIB: u64 = 1 << 20;

/// Runs a qemu tool that must succeed; `None` when it is missing outside CI.
fn qemu_ok<S: AsRef<OsStr>>(tool: &str, args: &[S]) -> Option<Output> {
    let out = qemu(tool, args)?;
    assert!(
        out.status.success(),
        "{tool} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(out)
}

/// `qemu-img create -f qcow [-b backing -F fmt] path size`.
fn qemu_create(path: &Path, size: &str, backing: Option<(&str, &str)>) -> Option<()> {
    let mut args: Vec<&OsStr> = ["create", "-q", "-f", "qcow"].map(OsStr::new).to_vec();
    if let Some((file, format)) = backing {
        args.extend(["-b", file, "-F", format].map(OsStr::new));
    }
    args.extend([path.as_os_str(), OsStr::new(size)]);
    qemu_ok("qemu-img", &args).map(|_| ())
}

/// Runs qemu-io commands on a qcow image; each must succeed.
fn qemu_io(path: &Path, commands: &[&str]) -> Option<()> {
    qemu_io_on("qcow", path, commands)
}

/// What QEMU reads from the image: `qemu-img convert -O raw`.
fn qemu_raw(path: &Path) -> Option<Vec<u8>> {
    qemu_raw_of(path, "-f qcow")
}

/// Asserts that QEMU reads exactly `expected` from the image (`qemu-img compare`).
fn assert_qemu_compare(path: &Path, expected: &[u8]) {
    crate::testutil::assert_qemu_compare_equal("qcow", path, expected);
}

fn try_open(path: &Path, backing: Option<Backing>) -> Result<QcowImage> {
    let file = HostFile::open(path, true)?;
    let header = QcowHeader::read(&file)?;
    QcowImage::open(file, header, backing, None)
}

fn open_rw(path: &Path, backing: Option<Backing>) -> QcowImage {
    try_open(path, backing).unwrap()
}

/// A raw backing file, served from memory.
fn raw_backing(path: &Path) -> Backing {
    let bytes = std::fs::read(path).unwrap();
    let image = MemImage::new(bytes.len(), None);
    image.write_at(&bytes, 0).unwrap();
    Backing::new(Arc::new(image), path)
}

/// Asserts two disk images are equal, naming the first difference instead of printing them.
#[track_caller]
fn assert_same(ours: &[u8], expected: &[u8], what: &str) {
    assert_eq!(ours.len(), expected.len(), "{what}: lengths differ");
    if let Some(first) = ours.iter().zip(expected).position(|(a, b)| a != b) {
        let differing = ours.iter().zip(expected).filter(|(a, b)| a != b).count();
        panic!(
            "{what}: {differing} bytes differ, the first at {first:#x} ({:#04x} instead of {:#04x})",
            ours[first], expected[first]
        );
    }
}

fn read_all(img: &dyn Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(&mut buf, 0).unwrap();
    buf
}

/// A raw file of `len` bytes: 64 KiB stretches of noise, of a repeated byte (compressible)
/// and of zeros, so `qemu-img convert -c` writes normal, compressed and no clusters.
fn mixed_raw(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut bytes = Vec::with_capacity(len);
    while bytes.len() < len {
        let piece = (64 << 10).min(len - bytes.len());
        match rng.below(3) {
            0 => bytes.extend(rng.bytes(piece)),
            1 => bytes.extend(std::iter::repeat_n(rng.next() as u8 | 1, piece)),
            _ => bytes.extend(std::iter::repeat_n(0, piece)),
        }
    }
    std::fs::write(path, &bytes).unwrap();
    bytes
}

/// `qemu-img convert -c -O qcow` of `raw` to `path`. qemu-img 10.0 exits 1 without a message
/// after converting to a compressed qcow v1 image (its final zero-length compressed write,
/// which pads qcow2 images, is refused by the qcow driver), so success is judged by comparing
/// the result with the source instead.
fn qemu_compress(raw: &Path, path: &Path) -> Option<()> {
    let out = qemu(
        "qemu-img",
        &[
            "convert".as_ref(),
            "-c".as_ref(),
            "-f".as_ref(),
            "raw".as_ref(),
            "-O".as_ref(),
            "qcow".as_ref(),
            raw.as_os_str(),
            path.as_os_str(),
        ],
    )?;
    assert!(
        out.status.success() || (out.stderr.is_empty() && path.exists()),
        "qemu-img convert -c: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let compare = qemu_ok(
        "qemu-img",
        &[
            "compare".as_ref(),
            "-f".as_ref(),
            "qcow".as_ref(),
            "-F".as_ref(),
            "raw".as_ref(),
            path.as_os_str(),
            raw.as_os_str(),
        ],
    )?;
    assert!(compare.status.success());
    Some(())
}

#[test]
fn reads_what_qemu_io_wrote() {
    let dir = TempDir::new();
    let path = dir.path().join("t.qcow");
    let Some(()) = qemu_create(&path, "9M", None) else {
        return;
    };
    qemu_io(
        &path,
        &[
            "write -P 0x5a 0 1M",
            "write -P 0x11 3000 5000",
            "write -P 0x22 2047k 8k",
            "write -P 0x33 8M 1M",
        ],
    )
    .unwrap();
    let img = open_rw(&path, None);
    assert_eq!(img.size(), 9 * MIB);
    let ours = read_all(&img);
    assert_same(&ours, &qemu_raw(&path).unwrap(), "qemu-img convert");
    assert!(ours[..3000].iter().all(|&b| b == 0x5a));
    assert!(ours[3000..8000].iter().all(|&b| b == 0x11));

    let extents = img.block_status(0, img.size()).unwrap();
    let data = |offset: u64| {
        extents
            .iter()
            .find(|e| e.offset <= offset && offset < e.offset + e.len)
            .unwrap()
            .state
    };
    assert_eq!(data(0), ExtentState::Data);
    assert_eq!(data(MIB + 4096), ExtentState::Unallocated);
    assert_eq!(data(2 * MIB), ExtentState::Data);
    assert_eq!(data(8 * MIB + 5), ExtentState::Data);
    assert_eq!(extents.iter().map(|e| e.len).sum::<u64>(), img.size());
    let info = img.info();
    assert_eq!((info.format, info.cluster_size), ("qcow", Some(4096)));
    // 1 MiB + 8 KiB (3 clusters over 2047k..2055k) + 1 MiB of 4 KiB clusters.
    assert_eq!(img.allocated_bytes(), 2 * MIB + 3 * 4096);
}

#[test]
fn reads_compressed_clusters_like_qemu() {
    let dir = TempDir::new();
    let raw = dir.path().join("src.raw");
    let source = mixed_raw(&raw, 3 * MIB as usize + 4096 * 5, 7);
    let path = dir.path().join("c.qcow");
    let Some(()) = qemu_compress(&raw, &path) else {
        return;
    };
    let img = open_rw(&path, None);
    assert_same(&read_all(&img), &source, "source");
    // Unaligned reads crossing compressed, normal and unallocated clusters.
    let mut rng = Rng(99);
    for _ in 0..200 {
        let offset = rng.below(img.size() - 1);
        let len = 1 + rng.below((img.size() - offset).min(20_000));
        let mut buf = vec![0u8; len as usize];
        img.read_at(&mut buf, offset).unwrap();
        assert_eq!(buf, &source[offset as usize..(offset + len) as usize]);
    }
    let compressed_only = img
        .block_status(0, img.size())
        .unwrap()
        .iter()
        .all(|e| e.layer == 0);
    assert!(compressed_only);
    assert!(std::fs::metadata(&path).unwrap().len() < source.len() as u64);
}

#[test]
fn reads_through_a_raw_backing_file() {
    let dir = TempDir::new();
    let base = dir.path().join("base.raw");
    let mut rng = Rng(3);
    std::fs::write(&base, rng.bytes(4 * MIB as usize)).unwrap();
    let path = dir.path().join("child.qcow");
    // Bigger than its backing file: the tail reads as zeros.
    let Some(()) = qemu_create(&path, "5M", Some(("base.raw", "raw"))) else {
        return;
    };
    qemu_io(
        &path,
        &[
            "write -P 0x11 1000 3000",
            "write -c -P 0x22 8192 512",
            "write -P 0x44 4095k 2k",
        ],
    )
    .unwrap();
    let file = HostFile::open(&path, true).unwrap();
    let header = QcowHeader::read(&file).unwrap();
    assert_eq!(header.backing_file(), Some(OsStr::new("base.raw")));
    // qemu-img picks 512-byte clusters and 32 KiB L2 tables for images with a backing file.
    assert_eq!((header.cluster_bits, header.l2_bits), (9, 12));
    let img = QcowImage::open(file, header, Some(raw_backing(&base)), None).unwrap();
    let ours = read_all(&img);
    assert_same(&ours, &qemu_raw(&path).unwrap(), "qemu-img convert");
    assert!(ours[5 * MIB as usize - 1000..].iter().all(|&b| b == 0));

    let extents = img.block_status(0, img.size()).unwrap();
    assert_eq!(
        (extents[0].offset, extents[0].len, extents[0].layer),
        (0, 512, 1)
    );
    assert_eq!((extents[1].offset, extents[1].layer), (512, 0));
    let last = extents.last().unwrap();
    assert_eq!(
        (last.offset, last.state),
        (4 * MIB + 1024, ExtentState::Unallocated),
        "the child's clusters end at 4097k, the backing file at 4M"
    );
    let info = img.info();
    assert!(info
        .details
        .contains(&("backing file", "base.raw".to_string())));
}

#[test]
fn reads_through_a_qcow_backing_file() {
    let dir = TempDir::new();
    let base = dir.path().join("base.qcow");
    let Some(()) = qemu_create(&base, "4M", None) else {
        return;
    };
    qemu_io(&base, &["write -P 0x77 0 2M", "write -c -P 0x78 3M 4k"]).unwrap();
    let path = dir.path().join("child.qcow");
    qemu_create(&path, "4M", Some(("base.qcow", "qcow"))).unwrap();
    qemu_io(&path, &["write -P 0x99 1M 4k"]).unwrap();

    let base_file = HostFile::open(&base, false).unwrap();
    let base_header = QcowHeader::read(&base_file).unwrap();
    let base_img =
        QcowImage::open(base_file, base_header, None, Some("backing file".into())).unwrap();
    assert_eq!(base_img.read_only_reason().as_deref(), Some("backing file"));
    let backing = Backing::new(Arc::new(base_img), &base);
    let img = open_rw(&path, Some(backing));
    assert_same(
        &read_all(&img),
        &qemu_raw(&path).unwrap(),
        "qemu-img convert",
    );
    let extents = img.block_status(0, 4 * MIB).unwrap();
    let layers: Vec<_> = extents
        .iter()
        .map(|e| (e.offset, e.len, e.state, e.layer))
        .collect();
    assert_eq!(
        layers,
        [
            (0, MIB, ExtentState::Data, 1),
            (MIB, 4096, ExtentState::Data, 0),
            (MIB + 4096, MIB - 4096, ExtentState::Data, 1),
            // Holes in the whole chain belong to no layer.
            (2 * MIB, MIB, ExtentState::Unallocated, 0),
            (3 * MIB, 4096, ExtentState::Data, 1),
            (3 * MIB + 4096, MIB - 4096, ExtentState::Unallocated, 0),
        ]
    );
}

/// Writes from `threads` threads at once: first small unaligned writes in interleaved
/// 1500-byte stripes (so neighbouring threads share clusters and race to allocate them),
/// then one large write per thread in its own region. Returns the model after all writes.
fn concurrent_writes(img: &Arc<QcowImage>, mut model: Vec<u8>, threads: u64) -> Vec<u8> {
    const STRIPE: u64 = 1500;
    let size = img.size();
    let barrier = Arc::new(Barrier::new(threads as usize));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (img, barrier) = (Arc::clone(img), Arc::clone(&barrier));
            std::thread::spawn(move || {
                let mut rng = Rng(0x1234_5678 + t);
                let mut small = Vec::new();
                let stripes = size / STRIPE;
                barrier.wait();
                for _ in 0..150 {
                    let stripe = rng.below(stripes / threads) * threads + t;
                    let start = stripe * STRIPE + rng.below(STRIPE - 1);
                    let len = 1 + rng.below(stripe * STRIPE + STRIPE - start);
                    let data = rng.bytes(len as usize);
                    img.write_at(&data, start).unwrap();
                    small.push((start, data));
                }
                barrier.wait();
                // One write of 40 KiB + a bit per thread, spread over the disk so that some
                // cross an L2 table boundary.
                let region = size / threads;
                let start = t * region + region / 2 - 20_000 + rng.below(1000);
                let len = 41_000 + rng.below(1000) as usize;
                let data = rng.bytes(len);
                img.write_at(&data, start).unwrap();
                (small, (start, data))
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    // The barrier orders all small writes before all large ones.
    let small = results.iter().flat_map(|(small, _)| small);
    for (start, data) in small.chain(results.iter().map(|(_, large)| large)) {
        model[*start as usize..*start as usize + data.len()].copy_from_slice(data);
    }
    model
}

/// Writes concurrently into the image at `path`, checks our reads before and after a flush and
/// a reopen, and has QEMU compare its contents with the model.
fn write_round_trip(path: &Path, backing: impl Fn() -> Option<Backing>) {
    let img = Arc::new(open_rw(path, backing()));
    let before = read_all(img.as_ref());
    let model = concurrent_writes(&img, before, 4);
    assert!(img.is_dirty());
    assert_same(&read_all(img.as_ref()), &model, "before flush");
    img.flush().unwrap();
    assert!(!img.is_dirty());
    assert_same(&read_all(img.as_ref()), &model, "after flush");
    drop(img);
    let img = open_rw(path, backing());
    assert_same(&read_all(&img), &model, "after reopen");
    drop(img);
    assert_qemu_compare(path, &model);
}

/// A disk of 32 L2 tables served with room for 4: reads and concurrent allocating writes all
/// over it stay correct while tables are dropped and read again, and memory stays bounded.
#[test]
fn a_small_table_cache_drops_clean_tables_and_keeps_working() {
    let dir = TempDir::new();
    let path = dir.path().join("big.qcow");
    let Some(()) = qemu_create(&path, "64M", None) else {
        return;
    };
    let fills: Vec<String> = (0..32)
        .map(|i| format!("write -P {} {} 5000", i + 1, i * 2 * MIB + 100_000))
        .collect();
    let fills: Vec<&str> = fills.iter().map(String::as_str).collect();
    qemu_io(&path, &fills).unwrap();
    let img = Arc::new(open_rw(&path, None));
    img.set_table_capacity(4);
    let expected = qemu_raw(&path).unwrap();
    assert_same(&read_all(img.as_ref()), &expected, "read with 4 tables");
    assert!(img.set_table_capacity(4) <= 4, "clean tables were dropped");
    let model = concurrent_writes(&img, expected, 4);
    assert_same(&read_all(img.as_ref()), &model, "before flush");
    img.flush().unwrap();
    assert_same(&read_all(img.as_ref()), &model, "after flush");
    assert!(
        img.set_table_capacity(4) <= 4,
        "flushed tables can be dropped"
    );
    drop(img);
    assert_qemu_compare(&path, &model);
}

#[test]
fn concurrent_writes_over_compressed_normal_and_unallocated_clusters() {
    let dir = TempDir::new();
    let raw = dir.path().join("src.raw");
    mixed_raw(&raw, 5 * MIB as usize, 11);
    let path = dir.path().join("w.qcow");
    let Some(()) = qemu_compress(&raw, &path) else {
        return;
    };
    write_round_trip(&path, || None);
}

#[test]
fn concurrent_writes_copy_up_from_a_backing_file() {
    let dir = TempDir::new();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, Rng(5).bytes(4 * MIB as usize)).unwrap();
    let path = dir.path().join("child.qcow");
    let Some(()) = qemu_create(&path, "5M", Some(("base.raw", "raw"))) else {
        return;
    };
    let compressed: Vec<String> = (0..64)
        .map(|i| format!("write -c -P {:#x} {} 512", i + 1, i * 7 * 4096))
        .collect();
    let mut commands: Vec<&str> = compressed.iter().map(String::as_str).collect();
    commands.extend(["write -P 0x11 1000 30000", "write -P 0x12 2M 100k"]);
    qemu_io(&path, &commands).unwrap();
    write_round_trip(&path, || Some(raw_backing(&base)));
}

#[test]
fn concurrent_writers_allocate_each_cluster_once() {
    const THREADS: u64 = 8;
    let dir = TempDir::new();
    let path = dir.path().join("t.qcow");
    let Some(()) = qemu_create(&path, "4M", None) else {
        return;
    };
    let len_before = std::fs::metadata(&path).unwrap().len();
    let img = Arc::new(open_rw(&path, None));
    for round in 0..16u64 {
        let barrier = Arc::new(Barrier::new(THREADS as usize));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (img, barrier) = (Arc::clone(&img), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    barrier.wait();
                    img.write_at(&[t as u8 + 1; 512], round * 4096 + t * 512)
                        .unwrap();
                })
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
    }
    img.flush().unwrap();
    drop(img);
    // One L2 table and sixteen clusters, each allocated once.
    let grown = std::fs::metadata(&path).unwrap().len();
    assert_eq!(grown, 4096 + 4096 + 16 * 4096, "from {len_before}");
    let mut model = vec![0u8; 4 * MIB as usize];
    for round in 0..16 {
        for t in 0..THREADS as usize {
            let at = round * 4096 + t * 512;
            model[at..at + 512].fill(t as u8 + 1);
        }
    }
    assert_qemu_compare(&path, &model);
}

#[test]
fn unflushed_allocations_are_not_referenced_on_disk() {
    let dir = TempDir::new();
    let path = dir.path().join("t.qcow");
    let Some(()) = qemu_create(&path, "4M", None) else {
        return;
    };
    let before = std::fs::read(&path).unwrap();
    let img = open_rw(&path, None);
    img.write_at(&[9; 100], 5000).unwrap();
    assert!(img.is_dirty());
    drop(img);
    let after = std::fs::read(&path).unwrap();
    assert_eq!(
        &after[..before.len()],
        &before[..],
        "header and L1 untouched"
    );
    assert_eq!(
        after.len(),
        3 * 4096,
        "the data cluster was written after the L2 space"
    );
    assert!(
        after[4096..8192].iter().all(|&b| b == 0),
        "the L2 table was not"
    );
    let img = open_rw(&path, None);
    assert!(read_all(&img).iter().all(|&b| b == 0));
}

#[test]
fn flush_writes_only_what_allocations_dirtied() {
    let dir = TempDir::new();
    let path = dir.path().join("t.qcow");
    let Some(()) = qemu_create(&path, "4M", None) else {
        return;
    };
    qemu_io(&path, &["write -P 0x5a 0 4k"]).unwrap();
    let img = open_rw(&path, None);
    img.read_at(&mut [0u8; 512], 0).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    // Garbage in the L1 padding and in an untouched sector of the (already loaded) L2 table
    // must survive: flush writes only dirty sectors.
    bytes[100] = 0x77;
    bytes[4096 + 3000] = 0x66;
    std::fs::write(&path, &bytes).unwrap();
    img.flush().unwrap();
    img.write_at(&[1; 10], 10).unwrap();
    img.flush().unwrap();
    bytes[8192 + 10..8192 + 20].fill(1);
    assert!(
        std::fs::read(&path).unwrap() == bytes,
        "in-place writes touch no metadata"
    );
    img.write_at(&[2; 10], 3 * 4096).unwrap();
    img.flush().unwrap();
    let after = std::fs::read(&path).unwrap();
    assert_eq!((after[100], after[4096 + 3000]), (0x77, 0x66));
    let entry = u64::from_be_bytes(after[4096 + 24..4096 + 32].try_into().unwrap());
    assert_eq!(
        entry,
        3 * 4096,
        "the new cluster went to the end of the file"
    );
}

#[test]
fn read_only_image_refuses_writes() {
    let dir = TempDir::new();
    let path = dir.path().join("t.qcow");
    let Some(()) = qemu_create(&path, "1M", None) else {
        return;
    };
    let file = HostFile::open(&path, false).unwrap();
    let header = QcowHeader::read(&file).unwrap();
    let img = QcowImage::open(file, header.clone(), None, Some("by request".into())).unwrap();
    let e = img.write_at(&[1; 10], 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
    assert!(e.to_string().contains("by request"), "{e}");
    img.flush().unwrap();
    assert_eq!(img.info().read_only_reason.as_deref(), Some("by request"));

    let file = HostFile::open(&path, false).unwrap();
    let img = QcowImage::open(file, header, None, None).unwrap();
    assert!(img.read_only_reason().is_some());
    assert_eq!(
        img.write_at(&[1; 10], 0).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
}

#[test]
fn qemu_reads_our_writes_into_its_image() {
    let dir = TempDir::new();
    let path = dir.path().join("t.qcow");
    let Some(()) = qemu_create(&path, "10M", None) else {
        return;
    };
    qemu_io(&path, &["write -P 0x5a 7M 64k", "write -c -P 0x5b 1M 4k"]).unwrap();
    let img = open_rw(&path, None);
    img.write_at(&[0xab; 4096], 0).unwrap();
    img.write_at(&[0xcd; 8192], 5 * MIB - 4096).unwrap();
    img.write_at(&[0xef; 512], 7 * MIB + 512).unwrap();
    img.write_at(&[0x01; 100], MIB + 100).unwrap();
    img.flush().unwrap();
    drop(img);
    qemu_io(
        &path,
        &[
            "read -P 0xab 0 4k",
            "read -P 0 4k 1020k",
            "read -P 0x5b 1M 100",
            "read -P 0x01 1048676 100",
            "read -P 0x5b 1048776 3896",
            "read -P 0xcd 5116k 8k",
            "read -P 0x5a 7M 512",
            "read -P 0xef 7340544 512",
        ],
    )
    .unwrap();
}

#[test]
fn discard_punches_mapped_clusters() {
    use crate::testutil::discard::{exercise_discard, DiscardCase};
    let dir = TempDir::new();
    let path = dir.path().join("d.qcow");
    if qemu_create(&path, "2M", None).is_none() {
        return;
    }
    let case = DiscardCase {
        format: "qcow",
        path: &path,
        unit: 4096,
        check: false,
        data_file: None,
    };
    exercise_discard(&case, &|p| Ok(std::sync::Arc::new(try_open(p, None)?)));
}

#[test]
fn discard_over_a_backing_file_reads_zeros() {
    let dir = TempDir::new();
    let base = dir.path().join("base.raw");
    let path = dir.path().join("top.qcow");
    std::fs::write(&base, vec![0x5a; 1 << 20]).unwrap();
    if qemu_create(&path, "1M", Some((base.to_str().unwrap(), "raw"))).is_none() {
        return;
    }
    let img = open_rw(&path, Some(raw_backing(&base)));
    img.write_at(&[0x11; 8192], 0).unwrap();
    img.discard(4096, 64 << 10).unwrap();
    let mut expected = vec![0x5a; 1 << 20];
    expected[..4096].fill(0x11);
    expected[4096..4096 + (64 << 10)].fill(0);
    img.flush().unwrap();
    drop(img);
    let img = open_rw(&path, Some(raw_backing(&base)));
    let mut got = vec![0; 1 << 20];
    img.read_at(&mut got, 0).unwrap();
    assert_same(&got, &expected, "after discard over a backing file");
    drop(img);
    assert_qemu_compare(&path, &expected);
}
