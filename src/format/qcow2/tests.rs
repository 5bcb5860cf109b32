//! Tests of the qcow2 driver through the `Image` trait: images of every kind qemu-img makes,
//! read whole and compared with `qemu-img convert -O raw`; snapshots, backing files, external
//! data files, corrupt and hostile images.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::header::testing::{put_u32, put_u64};
use super::*;
use crate::error::ErrorKind;
use crate::testutil::{
    assert_mutations_never_panic, exercise_image, path_str as p, qemu, qemu_io_on,
    qemu_raw_of as qemu_raw, qemu_run as run, MemImage, Rng, TempDir,
};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn qemu_io(path: &Path, commands: &[&str]) -> Option<()> {
    qemu_io_on("qcow2", path, commands)
}

fn try_open_with(path: &Path, backing: Option<Backing>) -> Result<Qcow2Image> {
    let file = HostFile::open(path, false)?;
    let header = Qcow2Header::read(&file)?;
    let data_file = match header.data_file() {
        Some(name) => Some(HostFile::open(
            &path.parent().unwrap().join(Path::new(name)),
            false,
        )?),
        None => None,
    };
    Qcow2Image::open(file, header, data_file, backing, None)
}

fn open(path: &Path) -> Qcow2Image {
    try_open_with(path, None).unwrap()
}

/// Opens `path` for writing, without a backing file or data file.
fn open_writable(path: &Path) -> Qcow2Image {
    let file = HostFile::open(path, true).unwrap();
    let header = Qcow2Header::read(&file).unwrap();
    Qcow2Image::open(file, header, None, None, None).unwrap()
}

fn read_all(img: &dyn Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(&mut buf, 0).unwrap();
    buf
}

/// Asserts that two disk images are equal, naming the first differing offset.
fn assert_same(ours: &[u8], expected: &[u8], what: &str) {
    assert_eq!(ours.len(), expected.len(), "{what}: size");
    if let Some(at) = ours.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at {at:#x}: ours {:#x}, qemu {:#x}",
            ours[at], expected[at]
        );
    }
}

/// Reads the whole image in pieces of `chunk` bytes and compares with qemu-img's view.
fn assert_reads_like_qemu(img: &dyn Image, path: &Path, extra: &str, what: &str) {
    if let Some(expected) = qemu_raw(path, extra) {
        assert_reads(img, &expected, what);
    }
}

/// Reads the whole image, then again in odd-sized pieces crossing cluster and subcluster
/// boundaries, and compares with `expected`.
fn assert_reads(img: &dyn Image, expected: &[u8], what: &str) {
    assert_same(&read_all(img), expected, what);
    let mut at = 0u64;
    let mut len = 1usize;
    while at < img.size() {
        let n = len.min((img.size() - at) as usize);
        let mut buf = vec![0u8; n];
        img.read_at(&mut buf, at).unwrap();
        assert_same(&buf, &expected[at as usize..at as usize + n], what);
        at += n as u64;
        len = len * 3 + 1000;
    }
}

fn fill_commands() -> Vec<&'static str> {
    vec![
        "write -P 0x11 0 64k",
        "write -P 0x22 100k 300k",
        "write -P 0x33 1M 4k",
        "write -z 2M 128k",
        "write -P 0x44 3M 256k",
        "write -z 3136k 64k",
        "write -P 0x55 5M 512",
        "write -P 0x66 8191k 1k",
    ]
}

/// Creates an 8 MiB qcow2 image with `options`, fills it with qemu-io, and checks every byte.
fn matrix_case(options: &str) {
    let dir = TempDir::new();
    let path = dir.path().join("m.qcow2");
    let create = format!("create -q -f qcow2 -o {options} {} 8M", p(&path));
    if run("qemu-img", &create).is_none() {
        return;
    }
    qemu_io(&path, &fill_commands()).unwrap();
    let img = open(&path);
    assert_eq!(img.size(), 8 * MIB);
    assert_reads_like_qemu(&img, &path, "", options);
    let e = img.write_at(&[1], 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
    assert!(e.to_string().contains("opened read-only"), "{e}");
}

#[test]
fn compat_0_10_64k() {
    matrix_case("compat=0.10");
}

#[test]
fn compat_1_1_512_byte_clusters() {
    matrix_case("compat=1.1,cluster_size=512");
}

#[test]
fn compat_1_1_4k_clusters() {
    matrix_case("compat=1.1,cluster_size=4k");
}

#[test]
fn compat_1_1_2m_clusters() {
    matrix_case("compat=1.1,cluster_size=2M");
}

#[test]
fn compat_0_10_512_byte_clusters() {
    matrix_case("compat=0.10,cluster_size=512");
}

#[test]
fn refcount_bits_1_and_64() {
    matrix_case("refcount_bits=1");
    matrix_case("refcount_bits=64,cluster_size=4k");
}

#[test]
fn extended_l2_subclusters() {
    matrix_case("extended_l2=on");
    matrix_case("extended_l2=on,cluster_size=2M");
}

#[test]
fn zero_clusters_hide_data_and_report_zero() {
    let dir = TempDir::new();
    let path = dir.path().join("z.qcow2");
    if run("qemu-img", &format!("create -q -f qcow2 {} 1M", p(&path))).is_none() {
        return;
    }
    qemu_io(
        &path,
        &[
            "write -P 0x11 0 256k",
            "write -z 64k 128k",
            "write -z -u 512k 64k",
        ],
    )
    .unwrap();
    let img = open(&path);
    assert_reads_like_qemu(&img, &path, "", "zero clusters");
    let status = img.block_status(0, MIB).unwrap();
    // Data clusters say where they are stored; zero and unallocated ones do not.
    for extent in &status {
        assert_eq!(extent.host.is_some(), extent.state == ExtentState::Data);
    }
    let status: Vec<Extent> = status
        .into_iter()
        .map(|e| Extent { host: None, ..e })
        .collect();
    let e = |offset, len, state| Extent {
        offset,
        len,
        state,
        layer: 0,
        host: None,
    };
    assert_eq!(
        status,
        [
            e(0, 64 * KIB, ExtentState::Data),
            e(64 * KIB, 128 * KIB, ExtentState::Zero),
            e(192 * KIB, 64 * KIB, ExtentState::Data),
            e(256 * KIB, 256 * KIB, ExtentState::Unallocated),
            e(512 * KIB, 64 * KIB, ExtentState::Zero),
            e(576 * KIB, 448 * KIB, ExtentState::Unallocated),
        ]
    );
    assert!(img.block_status(MIB, 10).unwrap().is_empty());
    let info = img.info();
    assert_eq!(
        (info.format, info.subformat.as_str()),
        ("qcow2", "compat 1.1")
    );
    assert_eq!(info.cluster_size, Some(64 * KIB));
    assert!(info.allocated_bytes > 0);
    let reason = info.read_only_reason.unwrap();
    assert!(reason.contains("opened read-only"), "{reason}");
}

/// A qcow2 source filled by `fill_commands`, converted with `convert_options`.
fn compressed_case(convert_options: &str, expected_type: CompressionType) {
    let dir = TempDir::new();
    let src = dir.path().join("src.qcow2");
    let path = dir.path().join("c.qcow2");
    if run("qemu-img", &format!("create -q -f qcow2 {} 8M", p(&src))).is_none() {
        return;
    }
    qemu_io(&src, &fill_commands()).unwrap();
    run(
        "qemu-img",
        &format!(
            "convert -c -O qcow2 {convert_options} {} {}",
            p(&src),
            p(&path)
        ),
    )
    .unwrap();
    let img = open(&path);
    assert_eq!(img.header().compression_type, expected_type);
    assert_reads_like_qemu(&img, &path, "", convert_options);
    let status = img.block_status(0, 64 * KIB).unwrap();
    assert_eq!(status[0].state, ExtentState::Data);
}

#[test]
fn zlib_compressed_clusters() {
    compressed_case("", CompressionType::Zlib);
    compressed_case("-o cluster_size=4k", CompressionType::Zlib);
    compressed_case("-o cluster_size=2M", CompressionType::Zlib);
}

#[test]
fn zstd_compressed_clusters() {
    compressed_case("-o compression_type=zstd", CompressionType::Zstd);
    compressed_case(
        "-o compression_type=zstd,extended_l2=on",
        CompressionType::Zstd,
    );
}

#[test]
fn external_data_file_plain_and_raw() {
    for raw in ["off", "on"] {
        let dir = TempDir::new();
        let path = dir.path().join("x.qcow2");
        let data = dir.path().join("x.data");
        let create = format!(
            "create -q -f qcow2 -o data_file={},data_file_raw={raw} {} 8M",
            p(&data),
            p(&path)
        );
        if run("qemu-img", &create).is_none() {
            return;
        }
        qemu_io(&path, &fill_commands()).unwrap();
        let img = open(&path);
        assert_eq!(img.header().data_file(), Some(data.as_os_str()));
        assert_eq!(img.header().data_file_raw(), raw == "on");
        assert_reads_like_qemu(&img, &path, "", raw);
        let details = img.info().details;
        assert!(details.contains(&("data file", p(&data).to_string())));

        // Without the data file the image cannot be served.
        let file = HostFile::open(&path, false).unwrap();
        let header = Qcow2Header::read(&file).unwrap();
        let e = Qcow2Image::open(file, header, None, None, None)
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
    }
}

fn mem_backing(bytes: &[u8], path: &Path) -> Backing {
    let image = MemImage::new(bytes.len(), None);
    image.write_at(bytes, 0).unwrap();
    Backing::new(Arc::new(image), path)
}

#[test]
fn raw_backing_file_shows_through_unallocated_clusters_only() {
    let dir = TempDir::new();
    let base = dir.path().join("base.raw");
    let path = dir.path().join("top.qcow2");
    // The base is shorter than the top: the rest reads as zeros.
    let base_bytes: Vec<u8> = (0..6 * MIB).map(|i| (i / 4096 % 200 + 1) as u8).collect();
    std::fs::write(&base, &base_bytes).unwrap();
    let create = format!("create -q -f qcow2 -b {} -F raw {} 8M", p(&base), p(&path));
    if run("qemu-img", &create).is_none() {
        return;
    }
    qemu_io(&path, &fill_commands()).unwrap();
    let img = try_open_with(&path, Some(mem_backing(&base_bytes, &base))).unwrap();
    assert_eq!(img.header().backing_file(), Some(base.as_os_str()));
    assert_eq!(img.header().backing_format(), Some("raw"));
    assert_reads_like_qemu(&img, &path, "", "raw backing");
    // Zero clusters hide the backing file; unallocated ones show it as layer 1.
    let status = img.block_status(2 * MIB, 192 * KIB).unwrap();
    assert_eq!(
        (status[0].state, status[0].len, status[0].layer),
        (ExtentState::Zero, 128 * KIB, 0)
    );
    assert_eq!((status[1].state, status[1].layer), (ExtentState::Data, 1));
    let tail = img.block_status(7 * MIB, MIB).unwrap();
    assert_eq!(tail[0].state, ExtentState::Unallocated);
}

#[test]
fn qcow2_backing_with_extended_l2_subclusters() {
    let dir = TempDir::new();
    let base = dir.path().join("base.qcow2");
    let path = dir.path().join("top.qcow2");
    if run("qemu-img", &format!("create -q -f qcow2 {} 4M", p(&base))).is_none() {
        return;
    }
    qemu_io(&base, &["write -P 0x77 0 4M"]).unwrap();
    let create = format!(
        "create -q -f qcow2 -o extended_l2=on -b {} -F qcow2 {} 4M",
        p(&base),
        p(&path)
    );
    run("qemu-img", &create).unwrap();
    // 2 KiB subclusters: partial writes, a zeroed subcluster, unallocated gaps between.
    qemu_io(
        &path,
        &[
            "write -P 0x01 0 2k",
            "write -P 0x02 6k 3k",
            "write -z 16k 2k",
            "write -P 0x03 70k 1",
            "write -z 1M 64k",
        ],
    )
    .unwrap();
    let base_img = Arc::new(open(&base));
    let img = try_open_with(&path, Some(Backing::new(base_img, &base))).unwrap();
    assert_reads_like_qemu(&img, &path, "", "extended l2 over qcow2");
    let status = img.block_status(0, 20 * KIB).unwrap();
    let summary: Vec<(u64, u64, ExtentState, u32)> = status
        .iter()
        .map(|e| (e.offset / KIB, e.len / KIB, e.state, e.layer))
        .collect();
    assert_eq!(
        summary,
        [
            (0, 2, ExtentState::Data, 0),
            (2, 4, ExtentState::Data, 1),
            (6, 4, ExtentState::Data, 0),
            (10, 6, ExtentState::Data, 1),
            (16, 2, ExtentState::Zero, 0),
            (18, 2, ExtentState::Data, 1),
        ]
    );
}

#[test]
fn internal_snapshots_read_like_qemu() {
    let dir = TempDir::new();
    let path = dir.path().join("s.qcow2");
    if run("qemu-img", &format!("create -q -f qcow2 {} 4M", p(&path))).is_none() {
        return;
    }
    qemu_io(&path, &["write -P 0x01 0 1M", "write -z 2M 64k"]).unwrap();
    run("qemu-img", &format!("snapshot -c s1 {}", p(&path))).unwrap();
    qemu_io(&path, &["write -P 0x02 512k 1M", "write -P 0x03 2M 4k"]).unwrap();
    run("qemu-img", &format!("snapshot -c second {}", p(&path))).unwrap();
    qemu_io(&path, &["write -z 0 64k", "write -P 0x04 3M 1M"]).unwrap();

    let img = open(&path);
    let names: Vec<&str> = img.snapshots().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["s1", "second"]);
    let s1 = &img.snapshots()[0];
    assert_eq!(
        (s1.id.as_str(), s1.disk_size, s1.vm_state_size),
        ("1", 4 * MIB, 0)
    );
    assert!(s1.date_sec > 1_600_000_000);
    assert_reads_like_qemu(&img, &path, "", "active");
    for (index, name) in ["s1", "second"].iter().enumerate() {
        let snap = img.snapshot_image(index).unwrap();
        assert_reads_like_qemu(&snap, &path, &format!("-l snapshot.name={name}"), name);
        assert!(snap
            .read_only_reason()
            .unwrap()
            .contains("served read-only"));
        assert!(snap.write_at(&[1], 0).is_err());
        assert!(snap
            .info()
            .details
            .iter()
            .any(|(k, v)| *k == "snapshot" && v.starts_with(name)));
    }
    assert_eq!(
        img.snapshot_image(2).err().unwrap().kind(),
        ErrorKind::OutOfRange
    );
    let details = img.info().details;
    assert!(details.contains(&("snapshots", "2: s1, second".to_string())));

    // A broken snapshot L1 offset fails that snapshot only.
    let mut bytes = std::fs::read(&path).unwrap();
    let table = be64(&bytes, 64) as usize;
    let l1 = be64(&bytes, table);
    put_u64(&mut bytes, table, l1 + 512);
    let bad = dir.path().join("bad.qcow2");
    std::fs::write(&bad, &bytes).unwrap();
    let img = open(&bad);
    let e = img.snapshot_image(0).err().unwrap();
    let text = e.to_string();
    assert!(
        text.contains("snapshot \"s1\" (0) l1_table_offset") && text.contains("not aligned"),
        "{text}"
    );
    assert!(text.contains(&format!("(at offset {table:#x})")), "{text}");
    assert!(img.snapshot_image(1).is_ok());
    assert_reads_like_qemu(&img, &path, "", "active of bad");
}

#[test]
fn dirty_lazy_refcounts_image_reads() {
    let dir = TempDir::new();
    let path = dir.path().join("d.qcow2");
    let create = format!("create -q -f qcow2 -o lazy_refcounts=on {} 4M", p(&path));
    if run("qemu-img", &create).is_none() {
        return;
    }
    // qemu-io killed by its own signal leaves the dirty bit set.
    let out = Command::new("qemu-io")
        .args(["-c", "write -P 0x5a 64k 128k", "-c", "sigraise 9"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let img = open(&path);
    assert!(img.header().is_dirty() && img.header().lazy_refcounts());
    let mut buf = vec![0u8; 128 * KIB as usize];
    img.read_at(&mut buf, 64 * KIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    let details = img.info().details;
    assert!(details.contains(&("dirty", "yes".to_string())));
    assert!(details.contains(&("lazy refcounts", "yes".to_string())));
}

#[test]
fn parallel_readers_through_a_tiny_cache() {
    let dir = TempDir::new();
    let src = dir.path().join("src.qcow2");
    let path = dir.path().join("par.qcow2");
    let create = format!("create -q -f qcow2 -o cluster_size=4k {} 32M", p(&src));
    if run("qemu-img", &create).is_none() {
        return;
    }
    let writes: Vec<String> = (0..64u64)
        .map(|i| {
            format!(
                "write -P {} {} {}",
                i + 1,
                i * 509 * KIB,
                4 * KIB + i * 1000
            )
        })
        .collect();
    let commands: Vec<&str> = writes.iter().map(String::as_str).collect();
    qemu_io(&src, &commands).unwrap();
    // Half the clusters compressed: convert -c, then overwrite some of them plainly.
    let convert = format!(
        "convert -c -O qcow2 -o cluster_size=4k {} {}",
        p(&src),
        p(&path)
    );
    run("qemu-img", &convert).unwrap();
    qemu_io(&path, &["write -P 0xee 8M 3M", "write -z 20M 1M"]).unwrap();
    let expected = Arc::new(qemu_raw(&path, "").unwrap());

    let file = HostFile::open(&path, false).unwrap();
    let header = Qcow2Header::read(&file).unwrap();
    let parts = OpenParts {
        file,
        header,
        data_file: None,
        backing: None,
        read_only_reason: None,
    };
    // Two 4 KiB slices for 32 MiB of 4 KiB clusters: constant eviction.
    let img = Arc::new(Qcow2Image::open_parts(parts, 8 * KIB).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (img, expected) = (Arc::clone(&img), Arc::clone(&expected));
            std::thread::spawn(move || {
                let mut state = 0x2545_f491_4f6c_dd1d_u64 ^ t;
                for _ in 0..300 {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let len = (state % (300 * KIB)) as usize + 1;
                    let at = (state >> 20) % (32 * MIB - len as u64);
                    let mut buf = vec![0u8; len];
                    img.read_at(&mut buf, at).unwrap();
                    let want = &expected[at as usize..at as usize + len];
                    assert!(buf == want, "thread {t}: read {len} at {at:#x} differs");
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|h| h.join().unwrap());
    assert!(img.shared.l2_cache.stats().entries <= 2);
}

/// The host offset of the data cluster holding guest offset `guest`.
fn host_of(img: &Qcow2Image, guest: u64) -> u64 {
    match img.lookup(guest, 1).unwrap()[0].mapping {
        Mapping::Data { host_offset } => host_offset,
        other => panic!("guest {guest:#x} is {other:?}"),
    }
}

#[test]
fn refcounts_of_every_width() {
    for bits in [1, 2, 4, 8, 16, 32, 64] {
        let dir = TempDir::new();
        let path = dir.path().join("r.qcow2");
        let create = format!(
            "create -q -f qcow2 -o refcount_bits={bits},cluster_size=4k {} 4M",
            p(&path)
        );
        if run("qemu-img", &create).is_none() {
            return;
        }
        qemu_io(&path, &["write -P 1 0 8k", "write -P 2 1M 4k"]).unwrap();
        // A snapshot shares the clusters (refcount 2), except with 1-bit refcounts.
        let shared = bits > 1;
        if shared {
            run("qemu-img", &format!("snapshot -c s {}", p(&path))).unwrap();
            qemu_io(&path, &["write -P 3 1M 4k"]).unwrap();
        }
        let img = open(&path);
        assert_eq!(img.header().refcount_bits(), bits);
        let what = format!("refcount_bits={bits}");
        assert_eq!(img.refcount(0).unwrap(), 1, "{what}: header");
        assert_eq!(
            img.refcount(img.header().l1_table_offset).unwrap(),
            1,
            "{what}: L1"
        );
        let kept = host_of(&img, 0);
        assert_eq!(
            img.refcount(kept).unwrap(),
            if shared { 2 } else { 1 },
            "{what}"
        );
        assert_eq!(
            img.refcount(host_of(&img, 1 << 20)).unwrap(),
            1,
            "{what}: COW copy"
        );
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(
            img.refcount(len + (1 << 30)).unwrap(),
            0,
            "{what}: past the end"
        );
    }
}

/// A small valid image: 1 GiB (two L1 entries) of 64 KiB clusters, data in guest cluster 0.
fn small_image(dir: &TempDir) -> Option<PathBuf> {
    let path = dir.path().join("small.qcow2");
    run("qemu-img", &format!("create -q -f qcow2 {} 1G", p(&path)))?;
    qemu_io(&path, &["write -P 0x42 0 64k"])?;
    Some(path)
}

fn be64(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
}

#[test]
fn opening_a_huge_sparse_image_reads_only_its_tables() {
    let dir = TempDir::new();
    let path = dir.path().join("huge.qcow2");
    if run("qemu-img", &format!("create -q -f qcow2 {} 4T", p(&path))).is_none() {
        return;
    }
    qemu_io(&path, &["write -P 0x9 3T 64k"]).unwrap();
    let started = std::time::Instant::now();
    let img = open(&path);
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    assert_eq!(img.size(), 4 << 40);
    let mut buf = vec![0u8; 128 * KIB as usize];
    img.read_at(&mut buf, 3 * (1 << 40) - 64 * KIB).unwrap();
    assert!(buf[..64 * KIB as usize].iter().all(|&b| b == 0));
    assert!(buf[64 * KIB as usize..].iter().all(|&b| b == 9));
    let stats = img.shared.l2_cache.stats();
    assert_eq!(stats.entries, 1, "one L2 slice read");
    let status = img.block_status(0, 4 << 40).unwrap();
    assert_eq!(status.len(), 3);
    assert_eq!(status[1].offset, 3 << 40);
}

mod crash;
mod discard;
mod encrypted;
mod faults;
mod hostile;
mod passthrough;
mod races;
mod resize;
mod write;
