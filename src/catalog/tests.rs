//! Catalog tests on a temporary source tree with fake images.

use super::*;
use crate::testutil::{FakeOpener, TempDir};
use std::sync::atomic::Ordering;

fn names(entries: &[Entry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e.name.to_string_lossy().into_owned())
        .collect()
}

fn tree() -> (TempDir, Catalog, Arc<std::sync::atomic::AtomicU64>) {
    let dir = TempDir::new();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("disk.img"), "FAKEIMG 8192").unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
    std::fs::write(dir.path().join("sub/other.vdi"), "FAKEIMG 4096").unwrap();
    std::fs::write(dir.path().join("broken.vdi"), "BADIMG").unwrap();
    let opener = FakeOpener::default();
    let opens = opener.opens.clone();
    let catalog = Catalog::new(dir.path(), Box::new(opener)).unwrap();
    (dir, catalog, opens)
}

#[test]
fn mirrors_directories_and_shows_only_images_with_raw_suffix() {
    let (_dir, catalog, _) = tree();
    assert_eq!(
        names(&catalog.list(Path::new("")).unwrap()),
        ["disk.img.raw", "sub"]
    );
    assert_eq!(
        names(&catalog.list(Path::new("sub")).unwrap()),
        ["other.vdi.raw"]
    );
    assert_eq!(catalog.scan(), 2);
}

#[test]
fn lookup_maps_raw_names_back_to_images() {
    let (_dir, catalog, _) = tree();
    let entry = catalog
        .lookup(Path::new(""), OsStr::new("disk.img.raw"))
        .unwrap()
        .unwrap();
    assert!(entry.source.ends_with("disk.img"));
    match entry.kind {
        EntryKind::Image(image) => assert_eq!(image.size(), 8192),
        EntryKind::Dir => panic!("expected an image"),
    }
    assert!(catalog
        .lookup(Path::new(""), OsStr::new("disk.img"))
        .unwrap()
        .is_none());
    assert!(catalog
        .lookup(Path::new(""), OsStr::new("notes.txt.raw"))
        .unwrap()
        .is_none());
    assert!(catalog
        .lookup(Path::new(""), OsStr::new("broken.vdi.raw"))
        .unwrap()
        .is_none());
    assert!(matches!(
        catalog
            .lookup(Path::new(""), OsStr::new("sub"))
            .unwrap()
            .unwrap()
            .kind,
        EntryKind::Dir
    ));
}

#[test]
fn images_are_opened_once_and_follow_changes_of_the_tree() {
    let (dir, catalog, opens) = tree();
    catalog.list(Path::new("")).unwrap();
    catalog.list(Path::new("")).unwrap();
    catalog
        .lookup(Path::new(""), OsStr::new("disk.img.raw"))
        .unwrap();
    assert_eq!(opens.load(Ordering::Relaxed), 1);

    std::fs::write(dir.path().join("new.qcow2"), "FAKEIMG 512").unwrap();
    std::fs::remove_file(dir.path().join("disk.img")).unwrap();
    assert_eq!(
        names(&catalog.list(Path::new("")).unwrap()),
        ["new.qcow2.raw", "sub"]
    );
    assert_eq!(
        catalog.open_images().len(),
        1,
        "the removed image is forgotten"
    );
}

#[test]
fn paths_leaving_the_tree_are_refused() {
    let (_dir, catalog, _) = tree();
    assert!(catalog.list(Path::new("..")).is_err());
    assert!(catalog.list(Path::new("/etc")).is_err());
    assert!(catalog
        .lookup(Path::new(""), OsStr::new(".."))
        .unwrap()
        .is_none());
}

#[test]
fn symlinks_are_not_followed() {
    let (dir, catalog, _) = tree();
    std::os::unix::fs::symlink(dir.path().join("disk.img"), dir.path().join("link.img")).unwrap();
    assert_eq!(
        names(&catalog.list(Path::new("")).unwrap()),
        ["disk.img.raw", "sub"]
    );
}

/// A tree with `top.img` over `base.img` (which is an image of its own).
fn chain_tree() -> (TempDir, Catalog) {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("base.img"), "FAKEIMG 4096").unwrap();
    std::fs::write(dir.path().join("top.img"), "FAKEIMG 4096\nbacking base.img").unwrap();
    let catalog = Catalog::new(dir.path(), Box::new(FakeOpener::default())).unwrap();
    (dir, catalog)
}

fn image_named(catalog: &Catalog, name: &str) -> Option<Arc<dyn Image>> {
    match catalog
        .lookup(Path::new(""), OsStr::new(name))
        .unwrap()?
        .kind
    {
        EntryKind::Image(image) => Some(image),
        EntryKind::Dir => None,
    }
}

#[test]
fn a_backing_file_is_served_read_only_and_shared_with_the_image_above() {
    let (_dir, catalog) = chain_tree();
    assert!(image_named(&catalog, "top.img.raw").is_some());
    let base = image_named(&catalog, "base.img.raw").unwrap();
    assert_eq!(
        base.read_only_reason().as_deref(),
        Some("test backing file")
    );
    assert_eq!(
        names(&catalog.list(Path::new("")).unwrap()),
        ["base.img.raw", "top.img.raw"]
    );
}

#[test]
fn an_image_served_writable_becomes_read_only_once_it_is_a_backing_file() {
    let (_dir, catalog) = chain_tree();
    let base = image_named(&catalog, "base.img.raw").unwrap();
    assert_eq!(base.read_only_reason(), None);
    // While someone has the writable instance, the image above must wait (busy, retried).
    assert!(image_named(&catalog, "top.img.raw").is_none());
    drop(base);
    assert!(image_named(&catalog, "top.img.raw").is_some());
    let base = image_named(&catalog, "base.img.raw").unwrap();
    assert!(base.read_only_reason().is_some());
}

#[test]
fn a_backing_file_outside_the_tree_keeps_only_that_image_out() {
    let dir = TempDir::new();
    let outside = TempDir::new();
    std::fs::write(outside.path().join("base.img"), "FAKEIMG 4096").unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("ok.img"), "FAKEIMG 4096").unwrap();
    let escape = format!(
        "FAKEIMG 4096\nbacking {}",
        outside.path().join("base.img").display()
    );
    std::fs::write(sub.join("escape.img"), escape).unwrap();
    std::fs::write(sub.join("dotdot.img"), "FAKEIMG 4096\nbacking ../../x.img").unwrap();
    let catalog = Catalog::new(&sub, Box::new(FakeOpener::default())).unwrap();
    assert_eq!(names(&catalog.list(Path::new("")).unwrap()), ["ok.img.raw"]);
}

#[test]
fn internal_snapshots_appear_read_only_in_a_snapshots_directory() {
    let dir = TempDir::new();
    std::fs::write(
        dir.path().join("d.img"),
        "FAKEIMG 4096\nsnapshot one\nsnapshot two",
    )
    .unwrap();
    std::fs::write(dir.path().join("plain.img"), "FAKEIMG 4096").unwrap();
    let catalog = Catalog::new(dir.path(), Box::new(FakeOpener::default())).unwrap();
    assert_eq!(
        names(&catalog.list(Path::new("")).unwrap()),
        ["d.img.raw", "d.img.snapshots", "plain.img.raw"]
    );
    let snaps = Path::new("d.img.snapshots");
    assert_eq!(names(&catalog.list(snaps).unwrap()), ["one.raw", "two.raw"]);
    let entry = catalog
        .lookup(snaps, OsStr::new("two.raw"))
        .unwrap()
        .unwrap();
    let EntryKind::Image(two) = entry.kind else {
        panic!("a snapshot is an image");
    };
    let mut byte = [0u8; 1];
    two.read_at(&mut byte, 100).unwrap();
    assert_eq!(byte, [2]);
    assert!(two.read_only_reason().is_some());
    // The same instance on every lookup while the image stays the same.
    let again = catalog
        .lookup(snaps, OsStr::new("two.raw"))
        .unwrap()
        .unwrap();
    let EntryKind::Image(again) = again.kind else {
        panic!("a snapshot is an image");
    };
    assert!(Arc::ptr_eq(&two, &again));
    assert!(catalog
        .lookup(snaps, OsStr::new("three.raw"))
        .unwrap()
        .is_none());
    assert!(catalog
        .lookup(Path::new(""), OsStr::new("plain.img.snapshots"))
        .unwrap()
        .is_none());
    let dir_entry = catalog
        .lookup(Path::new(""), OsStr::new("d.img.snapshots"))
        .unwrap();
    assert!(matches!(dir_entry.map(|e| e.kind), Some(EntryKind::Dir)));
    // Files in it show the image file's metadata.
    let image_meta = std::fs::metadata(dir.path().join("d.img")).unwrap();
    let meta = catalog.metadata(&snaps.join("one")).unwrap();
    assert_eq!(meta.ino(), image_meta.ino());
    assert_eq!(catalog.metadata(snaps).unwrap().ino(), image_meta.ino());
}

#[test]
fn a_real_directory_wins_over_a_snapshots_directory_of_the_same_name() {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("d.img"), "FAKEIMG 4096\nsnapshot one").unwrap();
    std::fs::create_dir(dir.path().join("d.img.snapshots")).unwrap();
    let catalog = Catalog::new(dir.path(), Box::new(FakeOpener::default())).unwrap();
    assert_eq!(
        names(&catalog.list(Path::new("")).unwrap()),
        ["d.img.raw", "d.img.snapshots"]
    );
    assert!(catalog
        .list(Path::new("d.img.snapshots"))
        .unwrap()
        .is_empty());
}
