//! Files that change under the catalog: replaced, overwritten in place, refused for a while,
//! removed while open; and instances closed when nobody uses them.

use super::*;
use std::os::unix::fs::PermissionsExt;

#[test]
fn a_file_overwritten_in_place_is_a_new_version_and_its_instance_is_retired() {
    let dir = TempDir::new();
    let path = dir.path().join("disk.img");
    std::fs::write(&path, "FAKEIMG 4096").unwrap();
    let (catalog, _) = catalog_of(dir.path(), false);
    let old = image(&catalog, "disk.img.raw").unwrap();
    let handle = catalog.open(&old, true).unwrap();
    handle.image().write_at(b"old", 0).unwrap();

    // `cp bigger.img disk.img`: same inode, new content.
    std::fs::write(&path, "FAKEIMG 65536").unwrap();
    let new = image(&catalog, "disk.img.raw").unwrap();
    assert_eq!(new.summary.size, 65536);
    assert_ne!(new.version, old.version);
    assert!(old.has_ended());
    // Nothing the old instance holds may reach the new content.
    let e = handle.image().write_at(b"x", 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Stale);
    assert_eq!(handle.image().flush().unwrap_err().kind(), ErrorKind::Stale);
    assert_eq!(
        catalog.open(&old, false).unwrap_err().kind(),
        ErrorKind::Stale
    );
    // The new content is served at once, beside the retired instance.
    let fresh = catalog.open(&new, true).unwrap();
    assert!(!Arc::ptr_eq(fresh.served(), handle.served()));
    assert_eq!(fresh.image().size(), 65536);
}

#[test]
fn a_file_replaced_by_rename_keeps_its_handles_on_the_old_file() {
    let dir = TempDir::new();
    let path = dir.path().join("disk.img");
    std::fs::write(&path, "FAKEIMG 4096").unwrap();
    let (catalog, _) = catalog_of(dir.path(), false);
    let old = image(&catalog, "disk.img.raw").unwrap();
    let handle = catalog.open(&old, true).unwrap();
    let staged = dir.path().join("staged");
    std::fs::write(&staged, "FAKEIMG 8192").unwrap();
    std::fs::rename(&staged, &path).unwrap();
    let new = image(&catalog, "disk.img.raw").unwrap();
    assert_eq!(new.summary.size, 8192);
    handle.image().write_at(b"still", 0).unwrap();
    assert_eq!(handle.image().size(), 4096);
    assert_eq!(catalog.open(&new, true).unwrap().image().size(), 8192);
}

#[test]
fn our_own_writes_and_times_keep_the_version() {
    let dir = TempDir::new();
    let path = dir.path().join("disk.img");
    std::fs::write(&path, "FAKEIMG 4096").unwrap();
    let (catalog, _) = catalog_of(dir.path(), false);
    let version = image(&catalog, "disk.img.raw").unwrap();
    let t = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000);
    catalog.set_times(&version, Some(t), Some(t)).unwrap();
    let again = image(&catalog, "disk.img.raw").unwrap();
    assert_eq!(again.version, version.version, "touch through the mount");
    assert_eq!(version.stat().mtime, t);
}

#[test]
fn transient_failures_are_retried_on_the_next_look() {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("disk.img"), "FAKEIMG 4096").unwrap();
    let (catalog, counters) = catalog_of(dir.path(), false);
    counters.transient_failures.store(1, Ordering::SeqCst);
    assert!(ls(&catalog, "").is_empty(), "descriptors ran out");
    assert_eq!(
        ls(&catalog, ""),
        ["disk.img.raw"],
        "retried, unchanged file"
    );
}

#[test]
fn other_failures_are_retried_once_the_file_changes_even_only_its_permissions() {
    let dir = TempDir::new();
    let path = dir.path().join("disk.img");
    std::fs::write(&path, "BADIMG").unwrap();
    let (catalog, counters) = catalog_of(dir.path(), false);
    assert!(ls(&catalog, "").is_empty());
    let probes = counters.probes.load(Ordering::Relaxed);
    assert!(ls(&catalog, "").is_empty());
    assert_eq!(
        counters.probes.load(Ordering::Relaxed),
        probes,
        "not retried"
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(ls(&catalog, "").is_empty());
    assert_eq!(
        counters.probes.load(Ordering::Relaxed),
        probes + 1,
        "a chmod is a change worth another look"
    );
}

#[test]
fn idle_instances_are_closed_and_removed_files_let_go() {
    let dir = TempDir::new();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("disk.img"), "FAKEIMG 4096").unwrap();
    std::fs::write(src.join("kept.img"), "FAKEIMG 4096").unwrap();
    let (catalog, counters) = catalog_of(&src, false);
    let disk = image(&catalog, "disk.img.raw").unwrap();
    let kept = image(&catalog, "kept.img.raw").unwrap();
    let kept_handle = catalog.open(&kept, false).unwrap();
    drop(catalog.open(&disk, true).unwrap());
    assert_eq!(catalog.live_instances().len(), 2);
    assert_eq!(
        catalog.close_idle(Duration::from_secs(3600)),
        0,
        "recently used"
    );
    assert_eq!(catalog.close_idle(Duration::ZERO), 1, "only the unused one");
    assert_eq!(catalog.live_instances().len(), 1);
    // Reopened on demand; moved out of the tree while open, closed once the handle is.
    let handle = catalog.open(&disk, true).unwrap();
    assert_eq!(counters.opens.load(Ordering::Relaxed), 3);
    std::fs::rename(src.join("disk.img"), dir.path().join("moved-away.img")).unwrap();
    catalog.refresh();
    assert!(disk.has_ended());
    assert_eq!(catalog.close_idle(Duration::ZERO), 0, "still open");
    handle.image().write_at(b"still", 0).unwrap();
    drop(handle);
    assert_eq!(catalog.close_idle(Duration::ZERO), 1);
    assert_eq!(catalog.live_instances().len(), 1);
    drop(kept_handle);
}

#[test]
fn a_read_only_catalog_opens_nothing_writable() {
    let dir = TempDir::new();
    std::fs::write(dir.path().join("disk.img"), "FAKEIMG 4096").unwrap();
    let (catalog, _) = catalog_of(dir.path(), true);
    let disk = image(&catalog, "disk.img.raw").unwrap();
    assert!(!catalog.attributes(&disk).writable);
    assert_eq!(
        catalog.open(&disk, true).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    let handle = catalog.open(&disk, false).unwrap();
    assert!(handle.image().read_only_reason().is_some());
}
