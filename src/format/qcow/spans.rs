//! Where the L2 tables lie in the file. qcow v1 keeps no refcounts, so a hostile image may
//! name an L2 table as a data cluster; a write or punch through that cluster would change the
//! table on disk behind its copy in memory, and the next open would read another disk. Such
//! writes are refused (QEMU's qcow driver does not look; its qcow2 driver's overlap check does).

/// The file offsets of every L2 table, sorted, and the tables' common length.
pub struct TableSpans {
    starts: Vec<u64>,
    len: u64,
}

impl TableSpans {
    /// The tables L1 names (`l1`: their offsets, 0 for none), each `len` bytes long.
    pub fn new(l1: &[u64], len: u64) -> TableSpans {
        let mut starts: Vec<u64> = l1.iter().copied().filter(|&at| at != 0).collect();
        starts.sort_unstable();
        starts.dedup();
        TableSpans { starts, len }
    }

    /// A new table at `start`. Tables are appended at the end of the file, so this is a push.
    pub fn add(&mut self, start: u64) {
        let at = self.starts.partition_point(|&s| s < start);
        if self.starts.get(at) != Some(&start) {
            self.starts.insert(at, start);
        }
    }

    /// The start of a table that `[offset, offset + len)` overlaps, if any. Tables all have
    /// one length, so the one starting last before the range ends reaches furthest.
    pub fn under(&self, offset: u64, len: u64) -> Option<u64> {
        let end = offset.saturating_add(len);
        let before_end = self.starts.partition_point(|&s| s < end);
        let start = *self.starts.get(before_end.checked_sub(1)?)?;
        (start.saturating_add(self.len) > offset).then_some(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_over_a_table_are_found_and_ranges_beside_them_are_not() {
        let mut spans = TableSpans::new(&[0x3000, 0, 0x1000, 0x3000], 0x800);
        assert_eq!(spans.under(0x1000, 0x200), Some(0x1000));
        assert_eq!(spans.under(0x17ff, 1), Some(0x1000));
        assert_eq!(spans.under(0xe00, 0x201), Some(0x1000));
        assert_eq!(spans.under(0xe00, 0x200), None);
        assert_eq!(spans.under(0x1800, 0x1800), None);
        assert_eq!(spans.under(0x1800, 0x1801), Some(0x3000));
        assert_eq!(spans.under(0x3800, 0x1000), None);
        assert_eq!(spans.under(u64::MAX - 1, 4), None);
        spans.add(0x8000);
        spans.add(0x8000);
        assert_eq!(spans.under(0x8200, 0x200), Some(0x8000));
        spans.add(0x2000);
        assert_eq!(spans.under(0x2400, 0x200), Some(0x2000));
        assert_eq!(TableSpans::new(&[0, 0], 0x800).under(0, u64::MAX), None);
    }
}
