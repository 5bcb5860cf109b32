//! Differencing VHDs, built by hand (qemu-img cannot make them, and QEMU reads them without
//! their parent): reads through to the parent, writes that store only the sectors written and
//! set their bits, and finding the parent by its locators, in order, inside the source tree.

use super::*;
use crate::format::backing::Backing;
use crate::format::links::PlainLinks;
use crate::format::vhd::header::{W2KU, W2RU};
use crate::format::{self as formats, OpenOptions};

/// An 8 MiB dynamic parent `p.vhd` full of 0x70 (0x71 in its second MiB, the rest of the
/// disk zeros past 6 MiB) and an empty child `c.vhd` of it.
pub fn parent_and_child(dir: &TempDir) -> Option<(PathBuf, PathBuf)> {
    let parent = create(dir, "p.vhd", "force_size=on", 8 * MIB)?;
    qemu_io(&parent, &["write -P 0x70 0 6M", "write -P 0x71 1M 1M"]);
    let child = dir.path().join("c.vhd");
    make_differencing(&child, &parent, "p.vhd").unwrap();
    Some((parent, child))
}

pub fn parent_bytes() -> Vec<u8> {
    let mut all = vec![0x70u8; 6 * MIB as usize];
    all[MIB as usize..2 * MIB as usize].fill(0x71);
    all.resize(8 * MIB as usize, 0);
    all
}

pub fn open_child(parent: &Path, child: &Path) -> VhdImage {
    let backing = Backing::new(Arc::new(open_ro(parent)), parent);
    VhdImage::open(HostFile::open(child, true).unwrap(), Some(backing), None).unwrap()
}

/// Opens `path` the way the mount does: the parent found through its locators inside `root`.
fn open_in_tree(root: &Path, path: &Path) -> Result<Arc<dyn Image>> {
    let mut links = PlainLinks::new(root, false)?;
    formats::open(path, &OpenOptions::default(), &mut links)
}

/// The bitmap bits set for block `block` of the child (2 MiB blocks), read from the file.
fn block_bits(child: &Path, table_offset: u64, block: u64) -> Vec<u64> {
    let bytes = std::fs::read(child).unwrap();
    let at = (table_offset + 4 * block) as usize;
    let entry = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    assert_ne!(entry, u32::MAX, "block {block} is in the file");
    let bitmap = &bytes[entry as usize * 512..entry as usize * 512 + 512];
    (0..4096).filter(|&s| bitmap::bit(bitmap, s)).collect()
}

fn table_offset(img: &VhdImage) -> u64 {
    img.sparse.as_ref().unwrap().header.table_offset
}

#[test]
fn children_read_through_to_the_parent_and_write_only_the_sectors_written() {
    let dir = TempDir::new();
    let Some((parent, child)) = parent_and_child(&dir) else {
        return;
    };
    let parent_before = std::fs::read(&parent).unwrap();
    let img = open_child(&parent, &child);
    assert_eq!(img.info().subformat, "differencing");
    assert_eq!(img.read_only_reason(), None);
    assert_eq!(img.size(), 8 * MIB);
    assert_eq!(detail(&img, "parent_name"), "p.vhd");
    assert_eq!(detail(&img, "parent"), parent.display().to_string());
    let mut expected = parent_bytes();
    assert!(read_all(&img) == expected);
    let status = img.block_status(0, 8 * MIB).unwrap();
    assert_eq!((status[0].layer, status[0].state), (1, ExtentState::Data));

    // 1000 bytes from 100 into the second MiB: sectors 2048..2051 of block 0, the parts of
    // the first and last sector outside the write taken from the parent.
    img.write_at(&[0xc1; 1000], MIB + 100).unwrap();
    expected[MIB as usize + 100..MIB as usize + 1100].fill(0xc1);
    // A write across blocks 1 and 2, the second one new too.
    img.write_at(&[0xc2; 8192], 4 * MIB - 4096).unwrap();
    expected[4 * MIB as usize - 4096..4 * MIB as usize + 4096].fill(0xc2);
    assert!(read_all(&img) == expected, "before flush");
    assert_eq!(mapped_bytes(&img), 3 * 2 * MIB);
    let tables = table_offset(&img);
    img.flush().unwrap();
    drop(img);
    assert_eq!(block_bits(&child, tables, 0), [2048, 2049, 2050]);
    assert_eq!(
        block_bits(&child, tables, 1),
        (4088..4096).collect::<Vec<_>>()
    );
    assert_eq!(block_bits(&child, tables, 2), (0..8).collect::<Vec<_>>());

    // Writes into a block the child holds: present sectors in place, others set their bits.
    let img = open_child(&parent, &child);
    assert!(read_all(&img) == expected, "after reopen");
    img.write_at(&[0xc3; 600], MIB + 1000).unwrap();
    expected[MIB as usize + 1000..MIB as usize + 1600].fill(0xc3);
    img.flush().unwrap();
    drop(img);
    assert_eq!(block_bits(&child, tables, 0), [2048, 2049, 2050, 2051]);
    assert!(read_all(&open_child(&parent, &child)) == expected);
    assert_eq!(
        std::fs::read(&parent).unwrap(),
        parent_before,
        "the parent is untouched"
    );

    // Without its parent the child is read-only; its own sectors still read right.
    let alone = VhdImage::open(HostFile::open(&child, true).unwrap(), None, None).unwrap();
    assert!(alone.read_only_reason().unwrap().contains("parent"));
    let all = read_all(&alone);
    let at = MIB as usize + 1024;
    assert!(all[at..at + 1024] == expected[at..at + 1024]);
    assert!(all[..MIB as usize].iter().all(|&b| b == 0));
}

#[test]
fn the_parent_is_found_by_locator_inside_the_tree() {
    let dir = TempDir::new();
    let Some((parent, child)) = parent_and_child(&dir) else {
        return;
    };
    let img = open_in_tree(dir.path(), &child).unwrap();
    assert!(read_all_dyn(img.as_ref()) == parent_bytes());
    let footer = footer_of(&HostFile::open(&parent, false).unwrap()).unwrap();

    // Each way of naming the parent alone, the parent in a sub-directory.
    std::fs::create_dir(dir.path().join("base")).unwrap();
    let moved = dir.path().join("base/p.vhd");
    std::fs::rename(&parent, &moved).unwrap();
    let build = |locators: &[([u8; 4], &str)], name: &str, uuid: [u8; 16]| {
        let spec = ChildSpec {
            locators,
            unicode_name: name,
            parent_uuid: uuid,
            parent_timestamp: 12345,
        };
        std::fs::write(&child, build_differencing(&footer, &spec).unwrap()).unwrap();
    };
    let uuid = footer.unique_id;
    build(&[(W2RU, ".\\base\\p.vhd")], "", uuid);
    assert!(open_in_tree(dir.path(), &child).is_ok(), "relative path");
    build(
        &[(W2RU, ".\\missing.vhd"), (W2KU, "C:\\x\\p.vhd")],
        "",
        uuid,
    );
    let e = open_in_tree(dir.path(), &child).err().unwrap();
    assert!(e.to_string().contains("missing.vhd does not exist"), "{e}");
    // The absolute path's file name and the header's name are looked up next to the child.
    std::fs::copy(&moved, dir.path().join("p.vhd")).unwrap();
    assert!(
        open_in_tree(dir.path(), &child).is_ok(),
        "absolute path's file name"
    );
    build(&[], "D:\\vms\\p.vhd", uuid);
    let img = open_in_tree(dir.path(), &child).unwrap();
    assert!(
        read_all_dyn(img.as_ref()) == parent_bytes(),
        "the header's name"
    );
    assert!(img.info().details.contains(&(
        "parent",
        dir.path()
            .join("p.vhd")
            .canonicalize()
            .unwrap()
            .display()
            .to_string()
    )));

    // A different UUID is no parent, whatever its name.
    build(&[(W2RU, ".\\p.vhd")], "", [0xee; 16]);
    let e = open_in_tree(dir.path(), &child).err().unwrap();
    assert!(
        e.to_string()
            .contains("the child's parent UUID is eeeeeeee"),
        "{e}"
    );

    // A locator leading out of the source tree is not followed.
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    let inner = tree.join("c.vhd");
    std::fs::rename(&child, &inner).unwrap();
    let spec = ChildSpec {
        locators: &[(W2RU, "..\\p.vhd")],
        unicode_name: "",
        parent_uuid: uuid,
        parent_timestamp: 0,
    };
    std::fs::write(&inner, build_differencing(&footer, &spec).unwrap()).unwrap();
    let e = open_in_tree(&tree, &inner).err().unwrap();
    assert!(e.to_string().contains("outside the source tree"), "{e}");
    assert!(
        open_in_tree(dir.path(), &inner).is_ok(),
        "inside a larger tree"
    );
}

#[test]
fn chains_of_children_read_through_every_layer() {
    let dir = TempDir::new();
    let Some((_parent, child)) = parent_and_child(&dir) else {
        return;
    };
    {
        let img = open_in_tree(dir.path(), &child).unwrap();
        img.write_at(&[0xd1; 4096], 0).unwrap();
        img.flush().unwrap();
    }
    let grandchild = dir.path().join("g.vhd");
    make_differencing(&grandchild, &child, "c.vhd").unwrap();
    let img = open_in_tree(dir.path(), &grandchild).unwrap();
    img.write_at(&[0xd2; 512], 512).unwrap();
    let mut expected = parent_bytes();
    expected[..4096].fill(0xd1);
    expected[512..1024].fill(0xd2);
    assert!(read_all_dyn(img.as_ref()) == expected);
    let status = img.block_status(0, 8192).unwrap();
    let layers: Vec<u32> = status.iter().map(|e| e.layer).collect();
    assert_eq!(layers, [1, 0, 1, 2], "{status:?}");
    // A child that names itself as its parent is a loop, not a hang.
    let own = footer_of(&HostFile::open(&grandchild, false).unwrap()).unwrap();
    let spec = ChildSpec {
        locators: &[(W2RU, ".\\g.vhd")],
        unicode_name: "",
        parent_uuid: own.unique_id,
        parent_timestamp: 0,
    };
    let mut bytes = build_differencing(&own, &spec).unwrap();
    // Same UUID in the footer as the one it names: patch both footer copies.
    let end = bytes.len() - 512;
    bytes[68..84].copy_from_slice(&own.unique_id);
    footer::testing::reseal(&mut bytes[..512]);
    let head = bytes[..512].to_vec();
    bytes[end..].copy_from_slice(&head);
    std::fs::write(&grandchild, &bytes).unwrap();
    let e = open_in_tree(dir.path(), &grandchild).err().unwrap();
    assert!(e.to_string().contains("loops"), "{e}");
}

fn read_all_dyn(img: &dyn Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(&mut buf, 0).unwrap();
    buf
}
