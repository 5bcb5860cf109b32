//! What each NBD command does to an export's image, apart from the socket: range checks, the
//! NBD error for each failure, how a read splits into data and holes, how zeroes are written,
//! and block-status descriptors for `base:allocation` and `qemu:allocation-depth`.
//!
//! - WRITE_ZEROES skips what already reads as zeros (unallocated, zero extents), tries the
//!   image's discard unless NO_HOLE asks otherwise (a discard leaves zeros, so nothing is
//!   left to write), and writes zeros over the rest; with FAST_ZERO it fails with ENOTSUP up
//!   front when zeros would have to be written.
//! - TRIM is advisory: the image's discard where it has one, nothing otherwise.

use super::exports::Export;
use super::handshake::{Contexts, ID_ALLOCATION, ID_DEPTH};
use super::proto::*;
use crate::error::{Error, ErrorKind};
use crate::image::{Extent, ExtentState, Image};

/// An NBD error and the message for the client (and the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub errno: u32,
    pub message: String,
    /// Whether the image failed (logged as an error), not the client's request.
    image_fault: bool,
}

impl Failure {
    pub fn new(errno: u32, message: impl Into<String>) -> Self {
        Failure {
            errno,
            message: message.into(),
            image_fault: false,
        }
    }

    /// Logs the failure once: image faults as errors, client mistakes for debugging.
    pub fn log(&self, export: &str, req: &Request) {
        let what = format!(
            "export {export}: command {} at {} (+{})",
            req.kind, req.offset, req.len
        );
        match self.image_fault {
            true => log::error!("{what}: {}", self.message),
            false => log::debug!("{what}: {}", self.message),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let errno = match e.kind() {
            ErrorKind::ReadOnly => EPERM,
            ErrorKind::OutOfRange => EINVAL,
            _ => match e.errno() {
                libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
                _ => EIO,
            },
        };
        let image_fault = !matches!(e.kind(), ErrorKind::ReadOnly | ErrorKind::OutOfRange);
        Failure {
            errno,
            message: e.to_string(),
            image_fault,
        }
    }
}

pub type Served<T = ()> = std::result::Result<T, Failure>;

/// `[offset, offset + len)` must lie inside the export; `errno` when it does not.
fn check_range(export: &Export, req: &Request, errno: u32) -> Served {
    match req.end() {
        Some(end) if end <= export.size() => Ok(()),
        _ => Err(Failure::new(
            errno,
            format!(
                "{} bytes at {} lie beyond the end of the export ({} bytes)",
                req.len,
                req.offset,
                export.size()
            ),
        )),
    }
}

fn check_writable(export: &Export) -> Served {
    match export.writable {
        true => Ok(()),
        false => Err(Failure::new(EPERM, "the export is read-only")),
    }
}

/// After a write with FUA: what it wrote must be on stable storage before the reply.
fn fua(export: &Export, req: &Request) -> Served {
    match req.flags & CMD_FLAG_FUA != 0 {
        true => Ok(export.image().flush()?),
        false => Ok(()),
    }
}

pub fn check_read(export: &Export, req: &Request) -> Served {
    if req.len > MAX_PAYLOAD {
        return Err(Failure::new(
            EINVAL,
            format!("a read of {} bytes (at most {MAX_PAYLOAD})", req.len),
        ));
    }
    check_range(export, req, EINVAL)
}

/// A piece of a read: `len` bytes at `start` within the request, data or a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub start: usize,
    pub len: usize,
    pub hole: bool,
}

/// Holes shorter than this are sent as data: a chunk header costs more than a few zeros.
const MIN_HOLE: usize = 4096;

/// How a read of `len` bytes at `offset` splits into data and holes, from the block status of
/// the format (holes the host file has inside allocated clusters count as data); all data when
/// the status is unavailable or does not cover the range exactly.
pub fn plan_read(image: &dyn Image, offset: u64, len: usize) -> Vec<Segment> {
    let whole = vec![Segment {
        start: 0,
        len,
        hole: false,
    }];
    if len == 0 {
        return Vec::new();
    }
    let status = crate::host::with_holes_as_data(|| image.block_status(offset, len as u64));
    let Ok(extents) = status else {
        return whole;
    };
    let mut segments: Vec<Segment> = Vec::new();
    let mut at = 0usize;
    for e in &extents {
        let start = e
            .offset
            .checked_sub(offset)
            .and_then(|s| usize::try_from(s).ok());
        let elen = usize::try_from(e.len).ok();
        let (Some(start), Some(elen)) = (start, elen) else {
            return whole;
        };
        if start != at || elen == 0 {
            return whole;
        }
        let elen = elen.min(len - at);
        push_segment(&mut segments, start, elen, e.state != ExtentState::Data);
        at += elen;
        if at == len {
            break;
        }
    }
    if at != len {
        return whole;
    }
    // Short holes become data, which may join their neighbours.
    let mut merged = Vec::with_capacity(segments.len());
    for s in segments {
        push_segment(&mut merged, s.start, s.len, s.hole && s.len >= MIN_HOLE);
    }
    merged
}

fn push_segment(segments: &mut Vec<Segment>, start: usize, len: usize, hole: bool) {
    if let Some(last) = segments.last_mut() {
        if last.hole == hole {
            last.len += len;
            return;
        }
    }
    segments.push(Segment { start, len, hole });
}

/// Reads the data segments into `buf` (which starts at `offset`); holes are left as they are.
pub fn fill(image: &dyn Image, offset: u64, segments: &[Segment], buf: &mut [u8]) -> Served {
    for s in segments.iter().filter(|s| !s.hole) {
        let part = buf
            .get_mut(s.start..s.start + s.len)
            .ok_or_else(|| Failure::new(EIO, "internal: a read segment outside its buffer"))?;
        image.read_at(part, offset + s.start as u64)?;
    }
    Ok(())
}

pub fn write(export: &Export, req: &Request, data: &[u8]) -> Served {
    check_writable(export)?;
    check_range(export, req, ENOSPC)?;
    export.image().write_at(data, req.offset)?;
    fua(export, req)
}

pub fn flush(export: &Export) -> Served {
    if export.writable {
        export.image().flush()?;
    }
    Ok(())
}

pub fn trim(export: &Export, req: &Request) -> Served {
    check_writable(export)?;
    check_range(export, req, EINVAL)?;
    match export.image().discard(req.offset, u64::from(req.len)) {
        Ok(()) => fua(export, req),
        Err(e) if e.kind() == ErrorKind::Unsupported => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub fn cache(export: &Export, req: &Request) -> Served {
    check_range(export, req, EINVAL)
}

/// The data extents of `[offset, offset + len)`: what does not read as zeros yet.
fn nonzero(image: &dyn Image, offset: u64, len: u64) -> Served<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let extents = image.block_status(at, end - at)?;
        let Some(last) = extents.last() else {
            // No status: assume data.
            out.push((at, end - at));
            break;
        };
        let next = last.offset.saturating_add(last.len).min(end);
        for e in extents.iter().filter(|e| e.state == ExtentState::Data) {
            let start = e.offset.max(at);
            let stop = e.offset.saturating_add(e.len).min(end);
            if stop > start {
                out.push((start, stop - start));
            }
        }
        if next <= at {
            out.push((at, end - at));
            break;
        }
        at = next;
    }
    Ok(out)
}

/// Zeros for WRITE_ZEROES, written from here in pieces.
static ZEROES: [u8; 1 << 20] = [0; 1 << 20];

pub fn write_zeroes(export: &Export, req: &Request) -> Served {
    check_writable(export)?;
    check_range(export, req, ENOSPC)?;
    let image = export.image();
    let len = u64::from(req.len);
    let mut data = nonzero(image, req.offset, len)?;
    if data.is_empty() {
        return Ok(());
    }
    if req.flags & CMD_FLAG_FAST_ZERO != 0 {
        return Err(Failure::new(
            ENOTSUP,
            "zeroing this range means writing zeros",
        ));
    }
    if req.flags & CMD_FLAG_NO_HOLE == 0 {
        match image.discard(req.offset, len) {
            // A discard leaves zeros, also where the format keeps the clusters mapped.
            Ok(()) => data = Vec::new(),
            Err(e) if e.kind() == ErrorKind::Unsupported => {}
            Err(e) => return Err(e.into()),
        }
    }
    for (mut at, len) in data {
        let end = at + len;
        while at < end {
            let n = (end - at).min(ZEROES.len() as u64) as usize;
            image.write_at(&ZEROES[..n], at)?;
            at += n as u64;
        }
    }
    fua(export, req)
}

/// The `base:allocation` flags of an extent: anything that is not data reads as zeros; zeros
/// stored in the image are not a hole (as qemu-nbd reports them).
fn allocation_flags(e: &Extent) -> u32 {
    match e.state {
        ExtentState::Data => 0,
        ExtentState::StoredZeros => STATE_ZERO,
        ExtentState::Zero | ExtentState::Unallocated => STATE_HOLE | STATE_ZERO,
    }
}

/// The `qemu:allocation-depth` value of an extent: 0 unallocated, 1 the image, 2 its backing
/// file, and so on.
fn depth_flags(e: &Extent) -> u32 {
    match e.state {
        ExtentState::Unallocated => 0,
        ExtentState::Data | ExtentState::Zero | ExtentState::StoredZeros => {
            e.layer.saturating_add(1)
        }
    }
}

/// The most descriptors in one block-status chunk (the protocol suggests at most 2^20).
const MAX_DESCRIPTORS: usize = 1 << 16;

/// Descriptors (length, flags) for the extents, merged where the flags agree, clipped to
/// `[offset, end)`.
fn descriptors(extents: &[Extent], offset: u64, end: u64, flags: fn(&Extent) -> u32) -> Vec<u8> {
    let mut merged: Vec<(u64, u32)> = Vec::new();
    for e in extents {
        let start = e.offset.max(offset);
        let stop = e.offset.saturating_add(e.len).min(end);
        if stop <= start {
            continue;
        }
        let f = flags(e);
        if let Some((len, last)) = merged.last_mut() {
            if *last == f && *len + (stop - start) <= u64::from(u32::MAX) {
                *len += stop - start;
                continue;
            }
        }
        if merged.len() == MAX_DESCRIPTORS {
            break;
        }
        merged.push((stop - start, f));
    }
    let mut out = Vec::with_capacity(merged.len() * 8);
    for (len, f) in merged {
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend_from_slice(&f.to_be_bytes());
    }
    out
}

/// NBD_CMD_BLOCK_STATUS: one chunk per selected context (kind and payload).
pub fn block_status(
    export: &Export,
    req: &Request,
    contexts: Contexts,
) -> Served<Vec<(u16, Vec<u8>)>> {
    if !contexts.any() {
        return Err(Failure::new(EINVAL, "no metadata context was selected"));
    }
    check_range(export, req, EINVAL)?;
    if req.len == 0 {
        return Err(Failure::new(EINVAL, "block status of zero bytes"));
    }
    // A reply may cover less than asked: keep the extent list of one request bounded.
    let window = u64::from(req.len).min(u64::from(export.preferred_block) << 17);
    let window = window.max(1 << 20).min(u64::from(req.len));
    let mut end = req.offset + window;
    let extents = export.image().block_status(req.offset, window)?;
    if req.flags & CMD_FLAG_REQ_ONE != 0 {
        if let Some(first) = extents.first() {
            end = end.min(first.offset.saturating_add(first.len));
        }
    }
    let mut chunks = Vec::new();
    for (on, id, flags) in [
        (
            contexts.allocation,
            ID_ALLOCATION,
            allocation_flags as fn(&Extent) -> u32,
        ),
        (contexts.depth, ID_DEPTH, depth_flags),
    ] {
        if !on {
            continue;
        }
        let mut list = descriptors(&extents, req.offset, end, flags);
        if list.is_empty() {
            return Err(Failure::new(EIO, "the image reported no block status"));
        }
        if req.flags & CMD_FLAG_REQ_ONE != 0 {
            list.truncate(8);
        }
        let mut payload = id.to_be_bytes().to_vec();
        payload.extend_from_slice(&list);
        chunks.push((REPLY_TYPE_BLOCK_STATUS, payload));
    }
    Ok(chunks)
}
