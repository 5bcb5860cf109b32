//! The hosted sparse extent header (magic "KDMV", versions 1 to 3), with the footer that a
//! streamOptimized extent may carry at its end instead.
//!
//! ```text
//! 0   magic "KDMV"           4   version u32 (1; 2 zeroed grains; 3 streamOptimized/CBT)
//! 8   flags u32              bit 0 newline test valid, 1 redundant GD used, 2 zeroed-grain
//!                            GTEs, 16 compressed grains, 17 grain markers
//! 12  capacity u64           sectors of the extent
//! 20  grainSize u64          sectors per grain
//! 28  descriptorOffset u64   sector of the embedded descriptor (0: none)
//! 36  descriptorSize u64     its length in sectors
//! 44  numGTEsPerGT u32       entries per grain table (512)
//! 48  rgdOffset u64          sector of the redundant grain directory
//! 56  gdOffset u64           sector of the grain directory; all ones: see the footer
//! 64  overHead u64           sectors of metadata before the first grain
//! 72  uncleanShutdown u8     73..77 "\n \r\n" newline test bytes
//! 77  compressAlgorithm u16  0 none, 1 deflate (zlib streams)
//! ```
//!
//! A streamOptimized extent written as a stream does not know its grain directory's place when
//! it writes the header: gdOffset is all ones, and the file ends with a footer marker, a copy
//! of the header holding the real gdOffset, and an end-of-stream marker (one sector each).

use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::meta::bytes::{u32_le, u64_le};

use super::descriptor::{MAX_DISK_SECTORS, SECTOR_SIZE};

pub const MAGIC: &[u8; 4] = b"KDMV";
pub const HEADER_LEN: usize = 512;
pub const FLAG_REDUNDANT_GD: u32 = 1 << 1;
pub const FLAG_ZEROED_GRAIN: u32 = 1 << 2;
pub const FLAG_COMPRESSED: u32 = 1 << 16;
pub const FLAG_MARKERS: u32 = 1 << 17;
pub const GD_AT_END: u64 = u64::MAX;
pub const COMPRESSION_DEFLATE: u16 = 1;
/// QEMU's bound: grain tables of more entries are refused.
pub const MAX_GTES_PER_GT: u32 = 512;
/// Grains larger than 32 MiB are refused: a write into one builds it in memory.
pub const MAX_GRAIN_SECTORS: u64 = 1 << 16;
/// Grain directories of more entries are refused (QEMU's bound, 128 MiB of entries).
pub const MAX_GD_ENTRIES: u64 = 32 << 20;
/// Marker type of the footer marker in a stream.
const MARKER_FOOTER: u32 = 3;
const MARKER_EOS: u32 = 0;

/// Which sparse format an extent is in: they share the grain directory -> grain table ->
/// grain scheme, and differ in how entries are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SparseKind {
    /// KDMV: u32 sector numbers.
    Hosted,
    /// COWD (VMDK3, vmfsSparse): u32 sector numbers, 4096-entry tables, one directory.
    Cowd,
    /// seSparse: u64 entries; directory entries index the grain tables at `tables_at`, table
    /// entries index the grains at `grains_at` (byte offsets).
    SeSparse { tables_at: u64, grains_at: u64 },
}

/// A parsed and checked sparse extent header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseHeader {
    pub kind: SparseKind,
    /// Grain directory entries the header gives explicitly (COWD, seSparse); derived from the
    /// capacity for KDMV.
    pub gd_len: Option<u64>,
    pub version: u32,
    pub flags: u32,
    pub capacity: u64,
    pub grain_sectors: u64,
    pub descriptor_offset: u64,
    pub descriptor_size: u64,
    pub gtes_per_gt: u32,
    pub rgd_offset: u64,
    /// The grain directory's sector, from the footer when the header says "at end".
    pub gd_offset: u64,
    pub overhead: u64,
    pub unclean_shutdown: bool,
    pub compression: u16,
    /// Whether the grain directory's place came from the footer.
    pub from_footer: bool,
}

fn corrupt(message: String, field_at: usize) -> Error {
    Error::corrupt(message).at_offset(field_at as u64)
}

impl SparseHeader {
    /// Parses the first sector of a KDMV file without checking it against the file.
    pub fn parse(head: &[u8]) -> Result<SparseHeader> {
        if head.get(..4) != Some(MAGIC) {
            return Err(Error::corrupt("not a VMDK sparse extent (no KDMV magic)"));
        }
        let version = u32_le(head, 4, "version")?;
        let flags = u32_le(head, 8, "flags")?;
        let header = SparseHeader {
            kind: SparseKind::Hosted,
            gd_len: None,
            version,
            flags,
            capacity: u64_le(head, 12, "capacity")?,
            grain_sectors: u64_le(head, 20, "grainSize")?,
            descriptor_offset: u64_le(head, 28, "descriptorOffset")?,
            descriptor_size: u64_le(head, 36, "descriptorSize")?,
            gtes_per_gt: u32_le(head, 44, "numGTEsPerGT")?,
            rgd_offset: u64_le(head, 48, "rgdOffset")?,
            gd_offset: u64_le(head, 56, "gdOffset")?,
            overhead: u64_le(head, 64, "overHead")?,
            unclean_shutdown: head.get(72).is_some_and(|&b| b != 0),
            compression: u16::from_le_bytes([
                head.get(77).copied().unwrap_or(0),
                head.get(78).copied().unwrap_or(0),
            ]),
            from_footer: false,
        };
        if !(1..=3).contains(&version) {
            return Err(Error::unsupported(format!(
                "VMDK sparse extent version {version} is not supported (1 to 3 are)"
            ))
            .at_offset(4));
        }
        Ok(header)
    }

    /// Reads the header of `file`, and the footer's copy when the grain directory is at the
    /// end, then checks the fields against each other and the file's length.
    pub fn read(file: &HostFile) -> Result<SparseHeader> {
        let mut head = vec![0u8; HEADER_LEN];
        file.read_exact_at(&mut head, 0)?;
        let mut header = SparseHeader::parse(&head)?;
        let file_len = file.len()?;
        if header.gd_offset == GD_AT_END {
            header = read_footer(file, file_len)?;
        }
        header.check(file_len)?;
        Ok(header)
    }

    /// Checks the geometry and that the tables lie inside a file of `file_len` bytes.
    pub fn check(&self, file_len: u64) -> Result<()> {
        if self.capacity == 0 || self.capacity > MAX_DISK_SECTORS {
            return Err(corrupt(
                format!(
                    "VMDK capacity {} sectors is outside 1..={MAX_DISK_SECTORS}",
                    self.capacity
                ),
                12,
            ));
        }
        if self.grain_sectors == 0 || self.grain_sectors > MAX_GRAIN_SECTORS {
            return Err(corrupt(
                format!(
                    "VMDK grain size {} sectors is outside 1..={MAX_GRAIN_SECTORS}",
                    self.grain_sectors
                ),
                20,
            ));
        }
        let max_gtes = match self.kind {
            SparseKind::Hosted => MAX_GTES_PER_GT,
            _ => 4096,
        };
        if self.gtes_per_gt == 0 || self.gtes_per_gt > max_gtes {
            return Err(corrupt(
                format!(
                    "VMDK numGTEsPerGT {} is outside 1..={max_gtes}",
                    self.gtes_per_gt
                ),
                44,
            ));
        }
        if self.compressed() && self.compression != COMPRESSION_DEFLATE {
            return Err(Error::unsupported(format!(
                "VMDK compression algorithm {} is not supported (1, deflate, is)",
                self.compression
            ))
            .at_offset(77));
        }
        let gd_entries = self.gd_entries();
        if gd_entries > MAX_GD_ENTRIES {
            return Err(corrupt(
                format!("the VMDK grain directory would have {gd_entries} entries, too many"),
                12,
            ));
        }
        let needed = self.capacity.div_ceil(self.gt_coverage());
        if gd_entries < needed {
            return Err(corrupt(
                format!(
                    "the VMDK grain directory has {gd_entries} entries, the capacity needs \
                     {needed}"
                ),
                12,
            ));
        }
        let gd_bytes = gd_entries * self.entry_bytes();
        let mut directories = vec![("grain directory", self.gd_offset, 56)];
        if self.has_redundant_gd() {
            directories.push(("redundant grain directory", self.rgd_offset, 48));
        }
        for (what, sector, field) in directories.iter().copied() {
            let start = sector_bytes(sector)
                .filter(|&s| s >= SECTOR_SIZE)
                .ok_or_else(|| {
                    corrupt(
                        format!(
                            "the VMDK {what} at sector {sector} overlaps the header or overflows"
                        ),
                        field,
                    )
                })?;
            if start
                .checked_add(gd_bytes)
                .filter(|&end| end <= file_len)
                .is_none()
            {
                return Err(corrupt(
                    format!(
                        "the VMDK {what} ({gd_entries} entries at sector {sector}) is beyond \
                         the end of the file ({file_len} bytes)"
                    ),
                    field,
                ));
            }
        }
        if self.descriptor_offset != 0 {
            let end = self
                .descriptor_offset
                .checked_add(self.descriptor_size)
                .and_then(sector_bytes);
            if end.is_none()
                || self.descriptor_size > super::descriptor::MAX_DESCRIPTOR_LEN / SECTOR_SIZE
            {
                return Err(corrupt(
                    format!(
                        "the VMDK embedded descriptor ({} sectors at sector {}) is too large",
                        self.descriptor_size, self.descriptor_offset
                    ),
                    28,
                ));
            }
            // Renewing the CID rewrites the descriptor: it must not hold a directory.
            let (desc_start, desc_end) = (self.descriptor_offset, end.unwrap_or(0) / SECTOR_SIZE);
            for (what, sector, _) in &directories {
                let gd_end = sector.saturating_add(gd_bytes.div_ceil(SECTOR_SIZE));
                if *sector < desc_end && desc_start < gd_end {
                    return Err(corrupt(
                        format!(
                            "the VMDK embedded descriptor (sectors {desc_start}..{desc_end}) \
                             overlaps the {what} at sector {sector}"
                        ),
                        36,
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }

    pub fn has_markers(&self) -> bool {
        self.flags & FLAG_MARKERS != 0
    }

    pub fn has_zeroed_grains(&self) -> bool {
        self.flags & FLAG_ZEROED_GRAIN != 0
    }

    /// Whether the redundant grain directory is in use (flag set and an offset given).
    pub fn has_redundant_gd(&self) -> bool {
        self.flags & FLAG_REDUNDANT_GD != 0 && self.rgd_offset != 0
    }

    pub fn grain_bytes(&self) -> u64 {
        self.grain_sectors * SECTOR_SIZE
    }

    /// Sectors one grain table covers.
    pub fn gt_coverage(&self) -> u64 {
        self.grain_sectors * u64::from(self.gtes_per_gt)
    }

    pub fn gd_entries(&self) -> u64 {
        self.gd_len
            .unwrap_or_else(|| self.capacity.div_ceil(self.gt_coverage().max(1)))
    }

    /// Bytes of one directory or table entry.
    pub fn entry_bytes(&self) -> u64 {
        match self.kind {
            SparseKind::SeSparse { .. } => 8,
            _ => 4,
        }
    }

    /// Bytes of one grain table on disk.
    pub fn gt_bytes(&self) -> u64 {
        u64::from(self.gtes_per_gt) * self.entry_bytes()
    }

    /// The embedded descriptor's byte range, if the header names one. Called on headers not
    /// checked yet (to tell a bare extent from a disk), so the sector counts are untrusted.
    pub fn descriptor_range(&self) -> Result<Option<(u64, u64)>> {
        if self.descriptor_offset == 0 || self.descriptor_size == 0 {
            return Ok(None);
        }
        match (
            sector_bytes(self.descriptor_offset),
            sector_bytes(self.descriptor_size),
        ) {
            (Some(at), Some(len)) => Ok(Some((at, len))),
            _ => Err(corrupt(
                format!(
                    "the VMDK embedded descriptor ({} sectors at sector {}) lies beyond any file",
                    self.descriptor_size, self.descriptor_offset
                ),
                28,
            )),
        }
    }
}

fn sector_bytes(sector: u64) -> Option<u64> {
    sector
        .checked_mul(SECTOR_SIZE)
        .filter(|&b| b <= i64::MAX as u64)
}

/// The header copy in a stream's footer: footer marker, header, end-of-stream marker in the
/// last three sectors.
fn read_footer(file: &HostFile, file_len: u64) -> Result<SparseHeader> {
    let at = file_len.checked_sub(3 * SECTOR_SIZE).ok_or_else(|| {
        Error::corrupt(
            "the VMDK grain directory is at the end, but the file is too short for a footer",
        )
    })?;
    let mut tail = vec![0u8; 3 * SECTOR_SIZE as usize];
    file.read_exact_at(&mut tail, at)?;
    // A marker: value u64, size u32 (0 for metadata markers), type u32.
    let marker = |sector: usize| -> Result<(u64, u32, u32)> {
        let base = sector * SECTOR_SIZE as usize;
        Ok((
            u64_le(&tail, base, "marker value")?,
            u32_le(&tail, base + 8, "marker size")?,
            u32_le(&tail, base + 12, "marker type")?,
        ))
    };
    let (_, footer_size, footer_type) = marker(0)?;
    let eos = marker(2)?;
    let marker_ok = footer_size == 0 && footer_type == MARKER_FOOTER && eos == (0, 0, MARKER_EOS);
    if !marker_ok {
        return Err(Error::corrupt(
            "the VMDK grain directory is at the end, but the file does not end with a footer \
             and an end-of-stream marker",
        )
        .at_offset(at));
    }
    let footer = tail
        .get(SECTOR_SIZE as usize..2 * SECTOR_SIZE as usize)
        .unwrap_or_default();
    let mut header = SparseHeader::parse(footer).map_err(|e| e.at_offset(at + SECTOR_SIZE))?;
    if header.gd_offset == GD_AT_END {
        return Err(
            Error::corrupt("the VMDK footer does not say where the grain directory is")
                .at_offset(at + SECTOR_SIZE),
        );
    }
    header.from_footer = true;
    Ok(header)
}

#[cfg(test)]
pub mod testing {
    /// A header sector with the given geometry: flags, capacity, grain, GTEs, rgd, gd.
    pub fn header_bytes(
        version: u32,
        flags: u32,
        capacity: u64,
        grain: u64,
        gtes: u32,
        rgd: u64,
        gd: u64,
    ) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(b"KDMV");
        h[4..8].copy_from_slice(&version.to_le_bytes());
        h[8..12].copy_from_slice(&flags.to_le_bytes());
        h[12..20].copy_from_slice(&capacity.to_le_bytes());
        h[20..28].copy_from_slice(&grain.to_le_bytes());
        h[44..48].copy_from_slice(&gtes.to_le_bytes());
        h[48..56].copy_from_slice(&rgd.to_le_bytes());
        h[56..64].copy_from_slice(&gd.to_le_bytes());
        h[73..77].copy_from_slice(b"\n \r\n");
        h
    }
}

#[cfg(test)]
mod tests {
    use super::testing::header_bytes;
    use super::*;

    #[test]
    fn fields_decode_and_derive_the_geometry() {
        let mut raw = header_bytes(1, 3, 10485760, 128, 512, 21, 0x297);
        raw[28..36].copy_from_slice(&1u64.to_le_bytes());
        raw[36..44].copy_from_slice(&20u64.to_le_bytes());
        raw[72] = 1;
        let h = SparseHeader::parse(&raw).unwrap();
        assert_eq!(h.grain_bytes(), 65536);
        assert_eq!(h.gd_entries(), 160);
        assert!(h.has_redundant_gd() && !h.compressed() && h.unclean_shutdown);
        assert_eq!(h.descriptor_range().unwrap(), Some((512, 10240)));
        h.check(0x297 * 512 + 640).unwrap();
        let e = h.check(0x297 * 512 + 639).unwrap_err();
        assert!(e.to_string().contains("beyond the end of the file"), "{e}");
    }

    #[test]
    fn hostile_headers_are_refused_with_the_field_named() {
        let check = |raw: Vec<u8>| {
            SparseHeader::parse(&raw)
                .and_then(|h| h.check(1 << 30))
                .unwrap_err()
                .to_string()
        };
        assert!(check(header_bytes(4, 3, 100, 128, 512, 1, 2)).contains("version 4"));
        assert!(check(header_bytes(1, 3, 0, 128, 512, 1, 2)).contains("capacity 0"));
        assert!(check(header_bytes(1, 3, u64::MAX, 128, 512, 1, 2)).contains("capacity"));
        assert!(check(header_bytes(1, 3, 100, 0, 512, 1, 2)).contains("grain size 0"));
        assert!(check(header_bytes(1, 3, 100, 1 << 40, 512, 1, 2)).contains("grain size"));
        assert!(check(header_bytes(1, 3, 100, 128, 4096, 1, 2)).contains("numGTEsPerGT"));
        assert!(check(header_bytes(1, 3, 1 << 40, 1, 1, 1, 2)).contains("too many"));
        assert!(check(header_bytes(1, 3, 100, 128, 512, 1, 0)).contains("overlaps the header"));
        assert!(check(header_bytes(1, 3, 100, 128, 512, 1, u64::MAX / 2)).contains("overflows"));
        let compressed = header_bytes(3, FLAG_COMPRESSED, 100, 128, 512, 0, 2);
        assert!(check(compressed).contains("compression algorithm 0"));
        assert!(SparseHeader::parse(b"COWD").is_err());
        assert!(SparseHeader::parse(b"KDMV").is_err(), "short header");
    }

    /// Found by fuzzing: the descriptor range of a header not checked yet (as the catalog
    /// reads it to tell bare extents from disks) overflowed on a huge descriptorOffset.
    #[test]
    fn descriptor_ranges_of_unchecked_headers_never_overflow() {
        for (offset, size) in [(1u64 << 55, 1u64), (1, 1 << 60), (u64::MAX, u64::MAX)] {
            let mut raw = header_bytes(1, 3, 100, 128, 512, 1, 2);
            raw[28..36].copy_from_slice(&offset.to_le_bytes());
            raw[36..44].copy_from_slice(&size.to_le_bytes());
            let e = SparseHeader::parse(&raw)
                .unwrap()
                .descriptor_range()
                .unwrap_err();
            assert!(e.to_string().contains("beyond any file"), "{e}");
        }
    }
}
