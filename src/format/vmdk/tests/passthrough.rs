//! `Image::raw_file`: which VMDK disks are nothing but one host file at the disk's own offsets
//! (the kernel may then read that file itself), and which are not.

use super::*;

/// A descriptor with `lines` as its extents beside `inside.raw` (`file_len` bytes of 7s).
fn hand_made(dir: &TempDir, lines: &str, file_len: usize) -> Arc<dyn Image> {
    let path = dir.path().join("d.vmdk");
    std::fs::write(dir.path().join("inside.raw"), vec![7u8; file_len]).unwrap();
    let text = format!(
        "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n\
         createType=\"monolithicFlat\"\n{lines}\n"
    );
    std::fs::write(&path, text).unwrap();
    try_open(&path, true).unwrap()
}

#[test]
fn one_flat_extent_of_the_disks_length_at_offset_0_is_the_raw_file() {
    let dir = TempDir::new();
    for (lines, file_len, raw) in [
        ("RW 8 FLAT \"inside.raw\" 0", 4096, true),
        ("RDONLY 8 FLAT \"inside.raw\" 0", 4096, true),
        ("RW 8 VMFS \"inside.raw\"", 4096, true),
        // Past the end of a shorter file the disk reads zeros, past the disk's end a longer
        // file goes on.
        ("RW 8 FLAT \"inside.raw\" 0", 2048, false),
        ("RW 8 FLAT \"inside.raw\" 0", 8192, false),
        ("RW 8 FLAT \"inside.raw\" 1", 4608, false),
        ("RW 8 FLAT \"inside.raw\" 0\nRW 4 ZERO", 4096, false),
        (
            "RW 4 FLAT \"inside.raw\" 0\nRW 4 FLAT \"inside.raw\" 4",
            4096,
            false,
        ),
        ("NOACCESS 8 FLAT \"inside.raw\" 0", 4096, false),
    ] {
        let img = hand_made(&dir, lines, file_len);
        let file = img.raw_file();
        assert_eq!(file.is_some(), raw, "{lines:?} over {file_len} bytes");
        if let Some(file) = file {
            assert!(file.path().ends_with("inside.raw"));
            assert_eq!(file.len().unwrap(), img.size());
        }
    }
}

#[test]
fn qemu_img_flat_disks_are_their_extent_file_and_sparse_ones_and_children_are_not() {
    let dir = TempDir::new();
    let flat = dir.path().join("flat.vmdk");
    let sparse = dir.path().join("sparse.vmdk");
    let child = dir.path().join("child.vmdk");
    let split = dir.path().join("split.vmdk");
    if create(&flat, "subformat=monolithicFlat", "1M").is_none()
        || create(&sparse, "", "1M").is_none()
        || create(&split, "subformat=twoGbMaxExtentFlat", "1M").is_none()
    {
        return;
    }
    qemu_io(&flat, &["write -P 0x5a 4k 8k"]).unwrap();
    run(
        "qemu-img",
        &format!("create -q -f vmdk -b flat.vmdk -F vmdk {}", p(&child)),
    )
    .unwrap();

    let img = open(&flat);
    let file = img.raw_file().unwrap();
    assert!(file.path().ends_with("flat-flat.vmdk"));
    let mut through_file = vec![0u8; 1 << 20];
    file.read_exact_at(&mut through_file, 0).unwrap();
    assert_eq!(through_file, read_all(img.as_ref()));
    // Under 2 GiB, a split flat disk is one extent file.
    assert!(open(&split)
        .raw_file()
        .unwrap()
        .path()
        .ends_with("split-f001.vmdk"));
    assert!(open(&sparse).raw_file().is_none());
    assert!(open(&child).raw_file().is_none());
}
