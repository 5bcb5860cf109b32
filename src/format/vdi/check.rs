//! `imgfs check` for VDI: the block map against itself and the header, as `qemu-img check`
//! does (its messages and verdicts), plus entries that point past the end of the file, which
//! qemu-img does not look for but the driver refuses.
//!
//! - an entry naming a physical block >= blocks_in_image: corruption ("too large");
//! - two entries naming one physical block: corruption (a write through one changes the other);
//! - `blocks_allocated` different from the allocated entries: corruption, in either direction,
//!   as qemu-img counts it (QEMU and VirtualBox put their next block at `blocks_allocated`);
//! - an entry whose block starts past the end of the file: corruption.
//!
//! Repair (`--repair leaks` or `all`): `blocks_allocated` is set to the allocated entries when
//! that is also one past the highest physical block in use (the dense maps QEMU, VirtualBox and
//! imgfs write), so no allocator is sent over used blocks; nothing else is repaired. The header
//! is written in one sector write and synced.

use crate::error::Result;
use crate::format::check::{CheckReport, Progress, Repair};
use crate::format::Format;
use crate::host::HostFile;

use super::header::{Header, DISCARDED, HEADER_LEN};

/// Entries read at a time (and between progress reports).
const CHUNK_ENTRIES: usize = 1 << 16;

/// Checks (and with `repair`, repairs) the VDI image in `file`.
pub fn check(file: &HostFile, repair: Option<Repair>, progress: Progress) -> Result<CheckReport> {
    let file_len = file.len()?;
    let mut head = [0u8; HEADER_LEN];
    file.read_exact_at(&mut head, 0)?;
    let mut header = Header::parse(&head)?;
    header.check_layout(file_len)?;
    let scan = scan(file, &header, file_len, progress)?;
    let mut report = scan.report;
    let Some(_) = repair else {
        return Ok(report);
    };
    if header.blocks_allocated == scan.allocated {
        return Ok(report);
    }
    if report.corruptions > 1 {
        report
            .not_repaired
            .push("blocks_allocated is only repaired when the block map itself is sound".into());
        return Ok(report);
    }
    if scan.used_end != scan.allocated {
        report.not_repaired.push(format!(
            "blocks_allocated is not repaired: {} entries use physical blocks up to {}, so the \
             count qemu-img expects would send QEMU's next block over a used one",
            scan.allocated,
            scan.used_end.saturating_sub(1)
        ));
        return Ok(report);
    }
    report.messages.push(format!(
        "Repairing blocks_allocated: was {}, now {}",
        header.blocks_allocated, scan.allocated
    ));
    header.blocks_allocated = scan.allocated;
    file.write_all_at(&header.to_bytes()?, 0)?;
    file.sync_data()?;
    report.corruptions_fixed += 1;
    let after = self::scan(file, &header, file_len, progress)?;
    Ok(report.then_rechecked(after.report))
}

/// What one pass over the block map found.
struct Scan {
    report: CheckReport,
    /// Entries naming a physical block (below blocks_in_image).
    allocated: u32,
    /// One past the highest physical block named.
    used_end: u32,
}

fn scan(file: &HostFile, header: &Header, file_len: u64, progress: Progress) -> Result<Scan> {
    let mut report = CheckReport::new(Format::Vdi);
    let count = header.blocks_in_image as usize;
    // The virtual block that first used each physical block, + 1 (0: unused). Bounded by
    // blocks_in_image, which the header caps, like the driver's own map.
    crate::meta::budget::check_table_memory("VDI block map check", header.bmap_len())?;
    let mut owner = vec![0u32; count];
    let (mut allocated, mut used_end) = (0u32, 0u32);
    let block_size = u64::from(header.block_size);
    let mut bytes = vec![0u8; CHUNK_ENTRIES * 4];
    let mut block = 0usize;
    while block < count {
        progress(block as u64, count as u64);
        let n = (count - block).min(CHUNK_ENTRIES);
        let piece = bytes.get_mut(..n * 4).unwrap_or_default();
        file.read_exact_at(piece, u64::from(header.offset_bmap) + block as u64 * 4)?;
        for (i, raw) in piece.chunks_exact(4).enumerate() {
            let entry = u32::from_le_bytes(raw.try_into().unwrap_or_default());
            let virtual_block = block + i;
            if entry >= DISCARDED {
                continue;
            }
            let Some(first) = owner.get_mut(entry as usize) else {
                report.corruption(format!(
                    "ERROR: block index {virtual_block} too large, is {entry}"
                ));
                continue;
            };
            allocated += 1;
            used_end = used_end.max(entry + 1);
            if *first != 0 {
                report.corruption(format!(
                    "ERROR: block index {entry} also used by {virtual_block} (first used by \
                     {})",
                    *first - 1
                ));
            } else {
                // virtual_block < blocks_in_image <= MAX_BLOCKS_IN_IMAGE, so + 1 fits.
                *first = virtual_block as u32 + 1;
            }
            let start = u64::from(entry)
                .checked_mul(block_size)
                .and_then(|o| o.checked_add(u64::from(header.offset_data)));
            if !start.is_some_and(|s| s < file_len) {
                report.corruption(format!(
                    "ERROR: block index {virtual_block} points to physical block {entry}, past \
                     the end of the file ({file_len} bytes)"
                ));
            }
        }
        block += n;
    }
    progress(count as u64, count as u64);
    if allocated != header.blocks_allocated {
        report.corruption(format!(
            "ERROR: allocated blocks mismatch, is {allocated}, should be {}",
            header.blocks_allocated
        ));
    }
    Ok(Scan {
        report,
        allocated,
        used_end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::vdi::header::testing::{header, image_bytes};
    use crate::format::vdi::header::{ImageType, UNALLOCATED};
    use crate::testutil::TempDir;

    fn checked(bytes: &[u8], repair: Option<Repair>) -> CheckReport {
        let dir = TempDir::new();
        let path = dir.path().join("a.vdi");
        std::fs::write(&path, bytes).unwrap();
        let file = HostFile::open(&path, repair.is_some()).unwrap();
        check(&file, repair, &|_, _| {}).unwrap()
    }

    #[test]
    fn duplicates_range_and_count_are_corruptions() {
        let mut h = header(ImageType::Dynamic, 4 << 20, 1 << 20);
        h.blocks_allocated = 2;
        let clean = image_bytes(&h, &[0, UNALLOCATED, 1, UNALLOCATED], 2);
        assert_eq!(checked(&clean, None).exit_code(), 0);
        let dup = image_bytes(&h, &[0, 0, 1, UNALLOCATED], 2);
        let r = checked(&dup, None);
        // The duplicate, and three entries counted against a header saying two.
        assert_eq!(r.corruptions, 2, "{:?}", r.messages);
        let large = image_bytes(&h, &[0, 7, 1, UNALLOCATED], 2);
        assert_eq!(checked(&large, None).corruptions, 1);
    }

    #[test]
    fn count_is_repaired_only_for_dense_maps() {
        let mut h = header(ImageType::Dynamic, 4 << 20, 1 << 20);
        h.blocks_allocated = 5;
        let dense = image_bytes(&h, &[0, UNALLOCATED, 1, UNALLOCATED], 2);
        let r = checked(&dense, Some(Repair::Leaks));
        assert_eq!((r.corruptions, r.corruptions_fixed), (0, 1), "{r:?}");
        h.blocks_allocated = 1;
        let holes = image_bytes(&h, &[0, UNALLOCATED, 3, UNALLOCATED], 4);
        let r = checked(&holes, Some(Repair::All));
        assert_eq!((r.corruptions, r.corruptions_fixed), (1, 0));
        assert_eq!(r.not_repaired.len(), 1);
    }
}
