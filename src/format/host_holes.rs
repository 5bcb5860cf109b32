//! Block status that follows holes in the host file, for data that stays mapped after a
//! discard: formats that cannot mark a cluster zero (qcow v1, VHD, VMDK version 1, flat
//! extents) punch its host range instead, and it must then report as zeros so that SEEK_HOLE,
//! NBD block status and `imgfs map` follow the discard.

use crate::error::Result;
use crate::host::HostFile;
use crate::image::{push_extent, Extent, ExtentState};

/// Data runs shorter than this are read to see whether they are zeros: a punch frees whole
/// host pages only, and zeroes the parts of pages at either end of its range, which the host
/// still reports as data.
const SHORT_RUN: u64 = 4096;

/// Appends `[offset, offset + len)` of the disk, stored from `host` on in `file`, to
/// `extents`: data where the host file holds data, zeros where it has holes.
pub fn push_stored(
    extents: &mut Vec<Extent>,
    file: &HostFile,
    offset: u64,
    host: u64,
    len: u64,
) -> Result<()> {
    let mut put = |at: u64, len: u64, state| {
        if len > 0 {
            push_extent(
                extents,
                Extent {
                    offset: offset + at,
                    len,
                    state,
                    layer: 0,
                },
            );
        }
    };
    let mut done = 0;
    let mut short = [0u8; SHORT_RUN as usize];
    for (data, n) in file.data_runs(host, len) {
        let at = data - host;
        put(done, at - done, ExtentState::StoredZeros);
        let state = match short.get_mut(..n as usize) {
            Some(bytes) if n < SHORT_RUN => {
                file.read_exact_at(bytes, data)?;
                match bytes.iter().all(|&b| b == 0) {
                    true => ExtentState::StoredZeros,
                    false => ExtentState::Data,
                }
            }
            _ => ExtentState::Data,
        };
        put(at, n, state);
        done = at + n;
    }
    put(done, len - done, ExtentState::StoredZeros);
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
        extents.clear();
        push_stored(&mut extents, &file, 0, (2 << 20) + 990, 20).unwrap();
        assert_eq!(extents.len(), 1, "{extents:?}");
        assert_eq!(extents[0].state, ExtentState::Data, "ten bytes of sevens");
    }
}
