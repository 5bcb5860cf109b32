//! Dirty tracking for an in-memory copy of an on-disk table: remembers which fixed-size chunks
//! (usually 512-byte sectors) changed since the last write-back, and hands them out coalesced.

use std::ops::Range;

/// A set of dirty chunks of a table that is `len` bytes long on disk.
#[derive(Debug, Clone)]
pub struct DirtyChunks {
    chunk: usize,
    len: usize,
    bits: Vec<u64>,
}

impl DirtyChunks {
    /// Tracks a table of `len` bytes in chunks of `chunk` bytes (`chunk` > 0).
    pub fn new(len: usize, chunk: usize) -> Self {
        let chunk = chunk.max(1);
        let chunks = len.div_ceil(chunk);
        DirtyChunks {
            chunk,
            len,
            bits: vec![0; chunks.div_ceil(64)],
        }
    }

    /// Marks the chunk holding table byte `byte` dirty.
    pub fn mark(&mut self, byte: usize) {
        let index = byte / self.chunk;
        if let Some(word) = self.bits.get_mut(index / 64) {
            *word |= 1 << (index % 64);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|&w| w == 0)
    }

    /// The dirty byte ranges of the table, contiguous chunks merged, in ascending order.
    pub fn ranges(&self) -> Vec<Range<usize>> {
        let mut out: Vec<Range<usize>> = Vec::new();
        for (w, &word) in self.bits.iter().enumerate() {
            let mut rest = word;
            while rest != 0 {
                let bit = rest.trailing_zeros() as usize;
                rest &= rest - 1;
                let start = (w * 64 + bit) * self.chunk;
                let end = (start + self.chunk).min(self.len);
                match out.last_mut() {
                    Some(last) if last.end == start => last.end = end,
                    _ => out.push(start..end),
                }
            }
        }
        out
    }

    pub fn clear(&mut self) {
        self.bits.iter_mut().for_each(|w| *w = 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_coalesce_neighbours_and_clip_the_tail() {
        let mut d = DirtyChunks::new(512 * 130 + 100, 512);
        assert!(d.is_empty());
        d.mark(0);
        d.mark(511);
        d.mark(512);
        d.mark(512 * 63);
        d.mark(512 * 64);
        d.mark(512 * 130 + 5);
        assert_eq!(
            d.ranges(),
            vec![0..1024, 512 * 63..512 * 65, 512 * 130..512 * 130 + 100]
        );
        d.clear();
        assert!(d.is_empty());
        d.mark(usize::MAX);
        assert!(d.is_empty(), "a mark outside the table is ignored");
    }
}
