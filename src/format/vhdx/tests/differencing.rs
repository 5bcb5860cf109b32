//! Differencing images (made from qemu-img images by adding a parent locator, since qemu-img
//! cannot create them): reads through to the parent, partially present blocks read sector by
//! sector, writes that store only the sectors written, and finding the parent by locator.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::super::header::{parse_region_table, put_guid, BAT_REGION, METADATA_REGION, MIB};
use super::super::metadata::{self, testing::parent_locator};
use super::*;
use crate::format::backing::Backing;
use crate::testutil::TempDir;

const LINKAGE: &str = "{83ed0ec3-24c8-49a6-a959-5e4bf1288bfb}";

pub(super) fn write_at(path: &Path, bytes: &[u8], at: u64) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, at).unwrap();
}

pub(super) fn region(path: &Path, guid: uuid::Uuid) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let regions = parse_region_table(&bytes[192 * 1024..256 * 1024]).unwrap();
    regions.iter().find(|r| r.guid == guid).unwrap().offset
}

/// An 8 MiB parent full of 0x70 (0x71 in its second MiB) and an empty child of it.
pub(super) fn parent_and_child(dir: &TempDir) -> Option<(PathBuf, PathBuf)> {
    parent_and_linked_child(dir, Some(LINKAGE))
}

/// `parent_and_child` with the child's parent_linkage given, or (`None`) the parent's own
/// data write GUID.
fn parent_and_linked_child(dir: &TempDir, linkage: Option<&str>) -> Option<(PathBuf, PathBuf)> {
    parent_and_child_with(dir, linkage, 512)
}

/// `parent_and_linked_child` with both images given logical sectors of `sector` bytes (set
/// after qemu-io filled the parent, as QEMU refuses 4 KiB sectors; with 8 blocks the BAT
/// layout of the parent does not depend on it).
pub(super) fn parent_and_child_with(
    dir: &TempDir,
    linkage: Option<&str>,
    sector: u32,
) -> Option<(PathBuf, PathBuf)> {
    let parent = create(dir, "p.vhdx", "block_size=1M", 8 * MIB)?;
    qemu_io(
        &parent,
        &["write -P 0x70 0 8M".into(), "write -P 0x71 1M 1M".into()],
    );
    set_logical_sector_size(&parent, sector);
    let parent_guid = data_write_guid_of(&HostFile::open(&parent, false).unwrap()).unwrap();
    let linkage = linkage.map_or_else(|| format!("{{{parent_guid}}}"), str::to_string);
    let child = create(dir, "c.vhdx", "block_size=1M,block_state_zero=off", 8 * MIB)?;
    set_logical_sector_size(&child, sector);
    let meta = region(&child, METADATA_REGION);
    let bytes = std::fs::read(&child).unwrap();
    let table = &bytes[meta as usize..meta as usize + metadata::TABLE_LEN];
    let entries = metadata::parse_table(table, MIB).unwrap();
    let params = entries
        .iter()
        .find(|e| e.item == metadata::FILE_PARAMETERS)
        .unwrap();
    write_at(
        &child,
        &2u32.to_le_bytes(),
        meta + u64::from(params.offset) + 4,
    );
    let locator = parent_locator(&[
        ("parent_linkage", &linkage),
        ("relative_path", ".\\p.vhdx"),
        ("absolute_win32_path", "\\\\?\\C:\\images\\p.vhdx"),
    ]);
    let item_at = 0x18000u32;
    let mut entry = [0u8; 32];
    put_guid(&mut entry, 0, metadata::PARENT_LOCATOR).unwrap();
    entry[16..20].copy_from_slice(&item_at.to_le_bytes());
    entry[20..24].copy_from_slice(&(locator.len() as u32).to_le_bytes());
    entry[24..28].copy_from_slice(&4u32.to_le_bytes());
    write_at(&child, &entry, meta + 32 + 32 * entries.len() as u64);
    write_at(&child, &(entries.len() as u16 + 1).to_le_bytes(), meta + 10);
    write_at(&child, &locator, meta + u64::from(item_at));
    Some((parent, child))
}

pub(super) fn open_child(parent: &Path, child: &Path) -> VhdxImage {
    let backing = Backing::new(Arc::new(open_ro(parent)), parent);
    VhdxImage::open(HostFile::open(child, true).unwrap(), Some(backing), None).unwrap()
}

pub(super) fn parent_bytes() -> Vec<u8> {
    let mut all = vec![0x70u8; 8 * MIB as usize];
    all[MIB as usize..2 * MIB as usize].fill(0x71);
    all
}

#[test]
fn differencing_images_read_through_to_their_parent_and_write_only_the_sectors_written() {
    let dir = TempDir::new();
    let Some((parent, child)) = parent_and_child(&dir) else {
        return;
    };
    let img = open_child(&parent, &child);
    assert_eq!(img.info().subformat, "differencing");
    assert_eq!(img.read_only_reason(), None);
    let locator = img.parent_locator().unwrap();
    assert_eq!(locator.relative_path_components().unwrap(), ["p.vhdx"]);
    assert_eq!(
        locator.parent_linkage().unwrap().to_string(),
        &LINKAGE[1..LINKAGE.len() - 1]
    );
    assert_eq!(detail(&img, "parent_relative_path"), ".\\p.vhdx");
    let mut expected = parent_bytes();
    assert_eq!(read_all(&img), expected);
    let status = img.block_status(0, 8 * MIB).unwrap();
    assert_eq!(
        (status.len(), status[0].layer, status[0].state),
        (1, 1, ExtentState::Data)
    );

    let len_before = std::fs::metadata(&child).unwrap().len();
    img.write_at(&[0xc1; 1000], MIB + 100).unwrap();
    expected[MIB as usize + 100..MIB as usize + 1100].fill(0xc1);
    assert!(read_all(&img) == expected, "before flush");
    assert_eq!(img.allocated_bytes(), MIB, "one payload block");
    img.flush().unwrap();
    drop(img);
    assert_eq!(bat_entry(&child, 1) & 7, 7, "partially present");
    assert_eq!(
        block_bits(&child, 1),
        [0, 1, 2],
        "the three sectors written"
    );
    assert_eq!(
        std::fs::metadata(&child).unwrap().len(),
        len_before + 2 * MIB,
        "a sector bitmap block and a payload block"
    );
    // The payload block holds the sectors written, filled up from the parent, and zeros.
    let payload = block_bytes(&child, 1);
    assert!(payload[..100].iter().all(|&b| b == 0x71));
    assert!(payload[100..1100].iter().all(|&b| b == 0xc1));
    assert!(payload[1100..1536].iter().all(|&b| b == 0x71));
    assert!(payload[1536..].iter().all(|&b| b == 0));
    assert!(
        read_all(&open_child(&parent, &child)) == expected,
        "after reopen"
    );

    // Without its parent the child is read-only, and its own sectors still read right.
    let alone = VhdxImage::open(HostFile::open(&child, true).unwrap(), None, None).unwrap();
    assert!(alone.read_only_reason().unwrap().contains("parent"));
    let all = read_all(&alone);
    let block1 = MIB as usize;
    assert!(all[block1..block1 + 1536] == expected[block1..block1 + 1536]);
    assert!(all[..block1].iter().all(|&b| b == 0));
    assert!(all[block1 + 1536..].iter().all(|&b| b == 0));
}

/// The BAT entry of payload block `block` of a child made by `parent_and_child` (1 MiB
/// blocks, 512-byte sectors: the chunk's bitmap entry is index 4096).
pub(super) fn payload_entry(path: &Path, block: u64) -> u64 {
    bat_entry(path, block)
}

/// The sector bitmap bits set for payload block `block` of a child made by
/// `parent_and_child`, read from the file: indexes of its sectors (0..2048).
pub(super) fn block_bits(path: &Path, block: u64) -> Vec<u64> {
    block_bits_with(path, block, 512)
}

/// `block_bits` of a child with logical sectors of `sector` bytes.
pub(super) fn block_bits_with(path: &Path, block: u64, sector: u64) -> Vec<u64> {
    let per_block = MIB / sector;
    // The chunk's bitmap entry follows its 2^23 * sector / 1 MiB payload entries.
    let sb = bat_entry(path, (1 << 23) * sector / MIB);
    assert_eq!(sb & 7, 6, "the chunk has a sector bitmap");
    let mut bytes = vec![0u8; (per_block / 8) as usize];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut bytes, (sb >> 20 << 20) + block * per_block / 8)
        .unwrap();
    (0..per_block)
        .filter(|i| bytes[(i / 8) as usize] & (1 << (i % 8)) != 0)
        .collect()
}

/// The bytes of the payload block the file holds for block `block`.
pub(super) fn block_bytes(path: &Path, block: u64) -> Vec<u8> {
    let entry = payload_entry(path, block);
    assert!(entry & 7 >= 6, "block {block} is present");
    let mut bytes = vec![0u8; MIB as usize];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut bytes, entry >> 20 << 20)
        .unwrap();
    bytes
}

#[test]
fn partially_present_blocks_read_by_sector_and_take_writes_in_place() {
    let dir = TempDir::new();
    let Some((parent, child)) = parent_and_child(&dir) else {
        return;
    };
    // Block 2 partially present: sectors 0-7 and 100 from a new block of 0xd0.
    let payload = std::fs::metadata(&child)
        .unwrap()
        .len()
        .next_multiple_of(MIB);
    write_at(&child, &vec![0xd0; MIB as usize], payload);
    let mut bitmap = vec![0u8; MIB as usize];
    let first = 2 * 2048; // block 2's first sector in the chunk
    bitmap[first / 8] = 0xff;
    bitmap[(first + 100) / 8] |= 1 << ((first + 100) % 8);
    write_at(&child, &bitmap, payload + MIB);
    let bat = region(&child, BAT_REGION);
    write_at(&child, &(payload | 7).to_le_bytes(), bat + 2 * 8);
    write_at(&child, &((payload + MIB) | 6).to_le_bytes(), bat + 4096 * 8);

    let img = open_child(&parent, &child);
    let mut expected = parent_bytes();
    let block2 = 2 * MIB as usize;
    expected[block2..block2 + 8 * 512].fill(0xd0);
    expected[block2 + 100 * 512..block2 + 101 * 512].fill(0xd0);
    assert_eq!(read_all(&img), expected);
    let mut unaligned = vec![0u8; 1000];
    img.read_at(&mut unaligned, (block2 + 8 * 512 - 300) as u64)
        .unwrap();
    assert_eq!(
        unaligned,
        expected[block2 + 8 * 512 - 300..block2 + 8 * 512 + 700]
    );
    let status = img.block_status(2 * MIB, MIB).unwrap();
    let layers: Vec<(u64, u32)> = status.iter().map(|e| (e.len, e.layer)).collect();
    assert_eq!(
        layers,
        [(4096, 0), (92 * 512, 1), (512, 0), (MIB - 101 * 512, 1)]
    );

    // Sectors 50-51 were left to the parent, sector 7 is here: the write covers 6-8 and 50-51.
    img.write_at(&[0xe2; 700], 2 * MIB + 50 * 512 + 3).unwrap();
    expected[block2 + 50 * 512 + 3..block2 + 50 * 512 + 703].fill(0xe2);
    img.write_at(&[0xe3; 1000], 2 * MIB + 6 * 512 + 100)
        .unwrap();
    expected[block2 + 6 * 512 + 100..block2 + 6 * 512 + 1100].fill(0xe3);
    assert!(read_all(&img) == expected, "before flush");
    assert!(img.is_dirty(), "bitmap pages wait for the flush");
    img.flush().unwrap();
    assert!(!img.is_dirty());
    drop(img);
    assert_eq!(
        payload_entry(&child, 2),
        payload | 7,
        "still partially present, in place"
    );
    let bits: Vec<u64> = (0..9).chain([50, 51, 100]).collect();
    assert_eq!(block_bits(&child, 2), bits);
    let bytes = block_bytes(&child, 2);
    assert_eq!(
        bytes[8 * 512..9 * 512],
        expected[block2 + 8 * 512..block2 + 9 * 512]
    );
    assert!(
        bytes[9 * 512..50 * 512].iter().all(|&b| b == 0xd0),
        "untouched"
    );
    assert_eq!(
        bytes[50 * 512..52 * 512],
        expected[block2 + 50 * 512..block2 + 52 * 512]
    );
    assert!(read_all(&open_child(&parent, &child)) == expected);
}

#[test]
fn format_open_finds_the_parent_by_locator_and_checks_its_linkage() {
    let dir = TempDir::new();
    let Some((parent, child)) = parent_and_linked_child(&dir, None) else {
        return;
    };
    let options = crate::format::OpenOptions::default();
    let mut links = crate::format::links::PlainLinks::new(dir.path(), false).unwrap();
    let image = crate::format::open(&child, &options, &mut links).unwrap();
    assert_eq!(image.read_only_reason(), None);
    let mut all = vec![0u8; 8 * MIB as usize];
    image.read_at(&mut all, 0).unwrap();
    assert!(all == parent_bytes(), "reads fall through to the parent");
    image.write_at(&[0x5a; 3000], MIB - 1000).unwrap();
    image.flush().unwrap();
    image.read_at(&mut all, 0).unwrap();
    let mut expected = parent_bytes();
    expected[MIB as usize - 1000..MIB as usize + 2000].fill(0x5a);
    assert!(all == expected, "the child holds the write over its parent");
    drop(image);
    let parent_now = open_ro(&parent);
    let mut bytes = vec![0u8; 8 * MIB as usize];
    parent_now.read_at(&mut bytes, 0).unwrap();
    assert!(bytes == parent_bytes(), "the parent is unchanged");

    // A parent whose data write GUID is not the child's parent_linkage is not its parent.
    let other = TempDir::new();
    let Some((_, stranger)) = parent_and_linked_child(&other, Some(LINKAGE)) else {
        return;
    };
    let mut links = crate::format::links::PlainLinks::new(other.path(), false).unwrap();
    let e = crate::format::open(&stranger, &options, &mut links)
        .err()
        .expect("refused");
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("parent_linkage"), "{e}");

    // A missing parent keeps out only its child, with the reason.
    std::fs::remove_file(&parent).unwrap();
    let mut links = crate::format::links::PlainLinks::new(dir.path(), false).unwrap();
    let e = crate::format::open(&child, &options, &mut links)
        .err()
        .expect("refused");
    assert!(
        e.to_string().contains("parent") && e.to_string().contains("does not exist"),
        "{e}"
    );
}
