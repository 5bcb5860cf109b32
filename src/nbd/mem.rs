//! Exports that live in memory, and a whole connection run over an in-memory socket: what the
//! unit tests and the fuzz target drive the real handshake and request code with, without a
//! catalog, files or network.
//!
//! `fuzz_session(bytes)` is the fuzz entry point: `bytes` is everything a client sends, and
//! the server's handshake, option parsers, request parser and command handlers run on it
//! exactly as for a network client (with one worker thread, so runs are reproducible).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use super::conn::{MemSocket, Socket};
use super::exports::{Export, ExportEntry, Exports};
use super::handshake::HandshakeConfig;
use super::server::{serve_connection, ConnectionContext};
use super::transmit::Limits;
use crate::error::{Error, Result};
use crate::image::{check_range, push_extent, Extent, ExtentState, Image, ImageInfo};

/// Allocation granularity of a `MemDisk`.
const BLOCK: u64 = 4096;

/// A disk in memory whose blocks are unallocated until written, so reads have holes.
pub struct MemDisk {
    data: RwLock<(Vec<u8>, Vec<bool>)>,
    read_only: bool,
    /// Reads act as if their bytes were not in the host page cache: inside
    /// `host::from_cache_only` they fail, so a worker thread serves them.
    uncached: bool,
    /// Reads answered inside `host::from_cache_only`.
    cached_reads: AtomicUsize,
    /// Writes made on a connection's worker threads (not on the connection's own thread).
    worker_writes: AtomicUsize,
    /// How long each write takes, as a slow disk would.
    write_time: std::time::Duration,
}

impl MemDisk {
    pub fn new(size: usize, read_only: bool) -> Self {
        let blocks = (size as u64).div_ceil(BLOCK) as usize;
        MemDisk {
            data: RwLock::new((vec![0; size], vec![false; blocks])),
            read_only,
            uncached: false,
            cached_reads: AtomicUsize::new(0),
            worker_writes: AtomicUsize::new(0),
            write_time: std::time::Duration::ZERO,
        }
    }

    /// Makes every write take `time`.
    pub fn slow_writes(mut self, time: std::time::Duration) -> Self {
        self.write_time = time;
        self
    }

    /// How many writes were made on worker threads.
    pub fn worker_writes(&self) -> usize {
        self.worker_writes.load(Ordering::Relaxed)
    }

    /// Makes every read need "the disk", so that worker threads serve reads in the order
    /// they serve writes (tests whose requests depend on each other's effects).
    pub fn uncached(mut self) -> Self {
        self.uncached = true;
        self
    }

    /// How many reads were answered from "the page cache" (inside `host::from_cache_only`).
    pub fn cached_reads(&self) -> usize {
        self.cached_reads.load(Ordering::Relaxed)
    }

    /// A copy of the whole disk.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().map(|d| d.0.clone()).unwrap_or_default()
    }
}

impl Image for MemDisk {
    fn size(&self) -> u64 {
        self.data.read().map(|d| d.0.len() as u64).unwrap_or(0)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size(), offset, buf.len())?;
        if crate::host::cache_only() {
            if self.uncached {
                return Err(Error::io("read", std::io::ErrorKind::WouldBlock.into()));
            }
            self.cached_reads.fetch_add(1, Ordering::Relaxed);
        }
        let d = self.data.read().map_err(|_| Error::corrupt("poisoned"))?;
        let start = offset as usize;
        buf.copy_from_slice(&d.0[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only("a read-only memory disk"));
        }
        check_range(self.size(), offset, buf.len())?;
        let thread = std::thread::current();
        if thread.name().is_some_and(|n| n.starts_with("nbd-worker")) {
            self.worker_writes.fetch_add(1, Ordering::Relaxed);
        }
        if !self.write_time.is_zero() {
            std::thread::sleep(self.write_time);
        }
        if buf.is_empty() {
            return Ok(());
        }
        let mut d = self.data.write().map_err(|_| Error::corrupt("poisoned"))?;
        let start = offset as usize;
        d.0[start..start + buf.len()].copy_from_slice(buf);
        let first = (offset / BLOCK) as usize;
        let last = ((offset + buf.len() as u64 - 1) / BLOCK) as usize;
        for b in &mut d.1[first..=last] {
            *b = true;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn is_dirty(&self) -> bool {
        false
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let size = self.size();
        let end = offset.saturating_add(len).min(size);
        let d = self.data.read().map_err(|_| Error::corrupt("poisoned"))?;
        let mut out = Vec::new();
        let mut at = offset;
        while at < end {
            let next = ((at / BLOCK) + 1) * BLOCK;
            let stop = next.min(end);
            let state = match d.1.get((at / BLOCK) as usize) {
                Some(true) => ExtentState::Data,
                _ => ExtentState::Unallocated,
            };
            push_extent(
                &mut out,
                Extent {
                    offset: at,
                    len: stop - at,
                    state,
                    layer: 0,
                    host: None,
                },
            );
            at = stop;
        }
        Ok(out)
    }

    fn allocated_bytes(&self) -> u64 {
        self.data
            .read()
            .map(|d| d.1.iter().filter(|b| **b).count() as u64 * BLOCK)
            .unwrap_or(0)
    }

    fn read_only_reason(&self) -> Option<String> {
        self.read_only.then(|| "read-only memory disk".into())
    }

    fn info(&self) -> ImageInfo {
        ImageInfo {
            format: "memory",
            subformat: String::new(),
            virtual_size: self.size(),
            cluster_size: Some(BLOCK),
            allocated_bytes: self.allocated_bytes(),
            read_only_reason: self.read_only_reason(),
            details: Vec::new(),
        }
    }
}

/// Named memory disks as exports.
pub struct MemExports {
    disks: Vec<(String, Arc<MemDisk>)>,
}

impl MemExports {
    pub fn new(disks: Vec<(String, Arc<MemDisk>)>) -> Self {
        MemExports { disks }
    }

    fn find(&self, name: &str) -> Option<&(String, Arc<MemDisk>)> {
        match name {
            "" if self.disks.len() == 1 => self.disks.first(),
            _ => self.disks.iter().find(|(n, _)| n == name),
        }
    }
}

impl Exports for MemExports {
    fn list(&self) -> Vec<ExportEntry> {
        self.disks
            .iter()
            .map(|(name, disk)| ExportEntry {
                name: name.clone(),
                description: format!("{} bytes in memory", disk.size()),
            })
            .collect()
    }

    fn open(&self, name: &str) -> Result<Option<Export>> {
        Ok(self.find(name).map(|(name, disk)| {
            let image: Arc<dyn Image> = disk.clone();
            let writable = image.read_only_reason().is_none();
            Export::new(name.clone(), "in memory".into(), writable, Box::new(image))
        }))
    }

    fn exists(&self, name: &str) -> bool {
        self.find(name).is_some()
    }
}

/// A connection's context without a server around it.
pub struct Standalone {
    pub exports: MemExports,
    pub handshake: HandshakeConfig,
    pub limits: Limits,
}

impl ConnectionContext for Standalone {
    fn exports(&self) -> &dyn Exports {
        &self.exports
    }
    fn handshake(&self) -> &HandshakeConfig {
        &self.handshake
    }
    fn limits(&self) -> Limits {
        self.limits
    }
}

/// Runs one whole connection whose client sends `input` (delivered `piece` bytes at a time)
/// against `context`; returns everything the server sent.
pub fn run_connection(context: &Standalone, input: &[u8], piece: usize) -> Vec<u8> {
    let sock = Arc::new(MemSocket::new(input.to_vec(), piece));
    serve_connection(context, Arc::clone(&sock) as Arc<dyn Socket>, "memory");
    sock.output()
}

/// The exports a fuzzed session sees: a small writable disk and a read-only one. Reads of the
/// writable one go to the worker, in order with its writes (so runs are reproducible); the
/// read-only one's are answered from "the page cache" on the connection's thread.
pub fn fuzz_context() -> Standalone {
    Standalone {
        exports: MemExports::new(vec![
            (
                "disk".into(),
                Arc::new(MemDisk::new(256 * 1024, false).uncached()),
            ),
            ("ro/disk".into(), Arc::new(MemDisk::new(64 * 1024, true))),
        ]),
        handshake: HandshakeConfig::default(),
        limits: Limits {
            workers: 1,
            inflight_bytes: 1 << 20,
        },
    }
}

/// The fuzz target: runs a whole client session made of `data` through the NBD server.
/// It must return (never panic, never hang) whatever `data` is.
pub fn fuzz_session(data: &[u8]) {
    let context = fuzz_context();
    // Pieces of 7 bytes make every parser see fields split across reads.
    let _ = run_connection(&context, data, 7);
}
