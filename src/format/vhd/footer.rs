//! The 512-byte VHD hard disk footer (big-endian, "conectix"): parsing with its checksum
//! checked, the disk type, the creator, the CHS geometry, and the virtual size as QEMU computes
//! it (the rule that decides between the geometry and `current_size`).
//!
//! The footer is written back only as the bytes it was read from (when it moves behind a new
//! block, or repairs a damaged copy), so fields imgfs does not interpret survive unchanged; a
//! resize changes `current_size`, the geometry and the checksum, nothing else.

use crate::error::{Error, Result};
use crate::meta::bytes::{u16_be, u32_be, u64_be};

pub const FOOTER_LEN: usize = 512;
pub const COOKIE: &[u8; 8] = b"conectix";
/// Every VHD sector is 512 bytes; sizes, BAT entries and bitmaps count in them.
pub const SECTOR: u64 = 512;
/// VHD time stamps count seconds from 2000-01-01 00:00:00 UTC, which is this Unix time.
pub const VHD_EPOCH: u64 = 946_684_800;

/// The geometry QEMU (and Hyper-V) write when the size cannot be expressed in CHS: a disk with
/// it is sized by `current_size` whoever created it.
const MAX_GEOMETRY: u64 = 65_535 * 16 * 255;
/// QEMU refuses disks above 2040 GiB (0xff000000 sectors); so does imgfs, to agree with it.
const MAX_SECTORS: u64 = 0xff00_0000;

// Field offsets.
const OFF_FEATURES: usize = 8;
const OFF_VERSION: usize = 12;
const OFF_DATA_OFFSET: usize = 16;
const OFF_TIMESTAMP: usize = 24;
const OFF_CREATOR_APP: usize = 28;
const OFF_CREATOR_VERSION: usize = 32;
const OFF_CREATOR_OS: usize = 36;
const OFF_ORIGINAL_SIZE: usize = 40;
const OFF_CURRENT_SIZE: usize = 48;
const OFF_CYLINDERS: usize = 56;
const OFF_HEADS: usize = 58;
const OFF_SECTORS: usize = 59;
const OFF_DISK_TYPE: usize = 60;
pub(super) const OFF_CHECKSUM: usize = 64;
const OFF_UNIQUE_ID: usize = 68;
const OFF_SAVED_STATE: usize = 84;

/// The three kinds of VHD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// The data, then the footer: a raw disk with 512 bytes appended.
    Fixed,
    /// Footer copy, dynamic header, BAT, blocks (sector bitmap + data), footer.
    Dynamic,
    /// A dynamic disk whose clear bitmap bits and unallocated blocks read from a parent.
    Differencing,
}

impl DiskType {
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
}

/// Where the virtual size comes from (QEMU's rule, see `Footer::virtual_size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeFrom {
    Geometry,
    CurrentSize,
}

/// A footer whose cookie and checksum were checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub version: u32,
    /// The dynamic header's offset (all ones in a fixed disk).
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_os: [u8; 4],
    pub original_size: u64,
    pub current_size: u64,
    pub cylinders: u16,
    pub heads: u8,
    pub sectors_per_track: u8,
    pub disk_type_code: u32,
    pub unique_id: [u8; 16],
    pub saved_state: u8,
    /// The bytes it was parsed from, written back unchanged.
    raw: [u8; FOOTER_LEN],
}

/// The one's complement of the byte sum of `bytes` with the 4-byte checksum field at `skip`
/// counted as zeros: the checksum of the footer and of the dynamic header.
pub fn checksum(bytes: &[u8], skip: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(skip..skip + 4).contains(i))
        .fold(0u32, |sum, (_, &b)| sum.wrapping_add(u32::from(b)));
    !sum
}

impl Footer {
    /// Parses a footer, checking the cookie and the checksum.
    pub fn parse(raw: &[u8]) -> Result<Footer> {
        let raw: [u8; FOOTER_LEN] = raw
            .get(..FOOTER_LEN)
            .and_then(|r| r.try_into().ok())
            .ok_or_else(|| Error::corrupt("the footer is shorter than 512 bytes"))?;
        if &raw[..8] != COOKIE {
            return Err(Error::corrupt("no \"conectix\" cookie"));
        }
        let stored = u32_be(&raw, OFF_CHECKSUM, "checksum")?;
        let computed = checksum(&raw, OFF_CHECKSUM);
        if stored != computed {
            return Err(Error::corrupt(format!(
                "footer checksum {stored:#010x} does not match its contents ({computed:#010x})"
            )));
        }
        let four = |at: usize| -> [u8; 4] { [raw[at], raw[at + 1], raw[at + 2], raw[at + 3]] };
        let mut unique_id = [0u8; 16];
        unique_id.copy_from_slice(&raw[OFF_UNIQUE_ID..OFF_UNIQUE_ID + 16]);
        Ok(Footer {
            features: u32_be(&raw, OFF_FEATURES, "features")?,
            version: u32_be(&raw, OFF_VERSION, "file format version")?,
            data_offset: u64_be(&raw, OFF_DATA_OFFSET, "data offset")?,
            timestamp: u32_be(&raw, OFF_TIMESTAMP, "time stamp")?,
            creator_app: four(OFF_CREATOR_APP),
            creator_version: u32_be(&raw, OFF_CREATOR_VERSION, "creator version")?,
            creator_os: four(OFF_CREATOR_OS),
            original_size: u64_be(&raw, OFF_ORIGINAL_SIZE, "original size")?,
            current_size: u64_be(&raw, OFF_CURRENT_SIZE, "current size")?,
            cylinders: u16_be(&raw, OFF_CYLINDERS, "cylinders")?,
            heads: raw[OFF_HEADS],
            sectors_per_track: raw[OFF_SECTORS],
            disk_type_code: u32_be(&raw, OFF_DISK_TYPE, "disk type")?,
            unique_id,
            saved_state: raw[OFF_SAVED_STATE],
            raw,
        })
    }

    /// The bytes to write back: exactly those that were read.
    pub fn bytes(&self) -> &[u8; FOOTER_LEN] {
        &self.raw
    }

    pub fn disk_type(&self) -> Result<DiskType> {
        match self.disk_type_code {
            2 => Ok(DiskType::Fixed),
            3 => Ok(DiskType::Dynamic),
            4 => Ok(DiskType::Differencing),
            other => Err(Error::unsupported(format!(
                "VHD disk type {other} is none of fixed (2), dynamic (3), differencing (4)"
            ))),
        }
    }

    /// Sectors the CHS geometry describes.
    pub fn geometry_sectors(&self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track)
    }

    /// The virtual size in bytes, as QEMU computes it: Virtual PC and QEMU (creator "vpc " and
    /// "qemu") size a disk by its CHS geometry, which rounds `current_size` down; every other
    /// creator (Hyper-V "win ", Disk2vhd "d2v ", QEMU's force_size "qem2", XenServer,
    /// VirtualBox, Azure's fixed disks, ...) by `current_size` rounded down to a sector; and a
    /// disk with the maximum geometry by `current_size` whoever made it.
    pub fn virtual_size(&self) -> Result<(u64, SizeFrom)> {
        let geometry = self.geometry_sectors();
        let chs_creator = matches!(&self.creator_app, b"vpc " | b"qemu");
        let (sectors, from) = if chs_creator && geometry != MAX_GEOMETRY {
            (geometry, SizeFrom::Geometry)
        } else {
            (self.current_size / SECTOR, SizeFrom::CurrentSize)
        };
        if sectors > MAX_SECTORS {
            return Err(Error::unsupported(format!(
                "the virtual size ({sectors} sectors) is above the 2040 GiB that VHD tools \
                 (QEMU among them) accept"
            )));
        }
        Ok((sectors * SECTOR, from))
    }

    /// This footer with another `current_size` and CHS geometry (a resize), resealed; every
    /// other byte as read.
    pub fn resized(&self, current_size: u64, chs: (u16, u8, u8)) -> Result<Footer> {
        let mut raw = self.raw;
        raw[OFF_CURRENT_SIZE..OFF_CURRENT_SIZE + 8].copy_from_slice(&current_size.to_be_bytes());
        raw[OFF_CYLINDERS..OFF_CYLINDERS + 2].copy_from_slice(&chs.0.to_be_bytes());
        raw[OFF_HEADS] = chs.1;
        raw[OFF_SECTORS] = chs.2;
        let sum = checksum(&raw, OFF_CHECKSUM);
        raw[OFF_CHECKSUM..OFF_CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
        Footer::parse(&raw)
    }

    /// Whether the geometry is the maximum one, which sizes the disk by `current_size`.
    pub fn has_max_geometry(&self) -> bool {
        self.geometry_sectors() == MAX_GEOMETRY
    }

    /// The creator application as text ("qemu", "win ", ...), unprintable bytes escaped.
    pub fn creator_app_text(&self) -> String {
        ascii(&self.creator_app)
    }

    pub fn creator_os_text(&self) -> String {
        ascii(&self.creator_os)
    }
}

/// The CHS geometry of a disk of `sectors` sectors, by the algorithm of the VHD specification
/// (appendix "CHS Calculation", as QEMU and Hyper-V compute it): the product rounds `sectors`
/// down, and is the maximum geometry from 65535 * 16 * 255 sectors on.
pub fn chs_for(sectors: u64) -> (u16, u8, u8) {
    let total = sectors.min(MAX_GEOMETRY);
    let (secs, heads, cyls_times_heads) = if total >= 65_535 * 16 * 63 {
        (255, 16, total / 255)
    } else {
        let per17 = total / 17;
        let heads = per17.div_ceil(1024).max(4);
        if per17 >= heads * 1024 || heads > 16 {
            let per31 = total / 31;
            if per31 >= 16 * 1024 {
                (63, 16, total / 63)
            } else {
                (31, 16, per31)
            }
        } else {
            (17, heads, per17)
        }
    };
    // Bounded: heads <= 16, secs <= 255, cylinders <= 65535 since total <= MAX_GEOMETRY.
    let cyls = (cyls_times_heads / heads).min(65_535);
    (cyls as u16, heads as u8, secs as u8)
}

fn ascii(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

/// A VHD time stamp as a UTC date and time, e.g. "2024-03-05 17:04:33 UTC".
pub fn timestamp_text(seconds: u32) -> String {
    let unix = VHD_EPOCH + u64::from(seconds);
    let (days, rest) = (unix / 86_400, unix % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// The proleptic Gregorian date of `days` after 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// The VHD time stamp of a Unix time (0 before 2000, the maximum past 2136).
pub fn vhd_time(unix_seconds: u64) -> u32 {
    u32::try_from(unix_seconds.saturating_sub(VHD_EPOCH)).unwrap_or(u32::MAX)
}

/// Builds a footer (for `make`): the fields given, reserved bytes zero, the checksum sealed.
#[allow(clippy::too_many_arguments)]
pub fn build(
    disk_type: DiskType,
    data_offset: u64,
    timestamp: u32,
    creator_app: [u8; 4],
    current_size: u64,
    geometry: (u16, u8, u8),
    unique_id: [u8; 16],
) -> Result<Footer> {
    let mut raw = [0u8; FOOTER_LEN];
    raw[..8].copy_from_slice(COOKIE);
    // Features: bit 1 is reserved and always set.
    raw[OFF_FEATURES..OFF_FEATURES + 4].copy_from_slice(&2u32.to_be_bytes());
    raw[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    raw[OFF_DATA_OFFSET..OFF_DATA_OFFSET + 8].copy_from_slice(&data_offset.to_be_bytes());
    raw[OFF_TIMESTAMP..OFF_TIMESTAMP + 4].copy_from_slice(&timestamp.to_be_bytes());
    raw[OFF_CREATOR_APP..OFF_CREATOR_APP + 4].copy_from_slice(&creator_app);
    raw[OFF_CREATOR_VERSION..OFF_CREATOR_VERSION + 4]
        .copy_from_slice(&0x0001_0000u32.to_be_bytes());
    raw[OFF_CREATOR_OS..OFF_CREATOR_OS + 4].copy_from_slice(b"Wi2k");
    raw[OFF_ORIGINAL_SIZE..OFF_ORIGINAL_SIZE + 8].copy_from_slice(&current_size.to_be_bytes());
    raw[OFF_CURRENT_SIZE..OFF_CURRENT_SIZE + 8].copy_from_slice(&current_size.to_be_bytes());
    raw[OFF_CYLINDERS..OFF_CYLINDERS + 2].copy_from_slice(&geometry.0.to_be_bytes());
    raw[OFF_HEADS] = geometry.1;
    raw[OFF_SECTORS] = geometry.2;
    raw[OFF_DISK_TYPE..OFF_DISK_TYPE + 4].copy_from_slice(&disk_type.code().to_be_bytes());
    raw[OFF_UNIQUE_ID..OFF_UNIQUE_ID + 16].copy_from_slice(&unique_id);
    let sum = checksum(&raw, OFF_CHECKSUM);
    raw[OFF_CHECKSUM..OFF_CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
    Footer::parse(&raw)
}

#[cfg(test)]
pub mod testing {
    use super::*;

    /// `raw` with its checksum field recomputed.
    pub fn reseal(raw: &mut [u8]) {
        let sum = checksum(raw, OFF_CHECKSUM);
        raw[OFF_CHECKSUM..OFF_CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
    }

    /// A footer's bytes with the creator application, current size and geometry replaced.
    pub fn with_sizing(raw: &[u8], app: &[u8; 4], current: u64, chs: (u16, u8, u8)) -> Vec<u8> {
        let mut raw = raw.to_vec();
        raw[OFF_CREATOR_APP..OFF_CREATOR_APP + 4].copy_from_slice(app);
        raw[OFF_CURRENT_SIZE..OFF_CURRENT_SIZE + 8].copy_from_slice(&current.to_be_bytes());
        raw[OFF_CYLINDERS..OFF_CYLINDERS + 2].copy_from_slice(&chs.0.to_be_bytes());
        raw[OFF_HEADS] = chs.1;
        raw[OFF_SECTORS] = chs.2;
        reseal(&mut raw);
        raw
    }
}

#[cfg(test)]
mod tests {
    use super::testing::with_sizing;
    use super::*;
    use crate::error::ErrorKind;

    fn sample(app: &[u8; 4], current: u64, chs: (u16, u8, u8)) -> Footer {
        build(DiskType::Fixed, u64::MAX, 0, *app, current, chs, [7; 16]).unwrap()
    }

    #[test]
    fn checksum_and_cookie_are_checked() {
        let f = sample(b"qemu", 10 << 20, (301, 4, 17));
        assert_eq!(Footer::parse(f.bytes()).unwrap(), f);
        let mut bad = f.bytes().to_vec();
        bad[100] ^= 1;
        let e = Footer::parse(&bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.to_string().contains("footer checksum"), "{e}");
        let mut bad = f.bytes().to_vec();
        bad[0] = b'C';
        assert!(Footer::parse(&bad)
            .unwrap_err()
            .to_string()
            .contains("cookie"));
        assert!(Footer::parse(&f.bytes()[..511]).is_err());
    }

    #[test]
    fn the_size_follows_qemus_rule_for_each_creator() {
        let mib = 1u64 << 20;
        let chs = (301, 4, 17);
        let by_chs = 301 * 4 * 17 * 512;
        for app in [b"vpc ", b"qemu"] {
            assert_eq!(
                sample(app, 10 * mib, chs).virtual_size().unwrap(),
                (by_chs, SizeFrom::Geometry)
            );
            let max = sample(app, 10 * mib, (65535, 16, 255));
            assert_eq!(
                max.virtual_size().unwrap(),
                (10 * mib, SizeFrom::CurrentSize)
            );
        }
        for app in [b"win ", b"d2v ", b"qem2", b"tap\0", b"vbox", b"CTXS"] {
            assert_eq!(
                sample(app, 10 * mib + 700, chs).virtual_size().unwrap(),
                (10 * mib + 512, SizeFrom::CurrentSize)
            );
        }
        let huge = sample(b"win ", (0xff00_0000 + 1) * 512, (65535, 16, 255));
        assert_eq!(
            huge.virtual_size().unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        let edge = sample(b"win ", 0xff00_0000 * 512, (65535, 16, 255));
        assert!(edge.virtual_size().is_ok());
        let raw = with_sizing(edge.bytes(), b"vpc ", 5, (0, 0, 0));
        assert_eq!(Footer::parse(&raw).unwrap().virtual_size().unwrap().0, 0);
    }

    #[test]
    fn types_timestamps_and_text() {
        let f = sample(b"tap\0", 0, (0, 0, 0));
        assert_eq!(f.disk_type().unwrap(), DiskType::Fixed);
        assert_eq!(f.creator_app_text(), "tap\\x00");
        assert_eq!(f.creator_os_text(), "Wi2k");
        let mut raw = f.bytes().to_vec();
        raw[63] = 5;
        testing::reseal(&mut raw);
        let e = Footer::parse(&raw).unwrap().disk_type().unwrap_err();
        assert!(e.to_string().contains("disk type 5"), "{e}");
        assert_eq!(timestamp_text(0), "2000-01-01 00:00:00 UTC");
        // 2024-02-29 12:34:56 UTC is Unix 1709210096.
        assert_eq!(
            timestamp_text(vhd_time(1_709_210_096)),
            "2024-02-29 12:34:56 UTC"
        );
        assert_eq!(vhd_time(5), 0);
    }
}
