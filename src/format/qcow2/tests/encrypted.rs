//! Encrypted qcow2 images (LUKS and the legacy AES method) made and written by qemu-img and
//! qemu-io, read through imgfs and compared with what qemu-img decrypts; without the right
//! passphrase they are refused by name. Writes from several threads, partial sectors of one
//! sector among them, leave images qemu-img checks clean and decrypts to what was written.

use super::*;
use crate::meta::keyring::testing::use_passphrases;
use crate::testutil::encrypted::{assert_qemu_check_clean, create_encrypted, qemu_plain};

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

/// Writes for four threads, in two rounds: unaligned ranges across clusters, each thread in
/// its own quarter of the disk; then 100-byte pieces side by side in sectors every thread
/// writes into (each such sector is read, decrypted, merged and encrypted again while the
/// others do the same). `expected` gets them in that order.
type Plans = Vec<Vec<(u64, Vec<u8>)>>;

fn encrypted_write_plan(expected: &mut [u8]) -> (Plans, Plans) {
    let size = expected.len() as u64;
    let (mut ranges, mut pieces) = (Vec::new(), Vec::new());
    for t in 0..4u64 {
        let mut rng = crate::testutil::Rng(0x5eed_c0de + t);
        let (mut own, mut shared) = (Vec::new(), Vec::new());
        for i in 0..40u64 {
            let len = 1 + rng.below(150_000);
            let region = size / 4;
            let offset = t * region + rng.below(region - len);
            own.push((offset, rng.bytes(len as usize)));
            let sector = i * 7919 % (size / 512 - 1);
            shared.push((sector * 512 + t * 100 + 5, vec![0x40 + t as u8; 100]));
        }
        ranges.push(own);
        pieces.push(shared);
    }
    for (offset, data) in ranges.iter().chain(&pieces).flatten() {
        expected[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }
    (ranges, pieces)
}

fn write_threads(img: &Arc<Qcow2Image>, plans: Plans) {
    std::thread::scope(|scope| {
        for writes in plans {
            scope.spawn(move || {
                for (offset, data) in writes {
                    img.write_at(&data, offset).unwrap();
                }
            });
        }
    });
}

#[test]
fn writes_into_encrypted_images_read_back_in_qemu() {
    for (method, passphrase) in [("luks", "hunter2"), ("aes", "abc")] {
        let dir = TempDir::new();
        let path = dir.path().join(format!("{method}.qcow2"));
        if create_encrypted("qcow2", &path, method, passphrase, "8M", WRITES).is_none() {
            return;
        }
        let Some(mut expected) =
            qemu_plain("qcow2", &path, passphrase, &dir.path().join("before.raw"))
        else {
            return;
        };
        use_passphrases(&[passphrase.as_bytes()]);
        let img = Arc::new(open_writable(&path));
        assert_eq!(img.read_only_reason(), None);
        let (ranges, pieces) = encrypted_write_plan(&mut expected);
        write_threads(&img, ranges);
        write_threads(&img, pieces);
        img.discard(6 << 20, 70_000).unwrap();
        expected[6 << 20..(6 << 20) + 70_000].fill(0);
        img.flush().unwrap();
        assert_reads(img.as_ref(), &expected, method);
        drop(img);
        assert_qemu_check_clean("qcow2", &path, passphrase);
        let after = qemu_plain("qcow2", &path, passphrase, &dir.path().join("after.raw"));
        assert_same(&after.unwrap(), &expected, method);
    }
}

/// A hostile L2 entry naming a cluster of the LUKS header: data written there would destroy
/// the key slots, so the write is refused, as writes over any other metadata are.
#[test]
fn writes_over_the_luks_header_are_refused() {
    let dir = TempDir::new();
    let path = dir.path().join("hostile.qcow2");
    if create_encrypted("qcow2", &path, "luks", "hunter2", "1M", &["write 0 64k"]).is_none() {
        return;
    }
    let header = Qcow2Header::read(&HostFile::open(&path, false).unwrap()).unwrap();
    let (luks_at, _) = header.crypto_header.unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let l1 = header.l1_table_offset as usize;
    let l2 = (u64::from_be_bytes(bytes[l1..l1 + 8].try_into().unwrap()) & OFFSET_MASK) as usize;
    let entry = u64::from_be_bytes(bytes[l2..l2 + 8].try_into().unwrap());
    put_u64(&mut bytes, l2, (entry & !OFFSET_MASK) | (luks_at + 65536));
    std::fs::write(&path, &bytes).unwrap();
    use_passphrases(&[b"hunter2"]);
    let img = open_writable(&path);
    let e = img.write_at(&[1; 512], 0).unwrap_err();
    assert!(e.to_string().contains("the LUKS header"), "{e}");
}

/// The LUKS header's clusters are the image's, as `qemu-img check` counts them: imgfs's check
/// finds no leak there (a repair would free the key slots), and the refcount rebuild of a
/// lazy-refcounts image left dirty keeps them, so later allocations never land on them.
#[test]
fn the_luks_header_is_counted_by_check_and_by_the_refcount_rebuild() {
    let dir = TempDir::new();
    let path = dir.path().join("lazy.qcow2");
    if create_encrypted(
        "qcow2",
        &path,
        "luks",
        "hunter2",
        "4M",
        &["write -P 0x31 0 64k"],
    )
    .is_none()
    {
        return;
    }
    use_passphrases(&[b"hunter2"]);
    let check = |path: &Path| {
        let file = HostFile::open(path, false).unwrap();
        let header = Qcow2Header::read(&file).unwrap();
        check(file, header, None, None, &|_, _| {}).unwrap()
    };
    let report = check(&path);
    assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:?}");
    // The dirty bit of lazy refcounts, as a crash leaves it: the first write rebuilds.
    let mut bytes = std::fs::read(&path).unwrap();
    put_u64(&mut bytes, 72, header::INCOMPAT_DIRTY);
    std::fs::write(&path, &bytes).unwrap();
    let img = open_writable(&path);
    let mut expected = read_all(&img);
    for (at, byte) in [(1 << 20, 0x32), (3 << 20, 0x33)] {
        img.write_at(&[byte; 70_000], at).unwrap();
        expected[at as usize..at as usize + 70_000].fill(byte);
    }
    img.flush().unwrap();
    drop(img);
    let report = check(&path);
    assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:?}");
    assert_qemu_check_clean("qcow2", &path, "hunter2");
    let after = qemu_plain("qcow2", &path, "hunter2", &dir.path().join("after.raw"));
    assert_same(&after.unwrap(), &expected, "after the rebuild");
}
