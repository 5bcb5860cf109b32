//! The discard test every writable driver runs: an image created by qemu-img, filled through
//! the driver, then whole and partial clusters discarded; reads, block status, a reopen,
//! `qemu-img check` and `qemu-img compare` must agree, and the file's allocated space and the
//! driver's allocated bytes must drop.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::{assert_qemu_check_clean, assert_qemu_compare_equal, path_str, qemu_run, Rng};
use crate::error::Result;
use crate::image::Image;

/// What `exercise_discard` expects of the driver.
pub struct DiscardCase<'a> {
    /// qemu-img's name of the format (`-f`).
    pub format: &'a str,
    /// The image, created by the caller and still empty.
    pub path: &'a Path,
    /// The driver's cluster / block / grain size.
    pub unit: u64,
    /// Whether `qemu-img check` can be asked (false for formats it cannot check).
    pub check: bool,
    /// The file holding the data, when it is not `path` (a flat VMDK extent).
    pub data_file: Option<&'a Path>,
}

/// Allocated bytes of the file at `path` (st_blocks * 512).
pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Runs the discard test on `case`; `open` opens the image writable.
pub fn exercise_discard(
    case: &DiscardCase<'_>,
    open: &dyn Fn(&Path) -> Result<std::sync::Arc<dyn Image>>,
) {
    let unit = case.unit;
    let img = open(case.path).unwrap();
    let size = img.size();
    assert!(size >= 8 * unit, "the image needs at least 8 clusters");
    let mut expected = Rng(7).bytes(size as usize);
    for chunk in expected.chunks_mut(512) {
        chunk[0] |= 1; // no sector of zeros a driver could keep unallocated
    }
    img.write_at(&expected, 0).unwrap();
    img.flush().unwrap();
    drop(img);
    let data = case.data_file.unwrap_or(case.path);
    let before = allocated(data);

    let img = open(case.path).unwrap();
    let counted = img.allocated_bytes();
    // Whole clusters 1..3, a partial head and tail around cluster 5, one unaligned range
    // inside cluster 7, and the last cluster.
    let ranges = [
        (unit, 2 * unit),
        (4 * unit + unit / 2, unit + unit / 4),
        (7 * unit + 100, 1000),
        (size - unit, unit),
    ];
    for &(offset, len) in &ranges {
        img.discard(offset, len).unwrap();
        expected[offset as usize..(offset + len) as usize].fill(0);
    }
    let mut got = vec![0u8; size as usize];
    img.read_at(&mut got, 0).unwrap();
    assert!(got == expected, "reads after discard");
    // Formats that cannot say "zero" keep the clusters mapped and punched: they report as
    // zeros all the same (SEEK_HOLE, NBD block status), and st_blocks drops.
    let status = img.block_status(unit, 2 * unit).unwrap();
    assert!(
        status.iter().all(|e| !e.state.is_data()),
        "discarded clusters report data: {status:?}"
    );
    img.flush().unwrap();
    assert!(
        img.allocated_bytes() + 2 * unit <= counted,
        "{}: allocated_bytes {counted} -> {}, not at least two clusters less",
        case.format,
        img.allocated_bytes()
    );
    drop(img);

    let after = allocated(data);
    assert!(
        after + 2 * unit <= before,
        "{}: allocated {before} -> {after} bytes, not at least two clusters less",
        case.format
    );
    let img = open(case.path).unwrap();
    got.fill(0xee);
    img.read_at(&mut got, 0).unwrap();
    assert!(got == expected, "reads after reopening");
    // Writing a discarded cluster again allocates it anew.
    img.write_at(&[0x42; 4096], unit).unwrap();
    expected[unit as usize..unit as usize + 4096].fill(0x42);
    img.flush().unwrap();
    drop(img);
    if case.check {
        assert_qemu_check_clean(case.format, case.path);
    }
    assert_qemu_compare_equal(case.format, case.path, &expected);
}

/// Creates a `format` image of `size` at `path` with qemu-img (`options` as `-o` values);
/// `None` when qemu-img is missing outside CI.
pub fn qemu_create(format: &str, options: &str, path: &Path, size: u64) -> Option<()> {
    let o = if options.is_empty() {
        String::new()
    } else {
        format!("-o {options} ")
    };
    qemu_run(
        "qemu-img",
        &format!("create -q -f {format} {o}{} {size}", path_str(path)),
    )
}
