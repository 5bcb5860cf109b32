//! Creating an empty differencing VHD over a parent: qemu-img cannot make one, and the tests
//! and the crash harness need them. The layout is Hyper-V's: footer copy, dynamic header, the
//! parent locators' data (each in its own 512-byte aligned space), the BAT, the footer.

use std::path::Path;

use super::footer::{self, DiskType, FOOTER_LEN, SECTOR};
use super::header::{self, Locator, NewHeader, HEADER_LEN, W2KU, W2RU};
use super::parent::footer_of;
use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::meta::bytes::put_bytes;

/// The block size Hyper-V and QEMU use.
const BLOCK_SIZE: u32 = 2 << 20;

/// What a differencing disk made by `build_differencing` says about its parent.
pub struct ChildSpec<'a> {
    /// Locators: platform code and path (stored UTF-16LE).
    pub locators: &'a [([u8; 4], &'a str)],
    /// The name in the dynamic header.
    pub unicode_name: &'a str,
    pub parent_uuid: [u8; 16],
    pub parent_timestamp: u32,
}

/// Makes `child` an empty differencing disk of the VHD at `parent`, which it finds at
/// `parent_name` (a path relative to the child's directory, with `/`): W2ru and W2ku locators
/// and the header's name, as Hyper-V writes them.
pub fn make_differencing(child: &Path, parent: &Path, parent_name: &str) -> Result<()> {
    let parent_footer =
        footer_of(&HostFile::open(parent, false)?).map_err(|e| e.with_path(parent))?;
    let windows = parent_name.replace('/', "\\");
    let relative = format!(".\\{windows}");
    let file_name = windows.rsplit('\\').next().unwrap_or(&windows).to_string();
    let absolute = format!("C:\\images\\{file_name}");
    let spec = ChildSpec {
        locators: &[(W2RU, &relative), (W2KU, &absolute)],
        unicode_name: &file_name,
        parent_uuid: parent_footer.unique_id,
        parent_timestamp: parent_footer.timestamp,
    };
    let bytes = build_differencing(&parent_footer, &spec)?;
    std::fs::write(child, bytes).map_err(|e| Error::io("write", e).with_path(child))
}

/// The bytes of an empty differencing disk of the parent whose footer is `parent`, sized and
/// sized-by like it (same creator, geometry and current size).
pub fn build_differencing(parent: &footer::Footer, spec: &ChildSpec<'_>) -> Result<Vec<u8>> {
    let (size, _) = parent.virtual_size()?;
    let entries = u32::try_from(size.div_ceil(u64::from(BLOCK_SIZE)))
        .map_err(|_| Error::out_of_range("too many blocks"))?;
    let mut at = (FOOTER_LEN + HEADER_LEN) as u64;
    let mut locators = Vec::new();
    let mut data = Vec::new();
    for (code, path) in spec.locators {
        let bytes = header::locator_bytes(path);
        let space = (bytes.len() as u64).next_multiple_of(SECTOR).max(SECTOR);
        locators.push(Locator {
            code: *code,
            space: space as u32,
            length: bytes.len() as u32,
            offset: at,
        });
        data.push((at, bytes));
        at += space;
    }
    let table_offset = at;
    let table_len = (u64::from(entries) * 4).next_multiple_of(SECTOR);
    let footer_at = table_offset + table_len;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let uuid = random_uuid()?;
    let child_footer = footer::build(
        DiskType::Differencing,
        FOOTER_LEN as u64,
        footer::vhd_time(now),
        parent.creator_app,
        parent.current_size,
        (parent.cylinders, parent.heads, parent.sectors_per_track),
        uuid,
    )?;
    let dyn_header = header::build(&NewHeader {
        table_offset,
        max_table_entries: entries,
        block_size: BLOCK_SIZE,
        parent_uuid: spec.parent_uuid,
        parent_timestamp: spec.parent_timestamp,
        parent_name: spec.unicode_name,
        locators: &locators,
    })?;
    let len = usize::try_from(footer_at)
        .ok()
        .and_then(|l| l.checked_add(FOOTER_LEN))
        .ok_or_else(|| Error::out_of_range("the new image would not fit in memory"))?;
    let mut file = vec![0u8; len];
    put_bytes(&mut file, 0, child_footer.bytes())?;
    put_bytes(&mut file, FOOTER_LEN, &dyn_header)?;
    for (at, bytes) in &data {
        put_bytes(&mut file, *at as usize, bytes)?;
    }
    put_bytes(
        &mut file,
        table_offset as usize,
        &vec![0xff; entries as usize * 4],
    )?;
    put_bytes(&mut file, footer_at as usize, child_footer.bytes())?;
    Ok(file)
}

/// A random (version 4) UUID for a new disk.
fn random_uuid() -> Result<[u8; 16]> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::io("read /dev/urandom for a new UUID", e))?;
    Ok(*uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .as_bytes())
}
