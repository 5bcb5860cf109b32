//! Partition tables made by sfdisk (the oracle for the layout) and damaged by hand.

use super::*;
use crate::testutil::{MemImage, TempDir};
use std::process::{Command, Stdio};

/// A disk of `sectors` 512-byte sectors partitioned by sfdisk with `script`; `None` (the test
/// skips) without sfdisk, except in CI.
fn sfdisk(sectors: u64, script: &str) -> Option<Vec<u8>> {
    let dir = TempDir::new();
    let path = dir.path().join("disk.raw");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(sectors * 512)
        .unwrap();
    let child = Command::new("sfdisk")
        .arg("-q")
        .arg(&path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipping: sfdisk not runnable: {e}");
            return None;
        }
        Err(e) => panic!("sfdisk is required in CI: {e}"),
    };
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk failed on {script}");
    Some(std::fs::read(&path).unwrap())
}

fn disk(bytes: &[u8]) -> MemImage {
    let image = MemImage::new(bytes.len(), None);
    image.write_at(bytes, 0).unwrap();
    image
}

fn layout(table: &PartitionTable) -> Vec<(u32, u64, u64)> {
    table
        .partitions
        .iter()
        .map(|p| (p.number, p.start / 512, p.len / 512))
        .collect()
}

const MBR_SCRIPT: &str = "label: dos
start=2048, size=4096, type=83
start=8192, size=4096, type=7
start=16384, size=32768, type=5
start=18432, size=4096, type=83
start=24576, size=4096, type=82
";

#[test]
fn mbr_primaries_and_logical_partitions_are_found_where_sfdisk_put_them() {
    let Some(bytes) = sfdisk(65536, MBR_SCRIPT) else {
        return;
    };
    let table = read_table(&disk(&bytes)).unwrap().unwrap();
    assert_eq!(table.kind, TableKind::Mbr);
    assert_eq!(
        layout(&table),
        [
            (1, 2048, 4096),
            (2, 8192, 4096),
            (5, 18432, 4096),
            (6, 24576, 4096)
        ]
    );
    assert_eq!(table.partitions[1].kind, "0x07");
}

#[test]
fn gpt_partitions_keep_their_names_and_a_damaged_primary_falls_back_to_the_backup() {
    let script = "label: gpt\nstart=2048, size=4096, name=boot\nstart=8192, size=8192, name=root\n";
    let Some(mut bytes) = sfdisk(65536, script) else {
        return;
    };
    let table = read_table(&disk(&bytes)).unwrap().unwrap();
    assert_eq!(table.kind, TableKind::Gpt);
    assert_eq!(layout(&table), [(1, 2048, 4096), (2, 8192, 8192)]);
    assert_eq!(table.partitions[1].name.as_deref(), Some("root"));
    assert_eq!(table.note, None);

    // The primary header's CRC no longer matches: the backup (last sector) is used.
    bytes[512 + 100] ^= 0xff;
    bytes[512 + 40] ^= 1;
    let table = read_table(&disk(&bytes)).unwrap().unwrap();
    assert_eq!(layout(&table), [(1, 2048, 4096), (2, 8192, 8192)]);
    assert!(table.note.unwrap().contains("backup is used"));

    let last = bytes.len() - 512;
    bytes[last + 40] ^= 1;
    let err = read_table(&disk(&bytes)).unwrap_err();
    assert!(err.to_string().contains("both GPT headers"), "{err}");
}

#[test]
fn disks_without_a_table_have_none() {
    assert_eq!(read_table(&MemImage::new(1 << 20, None)).unwrap(), None);
    // A boot sector of an unpartitioned disk: a signature, boot code where the slots would be.
    let mut boot = vec![0u8; 1 << 20];
    boot[446..510].fill(0x4c);
    boot[510] = 0x55;
    boot[511] = 0xaa;
    assert_eq!(read_table(&disk(&boot)).unwrap(), None);
    assert_eq!(read_table(&MemImage::new(512, None)).unwrap(), None);
}

/// An MBR with the given slots (type, first sector, sectors) on a disk of `sectors`.
fn mbr(sectors: u64, slots: &[(u8, u32, u32)]) -> Vec<u8> {
    let mut bytes = vec![0u8; (sectors * 512) as usize];
    for (i, (kind, first, count)) in slots.iter().enumerate() {
        let at = 446 + 16 * i;
        bytes[at + 4] = *kind;
        bytes[at + 8..at + 12].copy_from_slice(&first.to_le_bytes());
        bytes[at + 12..at + 16].copy_from_slice(&count.to_le_bytes());
    }
    bytes[510] = 0x55;
    bytes[511] = 0xaa;
    bytes
}

#[test]
fn hostile_tables_are_refused_with_the_reason() {
    let overlapping = mbr(4096, &[(0x83, 2048, 1024), (0x83, 2560, 1024)]);
    let err = read_table(&disk(&overlapping)).unwrap_err();
    assert!(err.to_string().contains("overlap"), "{err}");

    let beyond = mbr(4096, &[(0x83, 2048, 4096)]);
    let err = read_table(&disk(&beyond)).unwrap_err();
    assert!(err.to_string().contains("beyond the end"), "{err}");

    // An extended partition whose EBR links back to itself.
    let mut looping = mbr(8192, &[(0x05, 2048, 4096)]);
    let ebr = 2048 * 512;
    looping[ebr + 446 + 4] = 0x83;
    looping[ebr + 446 + 8..ebr + 446 + 12].copy_from_slice(&64u32.to_le_bytes());
    looping[ebr + 446 + 12..ebr + 446 + 16].copy_from_slice(&64u32.to_le_bytes());
    looping[ebr + 462 + 4] = 0x05;
    looping[ebr + 462 + 8..ebr + 462 + 12].copy_from_slice(&0u32.to_le_bytes());
    looping[ebr + 462 + 12..ebr + 462 + 16].copy_from_slice(&128u32.to_le_bytes());
    looping[ebr + 510] = 0x55;
    looping[ebr + 511] = 0xaa;
    let err = read_table(&disk(&looping)).unwrap_err();
    assert!(err.to_string().contains("loops"), "{err}");
}
