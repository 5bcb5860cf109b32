//! The 48-byte QCOW v1 header (big-endian): parsing with every field checked, alone and against
//! the host file's length, plus the fixed arithmetic the rest of the driver derives from it
//! (`Geometry`: splitting guest offsets, decoding L2 entries) and the file ranges the header
//! itself claims (`Layout`), which no cluster may overlap.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::meta::bytes::{u32_be, u64_be};

pub const MAGIC: u32 = u32::from_be_bytes(*b"QFI\xfb");
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 48;
pub const SECTOR_SIZE: u64 = 512;
/// L2 entry flag: the rest of the entry is (compressed size, host offset).
pub const COMPRESSED: u64 = 1 << 63;

const CRYPT_NONE: u32 = 0;
const CRYPT_AES: u32 = 1;
/// QEMU's limits: clusters of 512 B to 64 KiB, L2 tables of 512 B to 64 KiB.
const MIN_CLUSTER_BITS: u8 = 9;
const MAX_CLUSTER_BITS: u8 = 16;
const MIN_L2_BITS: u8 = 9 - 3;
const MAX_L2_BITS: u8 = 16 - 3;
/// QEMU refuses longer backing file names.
const MAX_BACKING_NAME: u32 = 1023;
/// The L1 table is held in memory whole. 2^25 entries (256 MiB) cover 64 TiB with either
/// geometry qemu-img writes (2 MiB per L1 entry); a larger table is a hostile header.
pub const MAX_L1_ENTRIES: u64 = 1 << 25;

// Field offsets, named once so parsing and error messages agree.
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 4;
const OFF_BACKING_FILE_OFFSET: usize = 8;
const OFF_BACKING_FILE_SIZE: usize = 16;
const OFF_MTIME: usize = 20;
const OFF_SIZE: usize = 24;
const OFF_CLUSTER_BITS: usize = 32;
const OFF_L2_BITS: usize = 33;
const OFF_CRYPT_METHOD: usize = 36;
const OFF_L1_TABLE_OFFSET: usize = 40;

/// A validated QCOW v1 header and the backing file name it records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QcowHeader {
    /// The size field as stored; the disk is served rounded down to whole sectors.
    pub size: u64,
    pub mtime: u32,
    pub cluster_bits: u8,
    pub l2_bits: u8,
    pub l1_table_offset: u64,
    /// Entries in the L1 table, derived from `size` (the header does not store it).
    pub l1_entries: u64,
    pub backing_file_offset: u64,
    backing_name: Vec<u8>,
    /// Data clusters are encrypted with the legacy AES method (crypt_method 1).
    pub encrypted: bool,
}

impl QcowHeader {
    /// Reads and validates the header of a QCOW v1 file.
    pub fn read(file: &HostFile) -> Result<QcowHeader> {
        Self::read_inner(file).map_err(|e| e.with_path(file.path()))
    }

    fn read_inner(file: &HostFile) -> Result<QcowHeader> {
        let file_len = file.len()?;
        if file_len < HEADER_LEN as u64 {
            return Err(Error::corrupt(format!(
                "file is {file_len} bytes, shorter than the {HEADER_LEN}-byte qcow header"
            )));
        }
        let mut raw = [0u8; HEADER_LEN];
        file.read_exact_at(&mut raw, 0)?;
        let mut header = Self::parse(&raw)?;
        header.check_layout(file_len)?;
        let name_len = header.backing_name_len();
        if name_len > 0 {
            let mut name = vec![0u8; name_len];
            file.read_exact_at(&mut name, header.backing_file_offset)?;
            header.backing_name = name;
        }
        Ok(header)
    }

    /// Parses and checks the fields of the 48 header bytes on their own (the backing name is
    /// left empty: it lives elsewhere in the file).
    pub fn parse(raw: &[u8]) -> Result<QcowHeader> {
        let u32_at = |offset, name| u32_be(raw, offset, name);
        let u64_at = |offset, name| u64_be(raw, offset, name);
        let u8_at = |offset: usize, name: &str| {
            raw.get(offset).copied().ok_or_else(|| {
                Error::corrupt(format!("field {name} at {offset} is outside the structure"))
            })
        };

        let magic = u32_at(OFF_MAGIC, "magic")?;
        if magic != MAGIC {
            return Err(Error::corrupt(format!(
                "qcow magic {magic:#010x} is not QFI\\xfb"
            )));
        }
        let version = u32_at(OFF_VERSION, "version")?;
        if version != VERSION {
            return Err(Error::unsupported(format!(
                "qcow version {version} (only version 1 is handled here)"
            ))
            .at_offset(OFF_VERSION as u64));
        }
        let crypt_method = u32_at(OFF_CRYPT_METHOD, "crypt_method")?;
        let encrypted = match crypt_method {
            CRYPT_NONE => false,
            CRYPT_AES => true,
            other => {
                return Err(
                    Error::corrupt(format!("qcow crypt_method {other} is not 0 or 1"))
                        .at_offset(OFF_CRYPT_METHOD as u64),
                )
            }
        };

        let size = u64_at(OFF_SIZE, "size")?;
        if size < 2 {
            // QEMU's own lower bound.
            return Err(Error::corrupt(format!(
                "qcow size {size} is too small (at least 2 bytes)"
            ))
            .at_offset(OFF_SIZE as u64));
        }
        let cluster_bits = u8_at(OFF_CLUSTER_BITS, "cluster_bits")?;
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::unsupported(format!(
                "qcow cluster_bits {cluster_bits} is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS} \
                 (clusters of 512 B to 64 KiB)"
            ))
            .at_offset(OFF_CLUSTER_BITS as u64));
        }
        let l2_bits = u8_at(OFF_L2_BITS, "l2_bits")?;
        if !(MIN_L2_BITS..=MAX_L2_BITS).contains(&l2_bits) {
            return Err(Error::unsupported(format!(
                "qcow l2_bits {l2_bits} is outside {MIN_L2_BITS}..={MAX_L2_BITS} \
                 (L2 tables of 512 B to 64 KiB)"
            ))
            .at_offset(OFF_L2_BITS as u64));
        }
        // Both bit counts are bounded above, so the shift is at most 29.
        let l1_shift = u32::from(cluster_bits) + u32::from(l2_bits);
        let l1_entries = size
            .checked_add((1u64 << l1_shift) - 1)
            .map(|s| s >> l1_shift)
            .ok_or_else(|| {
                Error::corrupt(format!("qcow size {size} is too large")).at_offset(OFF_SIZE as u64)
            })?;
        if l1_entries > MAX_L1_ENTRIES {
            return Err(Error::unsupported(format!(
                "qcow size {size} needs {l1_entries} L1 entries, more than the {MAX_L1_ENTRIES} \
                 imgfs holds in memory"
            ))
            .at_offset(OFF_SIZE as u64));
        }

        let header = QcowHeader {
            size,
            mtime: u32_at(OFF_MTIME, "mtime")?,
            cluster_bits,
            l2_bits,
            l1_table_offset: u64_at(OFF_L1_TABLE_OFFSET, "l1_table_offset")?,
            l1_entries,
            backing_file_offset: u64_at(OFF_BACKING_FILE_OFFSET, "backing_file_offset")?,
            backing_name: Vec::new(),
            encrypted,
        };
        header.with_backing_len(u32_at(OFF_BACKING_FILE_SIZE, "backing_file_size")?)
    }

    /// Records the backing name's length (as zeros until `read` fills it), checked like QEMU.
    fn with_backing_len(mut self, len: u32) -> Result<QcowHeader> {
        if self.backing_file_offset == 0 {
            return Ok(self);
        }
        if len > MAX_BACKING_NAME {
            return Err(Error::corrupt(format!(
                "qcow backing_file_size {len} is longer than {MAX_BACKING_NAME} bytes"
            ))
            .at_offset(OFF_BACKING_FILE_SIZE as u64));
        }
        self.backing_name = vec![0; len as usize];
        Ok(self)
    }

    fn backing_name_len(&self) -> usize {
        self.backing_name.len()
    }

    /// Checks that the L1 table and the backing name lie inside a file of `file_len` bytes and
    /// that the L1 table does not overlap the header.
    pub fn check_layout(&self, file_len: u64) -> Result<()> {
        let l1_end = self.l1_end().ok_or_else(|| {
            Error::corrupt(format!(
                "qcow l1_table_offset {:#x} + {} entries overflows",
                self.l1_table_offset, self.l1_entries
            ))
            .at_offset(OFF_L1_TABLE_OFFSET as u64)
        })?;
        if self.l1_table_offset < HEADER_LEN as u64 {
            return Err(Error::corrupt(format!(
                "qcow l1_table_offset {:#x} overlaps the header",
                self.l1_table_offset
            ))
            .at_offset(OFF_L1_TABLE_OFFSET as u64));
        }
        if l1_end > file_len {
            return Err(Error::corrupt(format!(
                "qcow L1 table ({} entries at l1_table_offset {:#x}) ends at {l1_end:#x}, beyond \
                 the end of the file ({file_len} bytes)",
                self.l1_entries, self.l1_table_offset
            ))
            .at_offset(OFF_L1_TABLE_OFFSET as u64));
        }
        let name_end = self
            .backing_file_offset
            .checked_add(self.backing_name.len() as u64)
            .filter(|&end| end <= file_len);
        if name_end.is_none() {
            return Err(Error::corrupt(format!(
                "qcow backing file name ({} bytes at backing_file_offset {:#x}) is beyond the \
                 end of the file ({file_len} bytes)",
                self.backing_name.len(),
                self.backing_file_offset
            ))
            .at_offset(OFF_BACKING_FILE_OFFSET as u64));
        }
        Ok(())
    }

    fn l1_end(&self) -> Option<u64> {
        self.l1_entries
            .checked_mul(8)
            .and_then(|len| self.l1_table_offset.checked_add(len))
    }

    /// The backing file name recorded in the image (bytes, not necessarily UTF-8), if any.
    pub fn backing_file(&self) -> Option<&OsStr> {
        (!self.backing_name.is_empty()).then(|| OsStr::from_bytes(&self.backing_name))
    }

    /// The size the disk is served with: whole sectors, rounded down as QEMU does.
    pub fn virtual_size(&self) -> u64 {
        self.size / SECTOR_SIZE * SECTOR_SIZE
    }

    pub fn geometry(&self) -> Geometry {
        Geometry {
            cluster_bits: u32::from(self.cluster_bits),
            l2_bits: u32::from(self.l2_bits),
        }
    }

    /// The file ranges the header claims, valid once `check_layout(file_len)` passed.
    pub fn layout(&self, file_len: u64) -> Layout {
        let name_start = self.backing_file_offset;
        Layout {
            file_len,
            reserved: [
                (0, HEADER_LEN as u64),
                (
                    name_start,
                    name_start.saturating_add(self.backing_name.len() as u64),
                ),
                (self.l1_table_offset, self.l1_end().unwrap_or(u64::MAX)),
            ],
        }
    }
}

/// The fixed arithmetic of an image. `Copy`, so I/O paths use it without any lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    cluster_bits: u32,
    l2_bits: u32,
}

/// Where a guest offset lives: L1 index, index in that L2 table, byte offset in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub l1_index: u64,
    pub l2_index: usize,
    pub in_cluster: u64,
}

/// A decoded L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Nothing here: the layer below shows through.
    Unallocated,
    /// A plain cluster at this host offset.
    Normal { host_offset: u64 },
    /// A deflated cluster of `len` bytes at `host_offset`.
    Compressed { host_offset: u64, len: u64 },
}

impl Geometry {
    #[cfg(test)]
    pub fn new(cluster_bits: u32, l2_bits: u32) -> Geometry {
        Geometry {
            cluster_bits,
            l2_bits,
        }
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries in one L2 table.
    pub fn l2_entries(&self) -> usize {
        1 << self.l2_bits
    }

    /// Bytes of one L2 table on disk.
    pub fn l2_table_len(&self) -> u64 {
        8 << self.l2_bits
    }

    pub fn split(&self, offset: u64) -> Position {
        Position {
            l1_index: offset >> (self.cluster_bits + self.l2_bits),
            l2_index: ((offset >> self.cluster_bits) as usize) & (self.l2_entries() - 1),
            in_cluster: offset & (self.cluster_size() - 1),
        }
    }

    /// The guest offset where the cluster holding `offset` starts.
    pub fn cluster_start(&self, offset: u64) -> u64 {
        offset & !(self.cluster_size() - 1)
    }

    /// Decodes a raw L2 entry: bit 63 marks a compressed cluster, whose compressed length sits
    /// in the `cluster_bits` bits below it and its host offset in the rest.
    pub fn decode(&self, raw: u64) -> Entry {
        if raw == 0 {
            return Entry::Unallocated;
        }
        if raw & COMPRESSED == 0 {
            return Entry::Normal { host_offset: raw };
        }
        let offset_bits = 63 - self.cluster_bits;
        Entry::Compressed {
            host_offset: raw & ((1 << offset_bits) - 1),
            len: (raw >> offset_bits) & (self.cluster_size() - 1),
        }
    }
}

/// The host file as it was opened: its length, and the ranges the header claims for itself
/// (header, backing name, L1 table). Tables and clusters referenced from the image must lie
/// inside the length and outside those ranges, or a write to them would corrupt metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub file_len: u64,
    reserved: [(u64, u64); 3],
}

impl Layout {
    /// The same layout over a file grown to `file_len` bytes (never shrunk).
    pub fn grown_to(self, file_len: u64) -> Layout {
        Layout {
            file_len: self.file_len.max(file_len),
            ..self
        }
    }

    /// The same layout with an L1 table of `len` bytes (a resize grew it).
    pub fn with_l1_len(self, len: u64) -> Layout {
        let [header, name, (l1_start, _)] = self.reserved;
        Layout {
            reserved: [header, name, (l1_start, l1_start.saturating_add(len))],
            ..self
        }
    }

    /// Checks a `len`-byte range at `offset` that `what` (e.g. "L2 table 3") points at.
    pub fn check_range(&self, what: &dyn std::fmt::Display, offset: u64, len: u64) -> Result<()> {
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.file_len)
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "qcow {what} at {offset:#x} (+{len}) is beyond the end of the file ({} \
                     bytes)",
                    self.file_len
                ))
            })?;
        let names = ["header", "backing file name", "L1 table"];
        for ((start, stop), name) in self.reserved.iter().zip(names) {
            if offset < *stop && *start < end {
                return Err(Error::corrupt(format!(
                    "qcow {what} at {offset:#x} (+{len}) overlaps the {name}"
                )));
            }
        }
        Ok(())
    }

    /// Where the metadata the header claims ends, with the L1 table padded to whole sectors
    /// as qemu-img writes it: bytes before this hold no guest data.
    pub fn metadata_end(&self) -> u64 {
        let [header, name, (l1_start, l1_end)] = self.reserved;
        let l1_padded = l1_end
            .saturating_sub(l1_start)
            .checked_next_multiple_of(SECTOR_SIZE)
            .map_or(u64::MAX, |len| l1_start.saturating_add(len));
        [header.1, name.1, l1_padded]
            .into_iter()
            .max()
            .unwrap_or(0)
            .min(self.file_len)
    }
}

/// Builds header bytes for the driver's tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A 48-byte header: no backing file, L1 table right after the header.
    pub fn header_bytes(size: u64, cluster_bits: u8, l2_bits: u8) -> [u8; HEADER_LEN] {
        let mut raw = [0u8; HEADER_LEN];
        raw[OFF_MAGIC..OFF_MAGIC + 4].copy_from_slice(&MAGIC.to_be_bytes());
        raw[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&VERSION.to_be_bytes());
        raw[OFF_SIZE..OFF_SIZE + 8].copy_from_slice(&size.to_be_bytes());
        raw[OFF_CLUSTER_BITS] = cluster_bits;
        raw[OFF_L2_BITS] = l2_bits;
        raw[OFF_L1_TABLE_OFFSET..OFF_L1_TABLE_OFFSET + 8]
            .copy_from_slice(&(HEADER_LEN as u64).to_be_bytes());
        raw
    }

    pub fn patch_u32(bytes: &mut [u8], offset: usize, value: u32) {
        bytes[offset..offset + 4].copy_from_slice(&value.to_be_bytes());
    }

    pub fn patch_u64(bytes: &mut [u8], offset: usize, value: u64) {
        bytes[offset..offset + 8].copy_from_slice(&value.to_be_bytes());
    }

    pub const SIZE_FIELD: usize = OFF_SIZE;
    pub const L1_FIELD: usize = OFF_L1_TABLE_OFFSET;
    pub const CLUSTER_BITS_FIELD: usize = OFF_CLUSTER_BITS;
    pub const L2_BITS_FIELD: usize = OFF_L2_BITS;
    pub const CRYPT_FIELD: usize = OFF_CRYPT_METHOD;
    pub const VERSION_FIELD: usize = OFF_VERSION;
    pub const BACKING_OFFSET_FIELD: usize = OFF_BACKING_FILE_OFFSET;
    pub const BACKING_SIZE_FIELD: usize = OFF_BACKING_FILE_SIZE;
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::error::ErrorKind;

    fn good() -> [u8; HEADER_LEN] {
        header_bytes(10 << 20, 12, 9)
    }

    fn assert_err(r: Result<QcowHeader>, kind: ErrorKind, needle: &str) {
        let e = r.expect_err("header must be refused");
        assert_eq!(e.kind(), kind, "{e}");
        assert!(
            e.to_string().contains(needle),
            "{e} should mention {needle}"
        );
    }

    #[test]
    fn parses_geometry_and_derives_the_l1_size() {
        let h = QcowHeader::parse(&good()).unwrap();
        assert_eq!((h.cluster_bits, h.l2_bits), (12, 9));
        // One L2 table covers 512 * 4 KiB = 2 MiB.
        assert_eq!(h.l1_entries, 5);
        assert_eq!(h.virtual_size(), 10 << 20);
        assert_eq!(h.backing_file(), None);
        h.check_layout(48 + 40).unwrap();
        assert_err(
            h.check_layout(48 + 39).map(|_| h.clone()),
            ErrorKind::Corrupt,
            "L1 table (5 entries at l1_table_offset 0x30) ends at 0x58, beyond the end",
        );
    }

    #[test]
    fn size_is_served_in_whole_sectors() {
        let mut b = good();
        patch_u64(&mut b, SIZE_FIELD, 1_000_001);
        let h = QcowHeader::parse(&b).unwrap();
        assert_eq!(h.size, 1_000_001);
        assert_eq!(h.virtual_size(), 999_936);
    }

    #[test]
    fn rejects_bad_identity_and_encryption() {
        let mut b = good();
        b[3] = 0xfc;
        assert_err(QcowHeader::parse(&b), ErrorKind::Corrupt, "magic");
        let mut b = good();
        patch_u32(&mut b, VERSION_FIELD, 2);
        assert_err(QcowHeader::parse(&b), ErrorKind::Unsupported, "version 2");
        let mut b = good();
        patch_u32(&mut b, CRYPT_FIELD, 1);
        assert!(QcowHeader::parse(&b).is_ok_and(|h| h.encrypted));
        patch_u32(&mut b, CRYPT_FIELD, 7);
        assert_err(QcowHeader::parse(&b), ErrorKind::Corrupt, "crypt_method 7");
        assert_err(QcowHeader::parse(&b[..20]), ErrorKind::Corrupt, "outside");
    }

    #[test]
    fn rejects_bad_geometry() {
        for bits in [0, 8, 17, 255] {
            let mut b = good();
            b[CLUSTER_BITS_FIELD] = bits;
            assert_err(
                QcowHeader::parse(&b),
                ErrorKind::Unsupported,
                "cluster_bits",
            );
        }
        for bits in [0, 5, 14] {
            let mut b = good();
            b[L2_BITS_FIELD] = bits;
            assert_err(QcowHeader::parse(&b), ErrorKind::Unsupported, "l2_bits");
        }
        let mut b = good();
        b[CLUSTER_BITS_FIELD] = 9;
        b[L2_BITS_FIELD] = 13;
        QcowHeader::parse(&b).unwrap();
    }

    #[test]
    fn rejects_absurd_sizes() {
        let mut b = good();
        patch_u64(&mut b, SIZE_FIELD, 1);
        assert_err(QcowHeader::parse(&b), ErrorKind::Corrupt, "too small");
        patch_u64(&mut b, SIZE_FIELD, u64::MAX);
        assert_err(QcowHeader::parse(&b), ErrorKind::Corrupt, "too large");
        patch_u64(&mut b, SIZE_FIELD, 1 << 60);
        assert_err(QcowHeader::parse(&b), ErrorKind::Unsupported, "L1 entries");
    }

    #[test]
    fn rejects_misplaced_l1_and_backing_name() {
        let mut b = good();
        patch_u64(&mut b, L1_FIELD, 16);
        let h = QcowHeader::parse(&b).unwrap();
        assert!(h
            .check_layout(1 << 20)
            .unwrap_err()
            .to_string()
            .contains("overlaps"));
        patch_u64(&mut b, L1_FIELD, u64::MAX - 8);
        let h = QcowHeader::parse(&b).unwrap();
        assert!(h
            .check_layout(1 << 20)
            .unwrap_err()
            .to_string()
            .contains("overflows"));

        let mut b = good();
        patch_u64(&mut b, BACKING_OFFSET_FIELD, 4096);
        patch_u32(&mut b, BACKING_SIZE_FIELD, 1024);
        assert_err(
            QcowHeader::parse(&b),
            ErrorKind::Corrupt,
            "backing_file_size 1024",
        );
        patch_u32(&mut b, BACKING_SIZE_FIELD, 10);
        let h = QcowHeader::parse(&b).unwrap();
        h.check_layout(4106).unwrap();
        let e = h.check_layout(4105).unwrap_err();
        assert!(e.to_string().contains("backing file name (10 bytes"), "{e}");
        // A name length without an offset means no backing file, as in QEMU.
        let mut b = good();
        patch_u32(&mut b, BACKING_SIZE_FIELD, 5000);
        assert_eq!(QcowHeader::parse(&b).unwrap().backing_file(), None);
    }

    #[test]
    fn splits_offsets_and_decodes_entries() {
        let g = Geometry::new(12, 9);
        assert_eq!(
            g.split((3 << 21) + (5 << 12) + 17),
            Position {
                l1_index: 3,
                l2_index: 5,
                in_cluster: 17
            }
        );
        assert_eq!(g.decode(0), Entry::Unallocated);
        assert_eq!(
            g.decode(0x3000),
            Entry::Normal {
                host_offset: 0x3000
            }
        );
        // qemu-img convert -c: 0x18 compressed bytes at 0x2200 in a 4 KiB-cluster image.
        assert_eq!(
            g.decode(0x80c0_0000_0000_2200),
            Entry::Compressed {
                host_offset: 0x2200,
                len: 0x18
            }
        );
        assert_eq!(g.l2_table_len(), 4096);
        assert_eq!(g.cluster_start(4097), 4096);
    }

    #[test]
    fn layout_keeps_clusters_inside_the_file_and_off_the_metadata() {
        let mut b = good();
        patch_u64(&mut b, BACKING_OFFSET_FIELD, 100);
        patch_u32(&mut b, BACKING_SIZE_FIELD, 8);
        let h = QcowHeader::parse(&b).unwrap();
        let layout = h.layout(8192);
        assert_eq!(layout.metadata_end(), 48 + 512, "L1 padded to a sector");
        layout.check_range(&"cluster", 4096, 4096).unwrap();
        let msg = |o, l| {
            layout
                .check_range(&"cluster", o, l)
                .unwrap_err()
                .to_string()
        };
        assert!(msg(4096, 4097).contains("beyond the end"));
        assert!(msg(u64::MAX, 2).contains("beyond the end"));
        assert!(msg(0, 512).contains("overlaps the header"));
        assert!(msg(104, 2).contains("overlaps the backing file name"));
        assert!(msg(56, 8).contains("overlaps the L1 table"));
    }
}
