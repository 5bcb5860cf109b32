//! References counted per cluster while refcounts are rebuilt or checked: 16-bit counters in
//! chunks that exist only where clusters are referenced, the rare count above 65,534 kept
//! aside. That is about 2 bytes per cluster of the file at most, what QEMU's own check takes,
//! where an ordered map took some 40 bytes per referenced cluster and its time.

use std::collections::BTreeMap;
use std::ops::Range;

/// Clusters per chunk (128 KiB of counters).
const CHUNK_BITS: u32 = 16;
const CHUNK_LEN: usize = 1 << CHUNK_BITS;
/// A counter holding this has its count in `spilled`.
const SPILLED: u16 = u16::MAX;

/// The number of references to each cluster.
#[derive(Debug, Default)]
pub struct ClusterCounts {
    chunks: Vec<Option<Box<[u16]>>>,
    spilled: BTreeMap<u64, u64>,
}

fn split(cluster: u64) -> (usize, usize) {
    // Cluster numbers come from offsets inside the file (or just past it), so the chunk
    // index fits a usize on every host imgfs runs on.
    let chunk = usize::try_from(cluster >> CHUNK_BITS).unwrap_or(usize::MAX);
    (chunk, (cluster as usize) & (CHUNK_LEN - 1))
}

impl ClusterCounts {
    pub fn new() -> Self {
        Self::default()
    }

    /// The references counted for `cluster`.
    pub fn get(&self, cluster: u64) -> u64 {
        let (chunk, at) = split(cluster);
        match self.chunks.get(chunk).and_then(|c| c.as_ref()) {
            Some(counters) if counters[at] == SPILLED => {
                self.spilled.get(&cluster).copied().unwrap_or(0)
            }
            Some(counters) => u64::from(counters[at]),
            None => 0,
        }
    }

    /// Counts one more reference to `cluster` (saturating).
    pub fn add_one(&mut self, cluster: u64) {
        let (chunk, at) = split(cluster);
        if chunk == usize::MAX {
            return;
        }
        if self.chunks.len() <= chunk {
            self.chunks.resize_with(chunk + 1, || None);
        }
        let counters = self.chunks[chunk].get_or_insert_with(|| vec![0; CHUNK_LEN].into());
        match counters[at] {
            SPILLED => {
                let count = self.spilled.entry(cluster).or_default();
                *count = count.saturating_add(1);
            }
            n if n == SPILLED - 1 => {
                counters[at] = SPILLED;
                self.spilled.insert(cluster, u64::from(SPILLED));
            }
            n => counters[at] = n + 1,
        }
    }

    /// Takes one reference to `cluster` back, if it has any.
    pub fn remove_one(&mut self, cluster: u64) {
        let (chunk, at) = split(cluster);
        let Some(counters) = self.chunks.get_mut(chunk).and_then(|c| c.as_mut()) else {
            return;
        };
        match counters[at] {
            0 => {}
            SPILLED => {
                let count = self.spilled.get(&cluster).copied().unwrap_or(0);
                let left = count.saturating_sub(1);
                if left < u64::from(SPILLED) {
                    self.spilled.remove(&cluster);
                    counters[at] = left as u16;
                } else {
                    self.spilled.insert(cluster, left);
                }
            }
            n => counters[at] = n - 1,
        }
    }

    /// The clusters in `range` with references, in order, with their counts.
    pub fn in_range(&self, range: Range<u64>) -> impl Iterator<Item = (u64, u64)> + '_ {
        let first_chunk = range.start >> CHUNK_BITS;
        let end_chunk = range.end.div_ceil(CHUNK_LEN as u64);
        (first_chunk..end_chunk.min(self.chunks.len() as u64))
            .filter(|&chunk| self.chunks.get(chunk as usize).is_some_and(|c| c.is_some()))
            .flat_map(move |chunk| {
                let base = chunk << CHUNK_BITS;
                let from = range.start.max(base);
                let to = range.end.min(base + CHUNK_LEN as u64);
                (from..to).filter_map(move |cluster| {
                    let count = self.get(cluster);
                    (count > 0).then_some((cluster, count))
                })
            })
    }

    /// Every cluster with references, in order, with its count.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.in_range(0..(self.chunks.len() as u64) << CHUNK_BITS)
    }

    /// The highest cluster with references.
    pub fn last(&self) -> Option<u64> {
        let chunk = self.chunks.iter().rposition(|c| c.is_some())? as u64;
        let base = chunk << CHUNK_BITS;
        self.in_range(base..base + CHUNK_LEN as u64)
            .last()
            .map(|(cluster, _)| cluster)
            .or_else(|| self.in_range(0..base).last().map(|(cluster, _)| cluster))
    }
}

impl FromIterator<u64> for ClusterCounts {
    /// One reference to each cluster given (once for each time it is given).
    fn from_iter<I: IntoIterator<Item = u64>>(clusters: I) -> Self {
        let mut counts = ClusterCounts::new();
        for cluster in clusters {
            counts.add_one(cluster);
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_kept_per_cluster_in_chunks_and_listed_in_order() {
        let mut counts: ClusterCounts = [5, 5, 70_000, 3].into_iter().collect();
        assert_eq!(counts.get(5), 2);
        assert_eq!(counts.get(6), 0);
        assert_eq!(counts.get(1 << 40), 0, "far past anything counted");
        assert_eq!(counts.chunks.iter().filter(|c| c.is_some()).count(), 2);
        assert_eq!(
            counts.iter().collect::<Vec<_>>(),
            [(3, 1), (5, 2), (70_000, 1)]
        );
        assert_eq!(counts.in_range(4..70_000).collect::<Vec<_>>(), [(5, 2)]);
        assert_eq!(counts.last(), Some(70_000));
        counts.remove_one(70_000);
        counts.remove_one(70_000);
        assert_eq!(counts.last(), Some(5), "a chunk left empty is looked past");
        counts.remove_one(9);
        assert_eq!(counts.get(9), 0);
    }

    #[test]
    fn counts_above_sixteen_bits_spill_and_come_back() {
        let mut counts = ClusterCounts::new();
        for _ in 0..70_000 {
            counts.add_one(7);
        }
        assert_eq!(counts.get(7), 70_000);
        assert_eq!(counts.iter().collect::<Vec<_>>(), [(7, 70_000)]);
        for _ in 0..70_000 - 10 {
            counts.remove_one(7);
        }
        assert_eq!(counts.get(7), 10);
        assert!(counts.spilled.is_empty());
        assert_eq!(ClusterCounts::new().last(), None);
    }
}
