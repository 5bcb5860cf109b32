//! The open instances of images that the catalog serves, and the handles on them.
//!
//! A `Served` wraps one driver instance. It counts who uses it (open handles, writable ones,
//! images above it that read through it) so the catalog can decide from real use, not from
//! reference counts, when an instance may become read-only, be closed, or be replaced. It can be
//! frozen (no more writes: it became a backing file) or retired (its file was overwritten in
//! place: every request fails, and nothing it holds in memory is ever written back). A
//! read-only instance replaced by a writable one while handles still read through it forwards
//! their reads to its successor, so they see what is written through the new one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::record::FileId;
use crate::error::{Error, ErrorKind, Result};
use crate::image::{Extent, Image, ImageInfo};

const OPEN: u8 = 0;
const FROZEN: u8 = 1;
const RETIRED: u8 = 2;

/// One open instance of an image file.
pub struct Served {
    image: Arc<dyn Image>,
    id: FileId,
    source: PathBuf,
    mode: AtomicU8,
    /// Why it is frozen or retired.
    reason: Mutex<String>,
    handles: AtomicUsize,
    writers: AtomicUsize,
    /// Instances of images above this one that read through it.
    users: AtomicUsize,
    last_used: Mutex<Instant>,
    /// Internal snapshots opened so far, kept as long as the instance.
    snapshots: Mutex<HashMap<String, Arc<dyn Image>>>,
    /// Whether it took writes when it was opened (one that refuses them later was stopped
    /// by a failure).
    opened_writable: bool,
    /// The instance that took this one's place; its handles count there too, so that it is
    /// not closed while they read through it.
    successor: Mutex<Option<Arc<Served>>>,
    /// Moves on after every write, discard or resize, and when the instance is retired or
    /// replaced, so data read before can be known to be stale (`generation`).
    changes: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Served {
    pub fn new(image: Arc<dyn Image>, id: FileId, source: &Path) -> Self {
        Served {
            opened_writable: image.read_only_reason().is_none(),
            image,
            id,
            source: source.to_path_buf(),
            mode: AtomicU8::new(OPEN),
            reason: Mutex::new(String::new()),
            handles: AtomicUsize::new(0),
            writers: AtomicUsize::new(0),
            users: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
            snapshots: Mutex::new(HashMap::new()),
            successor: Mutex::new(None),
            changes: AtomicU64::new(0),
        }
    }

    /// A number that changes whenever what a read through this instance returns may have
    /// changed: after a write, discard or resize through it or through its successor, and when
    /// it is retired or replaced. Data read while it had one value is current as long as it
    /// keeps that value (a change in flight moves it once it is done).
    pub fn generation(&self) -> u64 {
        let own = self.changes.load(Ordering::Acquire);
        match self.successor() {
            Some(next) => own.wrapping_add(next.generation()),
            None => own,
        }
    }

    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    /// `next` takes this instance's place: reads of the handles still on this one go there
    /// from now on, and count as its handles until they close.
    pub fn succeed_by(&self, next: &Arc<Served>) {
        let mut successor = lock(&self.successor);
        next.handles.fetch_add(self.handles(), Ordering::AcqRel);
        *successor = Some(Arc::clone(next));
        self.changed();
    }

    fn successor(&self) -> Option<Arc<Served>> {
        lock(&self.successor).clone()
    }

    /// One handle on this instance (or forwarded to it) closed.
    fn release_handle(&self) {
        let successor = lock(&self.successor);
        self.handles.fetch_sub(1, Ordering::AcqRel);
        if let Some(next) = successor.as_ref() {
            next.release_handle();
        }
    }

    pub fn id(&self) -> FileId {
        self.id
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Whether a write may go through this instance now.
    pub fn accepts_writes(&self) -> bool {
        self.mode.load(Ordering::Acquire) == OPEN && self.image.read_only_reason().is_none()
    }

    /// Whether it was opened writable and a failure (a failed write-back) stopped its writes
    /// since: its tables in memory may be ahead of the file.
    pub fn stopped_writing(&self) -> bool {
        self.opened_writable
            && self.mode.load(Ordering::Acquire) == OPEN
            && self.image.read_only_reason().is_some()
    }

    pub fn is_frozen(&self) -> bool {
        self.mode.load(Ordering::Acquire) == FROZEN
    }

    pub fn is_retired(&self) -> bool {
        self.mode.load(Ordering::Acquire) == RETIRED
    }

    pub fn handles(&self) -> usize {
        self.handles.load(Ordering::Acquire)
    }

    pub fn writers(&self) -> usize {
        self.writers.load(Ordering::Acquire)
    }

    pub fn users(&self) -> usize {
        self.users.load(Ordering::Acquire)
    }

    /// Nobody uses it: it may be closed or replaced.
    pub fn is_unused(&self) -> bool {
        self.handles() == 0 && self.users() == 0
    }

    pub fn idle_for(&self) -> Duration {
        lock(&self.last_used).elapsed()
    }

    /// Refuses writes from now on; reads and write-back of what was written go on.
    pub fn freeze(&self, reason: String) {
        *lock(&self.reason) = reason;
        self.mode.store(FROZEN, Ordering::Release);
    }

    /// Takes writes again (it stopped being a backing file and nothing reads through it).
    pub fn thaw(&self) {
        let _ = self
            .mode
            .compare_exchange(FROZEN, OPEN, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Refuses every request from now on and never writes back again.
    pub fn retire(&self, reason: String) {
        *lock(&self.reason) = reason;
        self.mode.store(RETIRED, Ordering::Release);
        self.changed();
    }

    fn refused(&self) -> Option<Error> {
        match self.mode.load(Ordering::Acquire) {
            OPEN => None,
            FROZEN => Some(Error::read_only(lock(&self.reason).clone())),
            _ => Some(self.stale()),
        }
    }

    fn stale(&self) -> Error {
        Error::new(ErrorKind::Stale, lock(&self.reason).clone()).with_path(&self.source)
    }

    fn check_live(&self) -> Result<()> {
        match self.is_retired() {
            true => Err(self.stale()),
            false => Ok(()),
        }
    }

    /// A handle on this instance; `writable` ones count as writers.
    pub fn handle(self: &Arc<Self>, writable: bool, view: Option<Arc<dyn Image>>) -> ImageHandle {
        self.handles.fetch_add(1, Ordering::AcqRel);
        if writable {
            self.writers.fetch_add(1, Ordering::AcqRel);
        }
        ImageHandle {
            served: Arc::clone(self),
            view,
            writable,
        }
    }

    /// The internal snapshot `name`, opened once per instance.
    pub fn snapshot_view(&self, name: &str) -> Result<Arc<dyn Image>> {
        self.check_live()?;
        let mut snapshots = lock(&self.snapshots);
        if let Some(view) = snapshots.get(name) {
            return Ok(Arc::clone(view));
        }
        let view = self.image.snapshot(name)?;
        snapshots.insert(name.to_string(), Arc::clone(&view));
        Ok(view)
    }

    fn touch(&self) {
        *lock(&self.last_used) = Instant::now();
    }
}

impl Image for Served {
    fn size(&self) -> u64 {
        match self.successor() {
            Some(next) => next.size(),
            None => self.image.size(),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if let Some(next) = self.successor() {
            return next.read_at(buf, offset);
        }
        self.check_live()?;
        self.image.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if let Some(e) = self.refused() {
            return Err(e);
        }
        let written = self.image.write_at(buf, offset);
        self.changed();
        written
    }

    fn flush(&self) -> Result<()> {
        self.check_live()?;
        self.image.flush()?;
        match self.successor() {
            Some(next) => next.flush(),
            None => Ok(()),
        }
    }

    fn is_dirty(&self) -> bool {
        !self.is_retired() && self.image.is_dirty()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        if let Some(next) = self.successor() {
            return next.block_status(offset, len);
        }
        self.check_live()?;
        self.image.block_status(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if let Some(e) = self.refused() {
            return Err(e);
        }
        let discarded = self.image.discard(offset, len);
        self.changed();
        discarded
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        if let Some(e) = self.refused() {
            return Err(e);
        }
        let resized = self.image.resize(new_size);
        self.changed();
        resized
    }

    fn snapshot_names(&self) -> Vec<String> {
        self.image.snapshot_names()
    }

    fn raw_file(&self) -> Option<Arc<crate::host::HostFile>> {
        if self.successor().is_some() || self.check_live().is_err() {
            return None;
        }
        self.image.raw_file()
    }

    fn snapshot(&self, name: &str) -> Result<Arc<dyn Image>> {
        self.snapshot_view(name)
    }

    fn allocated_bytes(&self) -> u64 {
        match self.successor() {
            Some(next) => next.allocated_bytes(),
            None => self.image.allocated_bytes(),
        }
    }

    fn read_only_reason(&self) -> Option<String> {
        match self.mode.load(Ordering::Acquire) {
            OPEN => self.image.read_only_reason(),
            _ => Some(lock(&self.reason).clone()),
        }
    }

    fn info(&self) -> ImageInfo {
        ImageInfo {
            read_only_reason: self.read_only_reason(),
            ..self.image.info()
        }
    }
}

/// An open handle on an image (or on one of its snapshots) through the mount.
pub struct ImageHandle {
    served: Arc<Served>,
    view: Option<Arc<dyn Image>>,
    writable: bool,
}

impl ImageHandle {
    /// What reads and writes go to: the snapshot for a snapshot handle, else the image.
    pub fn image(&self) -> &dyn Image {
        match &self.view {
            Some(view) => view.as_ref(),
            None => self.served.as_ref(),
        }
    }

    pub fn served(&self) -> &Arc<Served> {
        &self.served
    }

    /// `image()` as a reference of its own, for work that may outlive the borrow.
    pub fn shared_image(&self) -> Arc<dyn Image> {
        match &self.view {
            Some(view) => Arc::clone(view),
            None => Arc::clone(&self.served) as Arc<dyn Image>,
        }
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }
}

impl std::fmt::Debug for ImageHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageHandle")
            .field("source", &self.served.source)
            .field("writable", &self.writable)
            .field("snapshot", &self.view.is_some())
            .finish()
    }
}

impl Drop for ImageHandle {
    fn drop(&mut self) {
        self.served.touch();
        if self.writable {
            self.served.writers.fetch_sub(1, Ordering::AcqRel);
        }
        self.served.release_handle();
    }
}

/// A served instance in use as the backing file of another instance: counted as a user for as
/// long as the image above keeps it.
pub struct BackingUse(Arc<Served>);

impl BackingUse {
    pub fn new(served: Arc<Served>) -> Self {
        served.users.fetch_add(1, Ordering::AcqRel);
        BackingUse(served)
    }
}

impl Drop for BackingUse {
    fn drop(&mut self) {
        self.0.touch();
        self.0.users.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Image for BackingUse {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.0.read_at(buf, offset)
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Error::read_only(
            "a backing file is never written through the image above",
        ))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn is_dirty(&self) -> bool {
        false
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.0.block_status(offset, len)
    }

    fn allocated_bytes(&self) -> u64 {
        self.0.allocated_bytes()
    }

    fn read_only_reason(&self) -> Option<String> {
        Some("a backing file".into())
    }

    fn info(&self) -> ImageInfo {
        self.0.info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::MemImage;

    fn served() -> Arc<Served> {
        let image: Arc<dyn Image> = Arc::new(MemImage::new(8192, None));
        Arc::new(Served::new(image, (1, 2), Path::new("/src/x.img")))
    }

    #[test]
    fn handles_and_users_are_counted_until_dropped() {
        let s = served();
        let reader = s.handle(false, None);
        let writer = s.handle(true, None);
        assert_eq!((s.handles(), s.writers()), (2, 1));
        let backing = BackingUse::new(Arc::clone(&s));
        assert!(!s.is_unused());
        drop((reader, writer, backing));
        assert_eq!((s.handles(), s.writers(), s.users()), (0, 0, 0));
        assert!(s.is_unused());
    }

    #[test]
    fn frozen_instances_refuse_writes_and_retired_ones_everything() {
        let s = served();
        s.write_at(b"abc", 0).unwrap();
        s.freeze("it is the backing file of top.qcow2".into());
        assert_eq!(s.write_at(b"x", 0).unwrap_err().kind(), ErrorKind::ReadOnly);
        assert!(!s.accepts_writes());
        let mut buf = [0u8; 3];
        s.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"abc");
        s.flush().unwrap();
        s.thaw();
        assert!(s.accepts_writes());
        s.retire("the image file was overwritten".into());
        assert_eq!(s.read_at(&mut buf, 0).unwrap_err().kind(), ErrorKind::Stale);
        assert_eq!(s.flush().unwrap_err().kind(), ErrorKind::Stale);
        assert!(!s.is_dirty());
        s.thaw();
        assert!(s.is_retired(), "a retired instance never comes back");
    }

    #[test]
    fn the_generation_moves_on_with_every_change_and_with_the_successor() {
        let s = served();
        let mut seen = vec![s.generation()];
        let mut moved = |g: u64| {
            assert!(!seen.contains(&g), "generation {g} seen before");
            seen.push(g);
        };
        let mut buf = [0u8; 8];
        s.read_at(&mut buf, 0).unwrap();
        s.flush().unwrap();
        assert_eq!(s.generation(), 0, "reads and flushes change nothing");
        s.write_at(b"abc", 0).unwrap();
        moved(s.generation());
        let _ = s.discard(0, 4096);
        moved(s.generation());
        let _ = s.resize(4096);
        moved(s.generation());
        let next = served();
        s.succeed_by(&next);
        moved(s.generation());
        next.write_at(b"x", 0).unwrap();
        moved(s.generation());
        s.retire("the image file was overwritten".into());
        moved(s.generation());
    }
}
