//! LUKS containers made and written by qemu-img and qemu-io, read through imgfs and compared
//! with what qemu-img decrypts; imgfs's writes read back in QEMU; LUKS2 and damaged headers
//! refused by name.

use super::*;
use crate::meta::keyring::testing::use_passphrases;
use crate::testutil::encrypted::{create_encrypted, qemu_plain};
use crate::testutil::TempDir;

fn open(path: &std::path::Path, writable: bool) -> Result<LuksImage> {
    let file = HostFile::open(path, writable)?;
    LuksImage::open(file, None)
}

#[test]
fn a_luks_container_reads_and_writes_like_qemu() {
    let dir = TempDir::new();
    let path = dir.path().join("disk.luks");
    let writes = ["write -P 0x5a 1000 70000", "write -P 0x33 1M 4096"];
    if create_encrypted("luks", &path, "luks", "opensesame", "2M", &writes).is_none() {
        return;
    }
    let Some(mut expected) = qemu_plain("luks", &path, "opensesame", &dir.path().join("a.raw"))
    else {
        return;
    };
    assert_eq!(expected.len(), 2 << 20);
    use_passphrases(&[b"opensesame"]);
    let img = open(&path, true).unwrap();
    assert_eq!(img.size(), 2 << 20);
    let mut got = vec![0u8; expected.len()];
    img.read_at(&mut got, 0).unwrap();
    assert!(got == expected);
    let mut part = vec![0u8; 777];
    img.read_at(&mut part, 999).unwrap();
    assert_eq!(&part[..], &expected[999..1776]);
    let info = img.info();
    assert!(info
        .details
        .iter()
        .any(|(k, v)| *k == "encryption" && v.contains("aes-256-xts")));

    for (at, len, byte) in [
        (5, 10, 0x61),
        (600_000, 100_000, 0x62),
        ((2 << 20) - 3, 3, 0x63),
    ] {
        img.write_at(&vec![byte; len], at as u64).unwrap();
        expected[at..at + len].fill(byte);
    }
    img.flush().unwrap();
    assert!(img.discard(0, 4096).is_err());
    drop(img);
    let after = qemu_plain("luks", &path, "opensesame", &dir.path().join("b.raw")).unwrap();
    assert!(after == expected);
}

#[test]
fn luks2_and_damaged_containers_are_refused_by_name() {
    let dir = TempDir::new();
    let path = dir.path().join("x.luks");
    let mut head = vec![0u8; 4096];
    head[..6].copy_from_slice(b"LUKS\xba\xbe");
    head[7] = 2;
    std::fs::write(&path, &head).unwrap();
    use_passphrases(&[b"pw"]);
    let e = open(&path, false).err().unwrap();
    assert!(e.to_string().contains("LUKS2"), "{e}");
    std::fs::write(&path, &head[..100]).unwrap();
    let e = open(&path, false).err().unwrap();
    assert!(e.to_string().contains("shorter than a LUKS header"), "{e}");
    assert_eq!(
        crate::format::probe(b"LUKS\xba\xbe\x00\x01"),
        Some(crate::format::Format::Luks)
    );
}
