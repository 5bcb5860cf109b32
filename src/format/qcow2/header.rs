//! The qcow2 header (versions 2 and 3) and its extensions: big-endian parsing, feature bits, and
//! validation of every field the driver relies on, alone and against the image file's length.
//!
//! ```text
//!   0  magic "QFI\xfb"             4  version (2 or 3)
//!   8  backing_file_offset        16  backing_file_size (<= 1023)
//!  20  cluster_bits (9..=21)      24  size (virtual, bytes)
//!  32  crypt_method (0 = none)    36  l1_size (entries)
//!  40  l1_table_offset            48  refcount_table_offset
//!  56  refcount_table_clusters    60  nb_snapshots
//!  64  snapshots_offset           -- version 2 ends at 72 --
//!  72  incompatible_features      80  compatible_features
//!  88  autoclear_features         96  refcount_order (0..=6)
//! 100  header_length (>= 104)    104  compression_type (when header_length > 104)
//! header_length..  extensions: u32 type, u32 length, data padded to 8, type 0 ends the list
//! ```
//!
//! Extensions run from `header_length` to the backing file name (or the end of the first
//! cluster). All of them live inside the first cluster, so the header is parsed from that one
//! cluster, read once; nothing outside it is allocated by a header field.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::meta::bytes::{u32_be, u64_be};

pub const MAGIC: [u8; 4] = *b"QFI\xfb";
const V2_HEADER_LEN: u32 = 72;
const V3_MIN_HEADER_LEN: u32 = 104;
const OFF_COMPRESSION_TYPE: usize = 104;

pub const MIN_CLUSTER_BITS: u32 = 9;
/// QEMU's implementation limit (2 MiB clusters); larger ones are not written by any tool.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Extended L2 entries need 32 subclusters of at least 512 bytes.
const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
const MAX_BACKING_FILE_NAME: u32 = 1023;
/// QEMU's caps: 32 MiB of L1 entries, an 8 MiB refcount table, 65536 snapshots.
pub const MAX_L1_BYTES: u64 = 32 << 20;
const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
pub const MAX_SNAPSHOTS: u32 = 65536;
const MAX_REFCOUNT_ORDER: u32 = 6;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_DATA_FILE
    | INCOMPAT_COMPRESSION
    | INCOMPAT_EXTENDED_L2;
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const EXT_CRYPTO_HEADER: u32 = 0x0537_be77;
const FEATURE_ENTRY_LEN: usize = 48;
const BITMAPS_EXT_LEN: usize = 24;

/// How compressed clusters are compressed (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate, window bits 12 (the default, and the only choice before QEMU 5.1).
    Zlib,
    Zstd,
}

impl CompressionType {
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// Which feature bitmap an entry of the feature name table describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    Incompatible,
    Compatible,
    Autoclear,
}

/// How the image's data clusters are encrypted (`crypt_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    None,
    /// QEMU's legacy AES-128-CBC with the passphrase as key (crypt_method 1).
    Aes,
    /// LUKS, its header in the image file (crypt_method 2).
    Luks,
}

/// One entry of the feature name table extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    pub kind: FeatureKind,
    pub bit: u8,
    pub name: String,
}

/// The bitmaps extension: kept (and shown) but not used, since imgfs does not track dirty
/// bitmaps; the autoclear bit tells QEMU they are stale once someone else wrote the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExtension {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

/// A parsed and validated qcow2 header with its extensions.
#[derive(Debug, Clone)]
pub struct Qcow2Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: CompressionType,
    pub encryption: Encryption,
    /// The LUKS header's (offset, length) in the image file (crypto header extension).
    pub crypto_header: Option<(u64, u64)>,
    backing_file_offset: u64,
    backing_file: Option<Vec<u8>>,
    backing_format: Option<String>,
    data_file: Option<Vec<u8>>,
    pub feature_names: Vec<FeatureName>,
    pub bitmaps: Option<BitmapsExtension>,
    /// Extensions imgfs does not interpret, (type, data), kept for rewriting the header.
    pub other_extensions: Vec<(u32, Vec<u8>)>,
}

fn corrupt(message: String, field_at: usize) -> Error {
    Error::corrupt(message).at_offset(field_at as u64)
}

impl Qcow2Header {
    /// Reads and validates the header of the qcow2 image in `file`.
    pub fn read(file: &HostFile) -> Result<Qcow2Header> {
        Self::read_inner(file).map_err(|e| e.with_path(file.path()))
    }

    fn read_inner(file: &HostFile) -> Result<Qcow2Header> {
        let file_len = file.len()?;
        if file_len < u64::from(V2_HEADER_LEN) {
            return Err(Error::corrupt(format!(
                "file is {file_len} bytes, shorter than a qcow2 header"
            )));
        }
        let mut fixed = [0u8; 112];
        file.read_exact_at(&mut fixed, 0)?;
        let cluster_bits = parse_cluster_bits(&fixed)?;
        // Everything the header points into lives in its first cluster (at most 2 MiB).
        let head_len = (1u64 << cluster_bits).min(file_len) as usize;
        let mut head = vec![0u8; head_len];
        file.read_exact_at(&mut head, 0)?;
        Self::parse(&head, file_len)
    }

    /// Parses the header from `head`, the image's first cluster (or all of a shorter file),
    /// and validates it against a file of `file_len` bytes.
    pub fn parse(head: &[u8], file_len: u64) -> Result<Qcow2Header> {
        if head.get(..4) != Some(&MAGIC[..]) {
            return Err(Error::corrupt("not a qcow2 image (no QFI\\xfb magic)"));
        }
        let version = u32_be(head, 4, "version")?;
        if version != 2 && version != 3 {
            return Err(Error::unsupported(format!(
                "qcow2 version {version} (only 2 and 3 exist)"
            )));
        }
        let cluster_bits = parse_cluster_bits(head)?;
        let cluster_size = 1u64 << cluster_bits;
        let (incompatible_features, compatible_features, autoclear_features) = if version >= 3 {
            (
                u64_be(head, 72, "incompatible_features")?,
                u64_be(head, 80, "compatible_features")?,
                u64_be(head, 88, "autoclear_features")?,
            )
        } else {
            (0, 0, 0)
        };
        let (refcount_order, header_length) = if version >= 3 {
            (
                u32_be(head, 96, "refcount_order")?,
                u32_be(head, 100, "header_length")?,
            )
        } else {
            (4, V2_HEADER_LEN)
        };
        if version >= 3 && header_length < V3_MIN_HEADER_LEN {
            return Err(corrupt(
                format!(
                    "header_length {header_length} is shorter than the 104 bytes of a v3 header"
                ),
                100,
            ));
        }
        if u64::from(header_length) > cluster_size {
            return Err(corrupt(
                format!("header_length {header_length} exceeds the cluster size {cluster_size}"),
                100,
            ));
        }
        if u64::from(header_length) > file_len {
            return Err(Error::corrupt(format!(
                "file is {file_len} bytes, shorter than header_length {header_length}"
            )));
        }

        let encryption = match u32_be(head, 32, "crypt_method")? {
            0 => Encryption::None,
            1 => Encryption::Aes,
            2 => Encryption::Luks,
            other => {
                return Err(Error::unsupported(format!(
                    "the image is encrypted with unknown crypt_method {other}"
                )))
            }
        };

        let backing_file_offset = u64_be(head, 8, "backing_file_offset")?;
        let backing_file_size = u32_be(head, 16, "backing_file_size")?;
        let backing_file = if backing_file_offset == 0 {
            None
        } else {
            Some(backing_file_name(
                head,
                backing_file_offset,
                backing_file_size,
                cluster_size,
            )?)
        };

        let extensions_end = if backing_file_offset == 0 {
            cluster_size
        } else {
            backing_file_offset
        };
        let mut header = Qcow2Header {
            version,
            cluster_bits,
            size: u64_be(head, 24, "size")?,
            l1_size: u32_be(head, 36, "l1_size")?,
            l1_table_offset: u64_be(head, 40, "l1_table_offset")?,
            refcount_table_offset: u64_be(head, 48, "refcount_table_offset")?,
            refcount_table_clusters: u32_be(head, 56, "refcount_table_clusters")?,
            nb_snapshots: u32_be(head, 60, "nb_snapshots")?,
            snapshots_offset: u64_be(head, 64, "snapshots_offset")?,
            incompatible_features,
            compatible_features,
            autoclear_features,
            refcount_order,
            header_length,
            compression_type: CompressionType::Zlib,
            encryption,
            crypto_header: None,
            backing_file_offset,
            backing_file,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            bitmaps: None,
            other_extensions: Vec::new(),
        };
        header.parse_extensions(head, extensions_end)?;
        header.check_features(head)?;
        header.check_layout(file_len)?;
        Ok(header)
    }

    fn parse_extensions(&mut self, head: &[u8], end: u64) -> Result<()> {
        let end = usize::try_from(end).unwrap_or(usize::MAX);
        let mut at = self.header_length as usize;
        // Fewer than 8 bytes before the backing file name cannot hold an extension header.
        while at.checked_add(8).is_some_and(|e| e <= end) {
            if at + 8 > head.len() {
                return Err(corrupt(
                    format!("header extension at {at:#x} runs past the end of the file"),
                    at,
                ));
            }
            let kind = u32_be(head, at, "header extension type")?;
            let len = u32_be(head, at + 4, "header extension length")? as usize;
            if kind == EXT_END {
                return Ok(());
            }
            let data_at = at + 8;
            let data = data_at
                .checked_add(len)
                .filter(|&data_end| data_end <= end)
                .and_then(|data_end| head.get(data_at..data_end))
                .ok_or_else(|| {
                    corrupt(
                        format!(
                            "header extension {kind:#010x} at {at:#x} with length {len} runs \
                             past the end of the extension area ({end:#x})"
                        ),
                        at,
                    )
                })?;
            self.take_extension(kind, data, at)?;
            at = data_at.saturating_add(len.div_ceil(8) * 8);
        }
        Ok(())
    }

    fn take_extension(&mut self, kind: u32, data: &[u8], at: usize) -> Result<()> {
        match kind {
            EXT_BACKING_FORMAT => {
                let name = std::str::from_utf8(data)
                    .map_err(|_| corrupt("backing format name is not UTF-8".to_string(), at))?;
                self.backing_format = Some(name.to_string());
            }
            EXT_FEATURE_TABLE => {
                self.feature_names = data
                    .chunks_exact(FEATURE_ENTRY_LEN)
                    .filter_map(feature_name)
                    .collect();
            }
            EXT_BITMAPS => {
                if data.len() == BITMAPS_EXT_LEN {
                    self.bitmaps = Some(BitmapsExtension {
                        nb_bitmaps: u32_be(data, 0, "nb_bitmaps")?,
                        directory_size: u64_be(data, 8, "bitmap_directory_size")?,
                        directory_offset: u64_be(data, 16, "bitmap_directory_offset")?,
                    });
                } else {
                    log::warn!(
                        "qcow2 bitmaps extension at {at:#x} has length {}, not 24; ignoring it",
                        data.len()
                    );
                }
                self.other_extensions.push((kind, data.to_vec()));
            }
            EXT_DATA_FILE => self.data_file = Some(data.to_vec()),
            EXT_CRYPTO_HEADER => {
                if data.len() != 16 {
                    return Err(corrupt(
                        format!("the crypto header extension at {at:#x} is not 16 bytes long"),
                        at,
                    ));
                }
                self.crypto_header = Some((
                    u64_be(data, 0, "crypto header offset")?,
                    u64_be(data, 8, "crypto header length")?,
                ));
                // Kept for rewriting the header, like the extensions imgfs does not interpret.
                self.other_extensions.push((kind, data.to_vec()));
            }
            _ => self.other_extensions.push((kind, data.to_vec())),
        }
        Ok(())
    }

    fn check_features(&mut self, head: &[u8]) -> Result<()> {
        let unknown = self.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let bits: Vec<String> = (0..64u8)
                .filter(|bit| unknown & (1 << bit) != 0)
                .map(
                    |bit| match self.feature_name(FeatureKind::Incompatible, bit) {
                        Some(name) => format!("bit {bit} ({name})"),
                        None => format!("bit {bit}"),
                    },
                )
                .collect();
            return Err(Error::unsupported(format!(
                "unknown incompatible qcow2 feature {}",
                bits.join(", ")
            ))
            .at_offset(72));
        }
        if self.refcount_order > MAX_REFCOUNT_ORDER {
            return Err(corrupt(
                format!(
                    "refcount_order {} is larger than 6 (64-bit refcounts)",
                    self.refcount_order
                ),
                96,
            ));
        }
        let raw_type = if self.header_length as usize > OFF_COMPRESSION_TYPE {
            head.get(OFF_COMPRESSION_TYPE).copied().unwrap_or(0)
        } else {
            0
        };
        let flagged = self.incompatible_features & INCOMPAT_COMPRESSION != 0;
        self.compression_type = match (raw_type, flagged) {
            (0, false) => CompressionType::Zlib,
            (1, true) => CompressionType::Zstd,
            (0, true) => {
                return Err(corrupt(
                    "the compression type feature bit is set but compression_type is zlib"
                        .to_string(),
                    OFF_COMPRESSION_TYPE,
                ))
            }
            (other, false) => {
                return Err(corrupt(
                    format!("compression_type {other} without the compression type feature bit"),
                    OFF_COMPRESSION_TYPE,
                ))
            }
            (other, true) => {
                return Err(Error::unsupported(format!(
                    "qcow2 compression_type {other} is not known"
                ))
                .at_offset(OFF_COMPRESSION_TYPE as u64))
            }
        };
        if self.extended_l2() && self.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(corrupt(
                format!(
                    "extended L2 entries need clusters of at least 16 KiB, cluster_bits is {}",
                    self.cluster_bits
                ),
                20,
            ));
        }
        if self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0 && !self.has_data_file() {
            return Err(corrupt(
                "the raw external data bit is set without an external data file".to_string(),
                88,
            ));
        }
        if self.data_file.is_some() && !self.has_data_file() {
            log::warn!("qcow2 data file name extension without the external data file bit");
            self.data_file = None;
        }
        Ok(())
    }

    /// Checks the tables the header points to against each other and the file length.
    fn check_layout(&self, file_len: u64) -> Result<()> {
        let cluster_size = self.cluster_size();
        if self.size > i64::MAX as u64 {
            return Err(corrupt(
                format!("virtual size {} is too large", self.size),
                24,
            ));
        }
        // Refuse L1 tables QEMU refuses, before anything is allocated by l1_size.
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(corrupt(
                format!(
                    "l1_size {} is larger than the 32 MiB table QEMU allows",
                    self.l1_size
                ),
                36,
            ));
        }
        let needed = self.l1_entries_for(self.size);
        if u64::from(self.l1_size) < needed {
            return Err(corrupt(
                format!(
                    "l1_size {} is too small for the virtual size {} (needs {needed} entries)",
                    self.l1_size, self.size
                ),
                36,
            ));
        }
        if self.l1_size > 0 {
            check_table(
                "l1_table_offset",
                40,
                self.l1_table_offset,
                l1_bytes,
                cluster_size,
                file_len,
            )?;
        }
        let clusters = u64::from(self.refcount_table_clusters);
        if clusters == 0 {
            return Err(corrupt(
                "refcount_table_clusters is 0: the image has no refcount table".to_string(),
                56,
            ));
        }
        if clusters > MAX_REFCOUNT_TABLE_BYTES >> self.cluster_bits {
            return Err(corrupt(
                format!(
                    "refcount_table_clusters {clusters} is larger than the 8 MiB table QEMU \
                     allows"
                ),
                56,
            ));
        }
        check_table(
            "refcount_table_offset",
            48,
            self.refcount_table_offset,
            clusters << self.cluster_bits,
            cluster_size,
            file_len,
        )?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(corrupt(
                format!(
                    "nb_snapshots {} is more than the {MAX_SNAPSHOTS} QEMU allows",
                    self.nb_snapshots
                ),
                60,
            ));
        }
        if self.nb_snapshots > 0 {
            // Entries are at least 40 bytes; their real extent is checked while parsing.
            check_table(
                "snapshots_offset",
                64,
                self.snapshots_offset,
                u64::from(self.nb_snapshots) * 40,
                cluster_size,
                file_len,
            )?;
        }
        Ok(())
    }

    /// L1 entries needed to map `size` bytes of virtual disk.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        let l2_coverage_bits = self.cluster_bits + self.l2_bits();
        size.div_ceil(1u64 << l2_coverage_bits)
    }

    /// log2 of the entries in one L2 table.
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2() { 4 } else { 3 }
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTENDED_L2 != 0
    }

    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & INCOMPAT_DATA_FILE != 0
    }

    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & INCOMPAT_CORRUPT != 0
    }

    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }

    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
    }

    /// Whether the bitmaps extension's data is consistent (its autoclear bit survived).
    pub fn bitmaps_consistent(&self) -> bool {
        self.autoclear_features & AUTOCLEAR_BITMAPS != 0
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// The backing file name, as recorded in the image (not resolved against any directory).
    pub fn backing_file(&self) -> Option<&OsStr> {
        self.backing_file.as_deref().map(OsStr::from_bytes)
    }

    pub fn backing_file_offset(&self) -> u64 {
        self.backing_file_offset
    }

    /// The backing file's format from the backing format extension (e.g. "raw", "qcow2").
    pub fn backing_format(&self) -> Option<&str> {
        self.backing_format.as_deref()
    }

    /// The external data file's name, when the image has one and names it.
    pub fn data_file(&self) -> Option<&OsStr> {
        self.data_file.as_deref().map(OsStr::from_bytes)
    }

    /// Whether the external data file is also a consistent raw image on its own.
    /// The (offset, length) of the LUKS header area of a LUKS-encrypted image: clusters the
    /// image uses like its other metadata (counted by check and rebuild, guarded from data).
    pub fn luks_area(&self) -> Option<(u64, u64)> {
        match self.encryption {
            Encryption::Luks => self.crypto_header,
            _ => None,
        }
    }

    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
    }

    /// The name the feature name table gives to a feature bit.
    pub fn feature_name(&self, kind: FeatureKind, bit: u8) -> Option<&str> {
        self.feature_names
            .iter()
            .find(|f| f.kind == kind && f.bit == bit)
            .map(|f| f.name.as_str())
    }
}

fn parse_cluster_bits(head: &[u8]) -> Result<u32> {
    let bits = u32_be(head, 20, "cluster_bits")?;
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
        return Err(corrupt(
            format!("cluster_bits {bits} is outside 9..=21 (512 B to 2 MiB clusters)"),
            20,
        ));
    }
    Ok(bits)
}

fn backing_file_name(head: &[u8], offset: u64, size: u32, cluster_size: u64) -> Result<Vec<u8>> {
    if size > MAX_BACKING_FILE_NAME {
        return Err(corrupt(
            format!("backing_file_size {size} is longer than 1023 bytes"),
            16,
        ));
    }
    let end = offset
        .checked_add(u64::from(size))
        .filter(|&end| end <= cluster_size)
        .ok_or_else(|| {
            corrupt(
                format!(
                    "backing file name at backing_file_offset {offset:#x} runs past the first \
                     cluster"
                ),
                8,
            )
        })?;
    head.get(offset as usize..end as usize)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| {
            corrupt(
                format!("backing file name at {offset:#x} runs past the end of the file"),
                8,
            )
        })
}

fn feature_name(entry: &[u8]) -> Option<FeatureName> {
    let kind = match entry.first()? {
        0 => FeatureKind::Incompatible,
        1 => FeatureKind::Compatible,
        2 => FeatureKind::Autoclear,
        _ => return None,
    };
    let bit = *entry.get(1)?;
    let raw = entry.get(2..)?;
    let name = raw.split(|&b| b == 0).next().unwrap_or_default();
    Some(FeatureName {
        kind,
        bit,
        name: String::from_utf8_lossy(name).into_owned(),
    })
}

/// Checks that a table of `len` bytes at `offset` is cluster aligned, does not overlap the
/// header cluster, and lies inside the file.
pub(super) fn check_table(
    field: &str,
    field_at: u64,
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<()> {
    if offset % cluster_size != 0 {
        return Err(Error::corrupt(format!(
            "{field} {offset:#x} is not aligned to the cluster size {cluster_size}"
        ))
        .at_offset(field_at));
    }
    if offset == 0 {
        return Err(
            Error::corrupt(format!("{field} is 0: the table would overlap the header"))
                .at_offset(field_at),
        );
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(Error::corrupt(format!(
            "{field} {offset:#x} with {len} bytes runs past the end of the file \
             ({file_len} bytes)"
        ))
        .at_offset(field_at)),
    }
}

#[cfg(test)]
pub mod testing {
    //! Builders of header bytes for tests that need exact control over every field.

    /// Stores `value` big-endian at `at`.
    pub fn put_u32(buf: &mut [u8], at: usize, value: u32) {
        buf[at..at + 4].copy_from_slice(&value.to_be_bytes());
    }

    pub fn put_u64(buf: &mut [u8], at: usize, value: u64) {
        buf[at..at + 8].copy_from_slice(&value.to_be_bytes());
    }
}

#[cfg(test)]
mod tests;
