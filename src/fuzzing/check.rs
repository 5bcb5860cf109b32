//! The invariants every image must keep whatever its bytes, and the model of what the
//! exercise wrote, against which later reads are compared.

use std::fmt;

use crate::image::{Extent, ExtentState, Image};

/// Block status is asked in windows of this size, as `lseek` does.
pub const STATUS_WINDOW: u64 = 1 << 30;
/// What a buffer holds before a read into it that must set every byte (the FUSE request
/// threads reuse their read buffers).
pub const POISON: u8 = 0xa5;
/// How much of a range a seek skipped is read back to check that it is zeros.
const SEEK_VERIFY: u64 = 64 << 10;

/// A broken invariant: a bug in imgfs, never a property of the input.
#[derive(Debug)]
pub struct Violation(pub String);

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub type Checked<T = ()> = Result<T, Violation>;

pub fn violation(message: impl Into<String>) -> Violation {
    Violation(message.into())
}

/// The extents of `block_status(offset, len)` on a disk of `size` bytes must cover the range
/// clipped to the disk, in order, without gaps, overlaps or empty extents.
pub fn extents_cover(extents: &[Extent], offset: u64, len: u64, size: u64) -> Checked {
    let end = offset.saturating_add(len).min(size);
    let mut at = offset;
    for e in extents {
        if e.offset != at || e.len == 0 {
            return Err(violation(format!(
                "block_status({offset}, {len}) on a {size}-byte disk: extent {e:?} does not \
                 start at {at} or is empty"
            )));
        }
        at = e.offset.checked_add(e.len).ok_or_else(|| {
            violation(format!(
                "block_status({offset}, {len}): extent {e:?} overflows"
            ))
        })?;
    }
    if at.max(offset) != end.max(offset) {
        return Err(violation(format!(
            "block_status({offset}, {len}) on a {size}-byte disk covers up to {at}, not {end}: \
             {extents:?}"
        )));
    }
    Ok(())
}

/// The position of the first non-zero byte of `data`. Compares 4 KiB at a time against
/// zeros, because a byte-by-byte loop is what coverage instrumentation slows down most.
pub fn first_nonzero(data: &[u8]) -> Option<usize> {
    const ZEROS: [u8; 4096] = [0; 4096];
    let mut base = 0;
    for chunk in data.chunks(ZEROS.len()) {
        if chunk != &ZEROS[..chunk.len()] {
            return chunk.iter().position(|&b| b != 0).map(|at| base + at);
        }
        base += chunk.len();
    }
    None
}

/// The position of the first byte where `a` and `b` differ (as long as the shorter one).
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    let len = a.len().min(b.len());
    if a[..len] == b[..len] {
        return None;
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Bytes of `data` (read at `data_offset`) that `extents` call zero or unallocated must read
/// as zeros.
pub fn holes_read_as_zeros(extents: &[Extent], data: &[u8], data_offset: u64) -> Checked {
    let data_end = data_offset + data.len() as u64;
    for e in extents.iter().filter(|e| e.state != ExtentState::Data) {
        let start = e.offset.max(data_offset);
        let end = e.offset.saturating_add(e.len).min(data_end);
        if start >= end {
            continue;
        }
        let part = &data[(start - data_offset) as usize..(end - data_offset) as usize];
        if let Some(at) = first_nonzero(part) {
            return Err(violation(format!(
                "byte {} reads {:#04x} but block_status says {:?} for {}..{}",
                start + at as u64,
                part[at],
                e.state,
                e.offset,
                e.offset + e.len
            )));
        }
    }
    Ok(())
}

/// A SEEK_DATA (`want_data`) or SEEK_HOLE from `offset` that went to `found` (`None`: ENXIO)
/// must agree with the block status: what it skipped is of the other kind (checked up to one
/// window, and read back as zeros for SEEK_DATA), and where it stopped is of the kind sought.
pub fn seek_agrees(image: &dyn Image, offset: u64, want_data: bool, found: Option<u64>) -> Checked {
    let size = image.size();
    let what = if want_data { "SEEK_DATA" } else { "SEEK_HOLE" };
    let to = match found {
        None if want_data => size,
        None => return Err(violation(format!("{what} from {offset} found no hole"))),
        Some(to) if to < offset || to > size || (want_data && to == size) => {
            return Err(violation(format!(
                "{what} from {offset} of a {size}-byte disk went to {to}"
            )))
        }
        Some(to) => to,
    };
    let skipped = (to - offset).min(STATUS_WINDOW);
    if let Ok(extents) = image.block_status(offset, skipped) {
        extents_cover(&extents, offset, skipped, size)?;
        if let Some(e) = extents.iter().find(|e| e.state.is_data() == want_data) {
            return Err(violation(format!(
                "{what} from {offset} went to {to}, past {e:?}"
            )));
        }
    }
    if want_data {
        let mut buf = vec![0u8; skipped.min(SEEK_VERIFY) as usize];
        if image.read_at(&mut buf, offset).is_ok() {
            if let Some(at) = first_nonzero(&buf) {
                return Err(violation(format!(
                    "{what} from {offset} went to {to}, past byte {} which reads {:#04x}",
                    offset + at as u64,
                    buf[at]
                )));
            }
        }
    }
    if to < size {
        if let Ok(extents) = image.block_status(to, 1) {
            extents_cover(&extents, to, 1, size)?;
            if extents.first().map(|e| e.state.is_data()) != Some(want_data) {
                return Err(violation(format!(
                    "{what} from {offset} went to {to}, which is {extents:?}"
                )));
            }
        }
    }
    Ok(())
}

/// What the exercise did to the disk, in order, to know what a range must read.
#[derive(Default)]
pub struct Model {
    events: Vec<Event>,
}

enum Event {
    /// These bytes were written (and the write returned Ok).
    Wrote(u64, Vec<u8>),
    /// The range's contents are unknown: discarded, or a write that failed half-way.
    Forgot(u64, u64),
}

impl Model {
    pub fn wrote(&mut self, offset: u64, data: Vec<u8>) {
        self.events.push(Event::Wrote(offset, data));
    }

    pub fn forgot(&mut self, offset: u64, len: u64) {
        self.events.push(Event::Forgot(offset, len));
    }

    /// The pieces of `[offset, offset + len)` as (start, end, bytes written there), `None`
    /// where nothing known was written, in order.
    fn pieces(&self, offset: u64, len: u64) -> Vec<(u64, u64, Option<&[u8]>)> {
        let mut pieces: Vec<(u64, u64, Option<&[u8]>)> = vec![(offset, offset + len, None)];
        for event in &self.events {
            let (at, elen, bytes) = match event {
                Event::Wrote(at, bytes) => (*at, bytes.len() as u64, Some(bytes.as_slice())),
                Event::Forgot(at, elen) => (*at, *elen, None),
            };
            let stop = at.saturating_add(elen);
            let mut next = Vec::with_capacity(pieces.len() + 2);
            for (start, end, known) in pieces {
                if end <= at || start >= stop {
                    next.push((start, end, known));
                    continue;
                }
                if start < at {
                    next.push((start, at, known.map(|k: &[u8]| &k[..(at - start) as usize])));
                }
                let (a, b) = (start.max(at), end.min(stop));
                next.push((
                    a,
                    b,
                    bytes.map(|w| &w[(a - at) as usize..(b - at) as usize]),
                ));
                if end > stop {
                    let skip = (stop - start) as usize;
                    next.push((stop, end, known.map(|k: &[u8]| &k[skip..])));
                }
            }
            pieces = next;
        }
        pieces
    }

    /// `data`, read at `offset`, must hold what was written there.
    pub fn matches(&self, data: &[u8], offset: u64, when: &str) -> Checked {
        for (start, end, known) in self.pieces(offset, data.len() as u64) {
            let Some(want) = known else {
                continue;
            };
            let got = &data[(start - offset) as usize..(end - offset) as usize];
            if let Some(i) = first_difference(want, got) {
                return Err(violation(format!(
                    "{when}: byte {} reads {:#04x}, {:#04x} was written there",
                    start + i as u64,
                    got[i],
                    want[i]
                )));
            }
        }
        Ok(())
    }

    /// The written ranges, to read back after a reopen.
    pub fn written_ranges(&self) -> Vec<(u64, u64)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Wrote(at, bytes) => Some((*at, bytes.len() as u64)),
                Event::Forgot(..) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(offset: u64, len: u64, state: ExtentState) -> Extent {
        Extent {
            offset,
            len,
            state,
            layer: 0,
            host: None,
        }
    }

    #[test]
    fn extents_must_cover_the_clipped_range_contiguously() {
        let data = ExtentState::Data;
        let zero = ExtentState::Zero;
        assert!(extents_cover(&[e(0, 5, data), e(5, 5, zero)], 0, 10, 100).is_ok());
        assert!(extents_cover(&[e(90, 10, data)], 90, 50, 100).is_ok());
        assert!(extents_cover(&[], 100, 50, 100).is_ok());
        assert!(extents_cover(&[e(0, 5, data), e(6, 4, zero)], 0, 10, 100).is_err());
        assert!(extents_cover(&[e(0, 5, data)], 0, 10, 100).is_err());
        assert!(extents_cover(&[e(0, 0, data), e(0, 10, data)], 0, 10, 100).is_err());
        assert!(extents_cover(&[e(0, 11, data)], 0, 10, 100).is_err());
    }

    #[test]
    fn holes_must_read_as_zeros() {
        let extents = [e(0, 4, ExtentState::Data), e(4, 4, ExtentState::Zero)];
        assert!(holes_read_as_zeros(&extents, &[1, 2, 3, 4, 0, 0, 0, 0], 0).is_ok());
        assert!(holes_read_as_zeros(&extents, &[9, 0, 0], 3).is_ok());
        assert!(holes_read_as_zeros(&extents, &[0, 0, 9, 0], 4).is_err());
    }

    #[test]
    fn the_model_knows_the_last_write_of_each_byte() {
        let mut m = Model::default();
        m.wrote(10, vec![1; 10]);
        m.wrote(15, vec![2; 10]);
        m.forgot(12, 2);
        assert!(m.matches(&[1, 1, 7, 7, 1, 2, 2], 10, "t").is_ok());
        assert!(m.matches(&[1, 1, 7, 7, 1, 1], 10, "t").is_err());
        assert!(m.matches(&[5; 10], 0, "t").is_ok());
        assert_eq!(m.written_ranges(), [(10, 10), (15, 10)]);
        let mut inner = Model::default();
        inner.wrote(0, vec![3; 10]);
        inner.wrote(4, vec![4; 2]);
        assert!(inner
            .matches(&[3, 3, 3, 3, 4, 4, 3, 3, 3, 3, 9], 0, "t")
            .is_ok());
        assert!(inner.matches(&[3, 4, 4, 3], 3, "t").is_ok());
        assert!(inner
            .matches(&[3, 3, 3, 3, 4, 4, 3, 3, 3, 4], 0, "t")
            .is_err());
    }
}
