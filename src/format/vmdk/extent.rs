//! The extents of a VMDK disk: one per descriptor line, each a flat file region, a ZERO
//! range, or a hosted sparse extent, with the operations the image spreads requests over.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::host_holes::push_stored;
use crate::host::HostFile;
use crate::image::{push_extent, Extent as Status, ExtentState};
use crate::meta::write_back::WriteBack;

use super::descriptor::{Access, ExtentType};
use super::sparse::{Below, SparseExtent};
use super::tables::Grain;

/// How an extent stores its bytes.
pub enum Storage {
    /// Bytes at `offset` of `file` (FLAT, VMFS).
    Flat {
        file: Arc<HostFile>,
        offset: u64,
    },
    /// Reads as zeros (ZERO).
    Zero,
    Sparse(Box<SparseExtent>),
}

/// One extent, placed on the virtual disk.
pub struct Extent {
    /// Byte offset of the extent on the virtual disk.
    pub start: u64,
    /// Its length in bytes.
    pub len: u64,
    pub access: Access,
    pub kind: ExtentType,
    pub storage: Storage,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    fn no_access(&self) -> Error {
        Error::new(
            crate::error::ErrorKind::Unsupported,
            format!(
                "the VMDK extent at disk offset {:#x} is NOACCESS and cannot be read",
                self.start
            ),
        )
    }

    /// Fills `buf` from extent offset `offset`; `below` reads the parent at extent offsets.
    pub fn read(&self, buf: &mut [u8], offset: u64, below: Below) -> Result<()> {
        if self.access == Access::NoAccess {
            return Err(self.no_access());
        }
        match &self.storage {
            Storage::Flat { file, offset: base } => file.read_exact_at(buf, base + offset),
            Storage::Zero => {
                buf.fill(0);
                Ok(())
            }
            Storage::Sparse(sparse) => sparse.read(buf, offset, below),
        }
    }

    /// Writes `buf` at extent offset `offset`; `write_back` is the disk's, which a sparse
    /// extent writing back from its write path reports failures to.
    pub fn write(
        &self,
        buf: &[u8],
        offset: u64,
        below: Below,
        write_back: &WriteBack,
    ) -> Result<()> {
        if let Some(reason) = self.read_only_reason() {
            return Err(Error::read_only(reason));
        }
        match &self.storage {
            Storage::Flat { file, offset: base } => file.write_all_at(buf, base + offset),
            Storage::Zero => Err(Error::read_only("ZERO extents cannot be written")),
            Storage::Sparse(sparse) => sparse.write(buf, offset, below, write_back),
        }
    }

    /// Discards `[offset, offset + len)` of the extent (extent offsets); returns the extent
    /// ranges the caller still has to write with zeros. `below_data`: a parent may show
    /// through unallocated grains.
    pub fn discard(
        &self,
        offset: u64,
        len: u64,
        below_data: bool,
        write_back: &WriteBack,
    ) -> Result<Vec<(u64, u64)>> {
        if let Some(reason) = self.read_only_reason() {
            return Err(Error::read_only(reason));
        }
        match &self.storage {
            Storage::Flat { file, offset: base } => {
                file.punch_hole(base + offset, len)?;
                Ok(Vec::new())
            }
            Storage::Zero => Ok(Vec::new()),
            Storage::Sparse(sparse) => sparse.discard(offset, len, below_data, write_back),
        }
    }

    /// Why this extent refuses writes, if it does.
    pub fn read_only_reason(&self) -> Option<String> {
        let line = |what: &str| Some(format!("extent at disk offset {:#x} is {what}", self.start));
        match (&self.access, &self.storage) {
            (Access::ReadOnly, _) => line("RDONLY"),
            (Access::NoAccess, _) => line("NOACCESS"),
            (_, Storage::Zero) => line("a ZERO extent"),
            (_, Storage::Sparse(sparse)) => sparse.read_only_reason.clone(),
            _ => None,
        }
    }

    /// The state of `[offset, offset + len)` of the extent in disk coordinates, with
    /// unallocated runs for the caller to look up below.
    pub fn status(&self, offset: u64, len: u64, out: &mut Vec<Status>) -> Result<()> {
        let at = |state, from: u64, len| Status {
            offset: self.start + from,
            len,
            state,
            layer: 0,
            host: None,
        };
        // Discarded data that stays mapped (flat extents, version 1 grains) is punched in the
        // host file and reads as zeros.
        match &self.storage {
            Storage::Flat { file, offset: base } => {
                push_stored(out, file, self.start + offset, base + offset, len)?
            }
            Storage::Zero => push_extent(out, at(ExtentState::Zero, offset, len)),
            Storage::Sparse(sparse) => {
                for run in sparse.lookup(offset, len)? {
                    let state = match run.grain {
                        Grain::Data(host) => {
                            let disk = self.start + run.offset;
                            push_stored(out, sparse.file(), disk, host, run.len)?;
                            continue;
                        }
                        Grain::Compressed(_) => ExtentState::Data,
                        Grain::Zero => ExtentState::Zero,
                        Grain::Unallocated => ExtentState::Unallocated,
                    };
                    push_extent(out, at(state, run.offset, run.len));
                }
            }
        }
        Ok(())
    }

    pub fn flush(&self) -> Result<()> {
        match &self.storage {
            Storage::Flat { file, .. } if file.is_writable() => file.sync_data(),
            Storage::Sparse(sparse) => sparse.flush(),
            _ => Ok(()),
        }
    }

    pub fn is_dirty(&self) -> bool {
        matches!(&self.storage, Storage::Sparse(s) if s.is_dirty())
    }

    pub fn allocated_bytes(&self) -> u64 {
        match &self.storage {
            // Discards punch flat extents and version 1 grains without unmapping them.
            Storage::Flat { file, .. } => self.len.min(file.allocated_bytes()),
            Storage::Zero => 0,
            Storage::Sparse(sparse) => sparse
                .allocated_bytes()
                .min(sparse.file().allocated_bytes()),
        }
    }

    pub fn file(&self) -> Option<&Arc<HostFile>> {
        match &self.storage {
            Storage::Flat { file, .. } => Some(file),
            Storage::Zero => None,
            Storage::Sparse(sparse) => Some(sparse.file()),
        }
    }
}
