//! How a connection's replies reach the client: each one whole, straight through the shared
//! `Writer` (worker threads), or gathered in a `Batch` that the connection's thread sends when
//! it is about to wait, so a burst of small requests it served itself costs the client one
//! wake-up and the server one `writev` instead of one each. Also the encoders of the replies
//! that carry data: reads (structured, with holes), block status chunks, errors.

use std::io;

use super::conn::Writer;
use super::proto::*;
use super::serve::{Failure, Segment};

/// Where a reply goes; every `send` is one whole reply, never interleaved with another.
pub trait Replies {
    fn send(&mut self, parts: &[&[u8]]) -> io::Result<()>;
}

impl Replies for &Writer {
    fn send(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        Writer::send(self, parts)
    }
}

/// Replies kept back at most up to this many bytes: a larger one is sent at once, with the
/// batch in front of it, so its data is not copied.
const BATCH_BYTES: usize = 64 * 1024;

/// Replies kept back to go out together (see the module's comment). The owner must `flush`
/// before anything that may wait: for the client, for room in the payload budget, or for a
/// worker.
pub struct Batch<'w> {
    writer: &'w Writer,
    bytes: &'w mut Vec<u8>,
}

impl<'w> Batch<'w> {
    /// A batch over `bytes`, which holds what was kept back (empty after a `flush`).
    pub fn new(writer: &'w Writer, bytes: &'w mut Vec<u8>) -> Self {
        Batch { writer, bytes }
    }

    /// Sends what is kept back.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.bytes.is_empty() {
            return Ok(());
        }
        let sent = self.writer.send(&[self.bytes]);
        self.bytes.clear();
        sent
    }
}

impl Replies for Batch<'_> {
    fn send(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if self.bytes.len() + len <= BATCH_BYTES {
            for part in parts {
                self.bytes.extend_from_slice(part);
            }
            return Ok(());
        }
        let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
        if !self.bytes.is_empty() {
            all.push(self.bytes);
        }
        all.extend_from_slice(parts);
        let sent = self.writer.send(&all);
        self.bytes.clear();
        sent
    }
}

/// Room kept in front of a read buffer for the reply header, so header and data go out in one
/// write without copying the data.
pub const HEAD: usize = 32;

/// Sends a failed request's error reply.
pub fn send_failure(
    out: &mut dyn Replies,
    structured: bool,
    cookie: u64,
    f: &Failure,
) -> io::Result<()> {
    match structured {
        true => out.send(&[&error_chunk(f.errno, cookie, &f.message)]),
        false => out.send(&[&simple_reply(f.errno, cookie)]),
    }
}

/// Sends finished structured chunks (header and payload each) as one message.
pub fn send_chunks(
    out: &mut dyn Replies,
    cookie: u64,
    chunks: &[(u16, Vec<u8>)],
) -> io::Result<()> {
    let mut heads = Vec::with_capacity(chunks.len());
    for (i, (kind, payload)) in chunks.iter().enumerate() {
        let flags = if i + 1 == chunks.len() {
            REPLY_FLAG_DONE
        } else {
            0
        };
        heads.push(chunk_header(flags, *kind, cookie, payload.len() as u32));
    }
    let mut parts: Vec<&[u8]> = Vec::with_capacity(chunks.len() * 2);
    for (head, (_, payload)) in heads.iter().zip(chunks) {
        parts.push(head);
        parts.push(payload);
    }
    out.send(&parts)
}

/// Sends a filled read's reply: the data behind its header in one write where it is one piece.
pub fn send_read(
    req: &Request,
    scratch: &mut [u8],
    segments: &[Segment],
    out: &mut dyn Replies,
    structured: bool,
) -> io::Result<()> {
    let len = req.len as usize;
    if !structured {
        scratch[HEAD - 16..HEAD].copy_from_slice(&simple_reply(0, req.cookie));
        return out.send(&[&scratch[HEAD - 16..HEAD + len]]);
    }
    if len == 0 {
        return out.send(&[&chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_NONE,
            req.cookie,
            0,
        )]);
    }
    if let [only] = segments {
        if !only.hole {
            let head = &mut scratch[HEAD - 28..HEAD];
            head[..20].copy_from_slice(&chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                8 + req.len,
            ));
            head[20..].copy_from_slice(&req.offset.to_be_bytes());
            return out.send(&[&scratch[HEAD - 28..HEAD + len]]);
        }
    }
    let data = &scratch[HEAD..HEAD + len];
    let mut heads = Vec::with_capacity(segments.len());
    for (i, s) in segments.iter().enumerate() {
        let flags = if i + 1 == segments.len() {
            REPLY_FLAG_DONE
        } else {
            0
        };
        // Inside the request, so below 2^32 and the sum cannot overflow.
        let offset = req.offset + s.start as u64;
        let mut head = Vec::with_capacity(32);
        match s.hole {
            true => {
                head.extend_from_slice(&chunk_header(
                    flags,
                    REPLY_TYPE_OFFSET_HOLE,
                    req.cookie,
                    12,
                ));
                head.extend_from_slice(&offset.to_be_bytes());
                head.extend_from_slice(&(s.len as u32).to_be_bytes());
            }
            false => {
                let kind = REPLY_TYPE_OFFSET_DATA;
                head.extend_from_slice(&chunk_header(flags, kind, req.cookie, 8 + s.len as u32));
                head.extend_from_slice(&offset.to_be_bytes());
            }
        }
        heads.push(head);
    }
    let mut parts: Vec<&[u8]> = Vec::with_capacity(segments.len() * 2);
    for (head, s) in heads.iter().zip(segments) {
        parts.push(head);
        if !s.hole {
            parts.push(data.get(s.start..s.start + s.len).unwrap_or_default());
        }
    }
    out.send(&parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::conn::{Channel, MemSocket};
    use std::sync::Arc;

    #[test]
    fn a_batch_keeps_small_replies_until_flushed_and_sends_a_large_one_behind_them() {
        let sock = Arc::new(MemSocket::new(Vec::new(), 1));
        let ch = Channel::new(sock.clone());
        let mut kept = Vec::new();
        let mut batch = Batch::new(ch.writer(), &mut kept);
        batch.send(&[b"ab", b"c"]).unwrap();
        batch.send(&[b"de"]).unwrap();
        assert_eq!(sock.writes(), 0);
        batch.flush().unwrap();
        assert_eq!((sock.output(), sock.writes()), (b"abcde".to_vec(), 1));
        batch.flush().unwrap();
        assert_eq!(sock.writes(), 1, "nothing kept, nothing sent");
        // Too large to keep: the kept reply goes first, in the same write.
        let large = vec![7u8; BATCH_BYTES];
        batch.send(&[b"f"]).unwrap();
        batch.send(&[b"g", &large]).unwrap();
        assert_eq!(sock.writes(), 2);
        let out = sock.output();
        assert_eq!(&out[5..7], b"fg");
        assert!(out[7..] == large[..]);
        batch.flush().unwrap();
        assert_eq!(sock.writes(), 2);
    }
}
