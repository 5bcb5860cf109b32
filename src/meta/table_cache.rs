//! A bounded cache of on-disk metadata tables (qcow2 L2 tables and refcount blocks, VMDK grain
//! tables, ...), keyed by the table's host file offset, evicting the least recently used clean
//! table when full.
//!
//! Tables are handed out as `Arc<T>`, so a reader keeps using the table it looked up while the
//! cache evicts or replaces it, and no lock is held while the caller works with it. Loading
//! happens outside the cache's lock too (`get_or_load`): two threads missing the same table may
//! both read it, the first insert wins and the other copy is dropped, which is cheaper than
//! making every reader wait behind one disk read.
//!
//! A load that overlapped a modification (`insert_dirty` or `remove` of any key) is returned to
//! its caller but not cached: it may hold the table as it was before the modification, and once
//! the modified table has been written back and evicted, caching the old copy would bring stale
//! entries back (reads would miss the new entries, and the next write-back of the table would
//! drop them on disk). "Overlapped" runs from the miss to the insert, and the generation check
//! and the insert are one critical section: were they two, the table could be modified,
//! written back and evicted between them.
//!
//! Dirty tables (modified in memory, not yet written back) are never evicted: writing one back
//! needs the format's write order (data synced first), which only the format knows. The cache
//! grows past its capacity instead and `over_capacity` tells the format to write back.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::error::Result;

struct Slot<T> {
    table: Arc<T>,
    dirty: bool,
    /// The tick of the last use; the key of this slot in `Inner::by_use`.
    used: u64,
}

struct Inner<T> {
    slots: HashMap<u64, Slot<T>>,
    /// Last-use tick -> key, oldest first; ticks are unique, so this is an exact LRU order.
    by_use: BTreeMap<u64, u64>,
    tick: u64,
    /// Bumped by every modification, so a load can tell whether one overlapped it.
    generation: u64,
    hits: u64,
    misses: u64,
}

impl<T> Inner<T> {
    fn touch(&mut self, key: u64) -> Option<Arc<T>> {
        self.tick += 1;
        let tick = self.tick;
        let slot = self.slots.get_mut(&key)?;
        self.by_use.remove(&slot.used);
        slot.used = tick;
        self.by_use.insert(tick, key);
        Some(Arc::clone(&slot.table))
    }

    /// Caches a table read from disk, unless `key` is cached already: then that one is kept
    /// and returned, so every user sees the same table.
    fn insert_clean(&mut self, key: u64, table: Arc<T>, capacity: usize) -> Arc<T> {
        if let Some(existing) = self.touch(key) {
            return existing;
        }
        self.tick += 1;
        let used = self.tick;
        self.by_use.insert(used, key);
        self.slots.insert(
            key,
            Slot {
                table: Arc::clone(&table),
                dirty: false,
                used,
            },
        );
        self.evict_to(capacity);
        table
    }

    fn evict_to(&mut self, capacity: usize) {
        if self.slots.len() <= capacity {
            return;
        }
        let excess = self.slots.len() - capacity;
        let victims: Vec<(u64, u64)> = self
            .by_use
            .iter()
            .filter(|(_, key)| self.slots.get(key).is_some_and(|s| !s.dirty))
            .take(excess)
            .map(|(&tick, &key)| (tick, key))
            .collect();
        for (tick, key) in victims {
            self.by_use.remove(&tick);
            self.slots.remove(&key);
        }
    }
}

/// The pause point between reading a missing table and caching it: where a modification,
/// write-back and eviction of the same table by another thread must be noticed.
#[cfg(test)]
pub const PAUSE_LOADED: &str = "TableCache::get_or_load: table read, not yet cached";

/// Counters for tests and `imgfs info`-style diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: usize,
    pub dirty: usize,
    pub hits: u64,
    pub misses: u64,
}

/// An LRU cache of at most `capacity` clean tables (plus any dirty ones).
pub struct TableCache<T> {
    capacity: usize,
    inner: Mutex<Inner<T>>,
}

impl<T> TableCache<T> {
    /// A cache holding up to `capacity` tables (at least one).
    pub fn new(capacity: usize) -> Self {
        TableCache {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner {
                slots: HashMap::new(),
                by_use: BTreeMap::new(),
                tick: 0,
                generation: 0,
                hits: 0,
                misses: 0,
            }),
        }
    }

    // Every critical section below is a few map operations that cannot stop halfway in a way
    // that breaks the invariants a later user relies on, so a poisoned lock is simply reused.
    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The cached table at `key`, marking it most recently used.
    pub fn get(&self, key: u64) -> Option<Arc<T>> {
        let mut inner = self.lock();
        let found = inner.touch(key);
        match found {
            Some(_) => inner.hits += 1,
            None => inner.misses += 1,
        }
        found
    }

    /// The table at `key`, loaded by `load` (outside the cache's lock) on a miss. Of two
    /// threads loading the same table, the first to insert wins and both get its copy.
    pub fn get_or_load(&self, key: u64, load: impl FnOnce() -> Result<T>) -> Result<Arc<T>> {
        let generation = {
            let mut inner = self.lock();
            if let Some(table) = inner.touch(key) {
                inner.hits += 1;
                return Ok(table);
            }
            inner.misses += 1;
            inner.generation
        };
        let loaded = Arc::new(load()?);
        #[cfg(test)]
        crate::testutil::pause::point(PAUSE_LOADED);
        // Checked and inserted under one lock (see the module doc).
        let mut inner = self.lock();
        if inner.generation != generation {
            // Someone modified a table while this one was read: prefer what is cached now,
            // else use the copy for this caller only.
            return Ok(inner.touch(key).unwrap_or(loaded));
        }
        Ok(inner.insert_clean(key, loaded, self.capacity))
    }

    /// Stores a modified (or new) table at `key`, replacing what was cached, and marks it dirty.
    pub fn insert_dirty(&self, key: u64, table: Arc<T>) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.tick += 1;
        let used = inner.tick;
        if let Some(old) = inner.slots.get(&key).map(|s| s.used) {
            inner.by_use.remove(&old);
        }
        inner.by_use.insert(used, key);
        inner.slots.insert(
            key,
            Slot {
                table,
                dirty: true,
                used,
            },
        );
        inner.evict_to(self.capacity);
    }

    /// The dirty tables, in ascending key (host offset) order, for write-back.
    pub fn dirty_tables(&self) -> Vec<(u64, Arc<T>)> {
        let inner = self.lock();
        let mut dirty: Vec<(u64, Arc<T>)> = inner
            .slots
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(&k, s)| (k, Arc::clone(&s.table)))
            .collect();
        dirty.sort_by_key(|&(k, _)| k);
        dirty
    }

    /// Marks the table at `key` clean after `written` was written back, unless the table was
    /// replaced meanwhile (then the newer version is still dirty).
    pub fn mark_clean(&self, key: u64, written: &Arc<T>) {
        let mut inner = self.lock();
        if let Some(slot) = inner.slots.get_mut(&key) {
            if Arc::ptr_eq(&slot.table, written) {
                slot.dirty = false;
            }
        }
        inner.evict_to(self.capacity);
    }

    /// Drops the table at `key` whether dirty or not (its cluster was freed).
    pub fn remove(&self, key: u64) {
        let mut inner = self.lock();
        inner.generation += 1;
        if let Some(slot) = inner.slots.remove(&key) {
            inner.by_use.remove(&slot.used);
        }
    }

    pub fn is_dirty(&self) -> bool {
        self.lock().slots.values().any(|s| s.dirty)
    }

    /// Whether dirty tables keep the cache above its capacity, so the owner should write back.
    pub fn over_capacity(&self) -> bool {
        self.lock().slots.len() > self.capacity
    }

    pub fn stats(&self) -> CacheStats {
        let inner = self.lock();
        CacheStats {
            entries: inner.slots.len(),
            dirty: inner.slots.values().filter(|s| s.dirty).count(),
            hits: inner.hits,
            misses: inner.misses,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::testutil::pause::Pause;

    /// `table` cached at `key` as a table read from disk.
    fn load<T>(cache: &TableCache<T>, key: u64, table: T) -> Arc<T> {
        cache.get_or_load(key, || Ok(table)).unwrap()
    }

    #[test]
    fn evicts_the_least_recently_used_clean_table() {
        let cache = TableCache::new(2);
        load(&cache, 0, "a");
        load(&cache, 512, "b");
        assert_eq!(cache.get(0).as_deref(), Some(&"a"), "0 is now newest");
        load(&cache, 1024, "c");
        assert!(cache.get(512).is_none(), "512 was least recently used");
        assert!(cache.get(0).is_some() && cache.get(1024).is_some());
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.dirty), (2, 0));
        assert_eq!((stats.hits, stats.misses), (3, 4));
    }

    #[test]
    fn dirty_tables_stay_until_written_back() {
        let cache = TableCache::new(1);
        let a = Arc::new(1u32);
        cache.insert_dirty(0, Arc::clone(&a));
        load(&cache, 8, 2);
        assert!(cache.get(0).is_some(), "the dirty table survives eviction");
        assert!(cache.get(8).is_none(), "the clean one went instead");
        cache.insert_dirty(16, Arc::new(3));
        assert!(cache.over_capacity());
        let dirty = cache.dirty_tables();
        assert_eq!(
            dirty.iter().map(|(k, t)| (*k, **t)).collect::<Vec<_>>(),
            [(0, 1), (16, 3)]
        );
        // A table replaced after the write-back snapshot stays dirty.
        cache.insert_dirty(16, Arc::new(4));
        for (key, table) in &dirty {
            cache.mark_clean(*key, table);
        }
        assert_eq!(cache.stats().dirty, 1);
        assert_eq!(cache.get(16).as_deref(), Some(&4));
        assert!(cache.is_dirty());
        cache.remove(16);
        assert!(!cache.is_dirty());
        assert!(!cache.over_capacity());
    }

    #[test]
    fn errors_cache_nothing() {
        let cache: TableCache<Vec<u8>> = TableCache::new(4);
        let e = cache
            .get_or_load(8, || Err(Error::corrupt("bad table")))
            .unwrap_err();
        assert!(e.to_string().contains("bad table"));
        assert!(cache.get(8).is_none());
        let t = load(&cache, 8, vec![9]);
        assert_eq!(*t, vec![9]);
        let again = cache.get_or_load(8, || panic!("cached")).unwrap();
        assert!(Arc::ptr_eq(&t, &again));
    }

    #[test]
    fn of_two_loads_of_one_table_the_first_insert_wins() {
        let cache: TableCache<Vec<u8>> = TableCache::new(4);
        let pause = Pause::new();
        std::thread::scope(|scope| {
            let slow = scope.spawn(|| {
                pause.arm(PAUSE_LOADED);
                load(&cache, 0, vec![1])
            });
            pause.wait_parked();
            let first = load(&cache, 0, vec![2]);
            pause.release();
            let second = slow.join().unwrap();
            assert!(
                Arc::ptr_eq(&first, &second),
                "both use the copy cached first"
            );
        });
    }

    #[test]
    fn a_load_overlapping_a_modification_is_not_cached() {
        let cache: TableCache<Vec<u8>> = TableCache::new(4);
        let stale = cache
            .get_or_load(0, || {
                // Another thread modifies, writes back and evicts the table meanwhile.
                let newer = Arc::new(vec![2]);
                cache.insert_dirty(0, Arc::clone(&newer));
                cache.mark_clean(0, &newer);
                cache.remove(0);
                Ok(vec![1])
            })
            .unwrap();
        assert_eq!(*stale, vec![1], "the caller still gets what it read");
        assert!(cache.get(0).is_none(), "but the stale copy is not cached");
        let fresh = cache.get_or_load(0, || Ok(vec![2])).unwrap();
        assert!(Arc::ptr_eq(&fresh, &cache.get(0).unwrap()));
    }

    /// A table read from disk, then modified, written back and evicted by another thread
    /// before the first one caches its copy: that copy lacks the modification and must not be
    /// cached (it used to be, when the generation check and the insert were two critical
    /// sections and the thread stopped between them).
    #[test]
    fn a_load_racing_a_write_back_and_an_eviction_is_not_cached() {
        let cache: TableCache<Vec<u8>> = TableCache::new(1);
        let pause = Pause::new();
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                pause.arm(PAUSE_LOADED);
                load(&cache, 0, vec![1])
            });
            pause.wait_parked();
            // A writer loads the same table, changes it, writes it back; loading another
            // table evicts it (room for one).
            load(&cache, 0, vec![1]);
            let newer = Arc::new(vec![2]);
            cache.insert_dirty(0, Arc::clone(&newer));
            cache.mark_clean(0, &newer);
            load(&cache, 8, vec![8]);
            assert!(cache.get(0).is_none(), "evicted");
            pause.release();
            assert_eq!(
                *reader.join().unwrap(),
                vec![1],
                "the reader gets what it read"
            );
        });
        assert!(cache.get(0).is_none(), "but the copy is not cached");
        assert_eq!(*load(&cache, 0, vec![2]), vec![2]);
    }
}
