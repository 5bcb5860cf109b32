//! What a crash round writes (slots of unique bytes, some of them discards) and what may be on
//! the disk afterwards:
//! fsync'ed slots exactly, every other 512-byte sector its old bytes or its new ones.

use crate::common::Rng;

pub const SECTOR: u64 = 512;
/// The longest slot. A write through FUSE reaches the daemon as one request only while its
/// user pages fit one request (1 MiB, 256 pages); the kernel splits a longer one at whatever
/// byte the pages end, and a crash between the parts tears a sector no disk would tear.
const MAX_SLOT: u64 = (1 << 20) - 4096;

/// A region of the disk that a variant writes and checks (the whole disk, or a few windows of
/// a large one).
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub offset: u64,
    pub len: u64,
}

/// One write of the round: unique bytes at an offset, inside one window, sharing no sector
/// with any other slot; or a discard (`fallocate` PUNCH_HOLE), whose bytes are zeros.
#[derive(Debug, Clone)]
pub struct Slot {
    pub offset: u64,
    pub data: Vec<u8>,
    pub discard: bool,
}

impl Slot {
    fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }
}

/// Slots of 512 B to just under 1 MiB (some unaligned in offset and length) spread over `windows`,
/// covering about `share` of them, in a random order.
pub fn plan_slots(rng: &mut Rng, windows: &[Window], share: f64) -> Vec<Slot> {
    let mut slots = Vec::new();
    for window in windows {
        let end = window.offset + window.len;
        let mut at = window.offset;
        loop {
            // A gap of whole sectors (at least one), and sometimes a start inside a sector.
            let spacing = ((1.0 / share - 1.0).max(0.1) * 256.0 * 1024.0) as u64;
            at = (at + SECTOR + rng.below(spacing.max(SECTOR))) / SECTOR * SECTOR;
            let offset = at
                + if rng.below(3) == 0 {
                    rng.below(SECTOR)
                } else {
                    0
                };
            let len = match rng.below(4) {
                0 => SECTOR * (1 + rng.below(8)),
                1 => 1 + rng.below(64 * 1024),
                2 => SECTOR * (1 + rng.below(MAX_SLOT / SECTOR)),
                _ => 1 + rng.below(MAX_SLOT),
            };
            // The next slot starts in a later sector than this one ends in.
            let last_sector_end = (offset + len).div_ceil(SECTOR) * SECTOR;
            if last_sector_end > end {
                break;
            }
            // One slot in six punches a hole instead: clusters freed, blocks moved (VDI),
            // zero entries written, while the other slots' data must stay where it is.
            let discard = rng.below(6) == 0;
            slots.push(Slot {
                offset,
                data: match discard {
                    true => vec![0; len as usize],
                    false => rng.bytes(len as usize),
                },
                discard,
            });
            at = last_sector_end;
        }
    }
    for i in (1..slots.len()).rev() {
        slots.swap(i, rng.below(i as u64 + 1) as usize);
    }
    slots
}

/// The disk's bytes in each window.
pub type WindowBytes = Vec<Vec<u8>>;

/// Checks `seen` against what the round allows: bytes outside every slot as `old`, durable
/// slots exactly their new bytes, every sector piece of another slot old or new.
pub fn check(
    windows: &[Window],
    old: &WindowBytes,
    seen: &WindowBytes,
    slots: &[Slot],
    durable: &[bool],
) -> Result<(), String> {
    for (w, window) in windows.iter().enumerate() {
        let (old, seen) = (&old[w], &seen[w]);
        if seen.len() != old.len() {
            return Err(format!(
                "window {w}: {} bytes read, {} expected",
                seen.len(),
                old.len()
            ));
        }
        let mut inside: Vec<(usize, &Slot)> = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.offset >= window.offset && s.end() <= window.offset + window.len)
            .collect();
        inside.sort_by_key(|(_, s)| s.offset);
        let at = |disk: u64| (disk - window.offset) as usize;
        let mut covered = window.offset;
        for (i, slot) in inside {
            let gap = at(covered)..at(slot.offset);
            if let Some(bad) = first_difference(&seen[gap.clone()], &old[gap.clone()]) {
                return Err(format!(
                    "byte {:#x}, written by no slot, changed",
                    covered + bad as u64
                ));
            }
            let range = at(slot.offset)..at(slot.end());
            if durable[i] {
                if let Some(bad) = first_difference(&seen[range], &slot.data) {
                    return Err(format!(
                        "slot {i} ({} bytes at {:#x}) was fsync'ed, but byte {:#x} differs",
                        slot.data.len(),
                        slot.offset,
                        slot.offset + bad as u64
                    ));
                }
            } else {
                let mut piece = slot.offset;
                while piece < slot.end() {
                    let piece_end = ((piece / SECTOR + 1) * SECTOR).min(slot.end());
                    let r = at(piece)..at(piece_end);
                    let new = &slot.data[(piece - slot.offset) as usize..][..r.len()];
                    if seen[r.clone()] != old[r.clone()] && seen[r.clone()] != *new {
                        return Err(format!(
                            "slot {i} (not fsync'ed): the sector piece at {piece:#x} is neither \
                             its old nor its new bytes"
                        ));
                    }
                    piece = piece_end;
                }
            }
            covered = slot.end();
        }
        let tail = at(covered)..old.len();
        if let Some(bad) = first_difference(&seen[tail.clone()], &old[tail]) {
            return Err(format!(
                "byte {:#x}, written by no slot, changed",
                covered + bad as u64
            ));
        }
    }
    Ok(())
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        return None;
    }
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or(Some(a.len().min(b.len())))
}

/// `old` with every slot in `slots` written (what the disk holds if all of them landed).
pub fn apply(windows: &[Window], old: &WindowBytes, slots: &[Slot]) -> WindowBytes {
    let mut out = old.clone();
    for slot in slots {
        for (w, window) in windows.iter().enumerate() {
            if slot.offset >= window.offset && slot.end() <= window.offset + window.len {
                let at = (slot.offset - window.offset) as usize;
                out[w][at..at + slot.data.len()].copy_from_slice(&slot.data);
            }
        }
    }
    out
}
