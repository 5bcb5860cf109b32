//! How a fuzz input describes a small source tree and what to do with it.
//!
//! ```text
//! input := file ( FILE_SEP file ){0,2} [ OPS_SEP ops ]
//! file  := bytes                          written as they are
//!        | SPARSE_MAGIC len:u64 chunk*     a sparse file: `len` bytes of zeros with chunks
//! chunk := offset:u64 size:u16 bytes       laid over them (all integers little-endian);
//!                                          bit 63 of len: recompute the file's checksums
//! ops   := 8-byte records, see `Op`
//! ```
//!
//! The files are written as `a` (the image under test), `b` and `c`, so an image whose backing
//! file, parent or extent is named `b` or `c` finds it. Real images are mostly zeros (a VHDX
//! keeps its regions 1 MiB apart), so seeds store them sparse: a few KiB of input stand for a
//! multi-MiB file, and mutations land on bytes that mean something. Every length is capped
//! here, so no input can make the harness itself allocate or write much.

/// Separates the files of an input.
pub const FILE_SEP: &[u8] = b"\n=imgfs-file=\n";
/// Separates the operations from the files.
pub const OPS_SEP: &[u8] = b"\n=imgfs-ops=\n";
/// Starts a file given in sparse form.
pub const SPARSE_MAGIC: &[u8] = b"=imgfs-sparse=\n";
/// The names the files of an input get, in order.
pub const FILE_NAMES: [&str; 3] = ["a", "b", "c"];
/// The largest file a sparse description may ask for. Holes cost nothing on tmpfs, and large
/// files let hostile headers ask for large tables that must still be bounded by imgfs.
pub const MAX_SPARSE_LEN: u64 = 1 << 30;
/// At most this many operations are run from one input.
pub const MAX_OPS: usize = 32;
/// The size of one operation record.
pub const OP_LEN: usize = 8;

/// Bit of a sparse file's length that asks for its checksums to be recomputed (`seal`).
pub const SEAL_FLAG: u64 = 1 << 63;

/// One file of the tree: its length and the chunks of non-zero content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec<'a> {
    pub len: u64,
    pub chunks: Vec<(u64, &'a [u8])>,
    /// Recompute the checksums of the file once written (VHDX), so that mutations behind
    /// them are not all refused for their checksum.
    pub seal: bool,
}

/// What an input asks for: up to three files and a list of operations (empty: the default
/// plan).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input<'a> {
    pub files: Vec<FileSpec<'a>>,
    pub ops: Vec<Op>,
}

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    Status,
    Discard,
    Flush,
    Reopen,
    Snapshot,
    Seek,
}

/// One operation: a kind and a range of the disk chosen by `sel` and `len`, so that the same
/// record means "somewhere in the middle" on a disk of any size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    pub kind: OpKind,
    /// Bit 0: align the offset down to 512 bytes; bit 1: count from the end of the disk;
    /// bit 2: a long range (len * 16); bit 3: do not clip the range to the disk; bit 4: a
    /// seek for data rather than for a hole.
    pub flags: u8,
    pub len: u16,
    pub sel: u32,
}

pub const FLAG_ALIGN: u8 = 1;
pub const FLAG_FROM_END: u8 = 2;
pub const FLAG_LONG: u8 = 4;
pub const FLAG_UNCLIPPED: u8 = 8;
/// For seeks: look for data (SEEK_DATA) rather than for a hole.
pub const FLAG_SEEK_DATA: u8 = 16;

impl Op {
    fn parse(record: &[u8]) -> Option<Op> {
        let kind = match record.first()? % 8 {
            0 => OpKind::Read,
            1 => OpKind::Write,
            2 => OpKind::Status,
            3 => OpKind::Discard,
            4 => OpKind::Flush,
            5 => OpKind::Reopen,
            6 => OpKind::Snapshot,
            _ => OpKind::Seek,
        };
        Some(Op {
            kind,
            flags: *record.get(1)?,
            len: u16::from_le_bytes(record.get(2..4)?.try_into().ok()?),
            sel: u32::from_le_bytes(record.get(4..8)?.try_into().ok()?),
        })
    }

    /// The bytes of this record (for building inputs in tests and seeds).
    pub fn to_bytes(self) -> [u8; OP_LEN] {
        let kind: u8 = match self.kind {
            OpKind::Read => 0,
            OpKind::Write => 1,
            OpKind::Status => 2,
            OpKind::Discard => 3,
            OpKind::Flush => 4,
            OpKind::Reopen => 5,
            OpKind::Snapshot => 6,
            OpKind::Seek => 7,
        };
        let mut out = [0u8; OP_LEN];
        out[0] = kind;
        out[1] = self.flags;
        out[2..4].copy_from_slice(&self.len.to_le_bytes());
        out[4..8].copy_from_slice(&self.sel.to_le_bytes());
        out
    }

    /// The range `[offset, offset + len)` this operation covers on a disk of `size` bytes;
    /// `None` when it would be empty. Unless `FLAG_UNCLIPPED`, it lies inside the disk.
    pub fn range(&self, size: u64) -> Option<(u64, u64)> {
        let mut len = u64::from(self.len) + 1;
        if self.flags & FLAG_LONG != 0 {
            len *= 16;
        }
        let mut offset = if self.flags & FLAG_FROM_END != 0 {
            size.saturating_sub(u64::from(self.sel % (1 << 20)))
        } else {
            // sel / 2^32 of the way into the disk, so every disk size is covered evenly.
            u64::try_from((u128::from(self.sel) * u128::from(size)) >> 32).unwrap_or(0)
        };
        if self.flags & FLAG_ALIGN != 0 {
            offset &= !511;
        }
        if self.flags & FLAG_UNCLIPPED == 0 {
            len = len.min(size.saturating_sub(offset));
        }
        (len > 0).then_some((offset, len))
    }
}

/// Splits `data` at the first occurrence of `sep`.
fn split_once<'a>(data: &'a [u8], sep: &[u8]) -> (&'a [u8], Option<&'a [u8]>) {
    match data.windows(sep.len()).position(|w| w == sep) {
        Some(at) => (&data[..at], Some(&data[at + sep.len()..])),
        None => (data, None),
    }
}

fn u64_at(data: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        data.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn file_spec(data: &[u8]) -> FileSpec<'_> {
    let Some(body) = data.strip_prefix(SPARSE_MAGIC) else {
        return FileSpec {
            len: data.len() as u64,
            chunks: vec![(0, data)],
            seal: false,
        };
    };
    let declared = u64_at(body, 0).unwrap_or(0);
    let mut len = (declared & !SEAL_FLAG).min(MAX_SPARSE_LEN);
    let mut chunks = Vec::new();
    let mut at = 8;
    while let Some(offset) = u64_at(body, at) {
        let Some(size) = body.get(at + 8..at + 10) else {
            break;
        };
        let size = usize::from(u16::from_le_bytes([size[0], size[1]]));
        let start = at + 10;
        // A chunk cut short by the end of the input keeps what is there.
        let end = start.saturating_add(size).min(body.len());
        let bytes = body.get(start..end).unwrap_or_default();
        let offset = offset.min(MAX_SPARSE_LEN - bytes.len() as u64);
        len = len.max(offset + bytes.len() as u64);
        chunks.push((offset, bytes));
        at = end;
    }
    FileSpec {
        len,
        chunks,
        seal: declared & SEAL_FLAG != 0,
    }
}

/// Parses an input; never fails, since every byte string is some tree.
pub fn parse(data: &[u8]) -> Input<'_> {
    let (files_part, ops_part) = split_once(data, OPS_SEP);
    let mut files = Vec::new();
    let mut rest = Some(files_part);
    while let Some(part) = rest {
        if files.len() == FILE_NAMES.len() {
            break;
        }
        let (file, next) = split_once(part, FILE_SEP);
        files.push(file_spec(file));
        rest = next;
    }
    let ops = ops_part
        .unwrap_or_default()
        .chunks_exact(OP_LEN)
        .take(MAX_OPS)
        .filter_map(Op::parse)
        .collect();
    Input { files, ops }
}

/// Encodes a file in sparse form, keeping runs of non-zero 512-byte sectors, with its
/// checksums to be recomputed (for seeds: they are right already, mutations will not be).
pub fn sparse(file: &[u8]) -> Vec<u8> {
    let mut out = SPARSE_MAGIC.to_vec();
    out.extend_from_slice(&(file.len() as u64 | SEAL_FLAG).to_le_bytes());
    let sectors: Vec<&[u8]> = file.chunks(512).collect();
    let mut i = 0;
    while i < sectors.len() {
        if sectors[i].iter().all(|&b| b == 0) {
            i += 1;
            continue;
        }
        let start = i * 512;
        let mut end = start;
        // A chunk holds at most 65535 bytes (its size is a u16): 127 sectors.
        while i < sectors.len() && sectors[i].iter().any(|&b| b != 0) && end - start < 127 * 512 {
            end += sectors[i].len();
            i += 1;
        }
        out.extend_from_slice(&(start as u64).to_le_bytes());
        out.extend_from_slice(&((end - start) as u16).to_le_bytes());
        out.extend_from_slice(&file[start..end]);
    }
    out
}

/// Joins files and operations into one input (for seeds and tests).
pub fn join(files: &[Vec<u8>], ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, file) in files.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(FILE_SEP);
        }
        out.extend_from_slice(file);
    }
    if !ops.is_empty() {
        out.extend_from_slice(OPS_SEP);
        for op in ops {
            out.extend_from_slice(&op.to_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_files_ops_and_sparse_files_round_trip() {
        let mut image = vec![0u8; 5000];
        image[3] = 7;
        image[4095] = 9;
        let ops = [Op {
            kind: OpKind::Write,
            flags: FLAG_ALIGN,
            len: 99,
            sel: 1 << 31,
        }];
        let data = join(&[sparse(&image), b"plain".to_vec()], &ops);
        let input = parse(&data);
        assert_eq!(input.ops, ops);
        assert_eq!(input.files.len(), 2);
        assert_eq!(input.files[1].chunks, vec![(0, &b"plain"[..])]);
        assert!(!input.files[1].seal);
        let a = &input.files[0];
        assert_eq!(a.len, 5000);
        assert!(a.seal);
        let mut rebuilt = vec![0u8; a.len as usize];
        for (offset, bytes) in &a.chunks {
            rebuilt[*offset as usize..][..bytes.len()].copy_from_slice(bytes);
        }
        assert_eq!(rebuilt, image);
    }

    #[test]
    fn hostile_descriptions_stay_bounded() {
        let mut data = SPARSE_MAGIC.to_vec();
        data.extend_from_slice(&u64::MAX.to_le_bytes());
        data.extend_from_slice(&u64::MAX.to_le_bytes());
        data.extend_from_slice(&u16::MAX.to_le_bytes());
        data.extend_from_slice(b"xyz");
        let input = parse(&data);
        assert_eq!(input.files[0].len, MAX_SPARSE_LEN);
        assert_eq!(
            input.files[0].chunks,
            vec![(MAX_SPARSE_LEN - 3, &b"xyz"[..])]
        );
        assert!(parse(&[]).files[0].chunks[0].1.is_empty());
    }

    #[test]
    fn op_ranges_cover_the_disk_and_clip_unless_asked() {
        let op = |flags, len, sel| Op {
            kind: OpKind::Read,
            flags,
            len,
            sel,
        };
        assert_eq!(op(0, 9, 0).range(100), Some((0, 10)));
        assert_eq!(op(0, 99, u32::MAX).range(100), Some((99, 1)));
        assert_eq!(op(FLAG_FROM_END, 9, 4).range(100), Some((96, 4)));
        assert_eq!(op(FLAG_ALIGN, 0, 1 << 31).range(2000), Some((512, 1)));
        assert_eq!(op(FLAG_UNCLIPPED, 9, u32::MAX).range(100), Some((99, 10)));
        assert_eq!(op(FLAG_LONG, 0, 0).range(1000), Some((0, 16)));
        assert_eq!(op(0, 0, 0).range(0), None);
        assert_eq!(
            op(FLAG_FROM_END, 0, 0).range(u64::MAX),
            None,
            "an offset at the very end leaves nothing inside"
        );
    }
}
