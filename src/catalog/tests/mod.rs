//! Catalog tests on a temporary source tree with fake images (`testutil::FakeOpener`).

mod chains;
mod changes;

use super::*;
use crate::testutil::{FakeOpener, TempDir};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub(super) fn root() -> Target {
    Target::Dir(PathBuf::new())
}

pub(super) fn names(entries: &[Entry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e.name.to_string_lossy().into_owned())
        .collect()
}

pub(super) fn ls(catalog: &Catalog, dir: &str) -> Vec<String> {
    names(&catalog.list(&Target::Dir(dir.into())).unwrap())
}

/// The image version `name` (a raw name) of the root directory.
pub(super) fn image(catalog: &Catalog, name: &str) -> Option<Arc<ImageFile>> {
    match catalog.lookup(&root(), OsStr::new(name)).unwrap()?.target {
        Target::Image(image) => Some(image),
        _ => None,
    }
}

/// Counters of a fake opener handed to a catalog.
pub(super) struct Counters {
    pub opens: Arc<AtomicU64>,
    pub probes: Arc<AtomicU64>,
    pub transient_failures: Arc<AtomicU64>,
}

pub(super) fn catalog_of(dir: &Path, read_only: bool) -> (Catalog, Counters) {
    let opener = FakeOpener::default();
    let counters = Counters {
        opens: opener.opens.clone(),
        probes: opener.probes.clone(),
        transient_failures: opener.transient_failures.clone(),
    };
    (
        Catalog::new(dir, Box::new(opener), read_only).unwrap(),
        counters,
    )
}

fn tree() -> (TempDir, Catalog, Counters) {
    let dir = TempDir::new();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("disk.img"), "FAKEIMG 8192").unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
    std::fs::write(dir.path().join("sub/other.vdi"), "FAKEIMG 4096").unwrap();
    std::fs::write(dir.path().join("broken.vdi"), "BADIMG").unwrap();
    let (catalog, counters) = catalog_of(dir.path(), false);
    (dir, catalog, counters)
}

#[test]
fn mirrors_directories_and_shows_only_images_with_raw_suffix() {
    let (_dir, catalog, _) = tree();
    assert_eq!(ls(&catalog, ""), ["disk.img.raw", "sub"]);
    assert_eq!(ls(&catalog, "sub"), ["other.vdi.raw"]);
    assert_eq!(catalog.refresh(), 2);
}

#[test]
fn lookup_maps_raw_names_back_to_images() {
    let (_dir, catalog, _) = tree();
    let disk = image(&catalog, "disk.img.raw").unwrap();
    assert!(disk.source.ends_with("disk.img"));
    assert_eq!(disk.summary.size, 8192);
    for hidden in [
        "disk.img",
        "notes.txt.raw",
        "broken.vdi.raw",
        ".raw",
        "nope.raw",
    ] {
        assert!(image(&catalog, hidden).is_none(), "{hidden}");
    }
    let sub = catalog.lookup(&root(), OsStr::new("sub")).unwrap().unwrap();
    assert!(matches!(sub.target, Target::Dir(ref rel) if rel == Path::new("sub")));
}

#[test]
fn files_are_looked_at_once_per_version_and_opened_only_for_handles() {
    let (dir, catalog, counters) = tree();
    ls(&catalog, "");
    let probes = counters.probes.load(Ordering::Relaxed);
    ls(&catalog, "");
    image(&catalog, "disk.img.raw").unwrap();
    assert_eq!(
        counters.probes.load(Ordering::Relaxed),
        probes,
        "no second look"
    );
    assert_eq!(
        counters.opens.load(Ordering::Relaxed),
        0,
        "listing opens nothing"
    );

    let disk = image(&catalog, "disk.img.raw").unwrap();
    let handle = catalog.open(&disk, false).unwrap();
    let again = catalog.open(&disk, true).unwrap();
    assert!(Arc::ptr_eq(handle.served(), again.served()), "one instance");
    assert_eq!(counters.opens.load(Ordering::Relaxed), 1);

    std::fs::write(dir.path().join("new.qcow2"), "FAKEIMG 512").unwrap();
    std::fs::remove_file(dir.path().join("disk.img")).unwrap();
    assert_eq!(ls(&catalog, ""), ["new.qcow2.raw", "sub"]);
    assert!(disk.has_ended(), "the removed image's version ended");
    // Open handles keep working on the removed file's instance.
    handle.image().read_at(&mut [0u8; 4], 0).unwrap();
}

#[test]
fn listing_a_large_directory_looks_at_each_file_once() {
    let dir = TempDir::new();
    for i in 0..3000 {
        std::fs::write(dir.path().join(format!("f{i:05}")), "not an image").unwrap();
    }
    std::fs::write(dir.path().join("z.img"), "FAKEIMG 512").unwrap();
    let (catalog, counters) = catalog_of(dir.path(), false);
    assert_eq!(ls(&catalog, ""), ["z.img.raw"]);
    assert_eq!(counters.probes.load(Ordering::Relaxed), 3001);
    assert_eq!(ls(&catalog, ""), ["z.img.raw"]);
    assert_eq!(counters.probes.load(Ordering::Relaxed), 3001);
}

#[test]
fn paths_leaving_the_tree_are_refused() {
    let (_dir, catalog, _) = tree();
    assert!(catalog.list(&Target::Dir("..".into())).is_err());
    assert!(catalog.list(&Target::Dir("/etc".into())).is_err());
    assert!(catalog.lookup(&root(), OsStr::new("..")).unwrap().is_none());
    assert!(catalog
        .lookup(&root(), OsStr::new("sub/other.vdi.raw"))
        .unwrap()
        .is_none());
}

#[test]
fn symlinks_are_not_followed() {
    let (dir, catalog, _) = tree();
    std::os::unix::fs::symlink(dir.path().join("disk.img"), dir.path().join("link.img")).unwrap();
    assert_eq!(ls(&catalog, ""), ["disk.img.raw", "sub"]);
    assert!(image(&catalog, "link.img.raw").is_none());
}

#[test]
fn names_too_long_for_the_suffix_are_left_out() {
    let dir = TempDir::new();
    let longest = "a".repeat(NAME_MAX - RAW_SUFFIX.len());
    let too_long = "b".repeat(NAME_MAX - RAW_SUFFIX.len() + 1);
    std::fs::write(dir.path().join(&longest), "FAKEIMG 512").unwrap();
    std::fs::write(dir.path().join(&too_long), "FAKEIMG 512").unwrap();
    let (catalog, _) = catalog_of(dir.path(), false);
    assert_eq!(ls(&catalog, ""), [format!("{longest}.raw")]);
}

#[test]
fn internal_snapshots_appear_read_only_in_a_snapshots_directory() {
    let dir = TempDir::new();
    std::fs::write(
        dir.path().join("d.img"),
        "FAKEIMG 4096\nsnapshot one\nsnapshot old.snapshots",
    )
    .unwrap();
    std::fs::write(dir.path().join("plain.img"), "FAKEIMG 4096").unwrap();
    let (catalog, counters) = catalog_of(dir.path(), false);
    assert_eq!(
        ls(&catalog, ""),
        ["d.img.raw", "d.img.snapshots", "plain.img.raw"]
    );
    let snaps = catalog
        .lookup(&root(), OsStr::new("d.img.snapshots"))
        .unwrap()
        .unwrap()
        .target;
    assert!(matches!(snaps, Target::SnapshotsDir(_)));
    assert_eq!(
        names(&catalog.list(&snaps).unwrap()),
        ["old.snapshots.raw", "one.raw"]
    );
    assert_eq!(
        counters.opens.load(Ordering::Relaxed),
        0,
        "listing opens nothing"
    );
    // A snapshot whose own name ends like a snapshots directory is an ordinary snapshot.
    let entry = catalog
        .lookup(&snaps, OsStr::new("old.snapshots.raw"))
        .unwrap()
        .unwrap();
    let Target::Snapshot(image, name) = entry.target else {
        panic!("a snapshot");
    };
    let handle = catalog.open_snapshot(&image, &name).unwrap();
    let mut byte = [0u8; 1];
    handle.image().read_at(&mut byte, 100).unwrap();
    assert_eq!(byte, [2]);
    assert!(handle.image().read_only_reason().is_some());
    assert!(!handle.is_writable());
    let again = catalog.open_snapshot(&image, &name).unwrap();
    assert!(Arc::ptr_eq(handle.served(), again.served()));
    assert!(catalog
        .lookup(&snaps, OsStr::new("three.raw"))
        .unwrap()
        .is_none());
    assert!(catalog
        .lookup(&root(), OsStr::new("plain.img.snapshots"))
        .unwrap()
        .is_none());
}

#[test]
fn a_real_directory_wins_over_a_snapshots_directory_of_the_same_name() {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("d.img"), "FAKEIMG 4096\nsnapshot one").unwrap();
    std::fs::create_dir(dir.path().join("d.img.snapshots")).unwrap();
    let (catalog, _) = catalog_of(dir.path(), false);
    assert_eq!(ls(&catalog, ""), ["d.img.raw", "d.img.snapshots"]);
    assert!(ls(&catalog, "d.img.snapshots").is_empty());
}
