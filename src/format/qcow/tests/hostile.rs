//! Corrupt and hostile QCOW v1 images: every bad header field and table entry gives a clean
//! error naming it, a bad L2 table fails only the range it maps, and thousands of mutated images
//! open, serve and flush (or are refused) without a panic.

use super::*;
use crate::format::qcow::header::testing::{
    patch_u32, patch_u64, CRYPT_FIELD, L1_FIELD, SIZE_FIELD,
};

/// A qemu-img image with one allocated cluster: header, L1 at 48 (padded to 512 bytes), L2
/// table at 4 KiB, the cluster at 8 KiB.
fn one_cluster_image(dir: &TempDir) -> Option<PathBuf> {
    let path = dir.path().join("one.qcow");
    qemu_create(&path, "8M", None)?;
    qemu_io(&path, &["write -P 0x5a 0 4k"])?;
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 3 * 4096);
    assert_eq!(&bytes[48..56], &4096u64.to_be_bytes());
    assert_eq!(&bytes[4096..4104], &8192u64.to_be_bytes());
    Some(path)
}

#[test]
fn corrupt_headers_are_refused_cleanly() {
    // An encrypted header is refused for want of a passphrase.
    crate::meta::keyring::testing::use_passphrases(&[]);
    let dir = TempDir::new();
    let Some(good_path) = one_cluster_image(&dir) else {
        return;
    };
    let good = std::fs::read(&good_path).unwrap();
    let bad = dir.path().join("bad.qcow");
    let check = |bytes: &[u8], kind: ErrorKind, needle: &str| {
        std::fs::write(&bad, bytes).unwrap();
        let Err(e) = try_open(&bad, None) else {
            panic!("image must be refused ({needle})");
        };
        assert_eq!(e.kind(), kind, "{e}");
        assert!(
            e.to_string().contains(needle),
            "{e} should mention {needle}"
        );
        assert_eq!(e.path(), Some(bad.as_path()));
    };
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        b
    };
    check(&with(&|b| b[0] = b'X'), ErrorKind::Corrupt, "magic");
    check(
        &with(&|b| patch_u32(b, 4, 3)),
        ErrorKind::Unsupported,
        "version 3",
    );
    check(
        &with(&|b| b[32] = 17),
        ErrorKind::Unsupported,
        "cluster_bits 17",
    );
    check(
        &with(&|b| b[32] = 8),
        ErrorKind::Unsupported,
        "cluster_bits 8",
    );
    check(&with(&|b| b[33] = 14), ErrorKind::Unsupported, "l2_bits 14");
    check(
        &with(&|b| patch_u32(b, CRYPT_FIELD, 1)),
        ErrorKind::Unsupported,
        "encrypted (AES): give its passphrase",
    );
    check(
        &with(&|b| patch_u64(b, SIZE_FIELD, u64::MAX - 5)),
        ErrorKind::Corrupt,
        "too large",
    );
    check(
        &with(&|b| patch_u64(b, SIZE_FIELD, 1 << 55)),
        ErrorKind::Unsupported,
        "L1 entries",
    );
    // A size whose L1 table would not fit in the file.
    check(
        &with(&|b| patch_u64(b, SIZE_FIELD, 1 << 40)),
        ErrorKind::Corrupt,
        "beyond the end of the file",
    );
    check(
        &with(&|b| patch_u64(b, L1_FIELD, 1 << 20)),
        ErrorKind::Corrupt,
        "L1 table (4 entries at l1_table_offset 0x100000)",
    );
    check(
        &with(&|b| patch_u64(b, 48, 1 << 20)),
        ErrorKind::Corrupt,
        "L2 table 0 at 0x100000 (+4096) is beyond the end",
    );
    check(
        &with(&|b| patch_u64(b, 48, 4096 + 8)),
        ErrorKind::Corrupt,
        "L1 entry 0 points to L2 table offset 0x1008, which is not sector aligned",
    );
    check(
        &with(&|b| {
            patch_u64(b, 8, 12280);
            patch_u32(b, 16, 10);
        }),
        ErrorKind::Corrupt,
        "backing file name (10 bytes",
    );
    check(&good[..40], ErrorKind::Corrupt, "shorter than the 48-byte");
}

#[test]
fn corrupt_l2_entries_fail_reads_of_their_table_only() {
    let dir = TempDir::new();
    let Some(path) = one_cluster_image(&dir) else {
        return;
    };
    let good = std::fs::read(&path).unwrap();
    for (entry, needle) in [
        (1u64 << 40, "beyond the end of the file"),
        (8192 + 100, "not sector aligned"),
        ((1 << 63) | (16 << 51) | 56, "overlaps the L1 table"),
        (
            (1 << 63) | (100 << 51) | 12200,
            "beyond the end of the file",
        ),
    ] {
        let mut bytes = good.clone();
        patch_u64(&mut bytes, 4096 + 8, entry);
        std::fs::write(&path, &bytes).unwrap();
        let img = open_rw(&path, None);
        let mut buf = vec![0u8; 4096];
        let e = img.read_at(&mut buf, 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(
            e.to_string().contains(needle),
            "{e} should mention {needle}"
        );
        assert!(e.to_string().contains("L2 table 0 entry 1"), "{e}");
        assert!(img.write_at(&buf, 0).is_err());
        assert!(img.block_status(0, 4096).is_err());
        // The rest of the disk, under other tables, is still served.
        img.read_at(&mut buf, 3 * MIB).unwrap();
    }
}

/// Found by fuzzing: a discard punched a data cluster that was the L2 table itself, so the
/// table read back as zeros after a reopen while the cached copy had shown the old mapping.
#[test]
fn writes_and_discards_through_a_cluster_on_an_l2_table_are_refused() {
    let dir = TempDir::new();
    let Some(path) = one_cluster_image(&dir) else {
        return;
    };
    let mut bytes = std::fs::read(&path).unwrap();
    // Guest cluster 1 names the L2 table (at 4 KiB) as its data.
    patch_u64(&mut bytes, 4096 + 8, 4096);
    std::fs::write(&path, &bytes).unwrap();
    let img = open_rw(&path, None);
    for result in [
        img.write_at(&[1; 512], 4096 + 512),
        img.discard(4096, 4096),
        img.discard(0, 3 * 4096),
    ] {
        let e = result.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains("on the L2 table at 0x1000"), "{e}");
    }
    // Elsewhere the image is written as usual, and nothing reached the table.
    img.write_at(&[7; 4096], 2 * 4096).unwrap();
    img.flush().unwrap();
    drop(img);
    let img = open_rw(&path, None);
    let mut buf = vec![0u8; 3 * 4096];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0x5a), "cluster 0 kept");
    assert!(buf[2 * 4096..].iter().all(|&b| b == 7), "cluster 2 written");
}

#[test]
fn shared_l2_tables_serve_read_only() {
    let dir = TempDir::new();
    let Some(path) = one_cluster_image(&dir) else {
        return;
    };
    let mut bytes = std::fs::read(&path).unwrap();
    patch_u64(&mut bytes, 48 + 8, 4096);
    std::fs::write(&path, &bytes).unwrap();
    let img = open_rw(&path, None);
    let reason = img.read_only_reason().unwrap();
    assert!(
        reason.contains("L1 entries 0 and 1 point to overlapping"),
        "{reason}"
    );
    assert_eq!(
        img.write_at(&[1; 10], 0).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    // Reads still follow the map: the second 2 MiB show the same cluster.
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 2 * MIB).unwrap();
    assert_eq!(buf, [0x5a; 4096]);
}

#[test]
fn undecodable_compressed_cluster_is_a_clean_error() {
    let dir = TempDir::new();
    let Some(path) = one_cluster_image(&dir) else {
        return;
    };
    let mut bytes = std::fs::read(&path).unwrap();
    // 40 bytes of noise at 8 KiB, marked as compressed.
    bytes[8192..8232].copy_from_slice(&Rng(1).bytes(40));
    patch_u64(&mut bytes, 4096, (1 << 63) | (40 << 51) | 8192);
    std::fs::write(&path, &bytes).unwrap();
    let img = open_rw(&path, None);
    let mut buf = vec![0u8; 512];
    let e = img.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(
        e.to_string().contains("compressed cluster (40 bytes)"),
        "{e}"
    );
    assert!(
        img.write_at(&buf, 0).is_err(),
        "a partial write needs the old content"
    );
    // Overwriting the whole cluster does not.
    img.write_at(&[3; 4096], 0).unwrap();
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [3; 512]);
}

/// Hostile images: thousands of deterministic mutations of a valid image with normal,
/// compressed and unallocated clusters (random bytes and boundary values in the header, the L1
/// table and the L2 tables). Opening must give an image or a clean error, and an image that
/// opens must serve reads, block status, writes and flushes without a panic.
#[test]
fn mutated_images_never_panic() {
    const INTERESTING: [u64; 10] = [
        0,
        1,
        511,
        512,
        4096,
        0x7fff_ffff,
        1 << 63,
        (1 << 63) | (4095 << 51) | 0x3000,
        u64::MAX,
        0x1_0000_0000,
    ];
    let dir = TempDir::new();
    let raw = dir.path().join("src.raw");
    mixed_raw(&raw, 2 * MIB as usize + 100 * 512, 21);
    let source = dir.path().join("src.qcow");
    let Some(()) = qemu_compress(&raw, &source) else {
        return;
    };
    let base = std::fs::read(&source).unwrap();
    let metadata_span = 8192.min(base.len());
    let path = dir.path().join("m.qcow");
    let mutate = |bytes: &mut Vec<u8>, rng: &mut Rng| {
        for _ in 0..1 + rng.below(4) {
            let span = match rng.below(4) {
                0 => bytes.len(),
                1 => 48,
                _ => metadata_span,
            };
            let at = (rng.below(span as u64) as usize).min(bytes.len() - 8);
            if rng.below(2) == 0 {
                let value = INTERESTING[rng.below(INTERESTING.len() as u64) as usize];
                bytes[at & !7..(at & !7) + 8].copy_from_slice(&value.to_be_bytes());
            } else {
                bytes[at] = rng.next() as u8;
            }
        }
    };
    assert_mutations_never_panic(&base, &path, 1500, mutate, |path| {
        let Ok(img) = try_open(path, None) else {
            return false;
        };
        exercise_image(&img, true);
        true
    });
}

/// An image encrypted with the legacy AES method reads as qemu-img decrypts it, and what is
/// written (in place, into new clusters, partial sectors, a discard) QEMU decrypts back.
#[test]
fn legacy_aes_images_read_and_write_like_qemu() {
    use crate::testutil::encrypted::{create_encrypted, qemu_plain};
    let dir = TempDir::new();
    let path = dir.path().join("aes.qcow");
    let writes = ["write -P 0x5a 1000 70000", "write -P 0x33 3M 4096"];
    if create_encrypted("qcow", &path, "aes", "abc", "4M", &writes).is_none() {
        return;
    }
    let raw = dir.path().join("plain.raw");
    let Some(mut expected) = qemu_plain("qcow", &path, "abc", &raw) else {
        return;
    };
    assert!(expected[1000..71_000].iter().all(|&b| b == 0x5a));
    crate::meta::keyring::testing::use_passphrases(&[b"abc"]);
    let img = try_open(&path, None).unwrap();
    assert_eq!(img.read_only_reason(), None);
    let mut got = vec![0u8; expected.len()];
    img.read_at(&mut got, 0).unwrap();
    assert!(got == expected);
    let mut part = vec![0u8; 333];
    img.read_at(&mut part, 1000 - 7).unwrap();
    assert_eq!(&part[..], &expected[993..1326]);
    for (at, len, byte) in [
        (2000, 10, 0x61),
        (60_000, 200_000, 0x62),
        ((4 << 20) - 9, 9, 0x63),
    ] {
        img.write_at(&vec![byte; len], at as u64).unwrap();
        expected[at..at + len].fill(byte);
    }
    img.discard(3 << 20, 4096).unwrap();
    expected[3 << 20..(3 << 20) + 4096].fill(0);
    img.flush().unwrap();
    drop(img);
    assert!(qemu_plain("qcow", &path, "abc", &raw).unwrap() == expected);
}
