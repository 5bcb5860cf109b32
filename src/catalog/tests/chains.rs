//! Backing-file roles: decided from the tree, in whatever order names are looked up, and
//! released when the images above leave the tree.

use super::*;

/// A tree with `top.img` (in `sub/`) over `base.img`, as the daemon sees it after its scan.
fn chain_tree() -> (TempDir, Catalog, Counters) {
    let dir = TempDir::new();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("base.img"), "FAKEIMG 4096\nsnapshot s").unwrap();
    std::fs::write(
        dir.path().join("sub/top.img"),
        "FAKEIMG 4096\nbacking ../base.img",
    )
    .unwrap();
    let (catalog, counters) = catalog_of(dir.path(), false);
    assert_eq!(catalog.refresh(), 2);
    (dir, catalog, counters)
}

fn top(catalog: &Catalog) -> Arc<ImageFile> {
    let sub = Target::Dir("sub".into());
    match catalog.lookup(&sub, OsStr::new("top.img.raw")).unwrap() {
        Some(Entry {
            target: Target::Image(image),
            ..
        }) => image,
        _ => panic!("top.img.raw is served"),
    }
}

#[test]
fn a_backing_file_is_read_only_from_the_first_look_whatever_is_looked_at_first() {
    let (_dir, catalog, _) = chain_tree();
    // Its own raw file and its snapshots are looked at before the image above.
    let snaps = catalog
        .lookup(&root(), OsStr::new("base.img.snapshots"))
        .unwrap()
        .unwrap();
    catalog.list(&snaps.target).unwrap();
    let base = image(&catalog, "base.img.raw").unwrap();
    assert!(!catalog.attributes(&base).writable);
    let err = catalog.open(&base, true).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ReadOnly);
    assert!(
        err.to_string().contains("backing file of sub/top.img"),
        "{err}"
    );
    assert_eq!(ls(&catalog, "sub"), ["top.img.raw"]);
    assert!(catalog.attributes(&top(&catalog)).writable);
}

#[test]
fn a_backing_file_of_several_images_says_how_many_use_it() {
    let (dir, catalog, _) = chain_tree();
    for name in ["second.img", "third.img"] {
        std::fs::write(dir.path().join(name), "FAKEIMG 4096\nbacking base.img").unwrap();
    }
    assert_eq!(catalog.refresh(), 4);
    let base = image(&catalog, "base.img.raw").unwrap();
    let err = catalog.open(&base, true).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ReadOnly);
    assert!(err.to_string().contains(" and 2 other images"), "{err}");
    let reason = catalog.read_only_reason(&base).unwrap();
    assert!(reason.ends_with(" and 2 other images"), "{reason}");
}

#[test]
fn a_backing_file_is_shared_with_the_image_above() {
    let (_dir, catalog, counters) = chain_tree();
    let top_handle = catalog.open(&top(&catalog), true).unwrap();
    assert_eq!(counters.opens.load(Ordering::Relaxed), 2, "top and base");
    let base = image(&catalog, "base.img.raw").unwrap();
    let base_handle = catalog.open(&base, false).unwrap();
    assert_eq!(counters.opens.load(Ordering::Relaxed), 2, "base shared");
    assert_eq!(base_handle.served().users(), 1, "used by the image above");
    drop(top_handle);
    drop(base_handle);
    assert_eq!(catalog.close_idle(Duration::ZERO), 2);
    assert!(catalog.live_instances().is_empty());
}

#[test]
fn an_image_above_a_file_open_for_writing_waits_until_it_is_closed() {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("base.img"), "FAKEIMG 4096").unwrap();
    let (catalog, _) = catalog_of(dir.path(), false);
    let base = image(&catalog, "base.img.raw").unwrap();
    let writer = catalog.open(&base, true).unwrap();
    let reader = catalog.open(&base, false).unwrap();
    writer.image().write_at(b"data", 0).unwrap();

    std::fs::write(dir.path().join("top.img"), "FAKEIMG 4096\nbacking base.img").unwrap();
    assert_eq!(ls(&catalog, ""), ["base.img.raw"], "the new image waits");
    assert!(catalog.attributes(&base).writable);
    drop(writer);
    assert_eq!(ls(&catalog, ""), ["base.img.raw", "top.img.raw"]);
    assert!(!catalog.attributes(&base).writable, "a backing file now");

    // Opening the image above freezes the open instance instead of reopening the file: the
    // reader keeps it, reads go on, writes are refused.
    let top_handle = catalog
        .open(&image(&catalog, "top.img.raw").unwrap(), true)
        .unwrap();
    assert!(reader.served().is_frozen());
    let mut buf = [0u8; 4];
    reader.image().read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"data");
    assert_eq!(
        reader.image().write_at(b"x", 0).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    drop(top_handle);
}

/// `chain_tree` with `top.img` open and removed from the tree, and a reader of `base.img`:
/// (dir, catalog, base, top handle, base reader).
fn top_removed_while_open() -> (TempDir, Catalog, Arc<ImageFile>, ImageHandle, ImageHandle) {
    let (dir, catalog, _) = chain_tree();
    let base = image(&catalog, "base.img.raw").unwrap();
    let top_handle = catalog.open(&top(&catalog), false).unwrap();
    let base_reader = catalog.open(&base, false).unwrap();
    std::fs::remove_file(dir.path().join("sub/top.img")).unwrap();
    assert!(ls(&catalog, "sub").is_empty());
    (dir, catalog, base, top_handle, base_reader)
}

#[test]
fn a_backing_file_is_writable_again_once_the_images_above_are_gone() {
    let (_dir, catalog, base, top_handle, base_reader) = top_removed_while_open();
    // The removed image is still open: its backing file must not change under it.
    assert!(!catalog.attributes(&base).writable);
    assert_eq!(
        catalog.open(&base, true).unwrap_err().kind(),
        ErrorKind::Busy
    );
    drop(top_handle);
    drop(base_reader);
    // The removed image's idle instance is closed to let the backing file go.
    let writer = catalog.open(&base, true).unwrap();
    writer.image().write_at(b"now", 0).unwrap();
    assert!(catalog.attributes(&base).writable);
}

/// A reader of a backing file, still open when the file becomes writable again, reads what is
/// written through the new writable instance, not the old instance's view.
#[test]
fn a_reader_of_a_replaced_instance_sees_the_new_writes() {
    let (_dir, catalog, base, top_handle, base_reader) = top_removed_while_open();
    drop(top_handle);
    let writer = catalog.open(&base, true).unwrap();
    assert!(!Arc::ptr_eq(writer.served(), base_reader.served()));
    writer.image().write_at(b"now", 0).unwrap();
    let mut back = [0u8; 3];
    base_reader.image().read_at(&mut back, 0).unwrap();
    assert_eq!(&back, b"now");
    // The reader counts on the new instance, which is not closed while it reads.
    drop(writer);
    assert_eq!(catalog.close_idle(Duration::ZERO), 0);
    assert_eq!(base_reader.served().handles(), 1);
    drop(base_reader);
    assert_eq!(catalog.close_idle(Duration::ZERO), 1);
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
    let (catalog, _) = catalog_of(&sub, false);
    assert_eq!(ls(&catalog, ""), ["ok.img.raw"]);
}

#[test]
fn a_file_under_two_names_is_served_under_both_with_one_instance() {
    let dir = TempDir::new();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("a.img"), "FAKEIMG 4096").unwrap();
    std::fs::hard_link(dir.path().join("a.img"), dir.path().join("sub/b.img")).unwrap();
    let (catalog, counters) = catalog_of(dir.path(), false);
    let a = image(&catalog, "a.img.raw").unwrap();
    let b = match catalog
        .lookup(&Target::Dir("sub".into()), OsStr::new("b.img.raw"))
        .unwrap()
        .map(|e| e.target)
    {
        Some(Target::Image(b)) => b,
        _ => panic!("b.img.raw is served"),
    };
    let through_a = catalog.open(&a, true).unwrap();
    let through_b = catalog.open(&b, true).unwrap();
    assert!(Arc::ptr_eq(through_a.served(), through_b.served()));
    assert_eq!(counters.opens.load(Ordering::Relaxed), 1);
}

/// A source given as one image file: nothing else of its directory is listed or looked up,
/// and nothing below it is looked at; the image still opens over its backing file.
#[test]
fn a_catalog_of_one_image_serves_it_alone_over_its_backing_file() {
    let dir = TempDir::new();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub/other.img"), "FAKEIMG 4096").unwrap();
    std::fs::write(dir.path().join("base.img"), "FAKEIMG 4096\nsnapshot s").unwrap();
    std::fs::write(dir.path().join("else.img"), "FAKEIMG 4096").unwrap();
    std::fs::write(
        dir.path().join("top.img"),
        "FAKEIMG 4096\nbacking base.img\nsnapshot t",
    )
    .unwrap();
    let (catalog, counters) = catalog_of(dir.path(), false);
    let catalog = catalog.with_only(OsStr::new("top.img"));
    assert_eq!(catalog.refresh(), 1);
    assert_eq!(ls(&catalog, ""), ["top.img.raw", "top.img.snapshots"]);
    for hidden in [
        "base.img.raw",
        "else.img.raw",
        "base.img.snapshots",
        "sub",
        "top.img",
    ] {
        let found = catalog.lookup(&root(), OsStr::new(hidden)).unwrap();
        assert!(found.is_none(), "{hidden}");
    }
    assert!(ls(&catalog, "sub").is_empty());
    let top = image(&catalog, "top.img.raw").unwrap();
    assert!(catalog.attributes(&top).writable);
    let handle = catalog.open(&top, true).unwrap();
    assert!(handle.is_writable());

    // New files below the directory are never looked at; new files beside the image are.
    let probes = counters.probes.load(Ordering::Relaxed);
    for i in 0..10 {
        std::fs::write(dir.path().join(format!("sub/new{i}.img")), "FAKEIMG 4096").unwrap();
    }
    assert_eq!(catalog.refresh(), 1);
    assert_eq!(counters.probes.load(Ordering::Relaxed), probes);
    std::fs::write(dir.path().join("beside.img"), "FAKEIMG 4096").unwrap();
    assert_eq!(catalog.refresh(), 1);
    assert_eq!(counters.probes.load(Ordering::Relaxed), probes + 1);
}

/// The one image served may be the backing file of an image beside it, which writing it would
/// change: it is read-only, as in a tree.
#[test]
fn a_catalog_of_one_backing_file_serves_it_read_only() {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("base.img"), "FAKEIMG 4096").unwrap();
    std::fs::write(dir.path().join("top.img"), "FAKEIMG 4096\nbacking base.img").unwrap();
    let (catalog, _) = catalog_of(dir.path(), false);
    let catalog = catalog.with_only(OsStr::new("base.img"));
    assert_eq!(catalog.refresh(), 1);
    assert_eq!(ls(&catalog, ""), ["base.img.raw"]);
    let base = image(&catalog, "base.img.raw").unwrap();
    let err = catalog.open(&base, true).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ReadOnly);
    assert!(err.to_string().contains("backing file of top.img"), "{err}");
}

/// The file a single image is mounted on may lie beside it: it is never read (its reads would
/// be requests to the daemon itself), so even an image there naming the one served as its
/// backing file neither is probed nor makes it read-only.
#[test]
fn a_catalog_never_looks_at_the_file_it_is_mounted_on() {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("base.img"), "FAKEIMG 4096").unwrap();
    std::fs::write(dir.path().join("mnt.img"), "FAKEIMG 4096\nbacking base.img").unwrap();
    let (catalog, counters) = catalog_of(dir.path(), false);
    let catalog = catalog
        .with_only(OsStr::new("base.img"))
        .without(OsStr::new("mnt.img"));
    assert_eq!(catalog.refresh(), 1);
    assert_eq!(counters.probes.load(Ordering::Relaxed), 1);
    let base = image(&catalog, "base.img.raw").unwrap();
    assert!(catalog.open(&base, true).unwrap().is_writable());
    for name in ["mnt.img", "mnt.img.raw"] {
        assert!(catalog.lookup(&root(), OsStr::new(name)).unwrap().is_none());
    }
    assert_eq!(counters.probes.load(Ordering::Relaxed), 1);
}
