//! One client connection as two halves: a `Channel` that the connection's own thread reads
//! requests from, and a `Writer` that any worker thread sends a whole reply through. Both run
//! over a `Socket` (TCP, Unix, or an in-memory pipe for tests and fuzzing), in plain text or,
//! after NBD_OPT_STARTTLS, through one rustls session that both halves share.
//!
//! TLS lock order: the writer's `sending` lock, then the session lock. The session lock is only
//! held to encrypt or decrypt bytes in memory, never across socket I/O, so a reply being sent
//! never stops the reader from decrypting the next request, and records reach the socket in
//! the order they were sealed (the `sending` lock covers sealing and sending together).

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rustls::{ServerConfig, ServerConnection};

/// A connected byte stream that several threads may use at once (reads on one, writes under
/// the writer's lock on others).
pub trait Socket: Send + Sync + 'static {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Ends both directions: a thread blocked reading it wakes up.
    fn shutdown(&self);
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl Socket for TcpStream {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        Read::read(&mut &*self, buf)
    }
    fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        Write::write_vectored(&mut &*self, bufs)
    }
    fn shutdown(&self) {
        let _ = TcpStream::shutdown(self, Shutdown::Both);
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
}

impl Socket for UnixStream {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        Read::read(&mut &*self, buf)
    }
    fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        Write::write_vectored(&mut &*self, bufs)
    }
    fn shutdown(&self) {
        let _ = UnixStream::shutdown(self, Shutdown::Both);
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

/// Writes every byte of `parts` to `sock`, in order.
fn write_all_vectored(sock: &dyn Socket, parts: &[&[u8]]) -> io::Result<()> {
    let mut index = 0;
    let mut done = 0;
    while index < parts.len() {
        let mut slices = Vec::with_capacity(parts.len() - index);
        slices.push(IoSlice::new(parts[index].get(done..).unwrap_or_default()));
        slices.extend(parts[index + 1..].iter().map(|p| IoSlice::new(p)));
        let mut n = match sock.write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while index < parts.len() && n > 0 {
            let left = parts[index].len() - done;
            if n >= left {
                n -= left;
                index += 1;
                done = 0;
            } else {
                done += n;
                n = 0;
            }
        }
        while index < parts.len() && parts[index].len() == done {
            index += 1;
            done = 0;
        }
    }
    Ok(())
}

/// The sending half, shared by every thread that replies on the connection.
#[derive(Clone)]
pub struct Writer {
    sock: Arc<dyn Socket>,
    tls: Option<Arc<Mutex<ServerConnection>>>,
    sending: Arc<Mutex<()>>,
}

impl Writer {
    /// Sends `parts` as one message: no other reply is interleaved with it.
    pub fn send(&self, parts: &[&[u8]]) -> io::Result<()> {
        let _sending = lock(&self.sending);
        match &self.tls {
            None => write_all_vectored(self.sock.as_ref(), parts),
            Some(tls) => {
                for part in parts {
                    let mut rest: &[u8] = part;
                    while !rest.is_empty() {
                        let (taken, sealed) = {
                            let mut session = lock(tls);
                            let taken = session.writer().write(rest)?;
                            (taken, drain(&mut session)?)
                        };
                        if taken == 0 && sealed.is_empty() {
                            return Err(io::ErrorKind::WriteZero.into());
                        }
                        rest = rest.get(taken..).unwrap_or_default();
                        write_all_vectored(self.sock.as_ref(), &[&sealed])?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Sends what the TLS session has queued by itself (alerts, key updates).
    fn flush_tls(&self) -> io::Result<()> {
        let Some(tls) = &self.tls else { return Ok(()) };
        let _sending = lock(&self.sending);
        let sealed = drain(&mut lock(tls))?;
        write_all_vectored(self.sock.as_ref(), &[&sealed])
    }

    /// Ends the session politely (close_notify under TLS), then the socket.
    pub fn close(&self) {
        if let Some(tls) = &self.tls {
            let _sending = lock(&self.sending);
            let sealed = {
                let mut session = lock(tls);
                session.send_close_notify();
                drain(&mut session)
            };
            if let Ok(sealed) = sealed {
                let _ = write_all_vectored(self.sock.as_ref(), &[&sealed]);
            }
        }
        self.sock.shutdown();
    }
}

/// The TLS records the session has ready to send.
fn drain(session: &mut ServerConnection) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    while session.wants_write() {
        session.write_tls(&mut out)?;
    }
    Ok(out)
}

/// Lets rustls drive a handshake over a shared socket.
struct SocketIo<'a>(&'a dyn Socket);

impl Read for SocketIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for SocketIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_vectored(&[IoSlice::new(buf)])
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const BUFFER: usize = 64 * 1024;

/// The receiving half, owned by the connection's thread.
pub struct Channel {
    sock: Arc<dyn Socket>,
    writer: Writer,
    /// Received bytes (plain text) not consumed yet: `buf[start..end]`.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// TLS records read from the socket, kept for the session to take.
    raw: Vec<u8>,
}

impl Channel {
    pub fn new(sock: Arc<dyn Socket>) -> Self {
        let writer = Writer {
            sock: Arc::clone(&sock),
            tls: None,
            sending: Arc::new(Mutex::new(())),
        };
        Channel {
            sock,
            writer,
            buf: vec![0; BUFFER],
            start: 0,
            end: 0,
            raw: Vec::new(),
        }
    }

    pub fn writer(&self) -> &Writer {
        &self.writer
    }

    pub fn socket(&self) -> &Arc<dyn Socket> {
        &self.sock
    }

    pub fn is_tls(&self) -> bool {
        self.writer.tls.is_some()
    }

    /// Received bytes not read yet, which `read_exact` returns without waiting.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Fills `dst` completely; EOF before that is `UnexpectedEof`.
    pub fn read_exact(&mut self, dst: &mut [u8]) -> io::Result<()> {
        let mut filled = 0;
        while filled < dst.len() {
            if self.start == self.end {
                // Large payloads in plain text skip the buffer.
                if self.writer.tls.is_none() && dst.len() - filled >= BUFFER {
                    match self.sock.read(&mut dst[filled..]) {
                        Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                    continue;
                }
                self.fill()?;
            }
            let n = (self.end - self.start).min(dst.len() - filled);
            dst[filled..filled + n].copy_from_slice(&self.buf[self.start..self.start + n]);
            self.start += n;
            filled += n;
        }
        Ok(())
    }

    /// Reads and drops `len` bytes (the data of an option that is refused).
    pub fn skip(&mut self, mut len: u64) -> io::Result<()> {
        let mut scratch = [0u8; 4096];
        while len > 0 {
            let n = len.min(scratch.len() as u64) as usize;
            self.read_exact(&mut scratch[..n])?;
            len -= n as u64;
        }
        Ok(())
    }

    /// Receives more bytes into the empty buffer.
    fn fill(&mut self) -> io::Result<()> {
        self.start = 0;
        self.end = 0;
        let Some(tls) = self.writer.tls.clone() else {
            loop {
                match self.sock.read(&mut self.buf) {
                    Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Ok(n) => {
                        self.end = n;
                        return Ok(());
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        };
        loop {
            let (plain, closed, wants_write) = {
                let mut session = lock(&tls);
                let mut rest: &[u8] = &self.raw;
                while !rest.is_empty() {
                    if session.read_tls(&mut rest)? == 0 {
                        break;
                    }
                    session.process_new_packets().map_err(tls_error)?;
                }
                let consumed = self.raw.len() - rest.len();
                self.raw.drain(..consumed);
                let state = session.process_new_packets().map_err(tls_error)?;
                let plain = match session.reader().read(&mut self.buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(e) => return Err(e),
                };
                (plain, state.peer_has_closed(), session.wants_write())
            };
            if wants_write {
                self.writer.flush_tls()?;
            }
            if plain > 0 {
                self.end = plain;
                return Ok(());
            }
            if closed {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let mut records = [0u8; 16 * 1024];
            match self.sock.read(&mut records) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.raw.extend_from_slice(&records[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Upgrades the connection to TLS (after NBD_REP_ACK to NBD_OPT_STARTTLS): runs the
    /// handshake, then every byte in both directions goes through the session.
    pub fn start_tls(&mut self, config: Arc<ServerConfig>) -> io::Result<()> {
        let mut session = ServerConnection::new(config).map_err(tls_error)?;
        // The client may have sent its hello right behind the option: it is in our buffer.
        let mut early: &[u8] = &self.buf[self.start..self.end];
        while !early.is_empty() {
            if session.read_tls(&mut early)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS: the client hello does not fit the session's buffer",
                ));
            }
            session.process_new_packets().map_err(tls_error)?;
        }
        self.start = 0;
        self.end = 0;
        let mut io = SocketIo(self.sock.as_ref());
        while session.is_handshaking() {
            session.complete_io(&mut io)?;
        }
        while session.wants_write() {
            session.write_tls(&mut io)?;
        }
        self.writer = Writer {
            sock: Arc::clone(&self.sock),
            tls: Some(Arc::new(Mutex::new(session))),
            sending: Arc::new(Mutex::new(())),
        };
        Ok(())
    }
}

/// An in-memory socket: reads come from a fixed input, writes are collected (tests, fuzzing).
pub struct MemSocket {
    input: Mutex<(Vec<u8>, usize)>,
    output: Mutex<Vec<u8>>,
    /// Calls to `write_vectored`.
    writes: std::sync::atomic::AtomicUsize,
    /// At most this many bytes per read, so parsers see data arrive in pieces.
    piece: usize,
}

impl MemSocket {
    pub fn new(input: Vec<u8>, piece: usize) -> Self {
        MemSocket {
            input: Mutex::new((input, 0)),
            output: Mutex::new(Vec::new()),
            writes: Default::default(),
            piece: piece.max(1),
        }
    }

    /// Everything the server wrote so far.
    pub fn output(&self) -> Vec<u8> {
        lock(&self.output).clone()
    }

    /// How many writes the server made so far.
    pub fn writes(&self) -> usize {
        self.writes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Socket for MemSocket {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut input = lock(&self.input);
        let (data, at) = &mut *input;
        let n = buf.len().min(self.piece).min(data.len() - *at);
        buf[..n].copy_from_slice(&data[*at..*at + n]);
        *at += n;
        Ok(n)
    }
    fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut out = lock(&self.output);
        let mut n = 0;
        for b in bufs {
            out.extend_from_slice(b);
            n += b.len();
        }
        Ok(n)
    }
    fn shutdown(&self) {
        let mut input = lock(&self.input);
        input.1 = input.0.len();
    }
    fn set_read_timeout(&self, _timeout: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cross_piece_boundaries_and_skip_drops_bytes() {
        let data: Vec<u8> = (0..=255u8).cycle().take(200_000).collect();
        let sock = Arc::new(MemSocket::new(data.clone(), 777));
        let mut ch = Channel::new(sock);
        let mut a = [0u8; 10];
        ch.read_exact(&mut a).unwrap();
        assert_eq!(&a, &data[..10]);
        ch.skip(1000).unwrap();
        let mut big = vec![0u8; 150_000];
        ch.read_exact(&mut big).unwrap();
        assert_eq!(big, data[1010..151_010]);
        let mut rest = vec![0u8; 60_000];
        let err = ch.read_exact(&mut rest).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn vectored_writes_send_every_part_in_order() {
        let sock = Arc::new(MemSocket::new(Vec::new(), 1));
        let ch = Channel::new(sock.clone());
        ch.writer().send(&[b"ab", b"", b"cde"]).unwrap();
        assert_eq!(sock.output(), b"abcde");
    }
}
