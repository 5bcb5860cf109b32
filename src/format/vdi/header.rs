//! The 512-byte VDI v1.1 header: explicit little-endian parsing, validation of every field we
//! rely on (alone, then against the host file's length), and re-serialisation that keeps the
//! bytes we do not interpret (VirtualBox's LCHS geometry, padding) exactly as they were read.

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::meta::bytes::{bytes16, put_bytes, put_u32_le, u32_le, u64_le};

pub const SIGNATURE: u32 = 0xbeda_107f;
pub const VERSION_1_1: u32 = 0x0001_0001;
/// Bytes read and written as "the header"; the bmap can start right after it.
pub const HEADER_LEN: usize = 512;
pub const SECTOR_SIZE: u64 = 512;
/// Block map entry of a block never written: reads as zeros.
pub const UNALLOCATED: u32 = 0xffff_ffff;
/// Block map entry of a block given back by the guest: reads as zeros.
pub const DISCARDED: u32 = 0xffff_fffe;

/// `header_size` counts from offset 72; QEMU writes 384, VirtualBox 400. Anything shorter would
/// end before the UUIDs we read.
const MIN_HEADER_SIZE: u32 = 384;
/// The smallest block: one sector, so every block starts sector aligned.
const MIN_BLOCK_SIZE: u32 = 512;
/// No real tool writes blocks this large; a bigger value is a corrupt or hostile header, and a
/// partial write into an unallocated block has to build one block in memory.
const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// QEMU's cap: the bmap (4 bytes per block, sector aligned) stays below 2 GiB.
pub const MAX_BLOCKS_IN_IMAGE: u32 = 0x1fff_ff80;
/// QEMU's cap on the virtual size (MAX_BLOCKS_IN_IMAGE blocks of 1 MiB, about 512 TiB).
const MAX_DISK_SIZE: u64 = MAX_BLOCKS_IN_IMAGE as u64 * (1 << 20);

// Field offsets, named once so parse, serialise and error messages agree.
const OFF_TEXT: usize = 0;
const OFF_SIGNATURE: usize = 64;
const OFF_VERSION: usize = 68;
const OFF_HEADER_SIZE: usize = 72;
const OFF_IMAGE_TYPE: usize = 76;
const OFF_IMAGE_FLAGS: usize = 80;
const OFF_DESCRIPTION: usize = 84;
const OFF_OFFSET_BMAP: usize = 340;
const OFF_OFFSET_DATA: usize = 344;
const OFF_SECTOR_SIZE: usize = 360;
const OFF_DISK_SIZE: usize = 368;
const OFF_BLOCK_SIZE: usize = 376;
const OFF_BLOCK_EXTRA: usize = 380;
const OFF_BLOCKS_IN_IMAGE: usize = 384;
const OFF_BLOCKS_ALLOCATED: usize = 388;
const OFF_UUID_IMAGE: usize = 392;
const OFF_UUID_LAST_SNAP: usize = 408;
const OFF_UUID_LINK: usize = 424;
const OFF_UUID_PARENT: usize = 440;

const TEXT_LEN: usize = 64;
const DESCRIPTION_LEN: usize = 256;

/// The VDI image types imgfs serves. Undo images (3) are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageType {
    /// Blocks are allocated on first write ("normal" in VirtualBox terms).
    Dynamic,
    /// Every block preallocated, `bmap[i] == i` when created.
    Static,
    /// A VirtualBox snapshot: unallocated blocks read from the parent that `uuid_link` names.
    Differencing,
}

impl ImageType {
    fn from_raw(raw: u32) -> Result<Self> {
        match raw {
            1 => Ok(ImageType::Dynamic),
            2 => Ok(ImageType::Static),
            3 => Err(Error::unsupported(
                "VDI image_type 3 (undo image) is not supported",
            )),
            4 => Ok(ImageType::Differencing),
            other => Err(Error::corrupt(format!(
                "VDI image_type {other} is not a known type"
            ))),
        }
    }

    fn to_raw(self) -> u32 {
        match self {
            ImageType::Dynamic => 1,
            ImageType::Static => 2,
            ImageType::Differencing => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ImageType::Dynamic => "dynamic",
            ImageType::Static => "static",
            ImageType::Differencing => "differencing",
        }
    }
}

/// A parsed and validated VDI header.
#[derive(Debug, Clone)]
pub struct Header {
    pub image_type: ImageType,
    pub image_flags: u32,
    pub offset_bmap: u32,
    pub offset_data: u32,
    /// As stored; may be odd (`VBoxManage convertfromraw`), see `virtual_size`.
    pub disk_size: u64,
    /// A power of two in 512 B ..= 256 MiB.
    pub block_size: u32,
    pub blocks_in_image: u32,
    pub blocks_allocated: u32,
    pub uuid_image: Uuid,
    /// VirtualBox's modification UUID.
    pub uuid_last_snap: Uuid,
    /// A differencing image's parent: its `uuid_image` (VirtualBox's uuidLinkage).
    pub uuid_link: Uuid,
    /// The parent's `uuid_last_snap` when the child was made (uuidParentModification).
    pub uuid_parent: Uuid,
    /// The header as read, so serialising does not clobber fields we do not interpret.
    raw: [u8; HEADER_LEN],
}

impl Header {
    /// Parses the first `HEADER_LEN` bytes of an image and validates every field that does not
    /// depend on the file's length (see `check_layout` for those).
    pub fn parse(buf: &[u8]) -> Result<Header> {
        let raw: [u8; HEADER_LEN] = buf
            .get(..HEADER_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "VDI header needs {HEADER_LEN} bytes, got {}",
                    buf.len()
                ))
            })?;
        let field = |offset: usize, name: &str| u32_le(&raw, offset, name);

        let signature = field(OFF_SIGNATURE, "signature")?;
        if signature != SIGNATURE {
            return Err(Error::corrupt(format!(
                "VDI signature is {signature:#010x}, expected {SIGNATURE:#010x}"
            ))
            .at_offset(OFF_SIGNATURE as u64));
        }
        let version = field(OFF_VERSION, "version")?;
        if version != VERSION_1_1 {
            return Err(Error::unsupported(format!(
                "VDI version {}.{} is not supported (only 1.1)",
                version >> 16,
                version & 0xffff
            ))
            .at_offset(OFF_VERSION as u64));
        }
        let header_size = field(OFF_HEADER_SIZE, "header_size")?;
        if header_size < MIN_HEADER_SIZE {
            return Err(Error::unsupported(format!(
                "VDI header_size {header_size} is smaller than {MIN_HEADER_SIZE}"
            ))
            .at_offset(OFF_HEADER_SIZE as u64));
        }

        let uuid_parent = Uuid::from_bytes_le(bytes16(&raw, OFF_UUID_PARENT, "uuid_parent")?);
        let uuid_link = Uuid::from_bytes_le(bytes16(&raw, OFF_UUID_LINK, "uuid_link")?);
        let image_type = ImageType::from_raw(field(OFF_IMAGE_TYPE, "image_type")?)
            .map_err(|e| e.at_offset(OFF_IMAGE_TYPE as u64))?;
        // A parent is named by uuid_link; only differencing images have one (QEMU refuses any
        // other image that names one, and so do we).
        match (image_type, uuid_link.is_nil()) {
            (ImageType::Differencing, true) => {
                return Err(Error::corrupt(
                    "VDI differencing image with a nil uuid_link: its parent is unknown",
                )
                .at_offset(OFF_UUID_LINK as u64))
            }
            (ImageType::Differencing, false) => {}
            (other, false) => {
                return Err(Error::unsupported(format!(
                    "VDI {} image linked to another image (uuid_link {uuid_link}) is not \
                     supported",
                    other.name()
                ))
                .at_offset(OFF_UUID_LINK as u64))
            }
            (other, true) if !uuid_parent.is_nil() => {
                return Err(Error::unsupported(format!(
                    "VDI {} image with a parent UUID ({uuid_parent}) but no uuid_link is not \
                     supported",
                    other.name()
                ))
                .at_offset(OFF_UUID_PARENT as u64))
            }
            (_, true) => {}
        }

        let sector_size = field(OFF_SECTOR_SIZE, "sector_size")?;
        if u64::from(sector_size) != SECTOR_SIZE {
            return Err(Error::unsupported(format!(
                "VDI sector_size {sector_size} is not {SECTOR_SIZE}"
            ))
            .at_offset(OFF_SECTOR_SIZE as u64));
        }
        let offset_bmap = field(OFF_OFFSET_BMAP, "offset_bmap")?;
        if u64::from(offset_bmap) % SECTOR_SIZE != 0 || (offset_bmap as usize) < HEADER_LEN {
            return Err(Error::corrupt(format!(
                "VDI offset_bmap {offset_bmap:#x} is not a sector-aligned offset after the header"
            ))
            .at_offset(OFF_OFFSET_BMAP as u64));
        }
        let offset_data = field(OFF_OFFSET_DATA, "offset_data")?;
        if u64::from(offset_data) % SECTOR_SIZE != 0 || (offset_data as usize) < HEADER_LEN {
            return Err(Error::corrupt(format!(
                "VDI offset_data {offset_data:#x} is not a sector-aligned offset after the header"
            ))
            .at_offset(OFF_OFFSET_DATA as u64));
        }
        let block_size = field(OFF_BLOCK_SIZE, "block_size")?;
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(Error::unsupported(format!(
                "VDI block_size {block_size} is not a power of two between {MIN_BLOCK_SIZE} and \
                 {MAX_BLOCK_SIZE}"
            ))
            .at_offset(OFF_BLOCK_SIZE as u64));
        }
        let block_extra = field(OFF_BLOCK_EXTRA, "block_extra")?;
        if block_extra != 0 {
            return Err(Error::unsupported(format!(
                "VDI block_extra {block_extra} is not 0 (per-block metadata is not supported)"
            ))
            .at_offset(OFF_BLOCK_EXTRA as u64));
        }
        let blocks_in_image = field(OFF_BLOCKS_IN_IMAGE, "blocks_in_image")?;
        if blocks_in_image > MAX_BLOCKS_IN_IMAGE {
            return Err(Error::unsupported(format!(
                "VDI blocks_in_image {blocks_in_image} exceeds the maximum {MAX_BLOCKS_IN_IMAGE}"
            ))
            .at_offset(OFF_BLOCKS_IN_IMAGE as u64));
        }
        let disk_size = u64_le(&raw, OFF_DISK_SIZE, "disk_size")?;
        if disk_size > MAX_DISK_SIZE {
            return Err(Error::unsupported(format!(
                "VDI disk_size {disk_size} exceeds the maximum {MAX_DISK_SIZE}"
            ))
            .at_offset(OFF_DISK_SIZE as u64));
        }
        // Both factors are capped above, so this cannot overflow; checked all the same.
        let capacity = u64::from(blocks_in_image)
            .checked_mul(u64::from(block_size))
            .ok_or_else(|| Error::corrupt("VDI blocks_in_image * block_size overflows"))?;
        if disk_size > capacity {
            return Err(Error::corrupt(format!(
                "VDI disk_size {disk_size} is larger than blocks_in_image {blocks_in_image} * \
                 block_size {block_size} = {capacity}"
            ))
            .at_offset(OFF_DISK_SIZE as u64));
        }

        Ok(Header {
            image_type,
            image_flags: field(OFF_IMAGE_FLAGS, "image_flags")?,
            offset_bmap,
            offset_data,
            disk_size,
            block_size,
            blocks_in_image,
            blocks_allocated: field(OFF_BLOCKS_ALLOCATED, "blocks_allocated")?,
            uuid_image: Uuid::from_bytes_le(bytes16(&raw, OFF_UUID_IMAGE, "uuid_image")?),
            uuid_last_snap: Uuid::from_bytes_le(bytes16(
                &raw,
                OFF_UUID_LAST_SNAP,
                "uuid_last_snap",
            )?),
            uuid_link,
            uuid_parent,
            raw,
        })
    }

    /// Validates the placement of the block map and the data area in a file of `file_len`
    /// bytes: the bmap lies between the header and the data area, and both inside the file.
    pub fn check_layout(&self, file_len: u64) -> Result<()> {
        let bmap_end = u64::from(self.offset_bmap)
            .checked_add(self.bmap_len())
            .ok_or_else(|| Error::corrupt("VDI offset_bmap + block map size overflows"))?;
        if bmap_end > u64::from(self.offset_data) {
            return Err(Error::corrupt(format!(
                "VDI block map ({} entries at offset_bmap {:#x}) overlaps offset_data {:#x}",
                self.blocks_in_image, self.offset_bmap, self.offset_data
            ))
            .at_offset(OFF_BLOCKS_IN_IMAGE as u64));
        }
        if u64::from(self.offset_data) > file_len {
            return Err(Error::corrupt(format!(
                "VDI offset_data {:#x} is beyond the end of the file ({file_len} bytes)",
                self.offset_data
            ))
            .at_offset(OFF_OFFSET_DATA as u64));
        }
        Ok(())
    }

    /// The size the disk is served with: `disk_size` rounded up to whole sectors, as QEMU does.
    pub fn virtual_size(&self) -> u64 {
        // disk_size <= MAX_DISK_SIZE (checked in parse), far from overflowing.
        self.disk_size.div_ceil(SECTOR_SIZE) * SECTOR_SIZE
    }

    /// Bytes of the block map on disk (4 per block, without the padding to the data area).
    pub fn bmap_len(&self) -> u64 {
        u64::from(self.blocks_in_image) * 4
    }

    /// The free-text description, up to its first NUL.
    pub fn description(&self) -> String {
        c_string(
            self.raw
                .get(OFF_DESCRIPTION..OFF_DESCRIPTION + DESCRIPTION_LEN),
        )
    }

    /// The creator's banner, e.g. "<<< Oracle VM VirtualBox Disk Image >>>".
    pub fn text(&self) -> String {
        c_string(self.raw.get(OFF_TEXT..OFF_TEXT + TEXT_LEN))
            .trim()
            .to_string()
    }

    /// The 512 header bytes to write back: the bytes as read, with the fields this type owns
    /// stored over them.
    pub fn to_bytes(&self) -> Result<[u8; HEADER_LEN]> {
        let mut out = self.raw;
        put_u32_le(&mut out, OFF_SIGNATURE, SIGNATURE)?;
        put_u32_le(&mut out, OFF_VERSION, VERSION_1_1)?;
        put_u32_le(&mut out, OFF_IMAGE_TYPE, self.image_type.to_raw())?;
        put_u32_le(&mut out, OFF_IMAGE_FLAGS, self.image_flags)?;
        put_u32_le(&mut out, OFF_OFFSET_BMAP, self.offset_bmap)?;
        put_u32_le(&mut out, OFF_OFFSET_DATA, self.offset_data)?;
        put_u32_le(&mut out, OFF_SECTOR_SIZE, SECTOR_SIZE as u32)?;
        put_bytes(&mut out, OFF_DISK_SIZE, &self.disk_size.to_le_bytes())?;
        put_u32_le(&mut out, OFF_BLOCK_SIZE, self.block_size)?;
        put_u32_le(&mut out, OFF_BLOCK_EXTRA, 0)?;
        put_u32_le(&mut out, OFF_BLOCKS_IN_IMAGE, self.blocks_in_image)?;
        put_u32_le(&mut out, OFF_BLOCKS_ALLOCATED, self.blocks_allocated)?;
        put_bytes(&mut out, OFF_UUID_IMAGE, &self.uuid_image.to_bytes_le())?;
        put_bytes(
            &mut out,
            OFF_UUID_LAST_SNAP,
            &self.uuid_last_snap.to_bytes_le(),
        )?;
        put_bytes(&mut out, OFF_UUID_LINK, &self.uuid_link.to_bytes_le())?;
        put_bytes(&mut out, OFF_UUID_PARENT, &self.uuid_parent.to_bytes_le())?;
        Ok(out)
    }
}

fn c_string(bytes: Option<&[u8]>) -> String {
    let bytes = bytes.unwrap_or_default();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(bytes.get(..end).unwrap_or_default()).into_owned()
}

/// Builds headers and whole images in memory for the driver's tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A fresh header laid out the way `qemu-img create -f vdi` does it: bmap at 512, data at
    /// the next sector after the bmap, nil link/parent UUIDs.
    pub fn header(image_type: ImageType, disk_size: u64, block_size: u32) -> Header {
        let blocks = u32::try_from(disk_size.div_ceil(u64::from(block_size))).unwrap();
        let bmap_len = (u64::from(blocks) * 4).div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        let mut raw = [0u8; HEADER_LEN];
        raw[..19].copy_from_slice(b"<<< imgfs test >>>\n");
        put_u32_le(&mut raw, OFF_HEADER_SIZE, MIN_HEADER_SIZE).unwrap();
        Header {
            image_type,
            image_flags: 0,
            offset_bmap: HEADER_LEN as u32,
            offset_data: u32::try_from(HEADER_LEN as u64 + bmap_len).unwrap(),
            disk_size,
            block_size,
            blocks_in_image: blocks,
            blocks_allocated: 0,
            uuid_image: Uuid::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
            uuid_last_snap: Uuid::from_u128(0x1111_2222_3333_4444_5555_6666_7777_8888),
            uuid_link: Uuid::nil(),
            uuid_parent: Uuid::nil(),
            raw,
        }
    }

    /// Header + bmap `entries` + `data_blocks` physical blocks (block `i` filled with byte
    /// `i + 1`, so tests can tell blocks apart).
    pub fn image_bytes(header: &Header, entries: &[u32], data_blocks: u32) -> Vec<u8> {
        let mut out = header.to_bytes().unwrap().to_vec();
        out.resize(header.offset_bmap as usize, 0);
        for e in entries {
            out.extend_from_slice(&e.to_le_bytes());
        }
        out.resize(header.offset_data as usize, 0);
        for i in 0..data_blocks {
            out.extend(vec![(i + 1) as u8; header.block_size as usize]);
        }
        out
    }

    /// Stores `value` at `offset` of a header's bytes, to corrupt one field.
    pub fn patch_u32(bytes: &mut [u8], offset: usize, value: u32) {
        put_u32_le(bytes, offset, value).unwrap();
    }

    pub fn patch_u64(bytes: &mut [u8], offset: usize, value: u64) {
        put_bytes(bytes, offset, &value.to_le_bytes()).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::error::ErrorKind;

    /// The bytes of a fresh `qemu-img create -f vdi <options> <size>` image, or `None` (skip)
    /// where qemu-img is missing outside CI.
    fn qemu_image(options: &[&str], size: &str) -> Option<Vec<u8>> {
        let dir = crate::testutil::TempDir::new();
        let path = dir.path().join("t.vdi");
        let status = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "vdi"])
            .args(options)
            .arg(&path)
            .arg(size)
            .status();
        match status {
            Ok(s) => assert!(s.success(), "qemu-img create {options:?} {size} failed"),
            Err(e) if std::env::var_os("CI").is_none() => {
                eprintln!("skipping: qemu-img not runnable: {e}");
                return None;
            }
            Err(e) => panic!("qemu-img is required in CI: {e}"),
        }
        Some(std::fs::read(&path).unwrap())
    }

    /// Parses a good header with one u32 field replaced.
    fn with_u32(offset: usize, value: u32) -> Result<Header> {
        let mut b = header(ImageType::Dynamic, 10 << 20, 1 << 20)
            .to_bytes()
            .unwrap();
        patch_u32(&mut b, offset, value);
        Header::parse(&b)
    }

    fn assert_err(r: Result<Header>, kind: ErrorKind, needle: &str) {
        let e = r.expect_err("header must be refused");
        assert_eq!(e.kind(), kind, "{e}");
        assert!(
            e.to_string().contains(needle),
            "{e:?} should mention {needle}"
        );
    }

    #[test]
    fn parses_qemu_img_dynamic_static_and_rounded_sizes() {
        let Some(dynamic) = qemu_image(&[], "10M") else {
            return;
        };
        let h = Header::parse(&dynamic).unwrap();
        assert_eq!(h.image_type, ImageType::Dynamic);
        assert_eq!((h.offset_bmap, h.offset_data), (512, 1024));
        assert_eq!(
            (h.block_size, h.blocks_in_image, h.blocks_allocated),
            (1 << 20, 10, 0)
        );
        assert_eq!(h.virtual_size(), 10 << 20);
        assert!(!h.uuid_image.is_nil());
        assert!(h.text().contains("QEMU"), "{}", h.text());
        h.check_layout(dynamic.len() as u64).unwrap();
        assert_eq!(
            &h.to_bytes().unwrap()[..],
            &dynamic[..HEADER_LEN],
            "round trip"
        );

        let stat = qemu_image(&["-o", "static=on"], "3M").unwrap();
        let h = Header::parse(&stat).unwrap();
        assert_eq!(h.image_type, ImageType::Static);
        assert_eq!((h.blocks_in_image, h.blocks_allocated), (3, 3));

        // qemu-img rounds at creation; VBoxManage convertfromraw does not, so patch the size.
        let mut odd = qemu_image(&[], "1000001").unwrap();
        assert_eq!(Header::parse(&odd).unwrap().disk_size, 1_000_448);
        patch_u64(&mut odd, OFF_DISK_SIZE, 1_000_001);
        let h = Header::parse(&odd).unwrap();
        assert_eq!(h.disk_size, 1_000_001);
        assert_eq!(h.virtual_size(), 1_000_448);
        let written = h.to_bytes().unwrap();
        assert_eq!(
            u64_le(&written, OFF_DISK_SIZE, "disk_size").unwrap(),
            1_000_001
        );
    }

    #[test]
    fn serialising_keeps_unknown_bytes_and_updates_blocks_allocated() {
        let mut bytes = header(ImageType::Dynamic, 4 << 20, 1 << 20)
            .to_bytes()
            .unwrap();
        bytes[456..472].copy_from_slice(&[7; 16]); // VirtualBox LCHS geometry
        bytes[84..89].copy_from_slice(b"hello");
        let mut h = Header::parse(&bytes).unwrap();
        assert_eq!(h.description(), "hello");
        h.blocks_allocated = 3;
        let out = h.to_bytes().unwrap();
        assert_eq!(&out[456..472], &[7; 16]);
        assert_eq!(u32_le(&out, OFF_BLOCKS_ALLOCATED, "x").unwrap(), 3);
        let again = Header::parse(&out).unwrap();
        assert_eq!(again.blocks_allocated, 3);
        assert_eq!(again.to_bytes().unwrap(), out);
    }

    #[test]
    fn accepts_power_of_two_block_sizes() {
        for bs in [512, 4096, 1 << 20, 64 << 20, 256 << 20] {
            let h = header(ImageType::Dynamic, 8 << 20, bs);
            assert_eq!(
                Header::parse(&h.to_bytes().unwrap()).unwrap().block_size,
                bs
            );
        }
    }

    #[test]
    fn rejects_bad_identity_fields() {
        assert_err(
            with_u32(OFF_SIGNATURE, 0x1234),
            ErrorKind::Corrupt,
            "signature",
        );
        assert_err(
            with_u32(OFF_VERSION, 0x0001_0000),
            ErrorKind::Unsupported,
            "version 1.0",
        );
        assert_err(
            with_u32(OFF_HEADER_SIZE, 200),
            ErrorKind::Unsupported,
            "header_size",
        );
        assert_err(with_u32(OFF_IMAGE_TYPE, 3), ErrorKind::Unsupported, "undo");
        assert_err(
            with_u32(OFF_IMAGE_TYPE, 4),
            ErrorKind::Corrupt,
            "nil uuid_link",
        );
        assert_err(
            with_u32(OFF_IMAGE_TYPE, 9),
            ErrorKind::Corrupt,
            "image_type 9",
        );
        assert_err(Header::parse(&[0u8; 100]), ErrorKind::Corrupt, "512 bytes");
    }

    #[test]
    fn rejects_bad_geometry_fields() {
        assert_err(
            with_u32(OFF_OFFSET_BMAP, 513),
            ErrorKind::Corrupt,
            "offset_bmap 0x201",
        );
        assert_err(
            with_u32(OFF_OFFSET_BMAP, 0),
            ErrorKind::Corrupt,
            "offset_bmap",
        );
        assert_err(
            with_u32(OFF_OFFSET_DATA, 1030),
            ErrorKind::Corrupt,
            "offset_data 0x406",
        );
        assert_err(
            with_u32(OFF_SECTOR_SIZE, 4096),
            ErrorKind::Unsupported,
            "sector_size",
        );
        assert_err(
            with_u32(OFF_BLOCK_EXTRA, 512),
            ErrorKind::Unsupported,
            "block_extra",
        );
        for bs in [0, 256, 3 << 20, 512 << 20, u32::MAX] {
            assert_err(
                with_u32(OFF_BLOCK_SIZE, bs),
                ErrorKind::Unsupported,
                "block_size",
            );
        }
        assert_err(
            with_u32(OFF_BLOCKS_IN_IMAGE, 9),
            ErrorKind::Corrupt,
            "blocks_in_image 9",
        );
        assert_err(
            with_u32(OFF_BLOCKS_IN_IMAGE, u32::MAX),
            ErrorKind::Unsupported,
            "blocks_in_image",
        );
    }

    #[test]
    fn rejects_absurd_disk_size() {
        let mut b = header(ImageType::Dynamic, 1 << 20, 1 << 20)
            .to_bytes()
            .unwrap();
        patch_u64(&mut b, OFF_DISK_SIZE, u64::MAX);
        assert_err(Header::parse(&b), ErrorKind::Unsupported, "disk_size");
        patch_u64(&mut b, OFF_DISK_SIZE, (1 << 20) + 1);
        assert_err(Header::parse(&b), ErrorKind::Corrupt, "disk_size 1048577");
    }

    #[test]
    fn only_differencing_images_may_name_a_parent() {
        let mut b = header(ImageType::Dynamic, 1 << 20, 1 << 20)
            .to_bytes()
            .unwrap();
        b[OFF_UUID_PARENT + 15] = 0xaa;
        assert_err(Header::parse(&b), ErrorKind::Unsupported, "parent UUID");
        b[OFF_UUID_LINK] = 1;
        assert_err(Header::parse(&b), ErrorKind::Unsupported, "uuid_link");
        patch_u32(&mut b, OFF_IMAGE_TYPE, 4);
        let h = Header::parse(&b).unwrap();
        assert_eq!(h.image_type, ImageType::Differencing);
        assert_eq!(h.uuid_link.to_bytes_le()[0], 1);
        assert_eq!(h.uuid_parent.to_bytes_le()[15], 0xaa);
        assert_eq!(h.to_bytes().unwrap(), b);
        b[OFF_UUID_LINK] = 0;
        assert_err(Header::parse(&b), ErrorKind::Corrupt, "nil uuid_link");
    }

    #[test]
    fn layout_must_fit_between_header_data_and_file_end() {
        let h = header(ImageType::Dynamic, 10 << 20, 1 << 20);
        h.check_layout(1024).unwrap();
        let e = h.check_layout(1000).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.to_string().contains("offset_data 0x400 is beyond"), "{e}");

        let mut b = h.to_bytes().unwrap();
        patch_u32(&mut b, OFF_BLOCKS_IN_IMAGE, 200);
        let big = Header::parse(&b).unwrap(); // 200 entries need 800 bytes > 1024 - 512
        let e = big.check_layout(1 << 30).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.to_string().contains("overlaps offset_data"), "{e}");
    }
}
