//! The contract between format drivers and everything above them: one object-safe trait that
//! every format implements, and the plain data it reports (block status, image info).

use crate::error::{Error, Result};

/// How a range of the virtual disk is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentState {
    /// Allocated data stored in the image (or in the chain layer `Extent::layer`).
    Data,
    /// Reads as zeros because the image says so (e.g. a discarded VDI block).
    Zero,
    /// Nothing allocated anywhere in the chain: reads as zeros.
    Unallocated,
    /// Allocated in the image, but stored over a hole of the host file, so it reads as zeros:
    /// a discarded cluster of a format that cannot say "zero" (qcow v1, VHD, VMDK version 1,
    /// flat extents), the unwritten part of a fixed image. QEMU calls this data and zero.
    StoredZeros,
}

impl ExtentState {
    /// Whether `lseek(SEEK_DATA)` should stop here.
    pub fn is_data(self) -> bool {
        self == ExtentState::Data
    }
}

/// A run of the virtual disk with one state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub state: ExtentState,
    /// Which image of a backing chain holds the data: 0 is the image itself.
    pub layer: u32,
    /// Where the range's first byte is stored in that layer's file (or extent or data file),
    /// for ranges stored there as they are (not compressed): `qemu-img map`'s offset.
    pub host: Option<u64>,
}

/// What `imgfs info` shows about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: &'static str,
    pub subformat: String,
    pub virtual_size: u64,
    pub cluster_size: Option<u64>,
    /// Bytes of guest data allocated in the image file.
    pub allocated_bytes: u64,
    /// Why the image is served read-only, if it is.
    pub read_only_reason: Option<String>,
    /// Format-specific fields, in display order.
    pub details: Vec<(&'static str, String)>,
}

/// An internal snapshot as a directory lists it: its file name (without `.raw`), disk size
/// and allocated bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    pub name: String,
    pub size: u64,
    pub allocated: u64,
}

/// A virtual disk. Methods take `&self` because FUSE requests arrive on several threads;
/// implementations keep their state behind their own locks.
pub trait Image: Send + Sync {
    /// Virtual disk size in bytes.
    fn size(&self) -> u64;

    /// Fills all of `buf` from virtual offset `offset`; the range must lie inside `size()`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes all of `buf` at virtual offset `offset`, allocating as needed; the range must lie
    /// inside `size()`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Writes back dirty metadata in the format's safe order and syncs the host file.
    fn flush(&self) -> Result<()>;

    /// Whether there is metadata that `flush` would write.
    fn is_dirty(&self) -> bool;

    /// The state of `[offset, offset + len)` as consecutive extents covering the range (clipped
    /// to the disk size).
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;

    /// Makes `[offset, offset + len)` read as zeros, giving space back where the format can:
    /// whole clusters become unallocated or zero clusters and their host ranges are punched;
    /// partial clusters (and formats that cannot say "zero") are zeroed in place. The range
    /// must lie inside `size()`. Like a write, it is durable after the next `flush`; what it
    /// punched is synced before it returns, so that no later write into the range can reach
    /// the disk without the punch under it.
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(Error::unsupported(
            "discard is not implemented for this format",
        ))
    }

    /// Grows the virtual disk to `new_size` bytes, writing the format's metadata in a safe
    /// order (durable when it returns); the new part reads as zeros. Shrinking, and formats
    /// or sub-formats that cannot grow, are refused as unsupported.
    fn resize(&self, _new_size: u64) -> Result<()> {
        Err(Error::unsupported("this format cannot be resized"))
    }

    /// The file names (without `.raw`) of the internal snapshots this image holds (qcow2),
    /// distinct and usable as file names.
    fn snapshot_names(&self) -> Vec<String> {
        Vec::new()
    }

    /// A read-only image of the internal snapshot called `name` (one of `snapshot_names`).
    fn snapshot(&self, name: &str) -> Result<std::sync::Arc<dyn Image>> {
        Err(Error::unsupported(format!(
            "the image has no internal snapshot called {name:?}"
        )))
    }

    /// The internal snapshots that can be opened, with their sizes. By default each is opened;
    /// a format whose table gives the sizes answers from it.
    fn snapshot_entries(&self) -> Vec<SnapshotEntry> {
        self.snapshot_names()
            .into_iter()
            .filter_map(|name| {
                let view = self.snapshot(&name).ok()?;
                Some(SnapshotEntry {
                    size: view.size(),
                    allocated: view.allocated_bytes(),
                    name,
                })
            })
            .collect()
    }

    /// Bytes of guest data allocated in the image file (feeds `st_blocks`).
    fn allocated_bytes(&self) -> u64;

    /// Why writes are refused, or `None` when the image is writable.
    fn read_only_reason(&self) -> Option<String>;

    /// The host file that holds the disk's bytes at the disk's own offsets and is exactly as
    /// long as the disk, when reading the disk is nothing but reading that file (a VMDK with
    /// one flat extent at offset 0): the kernel may then read it without the daemon.
    fn raw_file(&self) -> Option<std::sync::Arc<crate::host::HostFile>> {
        None
    }

    fn info(&self) -> ImageInfo;
}

/// Checks that `[offset, offset + len)` lies inside a disk of `size` bytes.
pub fn check_range(size: u64, offset: u64, len: usize) -> Result<()> {
    let end = offset
        .checked_add(len as u64)
        .ok_or_else(|| Error::out_of_range(format!("offset {offset} + length {len} overflows")))?;
    if end > size {
        return Err(Error::out_of_range(format!(
            "request {offset}..{end} is beyond the end of the disk ({size} bytes)"
        )));
    }
    Ok(())
}

/// `check_range` for a length given as `u64` (discards are not bounded by a buffer).
pub fn check_span(size: u64, offset: u64, len: u64) -> Result<()> {
    check_range(size, offset, usize::try_from(len).unwrap_or(usize::MAX))
}

/// The checks every resize starts with: refused for an image served read-only (`read_only`
/// says why) and when shrinking (it would drop the data past the new end); `new_size` must be
/// a whole number of the format's `sector`s. Returns whether the size changes.
pub fn check_resize(
    read_only: &Option<String>,
    current: u64,
    new_size: u64,
    sector: u64,
    format: &str,
) -> Result<bool> {
    if let Some(reason) = read_only {
        return Err(Error::read_only(reason.clone()));
    }
    if new_size < current {
        return Err(Error::unsupported(format!(
            "shrinking from {current} to {new_size} bytes would drop data"
        )));
    }
    if new_size == current {
        return Ok(false);
    }
    if new_size % sector.max(1) != 0 {
        return Err(Error::out_of_range(format!(
            "a {format} size must be a multiple of {sector} bytes, not {new_size}"
        )));
    }
    Ok(true)
}

/// The part of a request buffer, which starts at virtual offset `base`, that covers
/// `[offset, offset + len)`; an internal error (never a panic) if it lies outside the buffer.
pub fn request_part(buf: &[u8], base: u64, offset: u64, len: u64) -> Result<&[u8]> {
    let range = request_range(base, offset, len)?;
    buf.get(range).ok_or_else(|| outside_request(offset, len))
}

/// `request_part` for a buffer being filled.
pub fn request_part_mut(buf: &mut [u8], base: u64, offset: u64, len: u64) -> Result<&mut [u8]> {
    let range = request_range(base, offset, len)?;
    buf.get_mut(range)
        .ok_or_else(|| outside_request(offset, len))
}

/// Splits a request buffer at `at`; an internal error (never a panic) past its end.
pub fn split_request(buf: &[u8], at: usize) -> Result<(&[u8], &[u8])> {
    buf.split_at_checked(at)
        .ok_or_else(|| Error::out_of_range("internal: split outside the request buffer"))
}

fn request_range(base: u64, offset: u64, len: u64) -> Result<std::ops::Range<usize>> {
    let start = usize::try_from(
        offset
            .checked_sub(base)
            .ok_or_else(|| outside_request(offset, len))?,
    )
    .map_err(|_| outside_request(offset, len))?;
    let len = usize::try_from(len).map_err(|_| outside_request(offset, len))?;
    let end = start
        .checked_add(len)
        .ok_or_else(|| outside_request(offset, len as u64))?;
    Ok(start..end)
}

fn outside_request(offset: u64, len: u64) -> Error {
    Error::out_of_range(format!(
        "internal: {len} bytes at {offset} lie outside the request buffer"
    ))
}

/// Where `lseek(SEEK_DATA)` (`want_data`) or `lseek(SEEK_HOLE)` from `offset` lands, or
/// `None` when no data follows (ENXIO). The disk's end counts as a hole. `offset` must lie
/// inside the disk.
pub fn seek(image: &dyn Image, offset: u64, want_data: bool) -> Result<Option<u64>> {
    let size = image.size();
    // Ask in windows so a huge, mostly empty disk does not build one giant extent list; each
    // window that finds nothing is twice the one before, so that crossing an empty disk of
    // any size (a hostile header's exabytes) takes a few dozen questions.
    let mut window: u64 = 1 << 30;
    let mut at = offset;
    while at < size {
        let len = window.min(size - at);
        for extent in image.block_status(at, len)? {
            if extent.state.is_data() == want_data {
                return Ok(Some(extent.offset.max(offset)));
            }
        }
        at += len;
        window = window.saturating_mul(2);
    }
    Ok((!want_data).then_some(size))
}

/// Writes zeros over the parts of `[offset, offset + len)` that do not read as zeros already
/// (`block_status` says `Data`, in the image or a layer below), through `write_at`: the
/// discard of partial clusters, and of clusters a format cannot mark as zero.
pub fn zero_fill(image: &dyn Image, offset: u64, len: u64) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let mut zeros = Vec::new();
    for extent in image.block_status(offset, len)? {
        if !extent.state.is_data() {
            continue;
        }
        let end = extent.offset.saturating_add(extent.len);
        let mut at = extent.offset;
        while at < end {
            let n = CHUNK.min(end - at) as usize;
            if zeros.len() < n {
                zeros.resize(n, 0);
            }
            image.write_at(zeros.get(..n).unwrap_or_default(), at)?;
            at += n as u64;
        }
    }
    Ok(())
}

/// Splits `[offset, offset + len)` at the boundaries of `unit`-byte clusters (a power of
/// two): the partial head, the whole clusters `(first index, count)`, and the partial tail,
/// each as (offset, len) and empty where there is none.
pub fn split_aligned(offset: u64, len: u64, unit: u64) -> ((u64, u64), (u64, u64), (u64, u64)) {
    let end = offset.saturating_add(len);
    let first_whole = offset.div_ceil(unit).saturating_mul(unit);
    let last_whole = end / unit * unit;
    if first_whole >= last_whole {
        return ((offset, len), (0, 0), (end, 0));
    }
    (
        (offset, first_whole - offset),
        (first_whole / unit, (last_whole - first_whole) / unit),
        (last_whole, end - last_whole),
    )
}

/// Appends `extent` to `extents`, merging it with the previous one when they continue each
/// other, on the disk and where they are stored.
pub fn push_extent(extents: &mut Vec<Extent>, extent: Extent) {
    if let Some(last) = extents.last_mut() {
        let stored_on = match (last.host, extent.host) {
            (None, None) => true,
            (Some(a), Some(b)) => a.checked_add(last.len) == Some(b),
            _ => false,
        };
        if last.state == extent.state
            && last.layer == extent.layer
            && last.offset + last.len == extent.offset
            && stored_on
        {
            last.len += extent.len;
            return;
        }
    }
    extents.push(extent);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_range_rejects_overflow_and_past_end() {
        assert!(check_range(100, 0, 100).is_ok());
        assert!(check_range(100, 1, 100).is_err());
        assert!(check_range(100, u64::MAX, 2).is_err());
    }

    #[test]
    fn request_parts_are_found_by_virtual_offset_and_never_panic() {
        let buf = [1u8, 2, 3, 4, 5, 6];
        assert_eq!(request_part(&buf, 100, 102, 3).unwrap(), [3, 4, 5]);
        assert!(request_part(&buf, 100, 99, 1).is_err());
        assert!(request_part(&buf, 100, 104, 3).is_err());
        assert!(request_part(&buf, 0, u64::MAX, 2).is_err());
        let mut out = [0u8; 4];
        request_part_mut(&mut out, 10, 11, 2).unwrap().fill(9);
        assert_eq!(out, [0, 9, 9, 0]);
        assert_eq!(split_request(&buf, 2).unwrap().0, [1, 2]);
        assert!(split_request(&buf, 7).is_err());
    }

    #[test]
    fn split_aligned_finds_head_whole_clusters_and_tail() {
        assert_eq!(split_aligned(0, 4096, 1024), ((0, 0), (0, 4), (4096, 0)));
        assert_eq!(
            split_aligned(100, 3000, 1024),
            ((100, 924), (1, 2), (3072, 28))
        );
        assert_eq!(
            split_aligned(100, 200, 1024),
            ((100, 200), (0, 0), (300, 0))
        );
        assert_eq!(
            split_aligned(1000, 1048, 1024),
            ((1000, 24), (1, 1), (2048, 0))
        );
    }

    #[test]
    fn push_extent_merges_neighbours_only() {
        let mut v = Vec::new();
        let e = |offset, len, state| Extent {
            offset,
            len,
            state,
            layer: 0,
            host: None,
        };
        push_extent(&mut v, e(0, 10, ExtentState::Data));
        push_extent(&mut v, e(10, 5, ExtentState::Data));
        push_extent(&mut v, e(15, 5, ExtentState::Zero));
        assert_eq!(
            v,
            vec![e(0, 15, ExtentState::Data), e(15, 5, ExtentState::Zero)]
        );
        // Stored apart in the file: not one extent.
        let stored = |offset, host| Extent {
            host: Some(host),
            ..e(offset, 10, ExtentState::Data)
        };
        let mut v = Vec::new();
        push_extent(&mut v, stored(0, 100));
        push_extent(&mut v, stored(10, 110));
        push_extent(&mut v, stored(20, 500));
        assert_eq!(
            v,
            vec![
                Extent {
                    len: 20,
                    ..stored(0, 100)
                },
                stored(20, 500)
            ]
        );
    }
}
