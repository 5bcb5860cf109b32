//! Tests of the VMDK driver through `format::open` and the `Image` trait, with qemu-img as the
//! oracle: every sub-format qemu-img writes, chains, zeroed grains, a hand-built stream with
//! its grain directory in the footer; writes from several threads checked with `qemu-img check`
//! and `qemu-img compare`.

mod crash;
mod esx;
mod faults;
mod hostile;
mod passthrough;
mod races;
mod write;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{ErrorKind, Result};
use crate::format::links::PlainLinks;
use crate::format::{self, OpenOptions};
use crate::image::{ExtentState, Image};
use crate::testutil::{path_str as p, qemu, qemu_io_on, qemu_raw_of, qemu_run as run, TempDir};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn qemu_io(path: &Path, commands: &[&str]) -> Option<()> {
    qemu_io_on("vmdk", path, commands)
}

/// `qemu-img create -f vmdk -o OPTIONS path size`.
fn create(path: &Path, options: &str, size: &str) -> Option<()> {
    let options = if options.is_empty() {
        String::new()
    } else {
        format!("-o {options}")
    };
    run(
        "qemu-img",
        &format!("create -q -f vmdk {options} {} {size}", p(path)),
    )
}

/// The raw file qemu-img makes of `path` (sparse on the host, so large disks are cheap).
fn qemu_raw_file(path: &Path) -> Option<PathBuf> {
    let out = path.with_extension("expected.raw");
    run(
        "qemu-img",
        &format!("convert -U -f vmdk -O raw {} {}", p(path), p(&out)),
    )?;
    Some(out)
}

fn qemu_raw(path: &Path) -> Option<Vec<u8>> {
    qemu_raw_of(path, "-f vmdk")
}

fn try_open(path: &Path, read_only: bool) -> Result<Arc<dyn Image>> {
    let mut links = PlainLinks::new(path.parent().unwrap(), false)?;
    let options = OpenOptions {
        read_only,
        ..OpenOptions::default()
    };
    format::open(path, &options, &mut links)
}

fn open(path: &Path) -> Arc<dyn Image> {
    try_open(path, true).unwrap()
}

fn read_range(img: &dyn Image, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    img.read_at(&mut buf, offset).unwrap();
    buf
}

fn read_all(img: &dyn Image) -> Vec<u8> {
    read_range(img, 0, img.size())
}

/// Asserts two disks are equal, naming the first differing offset.
fn assert_same(ours: &[u8], expected: &[u8], what: &str) {
    assert_eq!(ours.len(), expected.len(), "{what}: size");
    if let Some(at) = ours.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at {at:#x}: ours {:#x}, qemu {:#x}",
            ours[at], expected[at]
        );
    }
}

/// Reads the whole image, and again in odd-sized pieces, and compares with qemu-img.
fn assert_reads_like_qemu(img: &dyn Image, path: &Path, what: &str) {
    let Some(expected) = qemu_raw(path) else {
        return;
    };
    assert_same(&read_all(img), &expected, what);
    let mut at = 0u64;
    let mut len = 1u64;
    while at < img.size() {
        let n = len.min(img.size() - at);
        assert_same(
            &read_range(img, at, n),
            &expected[at as usize..(at + n) as usize],
            what,
        );
        at += n;
        len = len * 3 + 1000;
    }
}

/// Unaligned fills that cross grains, leave holes, end at the disk's end.
const FILLS: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 100k 300k",
    "write -P 0x33 1M 4k",
    "write -P 0x44 3M 256k",
    "write -P 0x55 5M 512",
    "write -P 0x66 8191k 1k",
];

fn subformat_case(subformat: &str) {
    let dir = TempDir::new();
    let path = dir.path().join("d.vmdk");
    if create(&path, &format!("subformat={subformat}"), "8M").is_none() {
        return;
    }
    qemu_io(&path, FILLS).unwrap();
    let img = open(&path);
    assert_eq!(img.size(), 8 * MIB);
    assert_reads_like_qemu(img.as_ref(), &path, subformat);
    let info = img.info();
    assert_eq!((info.format, info.subformat.as_str()), ("vmdk", subformat));
    let e = img.write_at(&[1], 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
}

#[test]
fn monolithic_sparse_reads_like_qemu() {
    subformat_case("monolithicSparse");
}

#[test]
fn monolithic_flat_reads_like_qemu() {
    subformat_case("monolithicFlat");
}

#[test]
fn small_two_gb_max_extent_disks_read_like_qemu() {
    subformat_case("twoGbMaxExtentSparse");
    subformat_case("twoGbMaxExtentFlat");
}

/// Disks larger than 2 GiB, split into several extents: compared around the boundaries.
#[test]
fn two_gb_max_extent_disks_split_at_2_gib() {
    for subformat in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
        let dir = TempDir::new();
        let path = dir.path().join("split.vmdk");
        if create(&path, &format!("subformat={subformat}"), "4100M").is_none() {
            return;
        }
        let fills = [
            "write -P 0x11 0 1M",
            "write -P 0x22 2047M 2M",
            "write -P 0x33 4095M 5M",
        ];
        qemu_io(&path, &fills).unwrap();
        let img = open(&path);
        assert_eq!(img.size(), 4100 * MIB);
        assert_eq!(
            img.info()
                .details
                .iter()
                .filter(|(k, _)| *k == "extent")
                .count(),
            3
        );
        let raw = qemu_raw_file(&path).unwrap();
        let expected = std::fs::File::open(&raw).unwrap();
        for (offset, len) in [(0, 2 * MIB), (2046 * MIB, 4 * MIB), (4094 * MIB, 6 * MIB)] {
            let mut want = vec![0u8; len as usize];
            std::os::unix::fs::FileExt::read_exact_at(&expected, &mut want, offset).unwrap();
            assert_same(&read_range(img.as_ref(), offset, len), &want, subformat);
        }
        let status = img.block_status(2047 * MIB, 2 * MIB).unwrap();
        assert!(
            status.iter().all(|s| s.state == ExtentState::Data),
            "{status:?}"
        );
    }
}

#[test]
fn stream_optimized_is_read_only_with_the_reason() {
    let dir = TempDir::new();
    let src = dir.path().join("src.raw");
    let path = dir.path().join("s.vmdk");
    if run("qemu-img", &format!("create -q -f raw {} 8M", p(&src))).is_none() {
        return;
    }
    let mut args: Vec<&OsStr> = vec!["-f".as_ref(), "raw".as_ref()];
    for c in FILLS {
        args.extend([OsStr::new("-c"), OsStr::new(c)]);
    }
    args.push(src.as_os_str());
    qemu("qemu-io", &args).unwrap();
    run(
        "qemu-img",
        &format!(
            "convert -f raw -O vmdk -o subformat=streamOptimized {} {}",
            p(&src),
            p(&path)
        ),
    )
    .unwrap();
    let img = try_open(&path, false).unwrap();
    assert_reads_like_qemu(img.as_ref(), &path, "streamOptimized");
    let info = img.info();
    assert_eq!(info.subformat, "streamOptimized");
    let reason = info.read_only_reason.unwrap();
    assert!(reason.contains("streamOptimized"), "{reason}");
    assert_eq!(
        img.write_at(&[1], 0).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    assert_eq!(
        img.block_status(0, 64 * KIB).unwrap()[0].state,
        ExtentState::Data
    );
}

#[test]
fn zeroed_grains_read_as_zeros_over_data_and_over_the_parent() {
    let dir = TempDir::new();
    let base = dir.path().join("base.vmdk");
    let path = dir.path().join("z.vmdk");
    if create(&base, "", "4M").is_none() {
        return;
    }
    qemu_io(&base, &["write -P 0x77 0 4M"]).unwrap();
    run(
        "qemu-img",
        &format!(
            "create -q -f vmdk -o zeroed_grain=on -b base.vmdk -F vmdk {} 4M",
            p(&path)
        ),
    )
    .unwrap();
    qemu_io(
        &path,
        &[
            "write -P 0x11 0 256k",
            "write -z 64k 128k",
            "write -z 1M 64k",
        ],
    )
    .unwrap();
    let img = open(&path);
    assert_reads_like_qemu(img.as_ref(), &path, "zeroed grains");
    let status = img.block_status(0, 2 * MIB).unwrap();
    let states: Vec<_> = status
        .iter()
        .map(|s| (s.offset / KIB, s.len / KIB, s.state, s.layer))
        .collect();
    assert_eq!(
        states,
        [
            (0, 64, ExtentState::Data, 0),
            (64, 128, ExtentState::Zero, 0),
            (192, 64, ExtentState::Data, 0),
            (256, 768, ExtentState::Data, 1),
            (1024, 64, ExtentState::Zero, 0),
            (1088, 960, ExtentState::Data, 1),
        ]
    );
}

#[test]
fn a_chain_reads_through_to_the_parent_and_checks_its_cid() {
    let dir = TempDir::new();
    let base = dir.path().join("base.vmdk");
    let mid = dir.path().join("mid.vmdk");
    let top = dir.path().join("top.vmdk");
    if create(&base, "", "6M").is_none() {
        return;
    }
    qemu_io(&base, &["write -P 0x11 0 6M"]).unwrap();
    let child = |path: &Path, parent: &str, size: &str| {
        run(
            "qemu-img",
            &format!("create -q -f vmdk -b {parent} -F vmdk {} {size}", p(path)),
        )
        .unwrap()
    };
    child(&mid, "base.vmdk", "6M");
    qemu_io(&mid, &["write -P 0x22 1M 1M", "write -P 0x23 3000k 10k"]).unwrap();
    child(&top, "mid.vmdk", "6M");
    qemu_io(&top, &["write -P 0x33 1536k 1M"]).unwrap();
    let img = open(&top);
    assert_reads_like_qemu(img.as_ref(), &top, "three-deep chain");
    let info = img.info();
    let hint = info
        .details
        .iter()
        .find(|(k, _)| *k == "parent file name hint");
    assert_eq!(hint.map(|(_, v)| v.as_str()), Some("mid.vmdk"));
    drop(img);

    // Writing the middle layer renews its CID: the top no longer matches it.
    qemu_io(&mid, &["write -P 0x44 0 4k"]).unwrap();
    let e = try_open(&top, true).err().unwrap();
    let text = e.to_string();
    assert!(
        text.contains("parentCID") && text.contains("mid.vmdk"),
        "{text}"
    );
}

/// A VMware-style stream: grain directory at the end, found through the footer; grain tables
/// and directory preceded by their markers; grains compressed with markers.
#[test]
fn a_stream_with_its_grain_directory_in_the_footer_reads_like_qemu() {
    let dir = TempDir::new();
    let path = dir.path().join("stream.vmdk");
    let mut disk = vec![0u8; 3 * MIB as usize];
    for (i, b) in disk.iter_mut().enumerate().skip(70_000).take(1_000_000) {
        *b = (i % 251) as u8;
    }
    std::fs::write(&path, hostile::stream_optimized(&disk)).unwrap();
    let img = open(&path);
    assert_eq!(img.size(), 3 * MIB);
    assert_same(&read_all(img.as_ref()), &disk, "footer stream");
    assert_reads_like_qemu(img.as_ref(), &path, "footer stream");
}

fn discard_case(options: &str) {
    use crate::testutil::discard::{exercise_discard, DiscardCase};
    let dir = TempDir::new();
    let path = dir.path().join("d.vmdk");
    if create(&path, options, "4M").is_none() {
        return;
    }
    let flat = options
        .contains("Flat")
        .then(|| dir.path().join("d-flat.vmdk"));
    let case = DiscardCase {
        format: "vmdk",
        path: &path,
        unit: 64 << 10,
        check: true,
        data_file: flat.as_deref(),
    };
    exercise_discard(&case, &|p| try_open(p, false));
}

#[test]
fn discard_zeroes_grains_where_the_version_allows() {
    discard_case("zeroed_grain=on");
}

#[test]
fn discard_punches_grains_of_version_1() {
    discard_case("");
}

#[test]
fn discard_punches_a_flat_extent() {
    discard_case("subformat=monolithicFlat");
}
