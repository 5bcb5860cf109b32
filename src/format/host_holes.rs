//! Block status that follows holes in the host file, for data that stays mapped after a
//! discard: formats that cannot mark a cluster zero (qcow v1, VHD, VMDK version 1, flat
//! extents) punch its host range instead, and it must then report as zeros so that SEEK_HOLE,
//! NBD block status and `imgfs map` follow the discard.

use crate::error::Result;
use crate::host::HostFile;
use crate::image::{push_extent, Extent, ExtentState};

/// The host's page: a punch frees whole pages only, and zeroes the parts of the pages at
/// either end of its range, which the host still reports as data.
const PAGE: u64 = 4096;

/// Appends `[offset, offset + len)` of the disk, stored from `host` on in `file`, to
/// `extents`: data where the host file holds data, zeros where it has holes. The page at an
/// edge of a data run that meets a hole is read, and its zero bytes next to the hole (the
/// rest of a page a punch zeroed, in whole sectors of the disk) count as zeros too. The host
/// is asked about a page more on either side than the range covers, so the answer for a byte
/// does not depend on the range it is asked in.
pub fn push_stored(
    extents: &mut Vec<Extent>,
    file: &HostFile,
    offset: u64,
    host: u64,
    len: u64,
) -> Result<()> {
    let end = host.saturating_add(len);
    let lo = (host / PAGE * PAGE).saturating_sub(PAGE);
    let hi = end.div_ceil(PAGE).saturating_mul(PAGE).saturating_add(PAGE);
    // Host offset h is disk offset h + offset - host; `skew` makes sector rounding in disk
    // terms possible on host offsets.
    let skew = (offset % 512 + 512 - host % 512) % 512;
    let sector_down = |h: u64| h - (h + skew) % 512;
    let sector_up = |h: u64| h + (512 - (h + skew) % 512) % 512;
    let mut page = [0u8; PAGE as usize];
    let mut put = |from: u64, to: u64, state| {
        let (from, to) = (from.max(host), to.min(end));
        if to > from {
            push_extent(
                extents,
                Extent {
                    offset: offset + (from - host),
                    len: to - from,
                    state,
                    layer: 0,
                    host: Some(from),
                },
            );
        }
    };
    let mut done = host;
    for (data, n) in file.data_runs(lo, hi - lo) {
        let (mut start, mut stop) = (data, data + n);
        if start > lo {
            // After a hole: zeros at the start of the run's first page.
            let piece = (stop - start).min(PAGE - start % PAGE);
            let bytes = page.get_mut(..piece as usize).unwrap_or_default();
            file.read_exact_at(bytes, start)?;
            let zeros = bytes.iter().take_while(|&&b| b == 0).count() as u64;
            start = match zeros == piece {
                true => start + piece,
                false => sector_down(start + zeros).max(start),
            };
        }
        if stop < hi && stop > start {
            // Before a hole: zeros at the end of the run's last page.
            let piece = (stop - start).min((stop - 1) % PAGE + 1);
            let bytes = page.get_mut(..piece as usize).unwrap_or_default();
            file.read_exact_at(bytes, stop - piece)?;
            let zeros = bytes.iter().rev().take_while(|&&b| b == 0).count() as u64;
            stop = match zeros == piece {
                true => stop - piece,
                false => sector_up(stop - zeros).min(stop),
            };
        }
        if stop > start && stop > host && start < end {
            put(done, start, ExtentState::StoredZeros);
            put(start, stop, ExtentState::Data);
            done = stop.max(host);
        }
    }
    put(done, end, ExtentState::StoredZeros);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn holes_in_the_host_range_report_as_zeros() {
        // On the disk, not tmpfs: the test needs a file system with holes.
        let dir = crate::testutil::TempDir::new();
        let path = dir.path().join("f");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![7u8; 3 << 20]).unwrap();
        drop(f);
        let file = HostFile::open(&path, true).unwrap();
        file.punch_hole(1 << 20, 1 << 20).unwrap();
        let mut extents = Vec::new();
        // Disk offset 10 MiB maps to host offset 512 KiB, for 2 MiB.
        push_stored(&mut extents, &file, 10 << 20, 512 << 10, 2 << 20).unwrap();
        let got: Vec<_> = extents.iter().map(|e| (e.offset, e.len, e.state)).collect();
        assert_eq!(
            got,
            [
                ((10 << 20), 512 << 10, ExtentState::Data),
                ((10 << 20) + (512 << 10), 1 << 20, ExtentState::StoredZeros),
                ((11 << 20) + (512 << 10), 512 << 10, ExtentState::Data),
            ]
        );
        // Past the end of the file is a hole too.
        extents.clear();
        push_stored(&mut extents, &file, 0, 3 << 20, 4096).unwrap();
        assert_eq!(extents[0].state, ExtentState::StoredZeros);
        assert_eq!(extents.len(), 1);
        // A punch that starts and ends inside host pages leaves zeroed page parts the host
        // calls data: they are read and report as zeros too.
        file.punch_hole((2 << 20) + 1000, 64 << 10).unwrap();
        extents.clear();
        push_stored(&mut extents, &file, 0, (2 << 20) + 1000, 64 << 10).unwrap();
        assert_eq!(extents.len(), 1, "{extents:?}");
        assert_eq!(extents[0].state, ExtentState::StoredZeros);
        // Mapped off the host's page grid (a VDI's blocks): the zeroed page parts on either
        // side of the punch are zeros, in whole sectors.
        extents.clear();
        push_stored(&mut extents, &file, 0, (2 << 20) + 488, 128 << 10).unwrap();
        let got: Vec<_> = extents.iter().map(|e| (e.offset, e.len, e.state)).collect();
        assert_eq!(
            got,
            [
                (0, 512, ExtentState::Data),
                (512, 64 << 10, ExtentState::StoredZeros),
                (512 + (64 << 10), (64 << 10) - 512, ExtentState::Data),
            ]
        );
        extents.clear();
        push_stored(&mut extents, &file, 0, (2 << 20) + 990, 20).unwrap();
        assert_eq!(extents.len(), 1, "{extents:?}");
        assert_eq!(extents[0].state, ExtentState::Data, "ten bytes of sevens");
    }
}
