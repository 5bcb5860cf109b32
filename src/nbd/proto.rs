//! The NBD wire format (the nbd project's `doc/proto.md`): magic numbers, option, reply, flag
//! and command values, and pure functions that parse what a client sends and encode what the
//! server answers. Nothing here does I/O, so every parser can be fed arbitrary bytes (unit
//! tests, the fuzz target) and returns an error instead of panicking on any of them.
//!
//! Every length from the network is checked against a fixed cap before anything is allocated
//! or read for it.

use crate::error::{Error, Result};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Information types of NBD_OPT_INFO / NBD_OPT_GO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands and command flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// Error values.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// base:allocation flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The metadata contexts imgfs serves, with the ids it gives them.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
pub const CONTEXT_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// The longest string the protocol allows (export names, queries, messages).
pub const MAX_STRING: usize = 4096;
/// The most option data accepted in one option: more is a denial of service.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// The largest READ or WRITE payload served, advertised as the maximum block size.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// The most queries one meta-context option may carry.
pub const MAX_QUERIES: u32 = 256;

/// The header of an option the client sent (after its magic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// Parses the 16 bytes that start every option: IHAVEOPT, option, length.
pub fn parse_option_header(bytes: &[u8; 16]) -> Result<OptionHeader> {
    let magic = be64(bytes, 0)?;
    if magic != IHAVEOPT {
        return Err(Error::out_of_range(format!(
            "option magic {magic:#x} is not IHAVEOPT"
        )));
    }
    Ok(OptionHeader {
        option: be32(bytes, 8)?,
        len: be32(bytes, 12)?,
    })
}

/// The data of NBD_OPT_INFO and NBD_OPT_GO: an export name and the information asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

/// Parses the data of NBD_OPT_INFO / NBD_OPT_GO.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest> {
    let mut r = Reader::new(data);
    let name = r.string()?;
    let count = r.u16()?;
    let mut requests = Vec::with_capacity(usize::from(count).min(r.remaining() / 2));
    for _ in 0..count {
        requests.push(r.u16()?);
    }
    r.finish()?;
    Ok(InfoRequest { name, requests })
}

/// The data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub name: String,
    pub queries: Vec<String>,
}

/// Parses the data of the meta-context options.
pub fn parse_meta_request(data: &[u8]) -> Result<MetaRequest> {
    let mut r = Reader::new(data);
    let name = r.string()?;
    let count = r.u32()?;
    if count > MAX_QUERIES {
        return Err(Error::out_of_range(format!(
            "{count} meta-context queries (at most {MAX_QUERIES})"
        )));
    }
    let mut queries = Vec::new();
    for _ in 0..count {
        queries.push(r.string()?);
    }
    r.finish()?;
    Ok(MetaRequest { name, queries })
}

/// An export name sent with NBD_OPT_EXPORT_NAME: the whole option data.
pub fn parse_export_name(data: &[u8]) -> Result<String> {
    if data.len() > MAX_STRING {
        return Err(Error::out_of_range("export name longer than 4096 bytes"));
    }
    utf8(data)
}

/// A request of the transmission phase (its 28-byte header; a write's payload follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    /// The end of the range it names; `None` if offset + length overflows.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(u64::from(self.len))
    }
}

pub const REQUEST_LEN: usize = 28;

/// Parses a request header; a wrong magic is an error (the stream cannot be trusted after it).
pub fn parse_request(bytes: &[u8; REQUEST_LEN]) -> Result<Request> {
    let magic = be32(bytes, 0)?;
    if magic != REQUEST_MAGIC {
        return Err(Error::out_of_range(format!(
            "request magic {magic:#x} is not NBD_REQUEST_MAGIC"
        )));
    }
    Ok(Request {
        flags: be16(bytes, 4)?,
        kind: be16(bytes, 6)?,
        cookie: be64(bytes, 8)?,
        offset: be64(bytes, 16)?,
        len: be32(bytes, 24)?,
    })
}

/// Which flags each command accepts (FUA is accepted everywhere, as the protocol asks).
pub fn allowed_flags(kind: u16) -> u16 {
    CMD_FLAG_FUA
        | match kind {
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        }
}

/// An option reply header followed by `data`.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    // Every reply the server builds is far below 4 GiB (names and messages are capped).
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// The 16-byte header of a simple reply.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// The 20-byte header of a structured reply chunk with `len` payload bytes.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
    out
}

/// A structured error chunk (final) carrying `message`, cut to what the protocol allows.
pub fn error_chunk(error: u32, cookie: u64, message: &str) -> Vec<u8> {
    let message = truncate_utf8(message, MAX_STRING);
    let mut out = Vec::with_capacity(26 + message.len());
    out.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + message.len() as u32,
    ));
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
    out
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn utf8(bytes: &[u8]) -> Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| Error::out_of_range("a string is not UTF-8"))
}

fn be16(bytes: &[u8], at: usize) -> Result<u16> {
    field(bytes, at).map(u16::from_be_bytes)
}

fn be32(bytes: &[u8], at: usize) -> Result<u32> {
    field(bytes, at).map(u32::from_be_bytes)
}

fn be64(bytes: &[u8], at: usize) -> Result<u64> {
    field(bytes, at).map(u64::from_be_bytes)
}

fn field<const N: usize>(bytes: &[u8], at: usize) -> Result<[u8; N]> {
    at.checked_add(N)
        .and_then(|end| bytes.get(at..end))
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::out_of_range("option data ends in the middle of a field"))
}

/// Reads big-endian fields and length-prefixed strings from option data.
struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Reader { data, at: 0 }
    }

    fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.at)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.data.len())
            .ok_or_else(|| Error::out_of_range("option data ends in the middle of a field"))?;
        let out = &self.data[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16> {
        be16(self.take(2)?, 0)
    }

    fn u32(&mut self) -> Result<u32> {
        be32(self.take(4)?, 0)
    }

    /// A 32-bit length and that many bytes of UTF-8, at most `MAX_STRING`.
    fn string(&mut self) -> Result<String> {
        let len = self.u32()?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= MAX_STRING)
            .ok_or_else(|| Error::out_of_range(format!("a string of {len} bytes")))?;
        utf8(self.take(len)?)
    }

    fn finish(&self) -> Result<()> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(Error::out_of_range(format!(
                "{n} bytes after the option data"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> Vec<u8> {
        let mut out = (s.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(s.as_bytes());
        out
    }

    #[test]
    fn info_requests_parse_and_reject_lies() {
        let mut data = string("vm/disk.vdi");
        data.extend_from_slice(&2u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        data.extend_from_slice(&INFO_NAME.to_be_bytes());
        let info = parse_info_request(&data).unwrap();
        assert_eq!(info.name, "vm/disk.vdi");
        assert_eq!(info.requests, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        // A count larger than the data, a name length past the end, trailing bytes.
        let mut short = string("x");
        short.extend_from_slice(&60000u16.to_be_bytes());
        assert!(parse_info_request(&short).is_err());
        assert!(parse_info_request(&[0xff, 0xff, 0xff, 0xff, b'a']).is_err());
        let mut extra = data.clone();
        extra.push(0);
        assert!(parse_info_request(&extra).is_err());
        assert!(parse_info_request(&[]).is_err());
    }

    #[test]
    fn meta_requests_cap_queries_and_strings() {
        let mut data = string("a");
        data.extend_from_slice(&2u32.to_be_bytes());
        data.extend(string("base:allocation"));
        data.extend(string("qemu:"));
        let meta = parse_meta_request(&data).unwrap();
        assert_eq!(meta.queries, vec!["base:allocation", "qemu:"]);
        let mut many = string("a");
        many.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&many).is_err());
        let mut long = string("a");
        long.extend_from_slice(&1u32.to_be_bytes());
        long.extend_from_slice(&5000u32.to_be_bytes());
        long.extend(vec![b'x'; 5000]);
        assert!(parse_meta_request(&long).is_err());
        let mut bad_utf8 = 1u32.to_be_bytes().to_vec();
        bad_utf8.push(0xff);
        bad_utf8.extend_from_slice(&0u32.to_be_bytes());
        assert!(parse_meta_request(&bad_utf8).is_err());
    }

    #[test]
    fn requests_parse_and_overflowing_ranges_are_seen() {
        let mut bytes = [0u8; REQUEST_LEN];
        bytes[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        bytes[4..6].copy_from_slice(&CMD_FLAG_FUA.to_be_bytes());
        bytes[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        bytes[8..16].copy_from_slice(&7u64.to_be_bytes());
        bytes[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
        bytes[24..28].copy_from_slice(&512u32.to_be_bytes());
        let req = parse_request(&bytes).unwrap();
        assert_eq!(
            (req.kind, req.flags, req.cookie),
            (CMD_WRITE, CMD_FLAG_FUA, 7)
        );
        assert_eq!(req.end(), None);
        bytes[0] ^= 1;
        assert!(parse_request(&bytes).is_err());
    }

    #[test]
    fn option_headers_need_their_magic() {
        let mut bytes = [0u8; 16];
        bytes[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        bytes[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        bytes[12..16].copy_from_slice(&9u32.to_be_bytes());
        let h = parse_option_header(&bytes).unwrap();
        assert_eq!((h.option, h.len), (OPT_GO, 9));
        bytes[3] = 0;
        assert!(parse_option_header(&bytes).is_err());
    }

    #[test]
    fn error_chunks_cut_long_messages_on_a_character_boundary() {
        let message = "é".repeat(3000);
        let chunk = error_chunk(EIO, 1, &message);
        let len = u32::from_be_bytes(chunk[16..20].try_into().unwrap()) as usize;
        assert_eq!(chunk.len(), 20 + len);
        assert!(len - 6 <= MAX_STRING);
        assert!(std::str::from_utf8(&chunk[26..]).is_ok());
    }
}
