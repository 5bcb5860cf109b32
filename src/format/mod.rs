//! The format drivers and the one entry point that recognises an image by its magic (never by
//! its file name) and opens it with the right driver, access mode and QEMU-compatible locks.

pub mod backing;
pub mod check;
pub mod encrypted;
pub mod host_holes;
pub mod links;
pub mod luks;
pub mod qcow;
pub mod qcow2;
pub mod raw;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::image::Image;

use backing::Backing;
use links::{Chain, Links};

/// Formats imgfs can recognise; only some of them have a driver yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Vdi,
    Qcow,
    Qcow2,
    Vhdx,
    /// VHD (QEMU calls the format and its driver "vpc").
    Vhd,
    Vmdk,
    /// A LUKS1 container (QEMU's `luks`).
    Luks,
    /// A backing file, or a file named as the source: raw files carry no magic, so they are
    /// not recognised in a tree.
    Raw,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Vdi => "vdi",
            Format::Qcow => "qcow",
            Format::Qcow2 => "qcow2",
            Format::Vhdx => "vhdx",
            Format::Vhd => "vpc",
            Format::Vmdk => "vmdk",
            Format::Luks => "luks",
            Format::Raw => "raw",
        }
    }

    /// The format QEMU calls `name` (what `name` gives), if imgfs has it.
    pub fn from_name(name: &str) -> Option<Format> {
        [
            Format::Vdi,
            Format::Qcow,
            Format::Qcow2,
            Format::Vhdx,
            Format::Vhd,
            Format::Vmdk,
            Format::Luks,
            Format::Raw,
        ]
        .into_iter()
        .find(|f| f.name() == name)
    }
}

/// How many leading bytes `probe` needs to see.
pub const PROBE_LEN: usize = 512;

/// Recognises a format from the first bytes of a file (a fixed VHD needs `probe_file`'s look
/// at the end too).
pub fn probe(head: &[u8]) -> Option<Format> {
    if vdi::probe(head) {
        return Some(Format::Vdi);
    }
    match head.get(..4) {
        Some(b"QFI\xfb") => {
            let version = head
                .get(4..8)
                .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
            match version {
                Some(1) => Some(Format::Qcow),
                _ => Some(Format::Qcow2),
            }
        }
        Some(b"KDMV") | Some(b"COWD") => Some(Format::Vmdk),
        _ if head.starts_with(b"vhdxfile") => Some(Format::Vhdx),
        // A dynamic or differencing VHD's footer copy.
        _ if head.starts_with(b"conectix") => Some(Format::Vhd),
        _ if head.starts_with(b"# Disk DescriptorFile") => Some(Format::Vmdk),
        // Version 2 too, so that it is refused by name rather than taken for raw.
        _ if head.starts_with(b"LUKS\xba\xbe") => Some(Format::Luks),
        _ => None,
    }
}

/// Reads the head of `path` and recognises its format; `None` for files that are not images.
/// A file whose head matches nothing gets one more read, of its last sector: a fixed VHD has
/// its only footer there.
pub fn probe_file(path: &Path) -> Result<Option<Format>> {
    let file = HostFile::open(path, false)?;
    let mut head = vec![0u8; PROBE_LEN];
    file.read_exact_at(&mut head, 0)?;
    if let Some(format) = probe(&head) {
        return Ok(Some(format));
    }
    Ok(vhd::probe_tail(&file)?.then_some(Format::Vhd))
}

/// Whether the file at `path`, which has an image's magic, is only a part of an image
/// described by another file: a hosted sparse VMDK extent without a descriptor of its own (the
/// `-s001.vmdk` files of twoGbMaxExtentSparse disks). Flat extents and data files have no
/// magic and are never taken for images in the first place.
pub fn is_part_of_another_image(path: &Path) -> Result<bool> {
    let file = HostFile::open(path, false)?;
    vmdk::is_bare_extent(&file).map_err(|e| e.with_path(path))
}

/// The read-only reason of an image opened by `imgfs info`, which never writes.
pub const INSPECT_REASON: &str = "opened for inspection only";

/// The reasons an image opened for inspection gives for being read-only, without the
/// inspection itself: what would keep it read-only if it were served.
pub fn inherent_read_only_reason(reason: Option<String>) -> Option<String> {
    let reason = reason?;
    let own: Vec<&str> = reason
        .split("; ")
        .filter(|r| *r != INSPECT_REASON)
        .collect();
    (!own.is_empty()).then(|| own.join("; "))
}

/// How the caller wants an image served.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Serve read-only whatever the image allows (e.g. `imgfs mount --read-only`).
    pub read_only: bool,
    /// Inspect only: take no locks and never write (`imgfs info`).
    pub inspect: bool,
    /// Why it is served read-only, when `read_only` is set (shown by `imgfs info` and logs).
    pub reason: Option<String>,
}

// QEMU's permission lock bytes (FACTS.md): 100 + i announces permission i, 200 + i refuses to
// share it; READ = 0, WRITE = 1, RESIZE = 3.
const LOCK_READ: u64 = 100;
const LOCK_WRITE: u64 = 101;
const LOCK_UNSHARED_WRITE: u64 = 201;
const LOCK_UNSHARED_RESIZE: u64 = 203;

/// Opens the image at `path`, choosing the driver by magic. Writable unless the options, the host
/// file's permissions or the image itself say otherwise. Backing files are opened through
/// `links`, read-only.
pub fn open(path: &Path, options: &OpenOptions, links: &mut dyn Links) -> Result<Arc<dyn Image>> {
    let format = probe_file(path)
        .and_then(|f| f.ok_or_else(|| Error::unsupported("not a disk image imgfs recognises")))
        .map_err(|e| e.with_path(path))?;
    open_probed(path, format, options, links)
}

/// `open` for a file whose format the caller has already probed.
pub fn open_probed(
    path: &Path,
    format: Format,
    options: &OpenOptions,
    links: &mut dyn Links,
) -> Result<Arc<dyn Image>> {
    let top = path
        .canonicalize()
        .map_err(|e| Error::io("resolve", e).with_path(path))?;
    let reason = options.reason.clone();
    open_as(path, format, options, reason, &Chain::top(&top), links).map_err(|e| e.with_path(path))
}

/// Whether another process (QEMU) holds the image at `path` open for writing, as its lock
/// bytes announce.
pub fn held_for_writing(path: &Path) -> Result<bool> {
    HostFile::open(path, false)?.byte_locked_by_another_process(LOCK_WRITE)
}

/// Opens `path` read-only as a backing file of the images in `chain` (what `Links` implementations
/// call). `format` is what the image above records; without it the file is probed and taken as
/// raw when nothing matches, as QEMU does.
pub fn open_backing_file(
    path: &Path,
    format: Option<Format>,
    chain: &Chain,
    links: &mut dyn Links,
    inspect: bool,
) -> Result<Arc<dyn Image>> {
    let below = chain.below(path)?;
    let format = match format {
        Some(format) => format,
        None => probe_file(path)?.unwrap_or(Format::Raw),
    };
    let parent = chain.parent_path();
    let shown = parent.strip_prefix(links.root()).unwrap_or(parent);
    let reason = format!("it is the backing file of {}", shown.display());
    let options = OpenOptions {
        read_only: true,
        inspect,
        reason: None,
    };
    open_as(path, format, &options, Some(reason), &below, links).map_err(|e| e.with_path(path))
}

/// Opens the qcow2 image at `path` for writing over `backing`, an image already open: the
/// overlays imgfs keeps for originals it must never write. Claimed with QEMU's lock bytes like
/// any image it writes.
pub fn open_overlay(path: &Path, backing: Backing) -> Result<Arc<dyn Image>> {
    let opened = (|| {
        let file = open_claimed(path, true, false)?;
        let header = qcow2::Qcow2Header::read(&file)?;
        if header.data_file().is_some() {
            return Err(Error::unsupported("an overlay with an external data file"));
        }
        let image: Arc<dyn Image> = Arc::new(qcow2::Qcow2Image::open(
            file,
            header,
            None,
            Some(backing),
            None,
        )?);
        Ok(image)
    })();
    opened.map_err(|e| e.with_path(path))
}

/// Opens the qcow2 image at `path` for inspection without its backing file: what it holds
/// itself reads as data or zeros, the rest as unallocated.
pub fn open_alone(path: &Path) -> Result<Arc<dyn Image>> {
    let opened = (|| {
        let file = HostFile::open(path, false)?;
        if probe_file(path)? != Some(Format::Qcow2) {
            return Err(Error::unsupported("not a qcow2 image"));
        }
        let header = qcow2::Qcow2Header::read(&file)?;
        let reason = Some(INSPECT_REASON.to_string());
        let image: Arc<dyn Image> =
            Arc::new(qcow2::Qcow2Image::open(file, header, None, None, reason)?);
        Ok(image)
    })();
    opened.map_err(|e| e.with_path(path))
}

/// Opens the backing file that the image at `chain.parent_path()` names, if it names one.
/// `format_name` is its recorded backing format (e.g. the qcow2 extension), if any.
pub fn open_backing_named(
    name: Option<&OsStr>,
    format_name: Option<&str>,
    chain: &Chain,
    links: &mut dyn Links,
) -> Result<Option<Backing>> {
    let Some(name) = name else {
        return Ok(None);
    };
    let path = links::resolve(links.root(), chain.parent_path(), name, "backing file")?;
    let format = format_name.map(links::format_named).transpose()?;
    let image = links.open_backing(&path, format, chain)?;
    Ok(Some(Backing::new(image, &path)))
}

/// Opens an external data file (qcow2 `data_file`) that the image at `chain.parent_path()`
/// names, with the image's own access mode and locks.
pub fn open_data_file(
    name: &OsStr,
    chain: &Chain,
    links: &dyn Links,
    writable: bool,
    inspect: bool,
) -> Result<HostFile> {
    let path = links::resolve(links.root(), chain.parent_path(), name, "data file")?;
    let file = HostFile::open(&path, writable).map_err(|e| e.with_path(&path))?;
    if !inspect {
        claim_like_qemu(&file).map_err(|e| e.with_path(&path))?;
    }
    Ok(file)
}

fn open_as(
    path: &Path,
    format: Format,
    options: &OpenOptions,
    reason: Option<String>,
    chain: &Chain,
    links: &mut dyn Links,
) -> Result<Arc<dyn Image>> {
    let want_write = !options.read_only && !options.inspect;
    let file = open_claimed(path, want_write, options.inspect)?;
    let host_reason = if want_write {
        (!file.is_writable()).then(|| "the image file is not writable".to_string())
    } else {
        Some(match reason {
            Some(reason) => reason,
            None if options.inspect => INSPECT_REASON.to_string(),
            None => "served read-only by request".to_string(),
        })
    };
    let image: Arc<dyn Image> = match format {
        Format::Vdi => {
            let mut find_parent = |link: &vdi::ParentLink| vdi::open_parent(link, chain, links);
            Arc::new(vdi::VdiImage::open_finding_parent(
                file,
                &mut find_parent,
                host_reason,
            )?)
        }
        Format::Qcow => {
            let header = qcow::QcowHeader::read(&file)?;
            // QCOW v1 records no backing format: the backing file is probed.
            let backing = open_backing_named(header.backing_file(), None, chain, links)?;
            Arc::new(qcow::QcowImage::open(file, header, backing, host_reason)?)
        }
        Format::Qcow2 => {
            let header = qcow2::Qcow2Header::read(&file)?;
            let data_file = header
                .data_file()
                .map(|name| open_data_file(name, chain, links, file.is_writable(), options.inspect))
                .transpose()?;
            let backing =
                open_backing_named(header.backing_file(), header.backing_format(), chain, links)?;
            Arc::new(qcow2::Qcow2Image::open(
                file,
                header,
                data_file,
                backing,
                host_reason,
            )?)
        }
        Format::Vhdx => {
            let mut find_parent =
                |locator: &vhdx::ParentLocator| open_vhdx_parent(locator, chain, links);
            Arc::new(vhdx::VhdxImage::open_finding_parent(
                file,
                &mut find_parent,
                host_reason,
            )?)
        }
        Format::Vhd => {
            let mut find_parent = |parent: &vhd::ParentRef| vhd::open_parent(parent, chain, links);
            Arc::new(vhd::VhdImage::open_finding_parent(
                file,
                &mut find_parent,
                host_reason,
            )?)
        }
        Format::Vmdk => {
            let file = Arc::new(file);
            let top = vmdk::VmdkTop::read(&file)?;
            let extents = open_vmdk_extents(&top, &file, chain, links, options.inspect)?;
            let parent = top
                .parent_hint()
                .map(|name| open_vmdk_parent(name, top.parent_cid(), chain, links))
                .transpose()?;
            Arc::new(vmdk::VmdkImage::open(
                file,
                top,
                extents,
                parent,
                host_reason,
            )?)
        }
        Format::Luks => Arc::new(luks::LuksImage::open(file, host_reason)?),
        Format::Raw => Arc::new(raw::RawImage::open(file, host_reason)?),
    };
    Ok(image)
}

/// Opens the extent files a VMDK descriptor names, relative to the descriptor and inside the
/// source tree, with the descriptor's access mode and QEMU's locks; a file named twice is
/// opened once.
fn open_vmdk_extents(
    top: &vmdk::VmdkTop,
    top_file: &Arc<HostFile>,
    chain: &Chain,
    links: &dyn Links,
    inspect: bool,
) -> Result<Vec<Arc<HostFile>>> {
    let mut opened: Vec<(std::path::PathBuf, Arc<HostFile>)> = Vec::new();
    let mut files = Vec::new();
    for name in top.extent_files() {
        let path = links::resolve(links.root(), chain.parent_path(), name, "extent")?;
        if path == chain.parent_path() {
            return Err(Error::corrupt(format!(
                "the VMDK descriptor names itself ({}) as an extent",
                path.display()
            )));
        }
        if let Some((_, file)) = opened.iter().find(|(p, _)| *p == path) {
            files.push(Arc::clone(file));
            continue;
        }
        // An extent file we may not write makes the disk read-only, as for the top file.
        let file = Arc::new(
            open_claimed(&path, top_file.is_writable(), inspect).map_err(|e| e.with_path(&path))?,
        );
        opened.push((path, Arc::clone(&file)));
        files.push(file);
    }
    Ok(files)
}

/// Opens the parent that a VMDK's parentFileNameHint names, after checking that its CID is
/// the child's parentCID: a parent written since the child was made would show the child
/// through changed data.
fn open_vmdk_parent(
    name: &OsStr,
    parent_cid: u32,
    chain: &Chain,
    links: &mut dyn Links,
) -> Result<Backing> {
    let path = links::resolve(links.root(), chain.parent_path(), name, "parent")?;
    let file = HostFile::open(&path, false).map_err(|e| e.with_path(&path))?;
    let cid = vmdk::cid_of(&file).map_err(|e| e.with_path(&path))?;
    if cid != parent_cid {
        return Err(Error::corrupt(format!(
            "the parent {} has CID {cid:08x}, but this disk's parentCID is {parent_cid:08x}: \
             the parent changed after this disk was made from it",
            path.display()
        )));
    }
    drop(file);
    let image = links.open_backing(&path, Some(Format::Vmdk), chain)?;
    Ok(Backing::new(image, &path))
}

/// Finds and opens the parent of the differencing VHDX image at `chain.parent_path()`: the
/// locator's relative path first, then the file names of its Windows paths next to the child
/// (images copied off a Windows host keep their names, not their drive letters). The first
/// candidate whose data write GUID matches the child's parent_linkage is the parent.
fn open_vhdx_parent(
    locator: &vhdx::ParentLocator,
    chain: &Chain,
    links: &mut dyn Links,
) -> Result<Backing> {
    let mut candidates: Vec<String> = Vec::new();
    if let Some(components) = locator.relative_path_components() {
        candidates.push(components.join("/"));
    }
    for windows_path in [locator.volume_path(), locator.absolute_win32_path()]
        .into_iter()
        .flatten()
    {
        if let Some(name) = windows_path.rsplit(['\\', '/']).next() {
            candidates.push(name.to_string());
        }
    }
    let linkage = [locator.parent_linkage(), locator.parent_linkage2()];
    let mut tried = Vec::new();
    for name in candidates {
        if name.is_empty() || tried.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let path = match links::resolve(links.root(), chain.parent_path(), name.as_ref(), "parent")
        {
            Ok(path) => path,
            Err(e) => {
                tried.push((name, e.to_string()));
                continue;
            }
        };
        let file = HostFile::open(&path, false).map_err(|e| e.with_path(&path))?;
        let guid = vhdx::data_write_guid_of(&file).map_err(|e| e.with_path(&path))?;
        if !linkage.contains(&Some(guid)) {
            let expected = locator
                .parent_linkage()
                .map(|g| g.to_string())
                .unwrap_or_default();
            tried.push((
                name,
                format!(
                    "{} has data write GUID {guid}, the child's parent_linkage is {expected}",
                    path.display()
                ),
            ));
            continue;
        }
        let image = links.open_backing(&path, Some(Format::Vhdx), chain)?;
        return Ok(Backing::new(image, &path));
    }
    let reasons: Vec<String> = tried.into_iter().map(|(_, why)| why).collect();
    Err(Error::corrupt(format!(
        "the parent of this differencing image was not found: {}",
        reasons.join("; ")
    )))
}

/// Opens `path` for writing when `writable` (read-only where the host refuses writes: the file's
/// permissions or a read-only file system; `HostFile::is_writable` tells) and, unless only
/// inspecting, claims it with QEMU's lock bytes.
fn open_claimed(path: &Path, writable: bool, inspect: bool) -> Result<HostFile> {
    let file = match HostFile::open(path, writable) {
        // Permissions, a read-only file system, an immutable file.
        Err(e) if writable && matches!(e.errno(), libc::EACCES | libc::EROFS | libc::EPERM) => {
            HostFile::open(path, false)?
        }
        other => other?,
    };
    if !inspect {
        claim_like_qemu(&file)?;
    }
    Ok(file)
}

/// Refuses an image that a QEMU process writes (or will not let others write) and announces our
/// own use through the same lock bytes, so QEMU refuses to write an image imgfs serves.
fn claim_like_qemu(file: &HostFile) -> Result<()> {
    if file.byte_locked_by_another_process(LOCK_WRITE)? {
        return Err(Error::busy(
            "another process (QEMU?) has the image open for writing",
        ));
    }
    if file.is_writable() {
        if file.byte_locked_by_another_process(LOCK_UNSHARED_WRITE)? {
            return Err(Error::busy(
                "another process (QEMU?) uses the image and does not allow writers",
            ));
        }
        file.lock_bytes(&[
            LOCK_READ,
            LOCK_WRITE,
            LOCK_UNSHARED_WRITE,
            LOCK_UNSHARED_RESIZE,
        ])
    } else {
        file.lock_bytes(&[LOCK_READ, LOCK_UNSHARED_WRITE])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_recognises_magics_not_names() {
        assert_eq!(probe(b"QFI\xfb\0\0\0\x03rest"), Some(Format::Qcow2));
        assert_eq!(probe(b"QFI\xfb\0\0\0\x01rest"), Some(Format::Qcow));
        assert_eq!(probe(b"KDMV...."), Some(Format::Vmdk));
        assert_eq!(probe(b"vhdxfile...."), Some(Format::Vhdx));
        assert_eq!(probe(b"conectix...."), Some(Format::Vhd));
        assert_eq!(probe(b"# Disk DescriptorFile\n"), Some(Format::Vmdk));
        assert_eq!(probe(b"hello world"), None);
        assert_eq!(probe(b""), None);
    }

    #[test]
    fn inherent_reasons_leave_out_the_inspection() {
        let inspect = Some(INSPECT_REASON.to_string());
        assert_eq!(inherent_read_only_reason(inspect), None);
        let both = Some(format!("the image is marked corrupt; {INSPECT_REASON}"));
        assert_eq!(
            inherent_read_only_reason(both).as_deref(),
            Some("the image is marked corrupt")
        );
        assert_eq!(inherent_read_only_reason(None), None);
    }
}
