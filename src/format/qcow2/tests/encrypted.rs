//! Encrypted qcow2 images (LUKS and the legacy AES method) made and written by qemu-img and
//! qemu-io, read through imgfs and compared with what qemu-img decrypts; without the right
//! passphrase they are refused by name, and they are served read-only.

use super::*;
use crate::meta::keyring::testing::use_passphrases;
use crate::testutil::encrypted::{create_encrypted, qemu_plain};

/// Reads all of `img` in pieces of growing odd sizes and compares with `expected`.
fn assert_reads(img: &dyn Image, expected: &[u8], what: &str) {
    assert_same(&read_all(img), expected, what);
    let (mut at, mut len) = (0u64, 1usize);
    while at < img.size() {
        let n = len.min((img.size() - at) as usize);
        let mut buf = vec![0u8; n];
        img.read_at(&mut buf, at).unwrap();
        assert_same(&buf, &expected[at as usize..at as usize + n], what);
        at += n as u64;
        len = len * 3 + 777;
    }
}

const WRITES: &[&str] = &[
    "write -P 0x5a 1000 1M",
    "write -P 0x11 3M 64k",
    "write -P 0x22 4194303 3",
    "write -z 5M 64k",
];

#[test]
fn luks_images_read_like_qemu_with_the_passphrase() {
    let dir = TempDir::new();
    let path = dir.path().join("luks.qcow2");
    if create_encrypted("qcow2", &path, "luks", "hunter2", "8M", WRITES).is_none() {
        return;
    }
    let Some(expected) = qemu_plain("qcow2", &path, "hunter2", &dir.path().join("plain.raw"))
    else {
        return;
    };
    // The passphrase that opens it need not be the first given.
    use_passphrases(&[b"wrong", b"hunter2"]);
    let img = open(&path);
    assert_reads(&img, &expected, "luks");
    assert!(expected[1000..1000 + (1 << 20)].iter().all(|&b| b == 0x5a));
    let reason = img.read_only_reason().unwrap_or_default();
    assert!(reason.contains("encrypted"), "{reason}");
    let details = img.details();
    let encryption = details.iter().find(|(k, _)| *k == "encryption");
    assert!(
        encryption.is_some_and(|(_, v)| v.contains("LUKS") && v.contains("aes-256-xts")),
        "{details:?}"
    );
    // The raw bytes in the file are not the guest's.
    let file = std::fs::read(&path).unwrap();
    assert!(!file.windows(4096).any(|w| w.iter().all(|&b| b == 0x5a)));
}

#[test]
fn luks_images_without_the_passphrase_are_refused_by_name() {
    let dir = TempDir::new();
    let path = dir.path().join("locked.qcow2");
    if create_encrypted("qcow2", &path, "luks", "s3cret-only-here", "1M", &[]).is_none() {
        return;
    }
    use_passphrases(&[]);
    let e = try_open_with(&path, None).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("encrypted (LUKS)"), "{e}");
    assert!(e.to_string().contains("--key-file"), "{e}");
    use_passphrases(&[b"hunter2", b"letmein"]);
    let e = try_open_with(&path, None).err().unwrap();
    assert!(e.to_string().contains("none of the 2 passphrase(s)"), "{e}");
}

#[test]
fn legacy_aes_images_read_like_qemu() {
    let dir = TempDir::new();
    let path = dir.path().join("aes.qcow2");
    if create_encrypted("qcow2", &path, "aes", "abc", "4M", &WRITES[..2]).is_none() {
        return;
    }
    let Some(expected) = qemu_plain("qcow2", &path, "abc", &dir.path().join("plain.raw")) else {
        return;
    };
    use_passphrases(&[b"abc"]);
    let img = open(&path);
    assert_reads(&img, &expected, "aes");
    assert!(expected[3 << 20..(3 << 20) + 65536]
        .iter()
        .all(|&b| b == 0x11));
}
