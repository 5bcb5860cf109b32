//! Making an empty differencing VDI over a parent, the way VirtualBox takes a snapshot: the
//! parent's geometry and layout, a fresh image and modification UUID, the parent's UUIDs as
//! the link, and an empty block map. imgfs does not create snapshots itself; tests and the
//! crash harness use this to build the pairs qemu-img cannot make.

use std::path::Path;

use uuid::Uuid;

use super::header::{Header, ImageType, HEADER_LEN, UNALLOCATED};
use crate::error::{Error, Result};
use crate::host::HostFile;

/// Writes an empty differencing image of the VDI at `parent` to `child`.
pub fn make_differencing(child: &Path, parent: &Path) -> Result<()> {
    let file = HostFile::open(parent, false)?;
    let mut head = [0u8; HEADER_LEN];
    file.read_exact_at(&mut head, 0)?;
    let parent_header = Header::parse(&head).map_err(|e| e.with_path(parent))?;
    let bytes = differencing_bytes(&parent_header)?;
    std::fs::write(child, bytes).map_err(|e| Error::io("write", e).with_path(child))
}

/// The bytes of an empty differencing image of the image whose header is `parent`.
pub fn differencing_bytes(parent: &Header) -> Result<Vec<u8>> {
    let mut header = parent.clone();
    header.image_type = ImageType::Differencing;
    header.blocks_allocated = 0;
    header.uuid_image = random_uuid()?;
    header.uuid_last_snap = random_uuid()?;
    header.uuid_link = parent.uuid_image;
    header.uuid_parent = parent.uuid_last_snap;
    let mut out = header.to_bytes()?.to_vec();
    out.resize(header.offset_bmap as usize, 0);
    for _ in 0..header.blocks_in_image {
        out.extend_from_slice(&UNALLOCATED.to_le_bytes());
    }
    out.resize(header.offset_data as usize, 0);
    Ok(out)
}

fn random_uuid() -> Result<Uuid> {
    let mut bytes = [0u8; 16];
    let random = HostFile::open(Path::new("/dev/urandom"), false)?;
    random.read_exact_at(&mut bytes, 0)?;
    Ok(uuid::Builder::from_random_bytes(bytes).into_uuid())
}
