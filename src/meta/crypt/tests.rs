//! Tests of the crypt module as a whole: LUKS images built here (so unlocking and the hostile
//! header checks run without QEMU), and QEMU as the oracle for standalone LUKS files, qcow2 with
//! LUKS and the legacy qcow2 AES method, in both directions (QEMU writes, imgfs decrypts;
//! imgfs encrypts, QEMU reads).

use std::path::Path;

use super::af::{self, Hash};
use super::cipher::{IvGen, Mode, Spec};
use super::{qcow_aes, LuksHeader, SectorCipher};
use crate::error::{Error, ErrorKind, Result};
use crate::testutil::{path_str, qemu, Rng, TempDir};

/// Reads from an in-memory image the way a driver's `read_at` would: a clean error past its end.
fn reader(bytes: &[u8]) -> impl FnMut(u64, &mut [u8]) -> Result<()> + '_ {
    move |offset, buf| {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|start| bytes.get(start..start.checked_add(buf.len())?))
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "read of {} bytes at {offset} past the end",
                    buf.len()
                ))
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

fn put(bytes: &mut [u8], at: usize, value: &[u8]) {
    bytes[at..at + value.len()].copy_from_slice(value);
}

fn slot_at(i: usize) -> usize {
    208 + 48 * i
}

/// A LUKS1 image built as QEMU would, with tiny iteration counts: `passphrases[i]` in slot i
/// (None: disabled), 8 payload sectors of a known pattern.
struct Built {
    bytes: Vec<u8>,
    plain: Vec<u8>,
    payload: usize,
}

fn build(
    cipher: (&str, &str, &str),
    spec: Spec,
    hash: Hash,
    stripes: u32,
    passphrases: &[Option<&[u8]>],
) -> Built {
    let mut rng = Rng(0x1234_5678);
    let master_key = rng.bytes(spec.key_bytes);
    let material_len = spec.key_bytes * stripes as usize;
    let slot_sectors = material_len.div_ceil(512).next_multiple_of(8);
    let payload_sector = 8 + 8 * slot_sectors;
    let payload = payload_sector * 512;
    let mut bytes = vec![0u8; payload + 8 * 512];

    put(&mut bytes, 0, b"LUKS\xba\xbe\x00\x01");
    put(&mut bytes, 8, cipher.0.as_bytes());
    put(&mut bytes, 40, cipher.1.as_bytes());
    put(&mut bytes, 72, cipher.2.as_bytes());
    put(&mut bytes, 104, &(payload_sector as u32).to_be_bytes());
    put(&mut bytes, 108, &(spec.key_bytes as u32).to_be_bytes());
    let mk_salt = rng.bytes(32);
    let mut digest = [0u8; 20];
    hash.pbkdf2(&master_key, &mk_salt, 3, "it", &mut digest)
        .unwrap();
    put(&mut bytes, 112, &digest);
    put(&mut bytes, 132, &mk_salt);
    put(&mut bytes, 164, &3u32.to_be_bytes());
    put(&mut bytes, 168, b"6f1ac1c2-0000-4000-8000-000000000000");
    for i in 0..8 {
        let at = slot_at(i);
        let key_offset = 8 + i * slot_sectors;
        put(&mut bytes, at + 40, &(key_offset as u32).to_be_bytes());
        put(&mut bytes, at + 44, &stripes.to_be_bytes());
        let Some(Some(passphrase)) = passphrases.get(i) else {
            put(&mut bytes, at, &0xDEADu32.to_be_bytes());
            continue;
        };
        put(&mut bytes, at, &0x00AC_71F3u32.to_be_bytes());
        put(&mut bytes, at + 4, &5u32.to_be_bytes());
        let salt = rng.bytes(32);
        put(&mut bytes, at + 8, &salt);
        let mut slot_key = vec![0u8; spec.key_bytes];
        hash.pbkdf2(passphrase, &salt, 5, "it", &mut slot_key)
            .unwrap();
        let mut material = af::split(hash, &master_key, stripes as usize, &mut || {
            rng.next() as u8
        });
        material.resize(material_len.next_multiple_of(512), 0);
        SectorCipher::new(spec, &slot_key)
            .unwrap()
            .encrypt(0, &mut material)
            .unwrap();
        put(&mut bytes, key_offset * 512, &material[..material_len]);
    }
    let plain = rng.bytes(8 * 512);
    let mut encrypted = plain.clone();
    SectorCipher::new(spec, &master_key)
        .unwrap()
        .encrypt(0, &mut encrypted)
        .unwrap();
    put(&mut bytes, payload, &encrypted);
    Built {
        bytes,
        plain,
        payload,
    }
}

fn default_build() -> Built {
    let spec = Spec::new(64, Mode::Xts, IvGen::Plain64).unwrap();
    build(
        ("aes", "xts-plain64", "sha256"),
        spec,
        Hash::Sha256,
        4000,
        &[Some(b"first"), None, None, Some(b"second")],
    )
}

/// Unlocks `bytes` with `passphrase`, decrypts the payload and compares it with `plain`.
fn unlock_and_check(built: &Built, passphrase: &[u8]) -> Option<String> {
    let header = LuksHeader::parse(&built.bytes).unwrap();
    let cipher = header
        .unlock(passphrase, &mut reader(&built.bytes))
        .unwrap()?;
    let mut payload = built.bytes[built.payload..].to_vec();
    cipher.decrypt(0, &mut payload).unwrap();
    assert_eq!(payload, built.plain, "{}", cipher.describe());
    Some(cipher.describe())
}

#[test]
fn built_images_unlock_with_each_slot_and_refuse_wrong_passphrases() {
    let built = default_build();
    let header = LuksHeader::parse(&built.bytes).unwrap();
    assert_eq!(
        header.describe(),
        "LUKS1 aes-xts-plain64, 512-bit key, hash sha256, active key slots: 0, 3"
    );
    assert_eq!(header.uuid(), "6f1ac1c2-0000-4000-8000-000000000000");
    assert_eq!(header.payload_offset() * 512, built.payload as u64);
    // Slot 3's material ends 64 x 4000 bytes after sector 8 + 3 x 504.
    assert_eq!(header.span().unwrap(), (8 + 3 * 504) * 512 + 256_000);
    header.check_supported().unwrap();
    assert_eq!(
        unlock_and_check(&built, b"first").unwrap(),
        "aes-256-xts-plain64"
    );
    unlock_and_check(&built, b"second").unwrap();
    // The passphrase ends at a NUL, as QEMU's strlen makes it.
    unlock_and_check(&built, b"second\0ignored").unwrap();
    assert!(unlock_and_check(&built, b"third").is_none());
    assert!(unlock_and_check(&built, b"").is_none());
}

#[test]
fn built_images_of_every_spec_unlock() {
    let cases: [(&str, &str, Spec, Hash); 6] = [
        (
            "cbc-essiv:sha256",
            "sha1",
            Spec::new(16, Mode::Cbc, IvGen::Essiv(Hash::Sha256)).unwrap(),
            Hash::Sha1,
        ),
        (
            "xts-plain",
            "sha512",
            Spec::new(48, Mode::Xts, IvGen::Plain).unwrap(),
            Hash::Sha512,
        ),
        (
            "cbc-plain64",
            "sha384",
            Spec::new(24, Mode::Cbc, IvGen::Plain64).unwrap(),
            Hash::Sha384,
        ),
        (
            "cbc-plain",
            "sha256",
            Spec::new(32, Mode::Cbc, IvGen::Plain).unwrap(),
            Hash::Sha256,
        ),
        (
            "ecb",
            "sha256",
            Spec::new(32, Mode::Ecb, IvGen::Plain64).unwrap(),
            Hash::Sha256,
        ),
        // A hash after plain64 is ignored, as dm-crypt and QEMU do.
        (
            "xts-plain64:sha1",
            "sha1",
            Spec::new(32, Mode::Xts, IvGen::Plain64).unwrap(),
            Hash::Sha1,
        ),
    ];
    for (mode, hash_name, spec, hash) in cases {
        // 24 x 4000 = 96000 bytes: key material ending in half a sector, as QEMU's aes-192-cbc.
        let built = build(("aes", mode, hash_name), spec, hash, 4000, &[Some(b"pw")]);
        assert_eq!(
            unlock_and_check(&built, b"pw").unwrap(),
            spec.name(),
            "{mode}"
        );
        assert!(unlock_and_check(&built, b"wrong").is_none(), "{mode}");
    }
}

fn parse_err(bytes: &[u8]) -> Error {
    LuksHeader::parse(bytes).unwrap_err()
}

#[test]
fn hostile_headers_give_clean_errors() {
    let built = default_build();
    let good = &built.bytes[..];
    for len in [0, 5, 6, 7, 8, 100, 591] {
        parse_err(&good[..len]);
    }
    let edit = |at: usize, value: &[u8]| {
        let mut bytes = good[..LuksHeader::LEN].to_vec();
        put(&mut bytes, at, value);
        bytes
    };
    assert_eq!(
        parse_err(&edit(0, b"LUKS\xba\xbf")).kind(),
        ErrorKind::Corrupt
    );
    let luks2 = edit(6, &[0, 2]);
    for bytes in [&luks2[..], &luks2[..8]] {
        let e = parse_err(bytes);
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("LUKS2"), "{e}");
    }
    assert_eq!(parse_err(&edit(6, &[0, 0])).kind(), ErrorKind::Unsupported);
    assert_eq!(parse_err(&edit(6, &[0, 3])).kind(), ErrorKind::Unsupported);
    assert_eq!(
        parse_err(&edit(108, &0u32.to_be_bytes())).kind(),
        ErrorKind::Corrupt
    );
    parse_err(&edit(108, &1000u32.to_be_bytes()));
    parse_err(&edit(108, &u32::MAX.to_be_bytes()));
    parse_err(&edit(164, &0u32.to_be_bytes()));
    // Iteration counts that would hold the daemon for an hour are refused before deriving.
    let slow = parse_err(&edit(164, &u32::MAX.to_be_bytes()));
    assert!(
        slow.to_string().contains("more than the 16777216"),
        "{slow}"
    );
    parse_err(&edit(8, &[b'a'; 32]));
    parse_err(&edit(40, &[b'x'; 32]));
    parse_err(&edit(72, &[b's'; 32]));
    let slot0 = slot_at(0);
    parse_err(&edit(slot0, &0x1234_5678u32.to_be_bytes()));
    parse_err(&edit(slot0 + 4, &0u32.to_be_bytes()));
    assert_eq!(
        parse_err(&edit(slot0 + 4, &(1u32 << 30).to_be_bytes())).kind(),
        ErrorKind::Unsupported
    );
    parse_err(&edit(slot0 + 44, &0u32.to_be_bytes()));
    parse_err(&edit(slot0 + 44, &u32::MAX.to_be_bytes()));
    parse_err(&edit(slot0 + 44, &65537u32.to_be_bytes()));
    parse_err(&edit(slot0 + 40, &0u32.to_be_bytes()));
    parse_err(&edit(slot0 + 40, &1u32.to_be_bytes()));
    // A disabled slot's fields are never used, so nonsense there is fine.
    let slot1 = slot_at(1);
    LuksHeader::parse(&edit(slot1 + 44, &0u32.to_be_bytes())).unwrap();
    LuksHeader::parse(&edit(slot1 + 40, &u32::MAX.to_be_bytes())).unwrap();

    // Key material as far out as a header can put it: the span still computes, and the read
    // fails cleanly.
    let far = LuksHeader::parse(&edit(slot0 + 40, &u32::MAX.to_be_bytes())).unwrap();
    assert_eq!(far.span().unwrap(), u64::from(u32::MAX) * 512 + 256_000);
    assert!(far.unlock(b"first", &mut reader(good)).is_err());
    // The most stripes allowed, past the end of the image: a read error, not a huge read.
    let wide = LuksHeader::parse(&edit(slot0 + 44, &65536u32.to_be_bytes())).unwrap();
    assert!(wide.unlock(b"first", &mut reader(good)).is_err());
    // Stripes that decode to a wrong key: a wrong passphrase as far as the header can tell.
    let fewer = LuksHeader::parse(&edit(slot0 + 44, &3999u32.to_be_bytes())).unwrap();
    assert!(fewer.unlock(b"first", &mut reader(good)).unwrap().is_none());
    // An aes-192-cbc key slot with an odd stripe count ends in half an AES block.
    let mut odd = edit(40, b"cbc-plain64\0");
    put(&mut odd, 108, &24u32.to_be_bytes());
    put(&mut odd, slot0 + 44, &3u32.to_be_bytes());
    let odd = LuksHeader::parse(&odd).unwrap();
    assert_eq!(
        odd.unlock(b"first", &mut reader(good)).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
}

#[test]
fn unsupported_cipher_specs_are_named() {
    let built = default_build();
    let good = &built.bytes[..LuksHeader::LEN];
    let with = |at: usize, text: &str, key_bytes: u32| {
        let mut bytes = good.to_vec();
        bytes[at..at + 32].fill(0);
        put(&mut bytes, at, text.as_bytes());
        put(&mut bytes, 108, &key_bytes.to_be_bytes());
        LuksHeader::parse(&bytes).unwrap()
    };
    let cases = [
        (with(8, "serpent", 64), "serpent-xts-plain64"),
        (with(8, "twofish", 64), "twofish"),
        (with(8, "cast5", 16), "cast5"),
        (with(8, "sm4", 32), "sm4"),
        (with(40, "ctr-plain64", 32), "ctr"),
        (with(40, "xts", 64), "no IV generator"),
        (with(40, "cbc-essiv", 32), "essiv without a hash"),
        (with(40, "cbc-essiv:sha1", 32), "essiv:sha1"),
        (with(40, "cbc-essiv:md5", 32), "md5"),
        (with(40, "cbc-benbi", 32), "benbi"),
        (with(72, "sha224", 64), "sha224"),
        (with(72, "ripemd160", 64), "ripemd160"),
        (with(8, "aes", 40), "aes-xts with 40 key bytes"),
        (with(40, "cbc-plain64", 64), "aes-cbc with 64 key bytes"),
    ];
    for (header, name) in cases {
        let e = header.check_supported().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        assert!(e.to_string().contains(name), "{name}: {e}");
        let e = header
            .unlock(b"first", &mut reader(&built.bytes))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        // Still describable for `imgfs info`.
        assert!(header.describe().starts_with("LUKS1 "));
    }
}

#[test]
fn mutated_headers_never_panic() {
    // Stripes of 100 keep each round cheap; iteration fields are reset to small values after
    // mutating, since large ones are legitimately slow (see Hash::pbkdf2).
    let spec = Spec::new(32, Mode::Cbc, IvGen::Essiv(Hash::Sha256)).unwrap();
    let built = build(
        ("aes", "cbc-essiv:sha256", "sha1"),
        spec,
        Hash::Sha1,
        100,
        &[Some(b"pw"), Some(b"pw2")],
    );
    let mut rng = Rng(0xfeed_5eed);
    let (mut opened, mut refused) = (0, 0);
    for _ in 0..3000 {
        let mut bytes = built.bytes.clone();
        for _ in 0..=rng.below(4) {
            let at = rng.below(LuksHeader::LEN as u64) as usize;
            bytes[at] = rng.next() as u8;
        }
        for at in [164].into_iter().chain((0..8).map(|i| slot_at(i) + 4)) {
            let n = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
            put(&mut bytes, at, &(n % 8).to_be_bytes());
        }
        let len = if rng.below(8) == 0 {
            rng.below(LuksHeader::LEN as u64) as usize
        } else {
            bytes.len()
        };
        let Ok(header) = LuksHeader::parse(&bytes[..len]) else {
            refused += 1;
            continue;
        };
        let _ = (header.span(), header.describe(), header.check_supported());
        let unlocked = header.unlock(b"pw", &mut reader(&bytes[..len]));
        match unlocked {
            Ok(Some(cipher)) => {
                opened += 1;
                cipher.decrypt(0, &mut bytes[built.payload..]).unwrap();
            }
            Ok(None) | Err(_) => refused += 1,
        }
    }
    assert!(
        opened > 100 && refused > 100,
        "opened {opened}, refused {refused}"
    );
}

#[test]
fn qcow_aes_key_is_the_zero_padded_passphrase_prefix() {
    let spec = Spec::new(16, Mode::Cbc, IvGen::Plain64).unwrap();
    let encrypt = |cipher: &SectorCipher| {
        let mut sector = vec![0x5au8; 1024];
        cipher.encrypt(77, &mut sector).unwrap();
        sector
    };
    let reference = |key: &[u8; 16]| encrypt(&SectorCipher::new(spec, key).unwrap());
    assert_eq!(encrypt(&qcow_aes(b"").unwrap()), reference(&[0; 16]));
    assert_eq!(
        encrypt(&qcow_aes(b"abc").unwrap()),
        reference(b"abc\0\0\0\0\0\0\0\0\0\0\0\0\0")
    );
    assert_eq!(
        encrypt(&qcow_aes(b"abc\0def").unwrap()),
        reference(b"abc\0\0\0\0\0\0\0\0\0\0\0\0\0")
    );
    let long = b"0123456789abcdefXYZ";
    assert_eq!(
        encrypt(&qcow_aes(long).unwrap()),
        reference(b"0123456789abcdef")
    );
    assert_eq!(qcow_aes(long).unwrap().describe(), "aes-128-cbc-plain64");
}

// QEMU as the oracle.

const SECRET: &str = "secret,id=sec0,data=hunter2";

/// Runs a QEMU tool that must succeed (qemu-io reports failed commands on stdout only).
fn run(tool: &str, args: &[&str]) -> Option<()> {
    let out = qemu(tool, args)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("failed"),
        "{tool} {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(())
}

/// What QEMU reads from the image `opts` describes (`--image-opts` form).
fn qemu_plain(secret: &str, opts: &str, dir: &Path) -> Option<Vec<u8>> {
    let out = dir.join("expected.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "--object",
            secret,
            "--image-opts",
            opts,
            "-O",
            "raw",
            path_str(&out),
        ],
    )?;
    Some(std::fs::read(&out).unwrap())
}

/// Writes QEMU's three test patterns through the image `opts` describes.
fn qemu_write_patterns(secret: &str, opts: &str) -> Option<()> {
    let writes = [
        "write -P 0x5a 524288 64k",
        "write -P 0xa5 0 4096",
        "write -P 0x33 1044480 4096",
    ];
    let mut args = vec!["--object", secret, "--image-opts", opts];
    for w in &writes {
        args.extend(["-c", w]);
    }
    run("qemu-io", &args)
}

fn check_patterns(plain: &[u8]) {
    assert!(plain[524288..589824].iter().all(|&b| b == 0x5a));
    assert!(plain[..4096].iter().all(|&b| b == 0xa5));
    assert!(plain[1044480..].iter().all(|&b| b == 0x33));
}

/// A 1 MiB standalone LUKS file made by qemu-img with the extra creation options `extra`:
/// decrypts like QEMU reads it, and QEMU reads what imgfs encrypts into it.
fn check_qemu_luks(extra: &str, expected_cipher: &str) {
    let dir = TempDir::new();
    let path = dir.path().join("t.luks");
    let options = format!("key-secret=sec0,iter-time=10{extra}");
    let create = [
        "create",
        "-f",
        "luks",
        "--object",
        SECRET,
        "-o",
        &options,
        path_str(&path),
        "1M",
    ];
    if run("qemu-img", &create).is_none() {
        return;
    }
    let opts = format!(
        "driver=luks,key-secret=sec0,file.filename={}",
        path_str(&path)
    );
    qemu_write_patterns(SECRET, &opts).unwrap();
    let expected = qemu_plain(SECRET, &opts, dir.path()).unwrap();
    check_patterns(&expected);

    let mut file = std::fs::read(&path).unwrap();
    let header = LuksHeader::parse(&file[..LuksHeader::LEN]).unwrap();
    let payload = usize::try_from(header.payload_offset() * 512).unwrap();
    assert!(
        header.span().unwrap() <= payload as u64,
        "{}",
        header.describe()
    );
    assert!(header
        .unlock(b"hunter3", &mut reader(&file))
        .unwrap()
        .is_none());
    let cipher = header
        .unlock(b"hunter2", &mut reader(&file))
        .unwrap()
        .unwrap();
    assert_eq!(cipher.describe(), expected_cipher, "{}", header.describe());
    // Sector numbers start at 0 at the payload, not at the file's start.
    let mut plain = file[payload..].to_vec();
    cipher.decrypt(0, &mut plain).unwrap();
    assert!(
        plain == expected,
        "{expected_cipher}: decryption differs from QEMU's"
    );

    // imgfs encrypts sectors 100..108; QEMU must read them back.
    let mine: Vec<u8> = (0..4096u32).map(|i| (i * 31 % 253) as u8).collect();
    let mut encrypted = mine.clone();
    cipher.encrypt(100, &mut encrypted).unwrap();
    put(&mut file, payload + 100 * 512, &encrypted);
    std::fs::write(&path, &file).unwrap();
    let read_back = qemu_plain(SECRET, &opts, dir.path()).unwrap();
    assert!(
        read_back[51200..55296] == mine[..],
        "{expected_cipher}: QEMU reads other bytes"
    );
}

#[test]
fn qemu_luks_default_is_aes_256_xts_plain64() {
    check_qemu_luks("", "aes-256-xts-plain64");
}

#[test]
fn qemu_luks_aes_128_cbc_essiv_sha256_with_sha1() {
    let o =
        ",cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha1";
    check_qemu_luks(o, "aes-128-cbc-essiv:sha256");
}

#[test]
fn qemu_luks_aes_192_xts_plain() {
    check_qemu_luks(
        ",cipher-alg=aes-192,cipher-mode=xts,ivgen-alg=plain",
        "aes-192-xts-plain",
    );
}

#[test]
fn qemu_luks_aes_256_cbc_plain64_with_sha512() {
    check_qemu_luks(
        ",cipher-mode=cbc,ivgen-alg=plain64,hash-alg=sha512",
        "aes-256-cbc-plain64",
    );
}

#[test]
fn qemu_luks_aes_128_cbc_plain64_with_sha384() {
    // Not aes-192-cbc: its key material (24 x 4000 bytes) ends in half a sector, and QEMU 10
    // aborts on that (crypto/block.c asserts whole sectors), both creating and opening such a
    // file; imgfs opens them (built_images_of_every_spec_unlock covers that case).
    let o = ",cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=plain64,hash-alg=sha384";
    check_qemu_luks(o, "aes-128-cbc-plain64");
}

#[test]
fn qemu_luks_aes_256_xts_essiv_hashes_both_key_halves() {
    let o = ",cipher-mode=xts,ivgen-alg=essiv,ivgen-hash-alg=sha256";
    check_qemu_luks(o, "aes-256-xts-essiv:sha256");
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Where guest offset `guest` of a small qcow2 file is stored (test-only L1/L2 walk).
fn qcow2_host_offset(file: &[u8], guest: u64) -> usize {
    let cluster = 1u64 << be32(file, 20);
    let mask = 0x00ff_ffff_ffff_fe00;
    let (l2_entries, l1) = (cluster / 8, be64(file, 40) as usize);
    let l1_entry = be64(file, l1 + 8 * (guest / cluster / l2_entries) as usize) & mask;
    let l2_entry = be64(
        file,
        l1_entry as usize + 8 * (guest / cluster % l2_entries) as usize,
    ) & mask;
    assert_ne!(l2_entry, 0, "guest offset {guest} is not allocated");
    (l2_entry + guest % cluster) as usize
}

/// The (offset, length) of a qcow2 v3 file's LUKS header (the full disk encryption header
/// extension, 0x0537be77).
fn qcow2_crypto_header(file: &[u8]) -> (usize, usize) {
    let mut at = be32(file, 100) as usize;
    loop {
        let (kind, len) = (be32(file, at), be32(file, at + 4) as usize);
        assert_ne!(kind, 0, "no crypto header extension");
        if kind == 0x0537_be77 {
            return (be64(file, at + 8) as usize, be64(file, at + 16) as usize);
        }
        at += 8 + len.next_multiple_of(8);
    }
}

#[test]
fn qemu_qcow2_luks_numbers_sectors_by_host_offset() {
    let dir = TempDir::new();
    let path = dir.path().join("luks.qcow2");
    let create = [
        "create",
        "-f",
        "qcow2",
        "--object",
        SECRET,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        path_str(&path),
        "1M",
    ];
    if run("qemu-img", &create).is_none() {
        return;
    }
    let opts = format!(
        "driver=qcow2,encrypt.key-secret=sec0,file.filename={}",
        path_str(&path)
    );
    qemu_write_patterns(SECRET, &opts).unwrap();
    let expected = qemu_plain(SECRET, &opts, dir.path()).unwrap();
    check_patterns(&expected);

    let file = std::fs::read(&path).unwrap();
    let (start, len) = qcow2_crypto_header(&file);
    let luks = &file[start..start + len];
    let header = LuksHeader::parse(luks).unwrap();
    assert!(
        header.span().unwrap() <= len as u64,
        "{}",
        header.describe()
    );
    let cipher = header
        .unlock(b"hunter2", &mut reader(luks))
        .unwrap()
        .unwrap();
    assert_eq!(cipher.describe(), "aes-256-xts-plain64");
    for guest in [524288u64, 0, 1044480] {
        let host = qcow2_host_offset(&file, guest);
        assert_ne!(host as u64, guest);
        let mut data = file[host..host + 4096].to_vec();
        cipher.decrypt(host as u64 / 512, &mut data).unwrap();
        assert!(
            data[..] == expected[guest as usize..guest as usize + 4096],
            "guest {guest}"
        );
    }
}

#[test]
fn qemu_qcow2_aes_numbers_sectors_by_guest_offset_and_truncates_the_passphrase() {
    // QEMU 10 still creates and writes these with qemu-img and qemu-io (only system emulators
    // refuse them), so QEMU is the oracle here too. The 19-byte passphrase is cut to 16.
    let secret = "secret,id=sec0,data=0123456789abcdefXYZ";
    let dir = TempDir::new();
    let path = dir.path().join("aes.qcow2");
    let create = [
        "create",
        "-f",
        "qcow2",
        "--object",
        secret,
        "-o",
        "encrypt.format=aes,encrypt.key-secret=sec0",
        path_str(&path),
        "1M",
    ];
    if run("qemu-img", &create).is_none() {
        return;
    }
    let opts = format!(
        "driver=qcow2,encrypt.key-secret=sec0,file.filename={}",
        path_str(&path)
    );
    qemu_write_patterns(secret, &opts).unwrap();
    let expected = qemu_plain(secret, &opts, dir.path()).unwrap();
    check_patterns(&expected);

    let mut file = std::fs::read(&path).unwrap();
    let cipher = qcow_aes(b"0123456789abcdef").unwrap();
    for guest in [524288u64, 0, 1044480] {
        let host = qcow2_host_offset(&file, guest);
        assert_ne!(host as u64, guest);
        let mut data = file[host..host + 4096].to_vec();
        cipher.decrypt(guest / 512, &mut data).unwrap();
        assert!(
            data[..] == expected[guest as usize..guest as usize + 4096],
            "guest {guest}"
        );
    }

    // imgfs encrypts guest bytes 0x80000.. into their cluster; QEMU must read them back.
    let mine: Vec<u8> = (0..8192u32).map(|i| (i * 17 % 241) as u8).collect();
    let mut encrypted = mine.clone();
    cipher.encrypt(524288 / 512, &mut encrypted).unwrap();
    let host = qcow2_host_offset(&file, 524288);
    put(&mut file, host, &encrypted);
    std::fs::write(&path, &file).unwrap();
    let read_back = qemu_plain(secret, &opts, dir.path()).unwrap();
    assert!(read_back[524288..532480] == mine[..]);
}

/// Small LUKS containers for the fuzzer: one stripe per key slot (QEMU writes 4000, imgfs
/// reads any count), unlocked by the fuzzing harness's passphrase.
#[test]
#[ignore = "writes fuzz seeds; run by scripts/fuzz-seeds.sh"]
fn fuzz_seed_luks() {
    let passphrase: &[u8] = crate::fuzzing::PASSPHRASE;
    let cases = [
        (
            "xts-plain64",
            ("aes", "xts-plain64", "sha256"),
            Spec::new(64, Mode::Xts, IvGen::Plain64).unwrap(),
            Hash::Sha256,
        ),
        (
            "cbc-plain-sha1",
            ("aes", "cbc-plain", "sha1"),
            Spec::new(16, Mode::Cbc, IvGen::Plain).unwrap(),
            Hash::Sha1,
        ),
    ];
    for (name, cipher, spec, hash) in cases {
        let built = build(cipher, spec, hash, 1, &[None, Some(passphrase)]);
        crate::fuzzing::tests::write_seed("luks", name, &[built.bytes]);
    }
}
