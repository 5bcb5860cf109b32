//! The headers of ESXi's snapshot extents, both served read-only: COWD (VMDK3, the
//! `vmfsSparse` delta disks before ESXi 6.5) and seSparse (ESXi 6.5 and later). Both become a
//! `SparseHeader` with their own `SparseKind`, so the grain lookup is shared.
//!
//! ```text
//! COWD, all u32 LE          0 magic "COWD"  4 version  8 flags  12 capacity (sectors)
//!                           16 grain size (sectors)  20 grain directory sector
//!                           24 grain directory entries  28 next free sector
//!                           tables of 4096 u32 entries: sector of the grain, 0 unallocated
//! seSparse const header,    0 magic 0xcafebabe  8 version 0x2_00000001  16 capacity
//! all u64 LE, sectors       24 grain size (8)  32 grain table size (64 sectors)  40 flags (0)
//!                           80 volatile header  128/136 grain directory offset/size
//!                           144/152 grain tables offset/size  192/200 grains offset/size
//! seSparse volatile header  0 magic 0xcafecafe  24 replayJournal (must be 0)
//! directory entry           0 none, 0x1000_0000_xxxx_xxxx: grain table number x
//! table entry, top nibble   0 unallocated, 1 unmapped and 2 zero (both read as zeros),
//!                           3 allocated: grain number = bits 48..60 | bits 0..48 << 12
//! ```
//!
//! QEMU's checks are kept (they come from its black-box study of the format): version 2.1,
//! 4 KiB grains, 64-sector tables, no flags, zero reserved fields, no journal to replay.

use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::meta::bytes::{u32_le, u64_le};

use super::descriptor::SECTOR_SIZE;
use super::header::{SparseHeader, SparseKind};

pub const COWD_MAGIC: &[u8; 4] = b"COWD";
pub const SESPARSE_MAGIC: u64 = 0xcafe_babe;
const SESPARSE_VOLATILE_MAGIC: u64 = 0xcafe_cafe;
const SESPARSE_VERSION: u64 = 0x0000_0002_0000_0001;
/// Entries of a COWD grain table, fixed by the format.
const COWD_GTES: u32 = 4096;

/// Reads and checks the header of a COWD extent.
pub fn read_cowd(file: &HostFile) -> Result<SparseHeader> {
    let mut head = vec![0u8; SECTOR_SIZE as usize];
    file.read_exact_at(&mut head, 0)?;
    if head.get(..4) != Some(COWD_MAGIC) {
        return Err(Error::corrupt("not a COWD extent (no COWD magic)"));
    }
    let field = |at: usize, name: &str| u32_le(&head, at, name).map(u64::from);
    let header = SparseHeader {
        kind: SparseKind::Cowd,
        gd_len: Some(field(24, "grain directory entries")?),
        version: u32_le(&head, 4, "version")?,
        flags: 0,
        capacity: field(12, "capacity")?,
        grain_sectors: field(16, "grain size")?,
        descriptor_offset: 0,
        descriptor_size: 0,
        gtes_per_gt: COWD_GTES,
        rgd_offset: 0,
        gd_offset: field(20, "grain directory offset")?,
        overhead: 0,
        unclean_shutdown: false,
        compression: 0,
        from_footer: false,
    };
    header.check(file.len()?)?;
    Ok(header)
}

/// Reads and checks the const and volatile headers of a seSparse extent.
pub fn read_sesparse(file: &HostFile) -> Result<SparseHeader> {
    let mut head = vec![0u8; SECTOR_SIZE as usize];
    file.read_exact_at(&mut head, 0)?;
    let field = |at: usize, name: &str| u64_le(&head, at, name);
    let magic = field(0, "magic")?;
    if magic != SESPARSE_MAGIC {
        return Err(Error::corrupt(format!(
            "not a seSparse extent (magic {magic:#x})"
        )));
    }
    let unsupported = |what: String, at: usize| Error::unsupported(what).at_offset(at as u64);
    let version = field(8, "version")?;
    if version != SESPARSE_VERSION {
        return Err(unsupported(
            format!("seSparse version {version:#x} is not 2.1"),
            8,
        ));
    }
    for (at, name, want) in [
        (24, "grain size", 8),
        (32, "grain table size", 64),
        (40, "flags", 0),
    ] {
        let value = field(at, name)?;
        if value != want {
            return Err(unsupported(
                format!("seSparse {name} {value} is not supported (only {want} is)"),
                at,
            ));
        }
    }
    if (48..80)
        .step_by(8)
        .any(|at| field(at, "reserved").ok() != Some(0))
        || head
            .get(208..)
            .is_some_and(|pad| pad.iter().any(|&b| b != 0))
    {
        return Err(unsupported(
            "seSparse reserved fields are not zero".into(),
            48,
        ));
    }
    let sectors_to_bytes = |at: usize, name: &str| -> Result<u64> {
        field(at, name)?
            .checked_mul(SECTOR_SIZE)
            .filter(|&b| b <= i64::MAX as u64)
            .ok_or_else(|| {
                Error::corrupt(format!("seSparse {name} overflows")).at_offset(at as u64)
            })
    };
    let volatile_at = sectors_to_bytes(80, "volatile header offset")?;
    let mut volatile = vec![0u8; SECTOR_SIZE as usize];
    file.read_exact_at(&mut volatile, volatile_at)?;
    if u64_le(&volatile, 0, "volatile magic")? != SESPARSE_VOLATILE_MAGIC {
        return Err(
            Error::corrupt("the seSparse volatile header has a bad magic").at_offset(volatile_at),
        );
    }
    if u64_le(&volatile, 24, "replayJournal")? != 0 {
        return Err(Error::unsupported(
            "the seSparse extent is dirty: its journal would have to be replayed",
        )
        .at_offset(volatile_at + 24));
    }
    let gd_at = sectors_to_bytes(128, "grain directory offset")?;
    let gd_bytes = sectors_to_bytes(136, "grain directory size")?;
    let tables_at = sectors_to_bytes(144, "grain tables offset")?;
    let grains_at = sectors_to_bytes(192, "grains offset")?;
    let header = SparseHeader {
        kind: SparseKind::SeSparse {
            tables_at,
            grains_at,
        },
        gd_len: Some(gd_bytes / 8),
        version: 2,
        flags: 0,
        capacity: field(16, "capacity")?,
        grain_sectors: 8,
        descriptor_offset: 0,
        descriptor_size: 0,
        gtes_per_gt: 4096,
        rgd_offset: 0,
        gd_offset: gd_at / SECTOR_SIZE,
        overhead: grains_at / SECTOR_SIZE,
        unclean_shutdown: false,
        compression: 0,
        from_footer: false,
    };
    header.check(file.len()?)?;
    Ok(header)
}

#[cfg(test)]
pub mod testing {
    /// A seSparse extent of `capacity` sectors whose grains `(grain number, fill byte)` are
    /// allocated (one grain table, grains in order), plus `zero` grain numbers marked zero.
    pub fn sesparse(capacity: u64, grains: &[(u64, u8)], zero: &[u64]) -> Vec<u8> {
        let mut f = vec![0u8; 12288 * 512];
        let put =
            |f: &mut Vec<u8>, at: usize, v: u64| f[at..at + 8].copy_from_slice(&v.to_le_bytes());
        put(&mut f, 0, 0xcafe_babe);
        put(&mut f, 8, 0x2_0000_0001);
        put(&mut f, 16, capacity);
        put(&mut f, 24, 8);
        put(&mut f, 32, 64);
        for (at, v) in [
            (80, 1),
            (88, 1),
            (96, 2),
            (104, 2),
            (112, 2048),
            (120, 2048),
        ] {
            put(&mut f, at, v);
        }
        for (at, v) in [(128, 4096), (136, 2048), (144, 6144), (152, 2048)] {
            put(&mut f, at, v);
        }
        for (at, v) in [
            (160, 8192),
            (168, 2048),
            (176, 10240),
            (184, 2048),
            (192, 12288),
        ] {
            put(&mut f, at, v);
        }
        put(&mut f, 200, capacity);
        put(&mut f, 512, 0xcafe_cafe);
        put(&mut f, 4096 * 512, 0x1000_0000_0000_0000);
        let gt = 6144 * 512;
        for (index, &(grain, byte)) in grains.iter().enumerate() {
            let i = index as u64;
            let entry = 0x3000_0000_0000_0000 | ((i & 0xfff) << 48) | (i >> 12);
            put(&mut f, gt + grain as usize * 8, entry);
            f.resize(f.len() + 4096, byte);
        }
        for &grain in zero {
            put(&mut f, gt + grain as usize * 8, 0x2000_0000_0000_0000);
        }
        f
    }

    /// A COWD extent of `capacity` sectors with 512-byte grains; `grains` (grain number, fill
    /// byte) allocated in order after the single grain table.
    pub fn cowd(capacity: u32, grains: &[(u32, u8)]) -> Vec<u8> {
        let mut f = vec![0u8; 512 + 512 + 4096 * 4];
        f[..4].copy_from_slice(b"COWD");
        let put =
            |f: &mut Vec<u8>, at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put(&mut f, 4, 1);
        put(&mut f, 12, capacity);
        put(&mut f, 16, 1);
        put(&mut f, 20, 1);
        put(&mut f, 24, capacity.div_ceil(4096));
        put(&mut f, 512, 2);
        for &(grain, byte) in grains {
            let sector = (f.len() / 512) as u32;
            put(&mut f, 1024 + grain as usize * 4, sector);
            f.resize(f.len() + 512, byte);
        }
        f
    }
}
