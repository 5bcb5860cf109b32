//! The block-status target: the input's tree served through the catalog and the filesystem
//! core, as a mount would (formats probed, backing files shared and read-only, snapshots as
//! directories), then `lseek(SEEK_DATA/SEEK_HOLE)`, reads and writes through the core at the
//! operations' offsets, each checked against the image's own block status and reads.

use std::path::{Path, PathBuf};

use super::check::{extents_cover, holes_read_as_zeros, seek_agrees, violation, Checked, POISON};
use super::exercise::{Outcome, Trust};
use super::input::{self, Op, OpKind, FLAG_FROM_END, FLAG_LONG, FLAG_SEEK_DATA, FLAG_UNCLIPPED};
use super::tree::Tree;
use crate::catalog::{Catalog, FormatOpener, ImageHandle, Target};
use crate::fs::core::ROOT_INO;
use crate::fs::{FsCore, NodeKind};
use crate::host::AlignedBuffer;
use crate::image::Image;

/// At most this many raw files (including snapshots) are exercised per input.
const MAX_FILES: usize = 8;

/// The operations run when an input brings none: seeks from the start, the middle and near
/// the end, reads across the end, a write cut short by the end.
fn default_ops() -> Vec<Op> {
    let op = |kind, flags, len, sel| Op {
        kind,
        flags,
        len,
        sel,
    };
    vec![
        op(OpKind::Seek, FLAG_SEEK_DATA, 0, 0),
        op(OpKind::Seek, 0, 0, 0),
        op(OpKind::Seek, FLAG_SEEK_DATA, 0, 0x8000_0000),
        op(OpKind::Seek, 0, 0, 0x8000_0000),
        op(OpKind::Seek, FLAG_SEEK_DATA | FLAG_FROM_END, 0, 4096),
        op(OpKind::Read, FLAG_LONG, 0xffff, 0),
        op(OpKind::Read, FLAG_FROM_END | FLAG_UNCLIPPED, 0x1fff, 100),
        op(OpKind::Write, FLAG_FROM_END | FLAG_UNCLIPPED, 999, 10),
        op(OpKind::Seek, 0, 0, 0),
        op(OpKind::Status, FLAG_LONG, 0xffff, 0),
        op(OpKind::Flush, 0, 0, 0),
    ]
}

/// Runs the block-status exercise on `data`; `Err` only for a broken invariant.
pub fn run(data: &[u8], trust: Trust) -> Checked<Outcome> {
    let input = input::parse(data);
    let Some(tree) = Tree::write(&input.files) else {
        return Ok(Outcome::default());
    };
    let Ok(catalog) = Catalog::new(tree.path(), Box::new(FormatOpener), false) else {
        return Ok(Outcome::default());
    };
    let core = FsCore::new(catalog);
    let ops = if input.ops.is_empty() {
        default_ops()
    } else {
        input.ops
    };
    let mut outcome = Outcome::default();
    let mut files = Vec::new();
    list_files(&core, ROOT_INO, PathBuf::new(), &mut files, 0);
    for (ino, rel) in files {
        exercise_file(&core, ino, &rel, &ops, trust, &mut outcome)?;
    }
    Ok(outcome)
}

/// Collects the raw files below directory `ino` (snapshot directories included).
fn list_files(core: &FsCore, ino: u64, rel: PathBuf, out: &mut Vec<(u64, PathBuf)>, depth: u32) {
    let Ok(fh) = core.opendir(ino) else {
        return;
    };
    let entries = core.readdir(fh);
    core.releasedir(fh);
    let Ok(entries) = entries else {
        return;
    };
    for (_, kind, name) in entries.iter().cloned() {
        if name == "." || name == ".." || out.len() >= MAX_FILES {
            continue;
        }
        // As the kernel does: an entry is looked up before it is used.
        let Ok(child) = core.lookup(ino, &name).map(|attr| attr.ino) else {
            continue;
        };
        match kind {
            NodeKind::File => out.push((child, rel.join(&name))),
            NodeKind::Dir if depth < 2 => list_files(core, child, rel.join(&name), out, depth + 1),
            NodeKind::Dir => {}
        }
    }
}

/// A handle on the image behind the raw file at `rel` (found by walking the catalog from the
/// root, snapshot and partition directories included), to ask it directly what the core
/// should say.
fn image_of(core: &FsCore, rel: &Path) -> Option<ImageHandle> {
    let catalog = core.catalog();
    let mut target = Target::Dir(PathBuf::new());
    for component in rel.components() {
        target = catalog.lookup(&target, component.as_os_str()).ok()??.target;
    }
    match target {
        Target::Image(image) => catalog.open(&image, false).ok(),
        Target::Snapshot(image, name) => catalog.open_snapshot(&image, &name).ok(),
        Target::Partition(image, number) => catalog.open_partition(&image, number, false).ok(),
        Target::Dir(_) | Target::SnapshotsDir(_) | Target::PartsDir(_) => None,
    }
}

fn exercise_file(
    core: &FsCore,
    ino: u64,
    rel: &Path,
    ops: &[Op],
    trust: Trust,
    outcome: &mut Outcome,
) -> Checked {
    let (Ok(attr), Some(handle)) = (core.getattr(ino, None), image_of(core, rel)) else {
        return Ok(());
    };
    let image = handle.image();
    let size = image.size();
    // As in `exercise::Trust`: qcow, qcow2 and VMDK trust the tables they read on demand, so
    // in a hostile image a write may show through another place, or a cluster a hostile
    // entry also names may be freed under it; only the other formats and seeds must read back
    // every write.
    let strict =
        trust == Trust::Consistent || !matches!(image.info().format, "qcow" | "qcow2" | "vmdk");
    if attr.size != size {
        return Err(violation(format!(
            "{}: getattr says {} bytes, the image {size}",
            rel.display(),
            attr.size
        )));
    }
    let (fh, writable) = match core.open(ino, true) {
        Ok(fh) => (fh, true),
        Err(_) => match core.open(ino, false) {
            Ok(fh) => (fh, false),
            Err(_) => return Ok(()),
        },
    };
    outcome.opened = true;
    if rel.parent().and_then(Path::extension) == Some("parts".as_ref()) {
        outcome.partitions += 1;
    }
    for (n, op) in ops.iter().enumerate() {
        match op.kind {
            OpKind::Seek => {
                // An empty range stands for the end of the disk, where lseek says ENXIO.
                let offset = op.range(size).map_or(size, |(offset, _)| offset);
                let want_data = op.flags & FLAG_SEEK_DATA != 0;
                let whence = if want_data {
                    libc::SEEK_DATA
                } else {
                    libc::SEEK_HOLE
                };
                match core.lseek(fh, offset, whence) {
                    Ok(to) => seek_agrees(image, offset, want_data, Some(to))?,
                    Err(e) if e.0 == libc::ENXIO && offset >= size => {}
                    Err(e) if e.0 == libc::ENXIO && want_data => {
                        seek_agrees(image, offset, want_data, None)?
                    }
                    Err(e) if offset >= size => {
                        return Err(violation(format!(
                            "lseek at {offset} past the end of a {size}-byte disk gave errno {}, \
                             not ENXIO",
                            e.0
                        )))
                    }
                    Err(_) => {}
                }
            }
            OpKind::Write => {
                let Some((offset, len)) = op.range(size) else {
                    continue;
                };
                let data = vec![(n % 250) as u8 + 1; len as usize];
                let room = size.saturating_sub(offset);
                // Every other one as from an O_DIRECT writer: its whole host pages, if it
                // covers enough of them, bypass the host page cache.
                match core.write_with(fh, offset, &data, offset % 2 == 0) {
                    Ok(done) if !writable => {
                        return Err(violation(format!(
                            "a write of {done} bytes through a read-only handle succeeded"
                        )))
                    }
                    Ok(done) if u64::from(done) != len.min(room) => {
                        return Err(violation(format!(
                            "a write of {len} bytes at {offset} of a {size}-byte disk wrote \
                             {done}"
                        )))
                    }
                    Ok(done) => {
                        outcome.wrote = true;
                        let back = core.read(fh, offset, done).unwrap_or_default();
                        if strict && back.len() == done as usize && back != data[..back.len()] {
                            return Err(violation(format!(
                                "{} bytes written at {offset} read back differently",
                                back.len()
                            )));
                        }
                    }
                    Err(e) if room == 0 && e.0 != libc::ENOSPC && writable => {
                        return Err(violation(format!(
                            "a write at the end of the disk gave errno {}, not ENOSPC",
                            e.0
                        )))
                    }
                    Err(_) => {}
                }
            }
            OpKind::Status => {
                if let Some((offset, len)) = op.range(size) {
                    let len = len.saturating_mul(4096);
                    if let Ok(extents) = image.block_status(offset, len) {
                        extents_cover(&extents, offset, len, size)?;
                    }
                }
            }
            OpKind::Flush | OpKind::Reopen => {
                let _ = core.flush(fh);
            }
            OpKind::Read | OpKind::Discard | OpKind::Snapshot => {
                let Some((offset, len)) = op.range(size) else {
                    continue;
                };
                read_through_core(core, fh, image, offset, len)?;
            }
        }
    }
    let _ = core.release(fh);
    Ok(())
}

/// A read through the core returns the bytes up to the end of the disk, the same as the
/// image's, with holes as zeros.
fn read_through_core(core: &FsCore, fh: u64, image: &dyn Image, offset: u64, len: u64) -> Checked {
    let size = image.size();
    let Ok(got) = core.read(fh, offset, len as u32) else {
        return Ok(());
    };
    let want = len.min(size.saturating_sub(offset));
    if got.len() as u64 != want {
        return Err(violation(format!(
            "a read of {len} bytes at {offset} of a {size}-byte disk returned {} bytes",
            got.len()
        )));
    }
    // The request threads reuse their buffers: every byte asked for must be set, whatever
    // the buffer held.
    let mut direct = vec![POISON; got.len()];
    if !got.is_empty() && image.read_at(&mut direct, offset).is_ok() && direct != got {
        return Err(violation(format!(
            "reads at {offset} through the core and from the image (into a used buffer) \
             differ"
        )));
    }
    let mut reused = AlignedBuffer::default();
    reused.prepare(got.len() + 7).fill(POISON);
    // Direct: large aligned parts of it bypass the host page cache, and must read the same.
    if let Ok(n) = core.read_into(fh, offset, len as u32, true, &mut reused) {
        if reused.filled(n) != &got[..] {
            return Err(violation(format!(
                "a read at {offset} into a used buffer differs from one into a fresh buffer"
            )));
        }
    }
    if let Ok(extents) = image.block_status(offset, want) {
        extents_cover(&extents, offset, want, size)?;
        holes_read_as_zeros(&extents, &got, offset)?;
    }
    read_on(core, fh, image, offset + want, want)
}

/// Reads of `len` bytes from `offset` on, one after the other, as `dd` or `cp` read: from the
/// third on the core reads ahead (for reads of 64 KiB and more), and what it hands over must
/// be what the image holds, whatever the ops before wrote.
fn read_on(core: &FsCore, fh: u64, image: &dyn Image, mut offset: u64, len: u64) -> Checked {
    const STREAM_READS: usize = 3;
    if len < 64 * 1024 {
        return Ok(());
    }
    for _ in 0..STREAM_READS {
        let Ok(got) = core.read(fh, offset, len as u32) else {
            return Ok(());
        };
        if got.is_empty() {
            return Ok(());
        }
        let mut direct = vec![POISON; got.len()];
        if image.read_at(&mut direct, offset).is_ok() && direct != got {
            return Err(violation(format!(
                "a read at {offset} following the one before it (read ahead) differs from \
                 the image"
            )));
        }
        offset += got.len() as u64;
    }
    Ok(())
}
