//! The sector bitmap pages a differencing image changed since its last flush, kept in memory
//! until `flush` writes them through the log with the BAT.
//!
//! A sector bitmap block is 1 MiB of bits, one per logical sector of its chunk: bit 0 of byte 0
//! for the chunk's first sector; 1 means the sector is in this file, 0 that the parent has it.
//! Bits are tracked in 4 KiB pages (the log writes whole 4 KiB sectors), keyed by file offset.
//!
//! # Consistency
//!
//! Only writers holding the image's allocation mutex change pages, and `flush` (also under that
//! mutex) removes a page only after its bytes are in place in the file. So a reader that finds
//! a page missing from memory and then reads it from the file sees every bit set by a write that
//! finished before the read began: either the page was never changed, or the file holds it.
//! The lock guards the map only and is never held during I/O.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{PoisonError, RwLock};

use crate::error::{Error, Result};

/// The bitmap is changed and logged in 4 KiB pages.
pub const PAGE: u64 = 4096;

/// Changed sector bitmap pages, by the file offset of the page.
#[derive(Default)]
pub struct Bitmaps {
    pages: RwLock<BTreeMap<u64, Box<[u8]>>>,
}

impl Bitmaps {
    pub fn new() -> Self {
        Self::default()
    }

    /// Fills `buf` with the bitmap bytes at file offset `offset`: changed pages from memory,
    /// the rest read with `read_file(buf, offset)` after the lock is released.
    pub fn read(
        &self,
        buf: &mut [u8],
        offset: u64,
        read_file: impl Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| Error::out_of_range("sector bitmap read beyond 2^64"))?;
        let mut missing: Vec<Range<u64>> = Vec::new();
        {
            let pages = self.pages.read().unwrap_or_else(PoisonError::into_inner);
            let mut at = offset;
            while at < end {
                let page = at - at % PAGE;
                let stop = (page + PAGE).min(end);
                match pages.get(&page) {
                    Some(bytes) => {
                        let dst = buf
                            .get_mut((at - offset) as usize..(stop - offset) as usize)
                            .ok_or_else(internal)?;
                        let src = bytes
                            .get((at - page) as usize..(stop - page) as usize)
                            .ok_or_else(internal)?;
                        dst.copy_from_slice(src);
                    }
                    None => match missing.last_mut() {
                        Some(last) if last.end == at => last.end = stop,
                        _ => missing.push(at..stop),
                    },
                }
                at = stop;
            }
        }
        for range in missing {
            let dst = buf
                .get_mut((range.start - offset) as usize..(range.end - offset) as usize)
                .ok_or_else(internal)?;
            read_file(dst, range.start)?;
        }
        Ok(())
    }

    /// Sets the bits `bits` of the bitmap whose bit 0 is the lowest bit of the byte at file
    /// offset `base` (page aligned: bitmap blocks are 1 MiB aligned) to `value`. Pages not in memory are read with `read_file`; only pages
    /// whose bytes change are kept. Callers serialise changes (the allocation mutex).
    pub fn assign(
        &self,
        base: u64,
        bits: Range<u64>,
        value: bool,
        read_file: impl Fn(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        if base % PAGE != 0 {
            return Err(Error::out_of_range(
                "internal: sector bitmap not page aligned",
            ));
        }
        let mut bit = bits.start;
        while bit < bits.end {
            let byte = base
                .checked_add(bit / 8)
                .ok_or_else(|| Error::out_of_range("sector bitmap beyond 2^64"))?;
            let page = byte - byte % PAGE;
            // The bits of this page: up to the page's end or the range's end.
            let first = (page - base) * 8;
            let stop = (first + PAGE * 8).min(bits.end);
            let known = self
                .pages
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&page)
                .cloned();
            let mut bytes = match known {
                Some(bytes) => bytes,
                None => {
                    let mut fresh = vec![0u8; PAGE as usize].into_boxed_slice();
                    read_file(&mut fresh, page)?;
                    fresh
                }
            };
            let mut changed = false;
            for b in bit..stop {
                let i = b - first;
                let slot = bytes.get_mut((i / 8) as usize).ok_or_else(internal)?;
                let mask = 1u8 << (i % 8);
                let new = if value { *slot | mask } else { *slot & !mask };
                changed |= new != *slot;
                *slot = new;
            }
            if changed {
                self.pages
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(page, bytes);
            }
            bit = stop;
        }
        Ok(())
    }

    /// The changed pages as (file offset, 4 KiB), in file order.
    pub fn dirty_pages(&self) -> Vec<(u64, Vec<u8>)> {
        self.pages
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(&at, bytes)| (at, bytes.to_vec()))
            .collect()
    }

    /// Forgets the pages at `offsets`, once they are in place in the file.
    pub fn forget(&self, offsets: impl IntoIterator<Item = u64>) {
        let mut pages = self.pages.write().unwrap_or_else(PoisonError::into_inner);
        for at in offsets {
            pages.remove(&at);
        }
    }

    pub fn is_dirty(&self) -> bool {
        !self
            .pages
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }
}

fn internal() -> Error {
    Error::out_of_range("internal: sector bitmap page index")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `len` bytes of `fill`, as `read_file` sees it.
    fn file(fill: u8, len: u64) -> impl Fn(&mut [u8], u64) -> Result<()> {
        move |buf: &mut [u8], at: u64| {
            if at.checked_add(buf.len() as u64).is_none_or(|end| end > len) {
                return Err(Error::out_of_range("beyond the test file"));
            }
            buf.fill(fill);
            Ok(())
        }
    }

    #[test]
    fn assigned_bits_read_back_over_the_file() {
        let b = Bitmaps::new();
        let base = 1 << 20;
        // Bits 3..20: byte 0 bits 3-7, byte 1, byte 2 bits 0-3.
        b.assign(base, 3..20, true, file(0, 2 << 20)).unwrap();
        assert!(b.is_dirty());
        let mut buf = [0xaau8; 4];
        b.read(&mut buf, base, file(0x55, 2 << 20)).unwrap();
        assert_eq!(buf, [0xf8, 0xff, 0x0f, 0]);
        // A read crossing into a page not in memory takes those bytes from the file.
        let mut buf = [0u8; 8];
        b.read(&mut buf, base + PAGE - 4, file(0x55, 2 << 20))
            .unwrap();
        assert_eq!(buf, [0, 0, 0, 0, 0x55, 0x55, 0x55, 0x55]);

        // Clearing bits that are already clear keeps no page.
        let c = Bitmaps::new();
        c.assign(base, 0..100_000, false, file(0, 2 << 20)).unwrap();
        assert!(!c.is_dirty());
        // A range across three pages changes all three; the page between them wholly.
        c.assign(base, PAGE * 8 - 1..PAGE * 16 + 1, true, file(0, 2 << 20))
            .unwrap();
        let pages = c.dirty_pages();
        let offsets: Vec<u64> = pages.iter().map(|(at, _)| *at).collect();
        assert_eq!(offsets, [base, base + PAGE, base + 2 * PAGE]);
        assert_eq!(pages[0].1[4095], 0x80);
        assert!(pages[1].1.iter().all(|&b| b == 0xff));
        assert_eq!(pages[2].1[0], 1);
        c.forget(offsets);
        assert!(!c.is_dirty());
    }

    #[test]
    fn pages_the_file_cannot_give_fail_cleanly() {
        let b = Bitmaps::new();
        let e = b.assign(1 << 20, 0..8, true, file(0, 1 << 20)).unwrap_err();
        assert!(e.to_string().contains("beyond the test file"), "{e}");
        assert!(!b.is_dirty());
        assert!(b.assign(u64::MAX - 4095, 0..64, true, file(0, 0)).is_err());
        assert!(b.assign(100, 0..8, true, file(0, 1 << 20)).is_err());
    }
}
