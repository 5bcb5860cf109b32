//! An in-memory view of file changes: what replaying a VHDX log would write, kept out of a file
//! that must not be written (read-only images), and laid over every read of that file.
//!
//! The overlay is a map of non-overlapping file ranges, each either zeros or a slice of a
//! shared buffer; a later change cuts away the parts of earlier ones it covers, so the map
//! always holds the result of applying the changes in order.

use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Clone)]
struct Piece {
    end: u64,
    /// `None` for zeros; otherwise the bytes, of which this piece starts at `skip`.
    data: Option<Arc<[u8]>>,
    skip: usize,
}

/// Changes laid over a file, keyed by the file offset each piece starts at.
#[derive(Debug, Default, Clone)]
pub struct Overlay {
    pieces: BTreeMap<u64, Piece>,
}

impl Overlay {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `data` was written at `offset`.
    pub fn write(&mut self, offset: u64, data: Arc<[u8]>) {
        let end = offset.saturating_add(data.len() as u64);
        self.insert(
            offset,
            Piece {
                end,
                data: Some(data),
                skip: 0,
            },
        );
    }

    /// Records that `[offset, offset + len)` was zeroed.
    pub fn zero(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        self.insert(
            offset,
            Piece {
                end,
                data: None,
                skip: 0,
            },
        );
    }

    fn insert(&mut self, start: u64, piece: Piece) {
        if piece.end <= start {
            return;
        }
        let end = piece.end;
        let covered: Vec<u64> = self
            .pieces
            .range(..end)
            .rev()
            .take_while(|(_, p)| p.end > start)
            .map(|(&s, _)| s)
            .collect();
        for old_start in covered {
            let Some(old) = self.pieces.remove(&old_start) else {
                continue;
            };
            if old_start < start {
                let left = Piece {
                    end: start,
                    ..old.clone()
                };
                self.pieces.insert(old_start, left);
            }
            if old.end > end {
                let cut = (end - old_start) as usize;
                let right = Piece {
                    end: old.end,
                    data: old.data.clone(),
                    skip: old.skip.saturating_add(cut),
                };
                self.pieces.insert(end, right);
            }
        }
        self.pieces.insert(start, piece);
    }

    /// Lays the overlay over `buf`, which holds the file's bytes from `offset`.
    pub fn apply(&self, buf: &mut [u8], offset: u64) {
        let end = offset.saturating_add(buf.len() as u64);
        // The piece starting before `offset` may reach into the buffer; find it first.
        let first = self
            .pieces
            .range(..=offset)
            .next_back()
            .map(|(&s, _)| s)
            .unwrap_or(offset);
        for (&start, piece) in self.pieces.range(first..end) {
            let from = start.max(offset);
            let to = piece.end.min(end);
            if from >= to {
                continue;
            }
            let dst = (from - offset) as usize..(to - offset) as usize;
            let Some(target) = buf.get_mut(dst) else {
                continue;
            };
            match &piece.data {
                None => target.fill(0),
                Some(data) => {
                    let src_start = piece.skip.saturating_add((from - start) as usize);
                    match data.get(src_start..src_start.saturating_add(target.len())) {
                        Some(src) => target.copy_from_slice(src),
                        None => target.fill(0),
                    }
                }
            }
        }
    }

    /// The end of the highest range the overlay changes (0 when empty): replay extends the
    /// file that far.
    pub fn end(&self) -> u64 {
        self.pieces.values().map(|p| p.end).max().unwrap_or(0)
    }

    /// Bytes of memory the overlay's data takes (each shared buffer counted once).
    pub fn memory(&self) -> u64 {
        let mut seen = std::collections::HashSet::new();
        self.pieces
            .values()
            .filter_map(|p| p.data.as_ref())
            .filter(|d| seen.insert(Arc::as_ptr(d) as *const u8 as usize))
            .map(|d| d.len() as u64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(o: &Overlay, base: &[u8]) -> Vec<u8> {
        let mut buf = base.to_vec();
        o.apply(&mut buf, 0);
        buf
    }

    #[test]
    fn later_changes_win_and_split_earlier_ones() {
        let base = [9u8; 32];
        let mut o = Overlay::new();
        assert!(o.pieces.is_empty());
        o.write(4, Arc::from(&[1u8, 2, 3, 4, 5, 6, 7, 8][..]));
        o.zero(6, 2);
        o.write(7, Arc::from(&[0xaa][..]));
        let expect: Vec<u8> = [9, 9, 9, 9, 1, 2, 0, 0xaa, 5, 6, 7, 8]
            .into_iter()
            .chain([9; 20])
            .collect();
        assert_eq!(view(&o, &base), expect);
        assert_eq!(o.end(), 12);
        // Two pieces of one buffer count it once.
        assert_eq!(o.memory(), 8 + 1);
        // A read starting inside a piece sees its right bytes.
        let mut part = [0u8; 3];
        o.apply(&mut part, 8);
        assert_eq!(part, [5, 6, 7]);
        // A change covering everything replaces it all.
        o.zero(0, 100);
        assert_eq!(view(&o, &base), vec![0; 32]);
        assert_eq!(o.pieces.len(), 1);
        assert_eq!(o.memory(), 0);
    }

    #[test]
    fn empty_and_far_ranges_are_harmless() {
        let mut o = Overlay::new();
        o.zero(10, 0);
        assert!(o.pieces.is_empty());
        o.zero(u64::MAX - 1, 10);
        let mut buf = [7u8; 4];
        o.apply(&mut buf, u64::MAX - 2);
        assert_eq!(buf[..2], [7, 0], "the byte at 2^64 - 1 is past any file");
    }
}
