//! Guest offsets and L1/L2 entries: splitting a guest offset into table indices, and decoding
//! an L2 entry (standard 64-bit or extended 128-bit) into a `ClusterDescriptor`, then into the
//! runs of one state a read or a status query works with; the write path decodes entries here
//! too and builds new ones from the same constants.
//!
//! ```text
//! L1 entry:  bit 63 COPIED | bits 9..=55 L2 table offset (cluster aligned) | rest reserved
//! L2 entry:  bit 63 COPIED | bit 62 COMPRESSED | bits 0..=61 cluster descriptor
//!   standard:   bit 0 reads as zeros (v3, not with extended L2) | bits 9..=55 host cluster
//!   compressed: x = 62 - (cluster_bits - 8); bits 0..x host byte offset,
//!               bits x..=61 additional 512-byte sectors of compressed data
//! extended L2: a second u64, bits 0..32 subcluster allocated, bits 32..64 subcluster zero
//! ```
//!
//! Offset 0 in a standard descriptor means "unallocated", except with an external data file,
//! where guest cluster 0 lives at data file offset 0: there COPIED tells them apart, as in QEMU.

use crate::error::{Error, Result};

pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
pub const ZERO_FLAG: u64 = 1;
pub const SUBCLUSTERS: u32 = 32;
const COMPRESSED_SECTOR: u64 = 512;

/// The fixed shape of an image's block map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub cluster_bits: u32,
    /// log2 of the entries per L2 table.
    pub l2_bits: u32,
    pub extended_l2: bool,
    /// Version 3 images may use the zero flag; in version 2 it is a corrupt entry.
    pub zero_flag_allowed: bool,
    /// Guest data lives in an external data file (no compression, offset 0 is valid).
    pub external_data: bool,
}

/// A guest offset split into its L1 index, L2 index and offset inside the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestPos {
    pub l1_index: u64,
    pub l2_index: u64,
    pub in_cluster: u64,
}

/// What one L2 entry says about its guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterDescriptor {
    /// Nothing here: read from the backing file (or zeros).
    Unallocated,
    /// Reads as zeros, never from the backing file; `preallocated` is the host cluster kept
    /// for later writes, if any.
    Zero { preallocated: Option<u64> },
    /// Data in the host cluster at `host_cluster`; `copied` says its refcount is exactly one.
    Normal { host_cluster: u64, copied: bool },
    /// A compressed cluster: `len` bytes from `host_offset` hold its stream (and padding).
    Compressed { host_offset: u64, len: u64 },
    /// Extended L2: 32 subclusters each unallocated, zero or allocated (`alloc` bit set) in
    /// `host_cluster` (present whenever any subcluster is allocated); `copied` as for `Normal`.
    Subclusters {
        host_cluster: Option<u64>,
        alloc: u32,
        zero: u32,
        copied: bool,
    },
}

/// How a run of the guest disk is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    Unallocated,
    Zero,
    /// `host_offset` is where the run's first byte lives (image or external data file).
    Data {
        host_offset: u64,
    },
    /// The run lies `in_cluster` bytes into a compressed cluster.
    Compressed {
        host_offset: u64,
        len: u64,
        in_cluster: u64,
    },
}

/// A run of guest bytes `[offset, offset + len)` with one mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub offset: u64,
    pub len: u64,
    pub mapping: Mapping,
}

impl Run {
    /// Whether `next` (starting where this run ends) can be read together with this one.
    fn continued_by(&self, next: &Run) -> bool {
        if self.offset.checked_add(self.len) != Some(next.offset) {
            return false;
        }
        match (self.mapping, next.mapping) {
            (Mapping::Unallocated, Mapping::Unallocated) | (Mapping::Zero, Mapping::Zero) => true,
            (Mapping::Data { host_offset: a }, Mapping::Data { host_offset: b }) => {
                a.checked_add(self.len) == Some(b)
            }
            _ => false,
        }
    }
}

/// Appends `run` to `runs`, merging it into the last one where they continue each other.
pub fn push_run(runs: &mut Vec<Run>, run: Run) {
    if let Some(last) = runs.last_mut() {
        if last.continued_by(&run) {
            last.len += run.len;
            return;
        }
    }
    runs.push(run);
}

impl Geometry {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// u64 words per L2 entry.
    pub fn entry_words(&self) -> usize {
        if self.extended_l2 {
            2
        } else {
            1
        }
    }

    /// Guest bytes one L2 table maps.
    pub fn l2_coverage_bits(&self) -> u32 {
        self.cluster_bits + self.l2_bits
    }

    pub fn subcluster_bits(&self) -> u32 {
        self.cluster_bits - 5
    }

    pub fn split(&self, guest: u64) -> GuestPos {
        GuestPos {
            l1_index: guest >> self.l2_coverage_bits(),
            l2_index: (guest >> self.cluster_bits) & ((1 << self.l2_bits) - 1),
            in_cluster: guest & (self.cluster_size() - 1),
        }
    }

    /// Bits of the host offset in a compressed descriptor; the sector count sits above them.
    fn compressed_offset_bits(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }

    /// Decodes an L2 entry; `bitmap` is the second word of an extended entry (0 otherwise).
    pub fn decode(&self, entry: u64, bitmap: u64) -> Result<ClusterDescriptor> {
        if entry & COMPRESSED != 0 {
            return self.decode_compressed(entry);
        }
        let offset = entry & OFFSET_MASK;
        let copied = entry & COPIED != 0;
        // Offset 0 is a real cluster only in an external data file, marked by COPIED.
        let host = (offset != 0 || (self.external_data && copied)).then_some(offset);
        if let Some(host) = host {
            if host & (self.cluster_size() - 1) != 0 {
                return Err(Error::corrupt(format!(
                    "L2 entry {entry:#018x} points to host offset {host:#x}, not cluster aligned"
                )));
            }
        }
        if self.extended_l2 {
            let alloc = bitmap as u32;
            let zero = (bitmap >> 32) as u32;
            if alloc & zero != 0 || (host.is_none() && alloc != 0) {
                return Err(Error::corrupt(format!(
                    "extended L2 entry {entry:#018x} has an invalid subcluster bitmap \
                     {bitmap:#018x}"
                )));
            }
            return Ok(ClusterDescriptor::Subclusters {
                host_cluster: host,
                alloc,
                zero,
                copied,
            });
        }
        if entry & ZERO_FLAG != 0 {
            if !self.zero_flag_allowed {
                return Err(Error::corrupt(format!(
                    "L2 entry {entry:#018x} is a zero cluster, which version 2 images cannot have"
                )));
            }
            return Ok(ClusterDescriptor::Zero { preallocated: host });
        }
        Ok(match host {
            Some(host_cluster) => ClusterDescriptor::Normal {
                host_cluster,
                copied,
            },
            None => ClusterDescriptor::Unallocated,
        })
    }

    fn decode_compressed(&self, entry: u64) -> Result<ClusterDescriptor> {
        if self.external_data {
            return Err(Error::corrupt(format!(
                "L2 entry {entry:#018x} is compressed, which images with an external data file \
                 cannot have"
            )));
        }
        let bits = self.compressed_offset_bits();
        let host_offset = entry & ((1 << bits) - 1);
        let sector_mask = (1u64 << (self.cluster_bits - 8)) - 1;
        let sectors = ((entry >> bits) & sector_mask) + 1;
        // The first sector counts only from host_offset on; at most 8192 sectors (4 MiB).
        let len = sectors * COMPRESSED_SECTOR - (host_offset & (COMPRESSED_SECTOR - 1));
        if host_offset == 0 {
            return Err(Error::corrupt(format!(
                "compressed L2 entry {entry:#018x} points into the header"
            )));
        }
        Ok(ClusterDescriptor::Compressed { host_offset, len })
    }

    /// The mapping of the longest run of one state that starts `in_cluster` bytes into a
    /// cluster described by `desc` and stays inside it, capped at `max_len` bytes.
    pub fn span(&self, desc: ClusterDescriptor, in_cluster: u64, max_len: u64) -> (Mapping, u64) {
        let to_cluster_end = self.cluster_size() - in_cluster;
        let (mapping, len) = match desc {
            ClusterDescriptor::Unallocated => (Mapping::Unallocated, to_cluster_end),
            ClusterDescriptor::Zero { .. } => (Mapping::Zero, to_cluster_end),
            ClusterDescriptor::Normal { host_cluster, .. } => (
                Mapping::Data {
                    host_offset: host_cluster + in_cluster,
                },
                to_cluster_end,
            ),
            ClusterDescriptor::Compressed { host_offset, len } => (
                Mapping::Compressed {
                    host_offset,
                    len,
                    in_cluster,
                },
                to_cluster_end,
            ),
            ClusterDescriptor::Subclusters {
                host_cluster,
                alloc,
                zero,
                ..
            } => self.subcluster_span(host_cluster, alloc, zero, in_cluster),
        };
        (mapping, len.min(max_len))
    }

    fn subcluster_span(
        &self,
        host_cluster: Option<u64>,
        alloc: u32,
        zero: u32,
        in_cluster: u64,
    ) -> (Mapping, u64) {
        let bits = self.subcluster_bits();
        let first = (in_cluster >> bits) as u32;
        let state = |sc: u32| -> u8 {
            if alloc & (1 << sc) != 0 {
                2
            } else if zero & (1 << sc) != 0 {
                1
            } else {
                0
            }
        };
        let kind = state(first);
        let end = (first + 1..SUBCLUSTERS)
            .find(|&sc| state(sc) != kind)
            .unwrap_or(SUBCLUSTERS);
        let len = (u64::from(end) << bits) - in_cluster;
        let mapping = match (kind, host_cluster) {
            (2, Some(host)) => Mapping::Data {
                host_offset: host + in_cluster,
            },
            (1, _) => Mapping::Zero,
            // decode() refuses allocated subclusters without a host cluster.
            _ => Mapping::Unallocated,
        };
        (mapping, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(cluster_bits: u32, extended_l2: bool) -> Geometry {
        Geometry {
            cluster_bits,
            l2_bits: cluster_bits - if extended_l2 { 4 } else { 3 },
            extended_l2,
            zero_flag_allowed: true,
            external_data: false,
        }
    }

    #[test]
    fn split_into_indices() {
        let g = geo(16, false);
        let pos = g.split((3 << 29) + (5 << 16) + 7);
        assert_eq!(
            pos,
            GuestPos {
                l1_index: 3,
                l2_index: 5,
                in_cluster: 7
            }
        );
        assert_eq!(geo(16, true).split(1 << 28).l1_index, 1);
        assert_eq!(geo(9, false).split(1 << 15).l1_index, 1);
    }

    #[test]
    fn standard_entries() {
        let g = geo(16, false);
        assert_eq!(g.decode(0, 0).unwrap(), ClusterDescriptor::Unallocated);
        assert_eq!(
            g.decode(COPIED | 0x50000, 0).unwrap(),
            ClusterDescriptor::Normal {
                host_cluster: 0x50000,
                copied: true
            }
        );
        assert_eq!(
            g.decode(1, 0).unwrap(),
            ClusterDescriptor::Zero { preallocated: None }
        );
        assert_eq!(
            g.decode(0x50001, 0).unwrap(),
            ClusterDescriptor::Zero {
                preallocated: Some(0x50000)
            }
        );
        assert!(g
            .decode(0x50200, 0)
            .unwrap_err()
            .to_string()
            .contains("aligned"));
        let v2 = Geometry {
            zero_flag_allowed: false,
            ..g
        };
        assert!(v2
            .decode(1, 0)
            .unwrap_err()
            .to_string()
            .contains("version 2"));
        assert_eq!(
            g.decode(COPIED, 0).unwrap(),
            ClusterDescriptor::Unallocated,
            "offset 0 is unallocated in the image file"
        );
        let external = Geometry {
            external_data: true,
            ..g
        };
        assert_eq!(
            external.decode(COPIED, 0).unwrap(),
            ClusterDescriptor::Normal {
                host_cluster: 0,
                copied: true
            }
        );
        assert!(external.decode(COMPRESSED | 0x1000, 0).is_err());
    }

    #[test]
    fn compressed_descriptor_layout() {
        // 64 KiB clusters: 54 offset bits, then the extra sector count.
        let g = geo(16, false);
        let entry = COMPRESSED | (3 << 54) | 0x12345;
        assert_eq!(
            g.decode(entry, 0).unwrap(),
            ClusterDescriptor::Compressed {
                host_offset: 0x12345,
                len: 4 * 512 - 0x145
            }
        );
        // 2 MiB clusters: 49 offset bits, 13 bits of sectors, at most 8192 sectors.
        let g = geo(21, false);
        let entry = COMPRESSED | (0x1fff << 49) | 0x20000;
        assert_eq!(
            g.decode(entry, 0).unwrap(),
            ClusterDescriptor::Compressed {
                host_offset: 0x20000,
                len: 8192 * 512
            }
        );
        let (mapping, len) = g.span(g.decode(entry, 0).unwrap(), 100, u64::MAX);
        assert_eq!(len, (2 << 20) - 100);
        assert!(matches!(
            mapping,
            Mapping::Compressed {
                in_cluster: 100,
                ..
            }
        ));
    }

    #[test]
    fn extended_entries_split_into_subcluster_runs() {
        let g = geo(16, true);
        let sc = 2048u64;
        // Subclusters 0-1 allocated, 2 zero, 3.. unallocated.
        let desc = g.decode(0x30000, 0b11 | (0b100 << 32)).unwrap();
        assert_eq!(
            g.span(desc, 100, u64::MAX),
            (
                Mapping::Data {
                    host_offset: 0x30000 + 100
                },
                2 * sc - 100
            )
        );
        assert_eq!(g.span(desc, 2 * sc, u64::MAX), (Mapping::Zero, sc));
        assert_eq!(
            g.span(desc, 3 * sc + 5, u64::MAX),
            (Mapping::Unallocated, 29 * sc - 5)
        );
        assert_eq!(g.span(desc, 0, 10).1, 10);
        // The zero flag is not used with extended L2 entries.
        let desc = g.decode(1, u64::from(u32::MAX) << 32).unwrap();
        assert_eq!(g.span(desc, 0, u64::MAX), (Mapping::Zero, 65536));
        assert!(g.decode(0x30000, 1 | (1 << 32)).is_err(), "alloc and zero");
        assert!(g.decode(0, 1).is_err(), "allocated without a cluster");
    }

    #[test]
    fn runs_merge_only_when_contiguous() {
        let mut runs = Vec::new();
        let data = |offset, host| Run {
            offset,
            len: 10,
            mapping: Mapping::Data { host_offset: host },
        };
        push_run(&mut runs, data(0, 100));
        push_run(&mut runs, data(10, 110));
        push_run(&mut runs, data(20, 500));
        push_run(
            &mut runs,
            Run {
                offset: 30,
                len: 5,
                mapping: Mapping::Zero,
            },
        );
        assert_eq!(runs.len(), 3);
        assert_eq!(runs[0].len, 20);
    }
}
