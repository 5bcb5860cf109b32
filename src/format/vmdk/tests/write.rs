//! Writes through the VMDK driver from several threads into every writable sub-format, over a
//! parent, and into grain tables that do not exist yet; afterwards `qemu-img check` must pass
//! and `qemu-img compare` must find the expected bytes.

use std::path::Path;
use std::sync::Arc;

use super::{create, p, qemu_io, qemu_raw, read_all, run, try_open, FILLS, MIB};
use crate::image::Image;
use crate::testutil::{Rng, TempDir};

/// Random unaligned writes for four threads, each in its own quarter of `[0, span)`, plus
/// 999 bytes each into one shared grain at `shared`; `expected` gets every write.
fn plan(expected: &mut [u8], span: u64, shared: u64) -> Vec<Vec<(u64, Vec<u8>)>> {
    let region = span / 4;
    let mut plans = Vec::new();
    for t in 0..4u64 {
        let mut rng = Rng(0x5eed_0000 + t);
        let mut writes = Vec::new();
        for _ in 0..20 {
            let len = 1 + rng.below(150_000);
            let offset = t * region + rng.below(region - len);
            writes.push((offset, rng.bytes(len as usize)));
        }
        writes.push((shared + t * 1000 + 7, vec![0xe0 + t as u8; 999]));
        plans.push(writes);
    }
    for writes in &plans {
        for (offset, data) in writes {
            expected[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
        }
    }
    plans
}

fn run_threads(img: &Arc<dyn Image>, plans: Vec<Vec<(u64, Vec<u8>)>>) {
    std::thread::scope(|scope| {
        for writes in plans {
            scope.spawn(move || {
                for (offset, data) in writes {
                    img.write_at(&data, offset).unwrap();
                }
            });
        }
    });
}

/// Writes from four threads into `path`, reads back, flushes, reopens, and has qemu-img
/// check and compare the result.
fn write_case(path: &Path, what: &str) {
    let Some(mut expected) = qemu_raw(path) else {
        return;
    };
    let size = expected.len() as u64;
    let plans = plan(&mut expected, size - MIB, size - MIB / 2);
    let img = try_open(path, false).unwrap();
    assert_eq!(img.read_only_reason(), None, "{what}");
    run_threads(&img, plans);
    assert!(
        read_all(img.as_ref()) == expected,
        "{what}: read-back differs"
    );
    img.flush().unwrap();
    assert!(!img.is_dirty());
    drop(img);
    let img = try_open(path, true).unwrap();
    assert!(
        read_all(img.as_ref()) == expected,
        "{what}: differs after reopening"
    );
    drop(img);
    assert_check_clean(path);
    assert_compare_equal(path, &expected);
}

#[test]
fn threaded_writes_into_every_writable_sub_format() {
    for subformat in [
        "monolithicSparse",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
    ] {
        let dir = TempDir::new();
        let path = dir.path().join("w.vmdk");
        if create(&path, &format!("subformat={subformat}"), "8M").is_none() {
            return;
        }
        qemu_io(&path, FILLS).unwrap();
        write_case(&path, subformat);
    }
}

#[test]
fn threaded_writes_into_a_child_copy_the_parent_into_partial_grains() {
    let dir = TempDir::new();
    let base = dir.path().join("base.vmdk");
    let path = dir.path().join("child.vmdk");
    if create(&base, "", "8M").is_none() {
        return;
    }
    qemu_io(&base, &["write -P 0x5b 0 8M"]).unwrap();
    run(
        "qemu-img",
        &format!(
            "create -q -f vmdk -o zeroed_grain=on -b base.vmdk -F vmdk {} 8M",
            p(&path)
        ),
    )
    .unwrap();
    qemu_io(&path, &["write -P 0x33 1536k 1M", "write -z 4M 128k"]).unwrap();
    let before = std::fs::read(&base).unwrap();
    write_case(&path, "child");
    assert!(
        std::fs::read(&base).unwrap() == before,
        "the parent changed"
    );
}

#[test]
fn the_first_write_renews_the_cid_and_the_parent_check_sees_it() {
    let dir = TempDir::new();
    let base = dir.path().join("base.vmdk");
    let child = dir.path().join("child.vmdk");
    if create(&base, "", "1M").is_none() {
        return;
    }
    run(
        "qemu-img",
        &format!("create -q -f vmdk -b base.vmdk -F vmdk {} 1M", p(&child)),
    )
    .unwrap();
    let cid = |path: &Path| {
        crate::format::vmdk::cid_of(&crate::host::HostFile::open(path, false).unwrap()).unwrap()
    };
    let old = cid(&base);
    try_open(&child, true).unwrap();
    let img = try_open(&base, false).unwrap();
    img.write_at(&[1, 2, 3], 1000).unwrap();
    img.write_at(&[4], 0).unwrap();
    let new = cid(&base);
    assert_ne!(new, old);
    drop(img);
    assert_eq!(cid(&base), new, "renewed once per session");
    let e = try_open(&child, true).err().unwrap();
    assert!(e.to_string().contains(&format!("CID {new:08x}")), "{e}");
    assert_check_clean(&base);
}

/// Directory entries left empty (as other writers than qemu-img do): writes allocate grain
/// tables, both copies, at the end of the file.
#[test]
fn writes_allocate_missing_grain_tables_in_both_directories() {
    let dir = TempDir::new();
    let path = dir.path().join("gt.vmdk");
    if create(&path, "", "8M").is_none() {
        return;
    }
    let mut bytes = std::fs::read(&path).unwrap();
    let sector =
        |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize * 512;
    let (rgd, gd) = (sector(48), sector(56));
    // 8 MiB at 32 MiB per table: one table; clear it from both directories.
    bytes[gd..gd + 4].fill(0);
    bytes[rgd..rgd + 4].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    let len_before = bytes.len() as u64;
    write_case(&path, "missing grain tables");
    let bytes = std::fs::read(&path).unwrap();
    let entry = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as u64 * 512;
    assert!(entry(gd) >= len_before && entry(rgd) >= len_before);
    let table = |at: u64| bytes[at as usize..at as usize + 2048].to_vec();
    assert!(table(entry(gd)) == table(entry(rgd)), "both copies agree");
}

/// Without a flush, new grains are in the file but no table names them: the disk on disk is
/// still the old one, and qemu-img finds nothing wrong.
#[test]
fn a_crash_before_flush_leaves_the_old_disk_intact() {
    let dir = TempDir::new();
    let path = dir.path().join("crash.vmdk");
    if create(&path, "", "4M").is_none() {
        return;
    }
    qemu_io(&path, &["write -P 0x11 0 64k"]).unwrap();
    let before = qemu_raw(&path).unwrap();
    let img = try_open(&path, false).unwrap();
    img.write_at(&[0x99; 5000], 2 * MIB + 100).unwrap();
    img.write_at(&[0x98; 100], 10).unwrap();
    assert!(img.is_dirty());
    // Dropped without a flush, as a crash would leave it (the in-place write did land).
    drop(img);
    let mut expected = before;
    expected[10..110].fill(0x98);
    assert_check_clean(&path);
    assert_compare_equal(&path, &expected);
}

/// A large write into fresh grains goes out with few host writes: whole unallocated or zeroed
/// grains of one grain table become one run at the end of the file; a grain already allocated
/// (written in place) and the next grain table split runs. Everything reads back and checks.
#[test]
fn whole_grains_are_written_in_runs() {
    let dir = TempDir::new();
    let path = dir.path().join("runs.vmdk");
    if create(&path, "zeroed_grain=on", "40M").is_none() {
        return;
    }
    // A grain table covers 32 MiB of 64 KiB grains.
    qemu_io(&path, &["write -z 31M 64k", "write -P 0x31 33M 64k"]).unwrap();
    let Some(mut expected) = qemu_raw(&path) else {
        return;
    };
    let watch = crate::host::fault::watch(&path);
    let img = try_open(&path, false).unwrap();
    let at = 30 * MIB + 100;
    let data = Rng(0x5eed_7777).bytes(6 * MIB as usize);
    let writes_before = watch.counts().writes;
    img.write_at(&data, at).unwrap();
    let writes = watch.counts().writes - writes_before;
    assert!(
        writes < 20,
        "{writes} host writes for 97 grains: whole grains not gathered into runs"
    );
    expected[at as usize..at as usize + data.len()].copy_from_slice(&data);
    assert!(read_all(img.as_ref()) == expected, "read-back differs");
    img.flush().unwrap();
    drop(img);
    assert_check_clean(&path);
    assert_compare_equal(&path, &expected);
}

fn assert_check_clean(path: &Path) {
    crate::testutil::assert_qemu_check_clean("vmdk", path);
}

fn assert_compare_equal(path: &Path, expected: &[u8]) {
    crate::testutil::assert_qemu_compare_equal("vmdk", path, expected);
}

/// qemu-img writes a file name holding a newline into the embedded descriptor's extent line
/// as it is, cutting the line in two; QEMU skips what it cannot parse there, since a
/// monolithic disk is its own extent. imgfs opens, writes and renews the CID of such a disk.
#[test]
fn an_embedded_descriptor_cut_by_a_newline_in_the_name_still_serves() {
    let dir = TempDir::new();
    let path = dir.path().join("cut\nname.vmdk");
    let created = crate::testutil::qemu(
        "qemu-img",
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "vmdk".as_ref(),
            path.as_os_str(),
            "4M".as_ref(),
        ],
    );
    let Some(created) = created else { return };
    assert!(created.status.success());
    let img = try_open(&path, false).unwrap();
    let mut expected = vec![0u8; 4 * MIB as usize];
    img.write_at(&[0x6e; 70_000], 65_000).unwrap();
    expected[65_000..135_000].fill(0x6e);
    img.flush().unwrap();
    drop(img);
    let qemu_img = |args: &[&std::ffi::OsStr]| {
        crate::testutil::qemu("qemu-img", args).is_some_and(|out| out.status.success())
    };
    assert!(qemu_img(&["check".as_ref(), path.as_os_str()]));
    let raw = dir.path().join("expected.raw");
    let convert = ["convert", "-f", "vmdk", "-O", "raw"].map(std::ffi::OsStr::new);
    assert!(qemu_img(
        &[&convert[..], &[path.as_os_str(), raw.as_os_str()]].concat()
    ));
    assert!(std::fs::read(&raw).unwrap() == expected);
}
