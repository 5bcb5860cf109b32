//! VMware VMDK disks (hosted sparse, flat, VMFS, ZERO, COWD and seSparse extents, chains
//! through parentFileNameHint), served as one raw disk.
//!
//! # On-disk layout
//!
//! A disk is a descriptor (descriptor.rs) that lists extents in disk order. The descriptor is a
//! text file of its own (monolithicFlat, twoGbMaxExtentSparse/Flat, vmfs, ...) or embedded in a
//! hosted sparse extent (monolithicSparse, streamOptimized), which is then the only extent,
//! whatever name its descriptor gives it (files get renamed).
//!
//! ```text
//! FLAT / VMFS        the extent's bytes at `offset` sectors of a plain file
//! ZERO               no file: reads as zeros
//! SPARSE (KDMV)      sector 0     header (header.rs)
//!                    descriptorOffset   embedded descriptor (monolithic only)
//!                    rgdOffset          redundant grain directory, u32 sector numbers of GTs
//!                    gdOffset           grain directory (all ones: in the footer, at the end)
//!                    GTs                numGTEsPerGT u32 entries: 0 unallocated, 1 zeroed
//!                                       grain (with flag bit 2), else the grain's sector; for
//!                                       compressed extents the sector of a grain marker
//!                                       (lba u64, size u32, zlib stream)
//!                    grains             grainSize sectors each
//! VMFSSPARSE (COWD)  ESXi delta (esx.rs): u32 sectors, 4096-entry tables, no redundancy
//! SESPARSE           ESXi 6.5+ delta (esx.rs): u64 entries naming tables and grains by number
//! ```
//!
//! qemu-img preallocates every grain table (twice, with the redundant copy) right after the
//! directories; other writers leave directory entries empty until a table is needed.
//!
//! # Writes and metadata write order
//!
//! Flat and VMFS extents are written in place. A hosted sparse extent (sparse.rs) appends: a
//! missing grain table (and its redundant copy) is reserved at the grain-aligned end of the
//! file and its directory entries set in memory; a missing grain is written whole at the end
//! of the file (the payload merged with the parent's bytes, or zeros) and only then published
//! in the in-memory grain table. Flush: data `fdatasync` -> dirty grain tables, both copies ->
//! `fdatasync` -> dirty pieces of both directories -> `fdatasync`. A crash leaks appended
//! grains at worst; no directory entry points at an unwritten table, no table entry at an
//! unwritten grain. The first write of a session gives the descriptor a new CID first (synced),
//! as QEMU does, so a child made from this disk's old state notices it changed.
//!
//! Discard: a whole grain of a sparse extent becomes a zeroed grain (GTE 1) where the header
//! has the zeroed-grain flag, else it stays mapped; its host range is punched at once, which
//! is safe because grains are only ever appended, never reused, so a table still naming the
//! grain on disk reads zeros from it. The table goes out with the next flush like any other.
//! Flat extents are punched in place; partial grains, and unallocated grains over a parent
//! where no zeroed grain can hide it, are written with zeros.
//!
//! # Failures
//!
//! A failed write of a new grain fails only its request: the grain is published after it and
//! its space taken again by the next allocation (a table reserved for it is written, empty,
//! by the next flush). Any failure of a flush (of any extent, also one a sparse extent does
//! from its write path to bound its dirty tables) or of the descriptor's CID update stops the
//! disk (`meta::write_back`): it is served read-only with the reason in `info`, and every
//! later flush fails, since what was written since the last successful one may be lost. The
//! files are left as a crash at that step would leave them.
//! streamOptimized (compressed), version 3, COWD and seSparse extents are served read-only.
//!
//! # Locks (in this order, never the reverse)
//!
//! 1. `cid` (Mutex, image): held while the first write renews the descriptor's CID.
//! 2. Per sparse extent `alloc` (Mutex): serialises allocation and flush of that extent; held
//!    across the data write of a new grain so no grain is allocated twice.
//! 3. Per sparse extent `directory` (RwLock): the grain directories; read for lookups,
//!    written to publish a new grain table. Never held during I/O.
//! 4. The grain table cache's internal mutex, for a lookup or insert only.
//!
//! Reads and in-place writes take the directory read lock only to look up an entry and do
//! their I/O with no lock held. Extents are independent: each has its own locks.

mod check;
mod descriptor;
mod esx;
mod extent;
mod header;
mod sparse;
mod tables;

#[cfg(test)]
mod tests;

use std::ffi::OsStr;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::{Error, Result};
use crate::format::backing::{read_below, status_below, Backing};
use crate::host::HostFile;
use crate::image::{
    check_range, check_span, push_extent, request_part, request_part_mut, zero_fill,
    Extent as Status, ExtentState, Image, ImageInfo,
};
use crate::meta::budget::TableBudget;
use crate::meta::write_back::WriteBack;

pub use check::check;
pub use descriptor::{Access, Descriptor, ExtentType};
use descriptor::{MAX_DESCRIPTOR_LEN, SECTOR_SIZE};
use extent::{Extent, Storage};
pub use header::SparseHeader;
use sparse::SparseExtent;

/// Where the descriptor text lives, for rewriting its CID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TextAt {
    /// A descriptor file of its own, from offset 0.
    File,
    /// Embedded in the top sparse extent: `room` bytes at `at`.
    Embedded { at: u64, room: u64 },
}

/// The first phase of opening a VMDK: its descriptor, read from the top file, which names the
/// extent files and the parent for the caller to resolve.
pub struct VmdkTop {
    pub descriptor: Descriptor,
    text: Vec<u8>,
    text_at: TextAt,
    /// The top file's own header when it is a sparse extent carrying its descriptor.
    sparse: Option<SparseHeader>,
}

impl VmdkTop {
    /// Reads the descriptor of the disk whose top file is `file`.
    pub fn read(file: &HostFile) -> Result<VmdkTop> {
        let mut head = [0u8; 4];
        file.read_exact_at(&mut head, 0)?;
        match &head {
            b"KDMV" => Self::read_embedded(file),
            b"COWD" => Err(Error::unsupported(
                "this is a COWD (vmfsSparse) extent: it is served through the descriptor that \
                 names it",
            )),
            _ => {
                let len = file.len()?;
                if len > MAX_DESCRIPTOR_LEN {
                    return Err(Error::unsupported(format!(
                        "a {len}-byte file is too large to be a VMDK descriptor"
                    )));
                }
                let mut text = vec![0u8; len as usize];
                file.read_exact_at(&mut text, 0)?;
                let descriptor = Descriptor::parse(&text)?;
                descriptor.check_servable()?;
                Ok(VmdkTop {
                    descriptor,
                    text,
                    text_at: TextAt::File,
                    sparse: None,
                })
            }
        }
    }

    fn read_embedded(file: &HostFile) -> Result<VmdkTop> {
        let header = SparseHeader::read(file)?;
        let Some((at, room)) = embedded_descriptor(file)? else {
            return Err(Error::unsupported(
                "this VMDK sparse extent has no descriptor of its own: it is an extent of a \
                 disk described elsewhere (e.g. twoGbMaxExtentSparse) and served through that \
                 disk's descriptor",
            ));
        };
        let mut text = vec![0u8; room as usize];
        file.read_exact_at(&mut text, at)?;
        // A sparse file of capacity 0 only carries a descriptor for other extents (QEMU);
        // any other is the disk's one extent, whatever its extent lines say.
        let descriptor = match header.capacity {
            0 => Descriptor::parse(&text),
            _ => Descriptor::parse_embedded(&text),
        }
        .map_err(|e| e.at_offset(at))?;
        let text_at = TextAt::Embedded { at, room };
        if header.capacity == 0 {
            descriptor.check_servable()?;
            return Ok(VmdkTop {
                descriptor,
                text,
                text_at,
                sparse: None,
            });
        }
        Ok(VmdkTop {
            descriptor,
            text,
            text_at,
            sparse: Some(header),
        })
    }

    /// The file names of the extents that need a file, in disk order; none when the top file
    /// is itself the only extent.
    pub fn extent_files(&self) -> Vec<&OsStr> {
        if self.sparse.is_some() {
            return Vec::new();
        }
        self.descriptor
            .extents
            .iter()
            .filter_map(|e| e.file_name())
            .collect()
    }

    /// The parent named by parentFileNameHint, if any.
    pub fn parent_hint(&self) -> Option<&OsStr> {
        self.descriptor.parent_hint_name()
    }

    /// The CID the parent must have.
    pub fn parent_cid(&self) -> u32 {
        self.descriptor.parent_cid
    }

    pub fn cid(&self) -> u32 {
        self.descriptor.cid
    }
}

/// The embedded descriptor's (offset, length) in a KDMV file, `None` when it has none or its
/// area is empty.
fn embedded_descriptor(file: &HostFile) -> Result<Option<(u64, u64)>> {
    let mut head = vec![0u8; header::HEADER_LEN];
    file.read_exact_at(&mut head, 0)?;
    let header = SparseHeader::parse(&head)?;
    let Some((at, room)) = header.descriptor_range()? else {
        return Ok(None);
    };
    let file_len = file.len()?;
    if room > MAX_DESCRIPTOR_LEN
        || at
            .checked_add(room)
            .filter(|&end| end <= file_len)
            .is_none()
    {
        return Err(Error::corrupt(format!(
            "the VMDK embedded descriptor ({room} bytes at {at:#x}) is outside the file or too large"
        ))
        .at_offset(28));
    }
    let mut first = [0u8; 1];
    file.read_exact_at(&mut first, at)?;
    Ok((first[0] != 0).then_some((at, room)))
}

/// Whether the file at `path` is a hosted sparse extent with no descriptor of its own: a part
/// of a disk described elsewhere (qemu-img's and VMware's `-s001.vmdk` files, COWD delta
/// files), not a disk.
pub fn is_bare_extent(file: &HostFile) -> Result<bool> {
    let mut magic = [0u8; 4];
    file.read_exact_at(&mut magic, 0)?;
    // COWD files carry no descriptor: ESXi's delta disks, named by a vmfsSparse descriptor.
    if &magic == esx::COWD_MAGIC {
        return Ok(true);
    }
    if &magic != header::MAGIC {
        return Ok(false);
    }
    Ok(matches!(embedded_descriptor(file), Ok(None)))
}

/// The CID in the descriptor of the disk whose top file is `file` (to check a child's
/// parentCID against).
pub fn cid_of(file: &HostFile) -> Result<u32> {
    VmdkTop::read(file).map(|top| top.cid())
}

/// An open VMDK disk.
pub struct VmdkImage {
    top: Arc<HostFile>,
    descriptor: Descriptor,
    text: Mutex<Vec<u8>>,
    text_at: TextAt,
    create_type: String,
    extents: Vec<Extent>,
    size: u64,
    parent: Option<Backing>,
    cid: AtomicU32,
    cid_renewed: AtomicBool,
    read_only_reason: Option<String>,
    write_back: WriteBack,
}

impl VmdkImage {
    /// Opens the disk whose top file is `top` and whose descriptor `VmdkTop::read` returned,
    /// with the files of `top.extent_files()` opened in that order (the caller resolves them
    /// inside the source tree), and the parent already opened and its CID checked.
    pub fn open(
        top_file: Arc<HostFile>,
        top: VmdkTop,
        extent_files: Vec<Arc<HostFile>>,
        parent: Option<Backing>,
        read_only_reason: Option<String>,
    ) -> Result<VmdkImage> {
        let path = top_file.path().to_path_buf();
        Self::open_inner(top_file, top, extent_files, parent, read_only_reason)
            .map_err(|e| e.with_path(&path))
    }

    fn open_inner(
        top_file: Arc<HostFile>,
        top: VmdkTop,
        extent_files: Vec<Arc<HostFile>>,
        parent: Option<Backing>,
        read_only_reason: Option<String>,
    ) -> Result<VmdkImage> {
        let mut extents = Vec::new();
        // The grain directories of every extent count against one budget.
        let mut budget = TableBudget::default();
        let create_type;
        if let Some(header) = top.sparse.clone() {
            create_type = match top.descriptor.create_type.as_str() {
                "" if header.compressed() => "streamOptimized".to_string(),
                "" => "monolithicSparse".to_string(),
                other => other.to_string(),
            };
            let sectors = header.capacity;
            let sparse = SparseExtent::open(Arc::clone(&top_file), header, sectors, &mut budget)?;
            extents.push(Extent {
                start: 0,
                len: sectors * SECTOR_SIZE,
                access: descriptor::Access::ReadWrite,
                kind: ExtentType::Sparse,
                storage: Storage::Sparse(Box::new(sparse)),
            });
        } else {
            create_type = top.descriptor.create_type.clone();
            let mut files = extent_files.into_iter();
            let mut start = 0u64;
            for line in &top.descriptor.extents {
                let storage = match line.kind {
                    ExtentType::Zero => Storage::Zero,
                    _ => {
                        let file = files.next().ok_or_else(|| {
                            Error::out_of_range("internal: fewer extent files than extents")
                        })?;
                        open_storage(line, file, &mut budget)?
                    }
                };
                let len = line.sectors * SECTOR_SIZE;
                extents.push(Extent {
                    start,
                    len,
                    access: line.access,
                    kind: line.kind,
                    storage,
                });
                start += len;
            }
        }
        check_shared_files(&extents)?;
        let size = extents.last().map_or(0, Extent::end);
        let mut reasons: Vec<String> = read_only_reason.into_iter().collect();
        if reasons.is_empty() && !top_file.is_writable() {
            reasons.push("the descriptor file is opened read-only".into());
        }
        for extent in &extents {
            let file = extent
                .file()
                .filter(|f| top_file.is_writable() && !f.is_writable());
            if let Some(file) = file {
                reasons.push(format!(
                    "the extent file {} is not writable",
                    file.path().display()
                ));
            }
            if let Some(reason) = extent.read_only_reason() {
                if !reasons.contains(&reason) {
                    reasons.push(reason);
                }
            }
        }
        reasons.extend(aliased_flat_extents(&extents));
        Ok(VmdkImage {
            cid: AtomicU32::new(top.descriptor.cid),
            cid_renewed: AtomicBool::new(false),
            descriptor: top.descriptor,
            text: Mutex::new(top.text),
            text_at: top.text_at,
            create_type,
            extents,
            size,
            parent,
            read_only_reason: (!reasons.is_empty()).then(|| reasons.join("; ")),
            write_back: WriteBack::new(),
            top: top_file,
        })
    }

    /// The descriptor's current CID.
    pub fn cid(&self) -> u32 {
        self.cid.load(Ordering::Relaxed)
    }

    /// The extents overlapping `[offset, offset + len)`, with the part of the request each
    /// covers as (extent, disk offset, length).
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (&Extent, u64, u64)> {
        let end = offset + len;
        let first = self.extents.partition_point(|e| e.end() <= offset);
        self.extents[first..]
            .iter()
            .take_while(move |e| e.start < end)
            .map(move |e| {
                let from = offset.max(e.start);
                (e, from, end.min(e.end()) - from)
            })
            // An empty range would otherwise give an empty piece of the extent holding it.
            .filter(|&(_, _, len)| len > 0)
    }

    fn read_inner(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len())?;
        for (extent, at, len) in self.pieces(offset, buf.len() as u64) {
            let part = request_part_mut(buf, offset, at, len)?;
            let below =
                |b: &mut [u8], o: u64| read_below(self.parent.as_ref(), b, extent.start + o);
            extent.read(part, at - extent.start, &below)?;
        }
        Ok(())
    }

    fn write_inner(&self, buf: &[u8], offset: u64) -> Result<()> {
        if let Some(reason) = &self.read_only_reason {
            return Err(Error::read_only(reason.clone()));
        }
        self.write_back.refuse_writes()?;
        check_range(self.size, offset, buf.len())?;
        self.renew_cid()?;
        for (extent, at, len) in self.pieces(offset, buf.len() as u64) {
            let part = request_part(buf, offset, at, len)?;
            let below =
                |b: &mut [u8], o: u64| read_below(self.parent.as_ref(), b, extent.start + o);
            extent.write(part, at - extent.start, &below, &self.write_back)?;
        }
        Ok(())
    }

    fn discard_inner(&self, offset: u64, len: u64) -> Result<()> {
        if let Some(reason) = &self.read_only_reason {
            return Err(Error::read_only(reason.clone()));
        }
        self.write_back.refuse_writes()?;
        check_span(self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.renew_cid()?;
        let mut rest = Vec::new();
        for (extent, at, piece) in self.pieces(offset, len) {
            let parts = extent.discard(
                at - extent.start,
                piece,
                self.parent.is_some(),
                &self.write_back,
            )?;
            rest.extend(parts.into_iter().map(|(o, l)| (extent.start + o, l)));
        }
        for (at, piece) in rest {
            zero_fill(self, at, piece)?;
        }
        Ok(())
    }

    /// Gives the descriptor a new CID before the first write of this session changes the disk.
    fn renew_cid(&self) -> Result<()> {
        if self.cid_renewed.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut text = self.text.lock().unwrap_or_else(PoisonError::into_inner);
        if self.cid_renewed.load(Ordering::Acquire) {
            return Ok(());
        }
        let old = self.cid();
        let cid = new_cid(old);
        let new_text = descriptor::with_cid(&text, cid)?;
        let area = match self.text_at {
            // The text ends at the file's end or at a NUL; a new CID may be longer than the old
            // one, so a NUL goes after it again, or what followed it would become text.
            TextAt::File if text.contains(&0) => ([new_text.as_slice(), &[0]].concat(), 0),
            TextAt::File => (new_text.clone(), 0),
            TextAt::Embedded { at, room } => {
                if new_text.len() as u64 > room {
                    return Err(Error::unsupported(
                        "the embedded VMDK descriptor has no room for a new CID",
                    ));
                }
                // Only the text and its terminating NUL: the rest of the room is zeros in a
                // consistent image, and a hostile one may keep its grain directory there.
                let mut area = new_text.clone();
                if (area.len() as u64) < room {
                    area.push(0);
                }
                (area, at)
            }
        };
        self.write_back.run(self.top.path(), || {
            self.top.write_all_at(&area.0, area.1)?;
            self.top.sync_data()
        })?;
        *text = new_text;
        self.cid.store(cid, Ordering::Relaxed);
        self.cid_renewed.store(true, Ordering::Release);
        Ok(())
    }

    fn flush_inner(&self) -> Result<()> {
        for extent in &self.extents {
            extent.flush()?;
        }
        Ok(())
    }

    fn block_status_inner(&self, offset: u64, len: u64) -> Result<Vec<Status>> {
        let len = len.min(self.size.saturating_sub(offset));
        let mut own = Vec::new();
        for (extent, at, piece) in self.pieces(offset, len) {
            extent.status(at - extent.start, piece, &mut own)?;
        }
        let mut out = Vec::new();
        for status in own {
            if status.state == ExtentState::Unallocated {
                for below in status_below(self.parent.as_ref(), status.offset, status.len)? {
                    push_extent(&mut out, below);
                }
            } else {
                push_extent(&mut out, status);
            }
        }
        Ok(out)
    }
}

/// The storage of extent `line` in `file`.
fn open_storage(
    line: &descriptor::ExtentLine,
    file: Arc<HostFile>,
    budget: &mut TableBudget,
) -> Result<Storage> {
    let path = file.path().to_path_buf();
    let opened = match line.kind {
        ExtentType::Flat | ExtentType::Vmfs => {
            let offset = line.offset * SECTOR_SIZE;
            let end = offset + line.sectors * SECTOR_SIZE;
            let file_len = file.len()?;
            if end > file_len {
                log::warn!(
                    "{}: the flat extent ends at {end} bytes, the file at {file_len}; the rest \
                     reads as zeros",
                    path.display()
                );
            }
            Ok(Storage::Flat { file, offset })
        }
        ExtentType::Sparse => {
            let mut magic = [0u8; 4];
            file.read_exact_at(&mut magic, 0)?;
            match &magic {
                b"KDMV" => {
                    let header = SparseHeader::read(&file)?;
                    SparseExtent::open(file, header, line.sectors, budget)
                        .map(|s| Storage::Sparse(Box::new(s)))
                }
                b"COWD" => open_esx(esx::read_cowd(&file)?, file, line.sectors, budget),
                _ => Err(Error::corrupt(
                    "the SPARSE extent has no KDMV or COWD magic",
                )),
            }
        }
        ExtentType::VmfsSparse => {
            let header = esx::read_cowd(&file)?;
            open_esx(header, file, line.sectors, budget)
        }
        ExtentType::SeSparse => {
            let header = esx::read_sesparse(&file)?;
            open_esx(header, file, line.sectors, budget)
        }
        ExtentType::Zero | ExtentType::VmfsRdm | ExtentType::VmfsRaw => Err(Error::unsupported(
            format!("{} extents have no file to open", line.kind.name()),
        )),
    };
    opened.map_err(|e| {
        Error::new(
            e.kind(),
            format!("extent on descriptor line {}: {e}", line.line),
        )
        .with_path(&path)
    })
}

fn open_esx(
    header: SparseHeader,
    file: Arc<HostFile>,
    sectors: u64,
    budget: &mut TableBudget,
) -> Result<Storage> {
    SparseExtent::open(file, header, sectors, budget).map(|s| Storage::Sparse(Box::new(s)))
}

/// Refuses a sparse extent whose file another extent uses too: each would allocate in it.
fn check_shared_files(extents: &[Extent]) -> Result<()> {
    for (i, a) in extents.iter().enumerate() {
        let Storage::Sparse(sparse) = &a.storage else {
            continue;
        };
        for (j, b) in extents.iter().enumerate() {
            if i != j && b.file().is_some_and(|f| Arc::ptr_eq(f, sparse.file())) {
                return Err(Error::corrupt(format!(
                    "the sparse extent file {} is used by another extent too",
                    sparse.file().path().display()
                )));
            }
        }
    }
    Ok(())
}

/// Why the disk must not be written when two flat extents share bytes of one file: a write
/// through one would change what the other reads, so no write could be read back reliably
/// (as VDI, whose block maps may not alias either). Reading such a disk is well defined.
fn aliased_flat_extents(extents: &[Extent]) -> Option<String> {
    let mut flat: Vec<(usize, u64, u64, &Extent)> = extents
        .iter()
        .filter_map(|e| match &e.storage {
            Storage::Flat { file, offset } => Some((
                Arc::as_ptr(file) as usize,
                *offset,
                offset.saturating_add(e.len),
                e,
            )),
            _ => None,
        })
        .collect();
    flat.sort_by_key(|&(file, base, _, _)| (file, base));
    let mut reach: Option<(usize, u64, &Extent)> = None;
    for &(file, base, end, extent) in &flat {
        match reach {
            Some((f, r, other)) if f == file && base < r => {
                return Some(format!(
                    "the extents at disk offsets {:#x} and {:#x} share bytes of {}",
                    other.start,
                    extent.start,
                    extent
                        .file()
                        .map_or_else(String::new, |f| f.path().display().to_string())
                ));
            }
            Some((f, r, _)) if f == file && r >= end => {}
            _ => reach = Some((file, end, extent)),
        }
    }
    None
}

/// A random CID different from `old` and from the "no parent" value.
fn new_cid(old: u32) -> u32 {
    let state = std::collections::hash_map::RandomState::new();
    let mut salt = 0u64;
    loop {
        let mut hasher = state.build_hasher();
        hasher.write_u64(salt);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        hasher.write_u64(nanos);
        let cid = hasher.finish() as u32;
        if cid != old && cid != descriptor::NO_PARENT_CID {
            return cid;
        }
        salt += 1;
    }
}

impl Image for VmdkImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_inner(buf, offset)
            .map_err(|e| e.with_path(self.top.path()))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_inner(buf, offset)
            .map_err(|e| e.with_path(self.top.path()))
    }

    fn flush(&self) -> Result<()> {
        let path = self.top.path();
        self.write_back
            .run(path, || self.flush_inner().map_err(|e| e.with_path(path)))
    }

    fn is_dirty(&self) -> bool {
        !self.write_back.is_stopped() && self.extents.iter().any(Extent::is_dirty)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Status>> {
        self.block_status_inner(offset, len)
            .map_err(|e| e.with_path(self.top.path()))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.discard_inner(offset, len)
            .and_then(|()| {
                self.extents
                    .iter()
                    .filter_map(Extent::file)
                    .filter(|f| f.is_writable())
                    .try_for_each(|f| f.sync_data())
            })
            .map_err(|e| e.with_path(self.top.path()))
    }

    fn allocated_bytes(&self) -> u64 {
        self.extents.iter().map(Extent::allocated_bytes).sum()
    }

    fn read_only_reason(&self) -> Option<String> {
        self.write_back.reason_after(&self.read_only_reason)
    }

    fn raw_file(&self) -> Option<Arc<HostFile>> {
        let [extent] = self.extents.as_slice() else {
            return None;
        };
        let Storage::Flat { file, offset: 0 } = &extent.storage else {
            return None;
        };
        // Bytes past a shorter file read as zeros here, and past a longer one's end the
        // kernel would read on: only a file of exactly the disk's length is the disk.
        let exact = file.len().is_ok_and(|len| len == self.size);
        (self.parent.is_none() && extent.access != descriptor::Access::NoAccess && exact)
            .then(|| Arc::clone(file))
    }

    fn info(&self) -> ImageInfo {
        let d = &self.descriptor;
        let mut details = vec![("CID", format!("{:08x}", self.cid()))];
        if let Some(hint) = d.parent_hint_name() {
            details.push(("parentCID", format!("{:08x}", d.parent_cid)));
            details.push(("parent file name hint", hint.to_string_lossy().into_owned()));
        }
        if let Some(parent) = &self.parent {
            details.push(("parent path", parent.path.display().to_string()));
        }
        details.push(("extents", self.extents.len().to_string()));
        for e in self.extents.iter().take(16) {
            let file = e
                .file()
                .map(|f| f.path().display().to_string())
                .unwrap_or_default();
            let mut text = format!(
                "{} {} {} sectors {file}",
                e.access.name(),
                e.kind.name(),
                e.len / SECTOR_SIZE
            );
            if let Storage::Sparse(s) = &e.storage {
                let h = &s.header;
                text.push_str(&format!(
                    " (version {}, grain {} KiB, {} grain tables{}{})",
                    h.version,
                    s.grain_bytes() / 1024,
                    s.table_count(),
                    if h.compressed() { ", compressed" } else { "" },
                    if h.unclean_shutdown {
                        ", unclean shutdown flag set"
                    } else {
                        ""
                    },
                ));
            }
            details.push(("extent", text));
        }
        for key in ["adapterType", "virtualHWVersion", "uuid", "longContentID"] {
            if let Some(value) = d.ddb_value(key) {
                details.push(("ddb", format!("{key} = {value}")));
            }
        }
        let cluster_size = self.extents.iter().find_map(|e| match &e.storage {
            Storage::Sparse(s) => Some(s.grain_bytes()),
            _ => None,
        });
        ImageInfo {
            format: "vmdk",
            subformat: self.create_type.clone(),
            virtual_size: self.size,
            cluster_size,
            allocated_bytes: self.allocated_bytes(),
            read_only_reason: self.read_only_reason(),
            details,
        }
    }
}
