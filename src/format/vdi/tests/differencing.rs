//! Differencing VDIs (VirtualBox snapshots) built by hand over parents from the test fixtures:
//! reads fall through to the parent, partial writes copy the rest of the block from it,
//! discarded blocks read as zeros, and the parent is found by UUID in a source tree.

use std::sync::Arc;

use super::*;
use crate::format::backing::Backing;
use crate::format::links::{Chain, PlainLinks};
use crate::format::vdi::make::differencing_bytes;

/// A parent of four 4 KiB blocks: block 0 and 2 allocated (bytes 1 and 2), 1 and 3 not.
fn parent(dir: &TempDir) -> PathBuf {
    let path = fixture(dir, 4096, &[0, U, 1, U], 2);
    let named = dir.path().join("parent.vdi");
    std::fs::rename(&path, &named).unwrap();
    named
}

fn header_of(path: &Path) -> header::Header {
    let bytes = std::fs::read(path).unwrap();
    header::Header::parse(&bytes).unwrap()
}

/// An empty child of the image at `parent`, written to `name` in `dir`.
fn child_of(dir: &TempDir, parent: &Path, name: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, differencing_bytes(&header_of(parent)).unwrap()).unwrap();
    path
}

/// Opens `child` over `below` (already open), read-write.
fn open_over(child: &Path, below: Arc<dyn Image>, below_path: &Path) -> VdiImage {
    let backing = Backing::new(below, below_path);
    VdiImage::open_finding_parent(
        HostFile::open(child, true).unwrap(),
        &mut |link| {
            assert!(!link.uuid.is_nil());
            Ok(backing.clone())
        },
        None,
    )
    .unwrap()
}

fn open_read_only(path: &Path) -> Arc<dyn Image> {
    Arc::new(VdiImage::open(HostFile::open(path, false).unwrap(), Some("parent".into())).unwrap())
}

fn expected_parent() -> Vec<u8> {
    let mut bytes = vec![0u8; 4 * 4096];
    bytes[..4096].fill(1);
    bytes[2 * 4096..3 * 4096].fill(2);
    bytes
}

#[test]
fn an_empty_child_reads_as_its_parent_and_reports_the_parent_layer() {
    let dir = TempDir::new();
    let parent = parent(&dir);
    let child = child_of(&dir, &parent, "child.vdi");
    let img = open_over(&child, open_read_only(&parent), &parent);
    assert_eq!(img.size(), 4 * 4096);
    assert_eq!(read_all(&img), expected_parent());
    assert_eq!(img.allocated_bytes(), 0);
    let status = img.block_status(0, u64::MAX).unwrap();
    let data_layers: Vec<(u64, u32)> = status
        .iter()
        .filter(|e| e.state == ExtentState::Data)
        .map(|e| (e.offset, e.layer))
        .collect();
    assert_eq!(data_layers, [(0, 1), (2 * 4096, 1)]);
    let info = img.info();
    assert_eq!(info.subformat, "differencing");
    let detail = |k: &str| {
        info.details
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        detail("parent_uuid"),
        Some(header_of(&parent).uuid_image.to_string())
    );
    assert_eq!(detail("parent"), Some(parent.display().to_string()));
}

#[test]
fn partial_writes_copy_the_rest_of_the_block_from_the_parent() {
    let dir = TempDir::new();
    let parent = parent(&dir);
    let parent_before = std::fs::read(&parent).unwrap();
    let child = child_of(&dir, &parent, "child.vdi");
    let mut expected = expected_parent();
    {
        let img = open_over(&child, open_read_only(&parent), &parent);
        // Inside parent block 0, across blocks 1..2 (unallocated then allocated in the parent).
        for (offset, len, byte) in [(100u64, 10usize, 0xaa), (4096 + 4000, 300, 0xbb)] {
            img.write_at(&vec![byte; len], offset).unwrap();
            expected[offset as usize..offset as usize + len].fill(byte);
        }
        assert_eq!(read_all(&img), expected);
        img.flush().unwrap();
    }
    assert_eq!(std::fs::read(&parent).unwrap(), parent_before);
    let img = open_over(&child, open_read_only(&parent), &parent);
    assert_eq!(read_all(&img), expected);
    assert_eq!(img.allocated_bytes(), 3 * 4096);
    assert_eq!(bmap_entry(&child, 512, 3), U);
}

#[test]
fn discarded_blocks_of_a_child_read_as_zeros_not_as_the_parent() {
    let dir = TempDir::new();
    let parent = parent(&dir);
    let child = child_of(&dir, &parent, "child.vdi");
    let mut bytes = std::fs::read(&child).unwrap();
    bytes[512..516].copy_from_slice(&D.to_le_bytes());
    std::fs::write(&child, &bytes).unwrap();
    let img = open_over(&child, open_read_only(&parent), &parent);
    let mut expected = expected_parent();
    expected[..4096].fill(0);
    assert_eq!(read_all(&img), expected);
    // A partial write into it keeps zeros around the payload.
    img.write_at(&[9; 8], 16).unwrap();
    expected[16..24].fill(9);
    assert_eq!(read_all(&img), expected);
}

#[test]
fn a_chain_of_three_reads_each_layer_through_the_next() {
    let dir = TempDir::new();
    let base = parent(&dir);
    let mid = child_of(&dir, &base, "mid.vdi");
    let mut expected = expected_parent();
    {
        let img = open_over(&mid, open_read_only(&base), &base);
        img.write_at(&[5; 4096], 4096).unwrap();
        img.flush().unwrap();
    }
    expected[4096..2 * 4096].fill(5);
    let top = child_of(&dir, &mid, "top.vdi");
    let mid_image: Arc<dyn Image> = Arc::new(open_over(&mid, open_read_only(&base), &base));
    let img = open_over(&top, mid_image, &mid);
    img.write_at(&[7; 100], 3 * 4096 + 50).unwrap();
    expected[3 * 4096 + 50..3 * 4096 + 150].fill(7);
    assert_eq!(read_all(&img), expected);
    let layers: Vec<(u64, u32)> = img
        .block_status(0, u64::MAX)
        .unwrap()
        .iter()
        .filter(|e| e.state == ExtentState::Data)
        .map(|e| (e.offset, e.layer))
        .collect();
    assert_eq!(layers, [(0, 2), (4096, 1), (2 * 4096, 2), (3 * 4096, 0)]);
}

#[test]
fn without_a_source_tree_a_child_is_refused_with_the_reason() {
    let dir = TempDir::new();
    let parent = parent(&dir);
    let child = child_of(&dir, &parent, "child.vdi");
    let err = try_open(&child).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(err.to_string().contains("needs its parent"), "{err}");
}

/// Opens `child` through `open_parent` with the tree `dir` as the root, as `format::open` does.
fn open_in_tree(dir: &TempDir, child: &Path) -> Result<VdiImage> {
    let mut links = PlainLinks::new(dir.path(), false).unwrap();
    let child = child.canonicalize().unwrap();
    let chain = Chain::top(&child);
    VdiImage::open_finding_parent(
        HostFile::open(&child, true)?,
        &mut |link| open_parent(link, &chain, &mut links),
        None,
    )
}

#[test]
fn the_parent_is_found_by_uuid_anywhere_in_the_tree_and_must_be_unique() {
    let dir = TempDir::new();
    let parent = parent(&dir);
    std::fs::create_dir(dir.path().join("Snapshots")).unwrap();
    let child = child_of(&dir, &parent, "Snapshots/{0000-child}.vdi");
    // Unrelated files and another VDI do not confuse the search.
    std::fs::write(dir.path().join("notes.txt"), vec![b'x'; 600]).unwrap();
    fixture(&TempDir::new(), 4096, &[U], 0);
    let img = open_in_tree(&dir, &child).unwrap();
    assert_eq!(read_all(&img), expected_parent());
    drop(img);

    std::fs::copy(&parent, dir.path().join("copy-of-parent.vdi")).unwrap();
    let err = open_in_tree(&dir, &child).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains("ambiguous"), "{err}");
    assert!(err.to_string().contains("copy-of-parent.vdi"), "{err}");

    std::fs::remove_file(dir.path().join("copy-of-parent.vdi")).unwrap();
    std::fs::remove_file(&parent).unwrap();
    let err = open_in_tree(&dir, &child).err().unwrap();
    assert!(
        err.to_string().contains("is not among the VDIs below"),
        "{err}"
    );
    assert!(err.to_string().contains("{0000-child}.vdi"), "{err}");
}

#[test]
fn a_parent_modified_after_the_snapshot_still_serves_the_child() {
    let dir = TempDir::new();
    let parent = parent(&dir);
    let child = child_of(&dir, &parent, "child.vdi");
    let mut bytes = std::fs::read(&parent).unwrap();
    bytes[408] ^= 0xff; // uuid_last_snap
    std::fs::write(&parent, &bytes).unwrap();
    let img = open_in_tree(&dir, &child).unwrap();
    assert_eq!(read_all(&img), expected_parent());
}

/// Fuzz seeds (see `scripts/fuzz-seeds.sh`): a differencing image `a` with one block of its
/// own over its parent `b`, for the vdi and status targets.
#[test]
#[ignore = "writes fuzz seeds; run by scripts/fuzz-seeds.sh"]
fn fuzz_seed_differencing() {
    let dir = TempDir::new();
    let parent = parent(&dir);
    let child = child_of(&dir, &parent, "child.vdi");
    {
        let img = open_over(&child, open_read_only(&parent), &parent);
        img.write_at(&[0x5a; 700], 4096 + 100).unwrap();
        img.flush().unwrap();
    }
    let files = [
        std::fs::read(&child).unwrap(),
        std::fs::read(&parent).unwrap(),
    ];
    crate::fuzzing::tests::write_seed("vdi", "differencing", &files);
    crate::fuzzing::tests::write_seed("status", "vdi-differencing", &files);
}

#[test]
fn a_discard_in_a_child_reads_as_zeros_not_as_the_parent() {
    let dir = TempDir::new();
    let parent = parent(&dir);
    let child = child_of(&dir, &parent, "child.vdi");
    let mut expected = expected_parent();
    {
        let img = open_over(&child, open_read_only(&parent), &parent);
        // Block 0 whole (unallocated in the child), and a part of block 2.
        img.discard(0, 4096).unwrap();
        img.discard(2 * 4096 + 100, 50).unwrap();
        expected[..4096].fill(0);
        expected[2 * 4096 + 100..2 * 4096 + 150].fill(0);
        assert_eq!(read_all(&img), expected);
        img.flush().unwrap();
    }
    let img = open_over(&child, open_read_only(&parent), &parent);
    assert_eq!(read_all(&img), expected);
    assert_eq!(bmap_entry(&child, 512, 0), D);
}
