//! One image under test: opened from the input's tree with a driver chosen by the caller (the
//! probe is bypassed, so every driver sees every input), then read, queried, written, flushed,
//! reopened and read again, with the invariants of `check` asserted at every step.
//!
//! The work per input is bounded whatever the disk's size: reads cover the first and last
//! `SWEEP` bytes and the operations' ranges (at most 1 MiB each), whole-disk block status
//! stops after `MAX_STATUS_WINDOWS`, and writes stop once the tree's files occupy
//! `MAX_HOST_BYTES`, so an image with 256 MiB blocks cannot fill the host's memory.

use std::sync::Arc;

use super::check::{
    extents_cover, first_difference, holes_read_as_zeros, seek_agrees, violation, Checked, Model,
    POISON, STATUS_WINDOW,
};
use super::input::{self, Op, OpKind, FLAG_ALIGN, FLAG_FROM_END, FLAG_LONG, FLAG_SEEK_DATA};
use super::tree::Tree;
use crate::error::{ErrorKind, Result};
use crate::format::links::PlainLinks;
use crate::format::{self, Format, OpenOptions};
use crate::image::{self, Image};

/// Bytes read at each end of the disk before any operation.
const SWEEP: u64 = 256 << 10;
/// The size of one read of the sweep: odd, so chunks straddle every block boundary.
const CHUNK: u64 = (64 << 10) + 3;
/// Whole-disk block status looks at this many windows at most.
const MAX_STATUS_WINDOWS: u64 = 64;
/// Writes stop once the tree's files occupy this much of the host.
const MAX_HOST_BYTES: u64 = 512 << 20;

/// What an exercise got to do, so replay tests can tell that a seed reaches the deep paths.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The image opened.
    pub opened: bool,
    /// At least one write was accepted.
    pub wrote: bool,
    /// The image was flushed, dropped and opened again at least once.
    pub reopened: bool,
    /// Raw files of partitions exercised (`status`).
    pub partitions: usize,
}

/// The operations run when an input brings none: writes at the start, middle and end of the
/// disk, a write across blocks, queries, and reopens.
fn default_ops() -> Vec<Op> {
    let op = |kind, flags, len, sel| Op {
        kind,
        flags,
        len,
        sel,
    };
    vec![
        op(OpKind::Write, FLAG_ALIGN, 4095, 0),
        op(OpKind::Write, 0, 999, 0x8000_0000),
        op(OpKind::Write, FLAG_FROM_END, 2999, 3000),
        op(OpKind::Status, FLAG_LONG, 0xffff, 0),
        op(OpKind::Seek, FLAG_SEEK_DATA, 0, 0),
        op(OpKind::Seek, 0, 0, 0),
        op(OpKind::Flush, 0, 0, 0),
        op(OpKind::Write, FLAG_LONG, 0x3fff, 0x4000_0000),
        op(OpKind::Reopen, 0, 0, 0),
        op(OpKind::Read, FLAG_LONG, 0xffff, 0),
        op(OpKind::Snapshot, 0, 0, 0),
    ]
}

fn open(tree: &Tree, format: Format) -> Result<Arc<dyn Image>> {
    let mut links = PlainLinks::new(tree.path(), false)?;
    format::open_probed(&tree.top(), format, &OpenOptions::default(), &mut links)
}

/// How much the exercise may assume about the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// Any input. For VDI and VHDX, which hold their whole map in memory and refuse writes
    /// to one that aliases, every write must read back, at once and after any later writes,
    /// flushes and reopens. qcow, qcow2 and VMDK read their L2 or grain tables on demand and
    /// trust them, as QEMU does: in a hostile image two entries may name one cluster, an entry
    /// may name a table, or (qcow2) refcounts may call a used cluster free, and then a write
    /// through one place shows through another, even within one request. That is garbage in,
    /// not a bug to report; for those formats a flush and reopen must still keep what the
    /// image showed, and every other invariant holds.
    Input,
    /// An image known to be consistent (a seed made by qemu-img): every check, every format.
    Consistent,
}

/// Runs the exercise for `format` on `data`; `Err` only for a broken invariant.
pub fn run(format: Format, data: &[u8], trust: Trust) -> Checked<Outcome> {
    let input = input::parse(data);
    let Some(tree) = Tree::write(&input.files) else {
        return Ok(Outcome::default());
    };
    let Ok(image) = open(&tree, format) else {
        return Ok(Outcome::default());
    };
    let mut session = Session {
        size: image.size(),
        image: Some(image),
        tree,
        format,
        model: Model::default(),
        outcome: Outcome {
            opened: true,
            ..Outcome::default()
        },
        writes: 0,
        strict: trust == Trust::Consistent
            || matches!(
                format,
                Format::Vdi | Format::Vhdx | Format::Vhd | Format::Luks
            ),
    };
    session.basics()?;
    session.sweep()?;
    let ops = if input.ops.is_empty() {
        default_ops()
    } else {
        input.ops
    };
    for op in ops {
        if !session.run(op)? {
            return Ok(session.outcome);
        }
    }
    session.reopen()?;
    Ok(session.outcome)
}

struct Session {
    /// `None` only between dropping an instance and opening the next one.
    image: Option<Arc<dyn Image>>,
    size: u64,
    tree: Tree,
    format: Format,
    model: Model,
    outcome: Outcome,
    /// Writes so far, to make each write's bytes different.
    writes: u32,
    /// Reads are compared with what was written (`Trust`).
    strict: bool,
}

impl Session {
    fn image(&self) -> Checked<&Arc<dyn Image>> {
        self.image
            .as_ref()
            .ok_or_else(|| violation("internal: no image open"))
    }

    /// Size and info agree, and requests outside the disk fail cleanly.
    fn basics(&self) -> Checked {
        let image = self.image()?;
        let info = image.info();
        if info.virtual_size != self.size {
            return Err(violation(format!(
                "info says {} bytes, size() says {}",
                info.virtual_size, self.size
            )));
        }
        let _ = image.allocated_bytes();
        let _ = image.is_dirty();
        let mut byte = [0u8; 2];
        for offset in [self.size, self.size.saturating_sub(1), u64::MAX - 1] {
            if image.read_at(&mut byte, offset).is_ok() {
                return Err(violation(format!(
                    "a 2-byte read at {offset} of a {}-byte disk succeeded",
                    self.size
                )));
            }
            if image.write_at(&byte, offset).is_ok() {
                return Err(violation(format!(
                    "a 2-byte write at {offset} of a {}-byte disk succeeded",
                    self.size
                )));
            }
            if let Ok(extents) = image.block_status(offset, u64::MAX) {
                extents_cover(&extents, offset, u64::MAX - offset, self.size)?;
            }
        }
        Ok(())
    }

    /// Reads both ends of the disk, asks the block status of the whole disk (bounded), and
    /// looks into the first snapshot.
    fn sweep(&self) -> Checked {
        let head = SWEEP.min(self.size);
        let tail = self.size.saturating_sub(SWEEP).max(head);
        for (start, end) in [(0, head), (tail, self.size)] {
            let mut at = start;
            while at < end {
                let len = CHUNK.min(end - at);
                self.read_checked(self.image()?.as_ref(), at, len, "sweep")?;
                at += len;
            }
        }
        let mut at = 0;
        for _ in 0..MAX_STATUS_WINDOWS {
            if at >= self.size {
                break;
            }
            let len = STATUS_WINDOW.min(self.size - at);
            match self.image()?.block_status(at, len) {
                Ok(extents) => extents_cover(&extents, at, len, self.size)?,
                Err(_) => break,
            }
            at += len;
        }
        self.snapshot(0)
    }

    /// Reads `[offset, offset + len)` of `image` and checks it against the block status and
    /// the model. `None` when the image returned an error.
    fn read_checked(
        &self,
        image: &dyn Image,
        offset: u64,
        len: u64,
        when: &str,
    ) -> Checked<Option<Vec<u8>>> {
        let size = image.size();
        let mut buf = vec![0u8; len as usize];
        let read = image.read_at(&mut buf, offset);
        let inside = offset.checked_add(len).is_some_and(|end| end <= size);
        if !inside {
            return match read {
                Ok(()) => Err(violation(format!(
                    "{when}: a read of {len} bytes at {offset} of a {size}-byte disk succeeded"
                ))),
                Err(_) => Ok(None),
            };
        }
        if read.is_err() {
            return Ok(None);
        }
        // The request threads reuse their buffers: every byte asked for must be set.
        let mut used = vec![POISON; len as usize];
        if image.read_at(&mut used, offset).is_ok() && used != buf {
            return Err(violation(format!(
                "{when}: a read of {len} bytes at {offset} into a used buffer differs from one \
                 into a zeroed buffer"
            )));
        }
        if let Ok(extents) = image.block_status(offset, len) {
            extents_cover(&extents, offset, len, size)?;
            holes_read_as_zeros(&extents, &buf, offset)
                .map_err(|v| violation(format!("{when}: {v}")))?;
        }
        Ok(Some(buf))
    }

    /// Runs one operation; `false` when the exercise cannot go on (the image did not reopen).
    fn run(&mut self, op: Op) -> Checked<bool> {
        match op.kind {
            OpKind::Reopen => return self.reopen(),
            OpKind::Flush => {
                self.flush()?;
            }
            OpKind::Snapshot => self.snapshot(op.sel)?,
            OpKind::Seek => {
                if let Some((offset, _)) = op.range(self.size) {
                    self.seek(offset, op.flags & FLAG_SEEK_DATA != 0)?;
                }
            }
            OpKind::Read => {
                if let Some((offset, len)) = op.range(self.size) {
                    let image = Arc::clone(self.image()?);
                    let data = self.read_checked(image.as_ref(), offset, len, "read")?;
                    if let (Some(data), true) = (data, self.strict) {
                        self.model.matches(&data, offset, "read")?;
                    }
                }
            }
            OpKind::Status => {
                // Status ranges are in 4 KiB units: up to 4 GiB, several windows.
                if let Some((offset, len)) = op.range(self.size) {
                    let len = len.saturating_mul(4096);
                    if let Ok(extents) = self.image()?.block_status(offset, len) {
                        extents_cover(&extents, offset, len, self.size)?;
                    }
                }
            }
            OpKind::Write => {
                if let Some((offset, len)) = op.range(self.size) {
                    self.write(offset, len)?;
                }
            }
            OpKind::Discard => {
                if let Some((offset, len)) = op.range(self.size) {
                    let image = self.image()?;
                    let done = image.discard(offset, len);
                    if done.is_ok() && image.read_only_reason().is_some() {
                        return Err(violation("a discard on a read-only image succeeded"));
                    }
                    self.model.forgot(offset, len);
                }
            }
        }
        Ok(true)
    }

    fn write(&mut self, offset: u64, len: u64) -> Checked {
        if self.tree.host_bytes() > MAX_HOST_BYTES {
            return Ok(());
        }
        self.writes += 1;
        let data = pattern(self.writes, len);
        let image = Arc::clone(self.image()?);
        let result = image.write_at(&data, offset);
        let inside = offset.checked_add(len).is_some_and(|end| end <= self.size);
        match result {
            Ok(()) if !inside => Err(violation(format!(
                "a write of {len} bytes at {offset} of a {}-byte disk succeeded",
                self.size
            ))),
            Ok(()) if image.read_only_reason().is_some() => Err(violation(format!(
                "a write succeeded on an image that is read-only because {}",
                image.read_only_reason().unwrap_or_default()
            ))),
            Ok(()) => {
                self.outcome.wrote = true;
                self.model.wrote(offset, data);
                let back = self.read_checked(image.as_ref(), offset, len, "readback")?;
                if let (Some(back), true) = (back, self.strict) {
                    self.model
                        .matches(&back, offset, "read right after the write")?;
                }
                Ok(())
            }
            Err(_) => {
                if inside {
                    // A write that failed may have stored part of its bytes.
                    self.model.forgot(offset, len);
                }
                Ok(())
            }
        }
    }

    fn flush(&self) -> Checked<bool> {
        let image = self.image()?;
        let flushed = image.flush().is_ok();
        if flushed && image.is_dirty() {
            return Err(violation(
                "the image is still dirty after a flush that succeeded",
            ));
        }
        Ok(flushed)
    }

    /// SEEK_DATA / SEEK_HOLE from `offset` must agree with the block status.
    fn seek(&self, offset: u64, want_data: bool) -> Checked {
        let image = self.image()?.as_ref();
        match image::seek(image, offset, want_data) {
            Ok(found) => seek_agrees(image, offset, want_data, found),
            Err(_) => Ok(()),
        }
    }

    /// Reads a snapshot (chosen by `sel` among the image's) and checks it cannot be written.
    fn snapshot(&self, sel: u32) -> Checked {
        let names = self.image()?.snapshot_names();
        let Some(name) = names.get(sel as usize % names.len().max(1)) else {
            return Ok(());
        };
        let Ok(snap) = self.image()?.snapshot(name) else {
            return Ok(());
        };
        let size = snap.size();
        let head = SWEEP.min(size);
        self.read_checked(snap.as_ref(), 0, head, "snapshot")?;
        let tail = size.saturating_sub(SWEEP).max(head);
        self.read_checked(snap.as_ref(), tail, size - tail, "snapshot")?;
        if size > 0 && snap.write_at(&[1], 0).is_ok() {
            return Err(violation(format!("a write to snapshot {name:?} succeeded")));
        }
        Ok(())
    }

    /// Flushes, drops the image and opens it again: what it showed before must show again,
    /// and everything written must read back. `false` if it did not open again.
    fn reopen(&mut self) -> Checked<bool> {
        let flushed = self.flush()?;
        let mut ranges = self.model.written_ranges();
        ranges.push((0, CHUNK.min(self.size)));
        let before = self.read_ranges(&ranges)?;
        self.image = None;
        let image = match open(&self.tree, self.format) {
            Ok(image) => image,
            // Another instance still holding the file's lock bytes: one leaked.
            Err(e) if e.kind() == ErrorKind::Busy => {
                return Err(violation(format!("reopening failed: {e}")))
            }
            // A hostile image may have been written into its own metadata.
            Err(_) => return Ok(false),
        };
        self.outcome.reopened = true;
        self.image = Some(image);
        if !flushed {
            // What an unflushed image keeps is not defined: forget what was written.
            self.model = Model::default();
            return Ok(true);
        }
        if self.image()?.size() != self.size {
            return Err(violation("the disk size changed across a reopen"));
        }
        let after = self.read_ranges(&ranges)?;
        for (((offset, _), before), after) in ranges.iter().zip(before).zip(after) {
            if let (Some(before), Some(after)) = (before, after) {
                if self.strict {
                    self.model.matches(&after, *offset, "after a reopen")?;
                }
                if let Some(at) = first_difference(&before, &after) {
                    return Err(violation(format!(
                        "byte {} read {:#04x} before a flush and reopen, {:#04x} after",
                        offset + at as u64,
                        before[at],
                        after[at]
                    )));
                }
            }
        }
        Ok(true)
    }

    fn read_ranges(&self, ranges: &[(u64, u64)]) -> Checked<Vec<Option<Vec<u8>>>> {
        let image = Arc::clone(self.image()?);
        ranges
            .iter()
            .map(|&(offset, len)| self.read_checked(image.as_ref(), offset, len, "reopen"))
            .collect()
    }
}

/// The bytes of write number `n`: a cycle of 1..=251 starting at a place that depends on `n`,
/// never zero, so a written byte never passes for a hole. Built by copying, not byte by byte,
/// because instrumented per-byte loops dominate a fuzzer's time.
fn pattern(n: u32, len: u64) -> Vec<u8> {
    let cycle: Vec<u8> = (1..=251u8).collect();
    let mut out = Vec::with_capacity(len as usize);
    let mut phase = (n as usize * 37) % cycle.len();
    while out.len() < len as usize {
        let take = (cycle.len() - phase).min(len as usize - out.len());
        out.extend_from_slice(&cycle[phase..phase + take]);
        phase = 0;
    }
    out
}
