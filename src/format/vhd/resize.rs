//! Growing a dynamic or differencing VHD (`truncate -s BIGGER` on its raw file) where its BAT
//! has room.
//!
//! The BAT at `table_offset` holds `max_table_entries` entries. QEMU pads it to whole sectors
//! with 0xff and puts the first block right after, so its last sector has room for up to 127
//! more entries: at 2 MiB blocks, a 16 MiB disk qemu-img made grows to 256 MiB. The new
//! entries stay inside that sector and clear of every block, the parent locators' data, the
//! header, the footers and the place the next block goes; a resize that needs more is refused
//! as unsupported (moving blocks is not done), as are shrinking and fixed disks (growing one
//! means moving its footer past the new end of the data).
//!
//! The size lives in the footer as `current_size` and as the CHS geometry. QEMU and Virtual
//! PC size the disks they made (creator "qemu", "vpc ") by the geometry, every other creator
//! by `current_size` (`Footer::virtual_size`), so the new footer gets both: the geometry
//! computed as at creation (`footer::chs_for`), unless it is the maximum one (QEMU's
//! force_size), which stays. A disk sized by its geometry can only take sizes a geometry
//! expresses exactly: others are refused, naming the next one that works.
//!
//! A resize that fits, under the allocation mutex:
//!
//! 1. flushes (repairing a damaged footer copy as the first write's flush does);
//! 2. writes the new BAT entries (0xffffffff: no block), sync;
//! 3. writes the dynamic header with the new `max_table_entries`, sync (a table longer than
//!    the disk needs is valid, for QEMU too);
//! 4. writes the new footer at the end of the file (and over the copy an earlier allocation
//!    left where the next block goes, so the room there is found again), sync;
//! 5. writes the copy at offset 0, sync.
//!
//! A crash before step 4 leaves the old disk. One between steps 4 and 5 leaves the footers
//! differing: imgfs (like the spec and Hyper-V) goes by the last one, sees the new disk, and
//! repairs the copy with the flush after its next write; QEMU reads the copy and sees the old
//! disk until then. Both are valid images holding the same data.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use super::bat::Geometry;
use super::footer::{chs_for, Footer, SizeFrom, FOOTER_LEN, SECTOR};
use super::header::{self, DynHeader, HEADER_LEN};
use super::{AllocState, Sparse, VhdImage};
use crate::error::{Error, Result};
use crate::image::check_resize;

impl VhdImage {
    pub(super) fn resize_inner(&self, new_size: u64) -> Result<()> {
        self.write_back.refuse_writes()?;
        let current = self.virtual_size();
        if !check_resize(&self.read_only_reason, current, new_size, SECTOR, "VHD")? {
            return Ok(());
        }
        let Some(sparse) = &self.sparse else {
            return Err(Error::unsupported(
                "a fixed VHD cannot grow: its footer would have to move past the new end of \
                 the data, which is not implemented",
            ));
        };
        let mut alloc = sparse.lock_alloc();
        let old = self.current_footer();
        let footer = new_footer(&old, new_size)?;
        let geo = sparse.geometry;
        let entries = u32::try_from(new_size.div_ceil(geo.block_size))
            .map_err(|_| Error::out_of_range(format!("{new_size} bytes is too large a VHD")))?;
        // Damaged footers are repaired by the flush after the first write: a resize is one.
        self.written.store(true, Ordering::Relaxed);
        let path = self.file.path();
        self.write_back
            .run(path, || self.flush_locked(sparse, &mut alloc))?;
        let file_len = self.file.len()?;
        let end_at = file_len
            .checked_sub(FOOTER_LEN as u64)
            .ok_or_else(|| Error::corrupt("the file is shorter than a footer"))?;
        let mut last = [0u8; FOOTER_LEN];
        self.file.read_exact_at(&mut last, end_at)?;
        if last != *old.bytes() {
            return Err(Error::corrupt(
                "the last 512 bytes of the file are not the footer in force",
            ));
        }
        let have = sparse.read_bat().len();
        if entries > have {
            let header_at = old.data_offset;
            check_room(sparse, &alloc, (have, entries), header_at, end_at..file_len)?;
        }
        // The footer an earlier allocation left where the next block goes.
        let mut stale = [0u8; FOOTER_LEN];
        let placeholder = alloc.next_free + FOOTER_LEN as u64 <= end_at && {
            self.file.read_exact_at(&mut stale, alloc.next_free)?;
            stale == *old.bytes()
        };
        self.write_back.run(path, || {
            if entries > have {
                let table = sparse.header.table_offset;
                let fill = vec![0xffu8; (entries - have) as usize * 4];
                self.file.write_all_at(&fill, table + u64::from(have) * 4)?;
                self.file.sync_data()?;
                let mut raw = [0u8; HEADER_LEN];
                self.file.read_exact_at(&mut raw, old.data_offset)?;
                let on_disk = DynHeader::parse(&raw)?;
                if on_disk.max_table_entries != have || on_disk.table_offset != table {
                    return Err(Error::corrupt(
                        "the dynamic disk header changed under the driver",
                    ));
                }
                let raw = header::with_max_entries(&raw, entries)?;
                self.file.write_all_at(&raw, old.data_offset)?;
                self.file.sync_data()?;
            }
            self.file.write_all_at(footer.bytes(), end_at)?;
            if placeholder {
                self.file.write_all_at(footer.bytes(), alloc.next_free)?;
            }
            self.file.sync_data()?;
            self.file.write_all_at(footer.bytes(), 0)?;
            self.file.sync_data()?;
            Ok(())
        })?;

        if entries > have {
            let geometry = Geometry {
                entries,
                virtual_size: new_size,
                ..geo
            };
            sparse.bitmaps.grow(entries);
            sparse.write_bat().grow(geometry)?;
        }
        *self.footer.write().unwrap_or_else(PoisonError::into_inner) = footer;
        self.size.store(new_size, Ordering::Release);
        drop(alloc);
        Ok(())
    }
}

/// The footer of the disk grown to `new_size` bytes: its `current_size` and CHS geometry; a
/// disk sized by the geometry (`SizeFrom::Geometry`) must get exactly that size from it.
fn new_footer(old: &Footer, new_size: u64) -> Result<Footer> {
    let sectors = new_size / SECTOR;
    let chs = if old.has_max_geometry() {
        (old.cylinders, old.heads, old.sectors_per_track)
    } else {
        chs_for(sectors)
    };
    let footer = old.resized(new_size, chs)?;
    let (size, from) = footer.virtual_size()?;
    if size == new_size {
        return Ok(footer);
    }
    let why = match from {
        SizeFrom::Geometry => format!(
            "the disk is sized by its CHS geometry, as creator {:?} (QEMU, Virtual PC) sizes \
             its disks, and no geometry gives {new_size} bytes; {} bytes is the next size one \
             gives",
            old.creator_app_text(),
            next_chs_size(sectors)
        ),
        SizeFrom::CurrentSize => format!("the new footer gives {size} bytes, not {new_size}"),
    };
    Err(Error::unsupported(why))
}

/// The smallest size at least `sectors` sectors long that a CHS geometry gives exactly, found
/// as qemu-img create finds it.
fn next_chs_size(sectors: u64) -> u64 {
    let product = |(c, h, s): (u16, u8, u8)| u64::from(c) * u64::from(h) * u64::from(s);
    (0..1 << 16)
        .map(|i| product(chs_for(sectors + i)))
        .find(|&p| p >= sectors)
        .unwrap_or(sectors)
        * SECTOR
}

/// Checks that the BAT can grow from `have` to `entries` entries where it is: inside its
/// last sector, and clear of every structure, block and the place the next block goes.
/// `header_at` is where the dynamic header lies, `footer` where the last footer does.
fn check_room(
    sparse: &Sparse,
    alloc: &AllocState,
    (have, entries): (u32, u32),
    header_at: u64,
    footer: Range<u64>,
) -> Result<()> {
    let table = sparse.header.table_offset;
    let old_end = table + u64::from(have) * 4;
    let new_end = table + u64::from(entries) * 4;
    let limit = old_end.next_multiple_of(SECTOR);
    let refuse = |why: String| {
        Error::unsupported(format!(
            "the disk needs {entries} BAT entries and {have} fit where the table is: {why}; \
             moving blocks to make room is not implemented"
        ))
    };
    if new_end > limit {
        return Err(refuse(format!(
            "the table's last sector ends at {limit:#x}, {} entries in",
            (limit - table) / 4
        )));
    }
    let mut taken: Vec<(&str, Range<u64>)> = vec![
        ("the footer copy", 0..FOOTER_LEN as u64),
        (
            "the dynamic header",
            header_at..header_at + HEADER_LEN as u64,
        ),
        ("the footer", footer),
        ("the next block", alloc.next_free..u64::MAX),
    ];
    for locator in &sparse.header.locators {
        if let Ok(range) = locator.data_range() {
            taken.push(("a parent locator", range));
        }
    }
    if let Some(at) = sparse.read_bat().first_block_from(old_end) {
        taken.push(("a block", at..at.saturating_add(1)));
    }
    let new = old_end..new_end;
    match taken
        .iter()
        .find(|(_, r)| new.start < r.end && r.start < new.end)
    {
        Some((name, r)) => Err(refuse(format!("{name} lies at {:#x}", r.start))),
        None => Ok(()),
    }
}
