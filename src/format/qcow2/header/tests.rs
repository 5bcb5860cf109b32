//! Header parsing tests on hand-built header clusters: every field check, extensions,
//! feature names, version 2 layout, short input.

use super::testing::{put_u32, put_u64};
use super::*;
use crate::error::ErrorKind;

/// A minimal valid v3 image layout with 64 KiB clusters: header in cluster 0, refcount
/// table in cluster 1, L1 table in cluster 2, file 4 clusters long.
fn v3_head() -> (Vec<u8>, u64) {
    let mut h = vec![0u8; 65536];
    h[..4].copy_from_slice(&MAGIC);
    put_u32(&mut h, 4, 3);
    put_u32(&mut h, 20, 16);
    put_u64(&mut h, 24, 1 << 30);
    put_u32(&mut h, 36, 2);
    put_u64(&mut h, 40, 2 << 16);
    put_u64(&mut h, 48, 1 << 16);
    put_u32(&mut h, 56, 1);
    put_u32(&mut h, 96, 4);
    put_u32(&mut h, 100, 112);
    (h, 4 << 16)
}

fn err(head: &[u8], file_len: u64) -> Error {
    Qcow2Header::parse(head, file_len).expect_err("header must be refused")
}

fn push_ext(h: &mut [u8], at: &mut usize, kind: u32, data: &[u8]) {
    put_u32(h, *at, kind);
    put_u32(h, *at + 4, data.len() as u32);
    h[*at + 8..*at + 8 + data.len()].copy_from_slice(data);
    *at += 8 + data.len().div_ceil(8) * 8;
}

#[test]
fn valid_v3_header_with_extensions() {
    let (mut h, len) = v3_head();
    let mut at = 112;
    push_ext(&mut h, &mut at, EXT_BACKING_FORMAT, b"raw");
    let mut table = vec![0u8; 96];
    table[0] = 0;
    table[1] = 4;
    table[2..13].copy_from_slice(b"extended l2");
    table[48] = 2;
    table[49] = 1;
    table[50..58].copy_from_slice(b"raw data");
    push_ext(&mut h, &mut at, EXT_FEATURE_TABLE, &table);
    push_ext(&mut h, &mut at, 0x1234_5678, b"future");
    put_u64(&mut h, 8, 4096);
    put_u32(&mut h, 16, 8);
    h[4096..4104].copy_from_slice(b"base.img");
    let header = Qcow2Header::parse(&h, len).unwrap();
    assert_eq!(header.backing_file(), Some(OsStr::new("base.img")));
    assert_eq!(header.backing_format(), Some("raw"));
    assert_eq!(
        header.feature_name(FeatureKind::Incompatible, 4),
        Some("extended l2")
    );
    assert_eq!(
        header.feature_name(FeatureKind::Autoclear, 1),
        Some("raw data")
    );
    assert_eq!(header.other_extensions, [(0x1234_5678, b"future".to_vec())]);
    assert_eq!(header.compression_type, CompressionType::Zlib);
    assert_eq!((header.l2_bits(), header.refcount_bits()), (13, 16));
    assert_eq!(header.l1_entries_for(1 << 30), 2);
}

#[test]
fn unknown_incompatible_bits_are_named() {
    let (mut h, len) = v3_head();
    put_u64(&mut h, 72, (1 << 5) | (1 << 9) | INCOMPAT_DIRTY);
    let mut table = vec![0u8; 48];
    table[1] = 9;
    table[2..12].copy_from_slice(b"time warps");
    let mut at = 112;
    push_ext(&mut h, &mut at, EXT_FEATURE_TABLE, &table);
    let e = err(&h, len);
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    let text = e.to_string();
    assert!(
        text.contains("bit 5, bit 9 (time warps)"),
        "{text} should name both bits"
    );
}

#[test]
fn encryption_methods_and_the_crypto_header_pointer_are_read() {
    for (method, expected) in [(1, Encryption::Aes), (2, Encryption::Luks)] {
        let (mut h, len) = v3_head();
        put_u32(&mut h, 32, method);
        let mut at = 112;
        let mut pointer = [0u8; 16];
        pointer[..8].copy_from_slice(&(3u64 << 16).to_be_bytes());
        pointer[8..].copy_from_slice(&(1u64 << 16).to_be_bytes());
        push_ext(&mut h, &mut at, EXT_CRYPTO_HEADER, &pointer);
        let parsed = Qcow2Header::parse(&h, len).unwrap();
        assert_eq!(parsed.encryption, expected);
        assert_eq!(parsed.crypto_header, Some((3 << 16, 1 << 16)));
    }
    let (mut h, len) = v3_head();
    put_u32(&mut h, 32, 9);
    assert!(err(&h, len).to_string().contains("unknown crypt_method 9"));
    let mut at = 112;
    push_ext(&mut h, &mut at, EXT_CRYPTO_HEADER, &[0; 8]);
    put_u32(&mut h, 32, 2);
    assert!(err(&h, len).to_string().contains("not 16 bytes"));
}

#[test]
fn bad_fields_are_named() {
    type Patch = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(Patch, &str)> = vec![
        (Box::new(|h| put_u32(h, 20, 8)), "cluster_bits 8"),
        (Box::new(|h| put_u32(h, 20, 22)), "cluster_bits 22"),
        (Box::new(|h| put_u32(h, 4, 4)), "version 4"),
        (Box::new(|h| put_u32(h, 100, 96)), "header_length 96"),
        (Box::new(|h| put_u32(h, 96, 7)), "refcount_order 7"),
        (Box::new(|h| put_u32(h, 36, 1)), "l1_size 1 is too small"),
        (Box::new(|h| put_u32(h, 36, 1 << 30)), "l1_size 1073741824"),
        (Box::new(|h| put_u64(h, 40, 0)), "l1_table_offset is 0"),
        (Box::new(|h| put_u64(h, 40, 0x20200)), "not aligned"),
        (
            Box::new(|h| put_u64(h, 40, 1 << 40)),
            "past the end of the file",
        ),
        (
            Box::new(|h| put_u64(h, 48, 0)),
            "refcount_table_offset is 0",
        ),
        (
            Box::new(|h| put_u32(h, 56, 0)),
            "refcount_table_clusters is 0",
        ),
        (
            Box::new(|h| put_u32(h, 56, 129)),
            "refcount_table_clusters 129",
        ),
        (Box::new(|h| put_u32(h, 60, 70000)), "nb_snapshots 70000"),
        (Box::new(|h| put_u32(h, 60, 1)), "snapshots_offset is 0"),
        (Box::new(|h| put_u64(h, 8, 1 << 20)), "backing_file_offset"),
        (
            Box::new(|h| {
                put_u64(h, 8, 4096);
                put_u32(h, 16, 2000)
            }),
            "backing_file_size 2000",
        ),
        (
            Box::new(|h| put_u64(h, 88, AUTOCLEAR_DATA_FILE_RAW)),
            "raw external data",
        ),
        (
            Box::new(|h| put_u64(h, 72, INCOMPAT_COMPRESSION)),
            "compression type feature",
        ),
        (Box::new(|h| h[104] = 1), "compression_type 1 without"),
        (
            Box::new(|h| {
                put_u64(h, 72, INCOMPAT_COMPRESSION);
                h[104] = 9
            }),
            "compression_type 9",
        ),
        (
            Box::new(|h| {
                put_u32(h, 20, 12);
                put_u64(h, 72, INCOMPAT_EXTENDED_L2)
            }),
            "extended L2",
        ),
        (
            Box::new(|h| {
                put_u32(h, 112, EXT_BACKING_FORMAT);
                put_u32(h, 116, 70000)
            }),
            "header extension 0xe2792aca",
        ),
        (Box::new(|h| put_u64(h, 24, u64::MAX)), "virtual size"),
    ];
    for (patch, needle) in cases {
        let (mut h, len) = v3_head();
        patch(&mut h);
        let text = err(&h, len).to_string();
        assert!(text.contains(needle), "{text} should mention {needle}");
    }
}

#[test]
fn version_2_ignores_v3_fields() {
    let (mut h, len) = v3_head();
    put_u32(&mut h, 4, 2);
    put_u64(&mut h, 72, 0);
    put_u32(&mut h, 96, 99);
    let header = Qcow2Header::parse(&h, len).unwrap();
    assert_eq!(
        (header.incompatible_features, header.refcount_order),
        (0, 4)
    );
    assert_eq!(header.header_length, 72);
    // A v2 image's extension area starts at 72, where the v3 fields would be.
    let mut v2 = h.clone();
    put_u32(&mut v2, 72, EXT_BACKING_FORMAT);
    put_u32(&mut v2, 76, 5);
    v2[80..85].copy_from_slice(b"qcow2");
    put_u32(&mut v2, 88, 0);
    let header = Qcow2Header::parse(&v2, len).unwrap();
    assert_eq!(header.backing_format(), Some("qcow2"));
}

#[test]
fn short_inputs_never_panic() {
    let (h, len) = v3_head();
    for cut in [0, 3, 4, 20, 71, 72, 100, 111, 112, 200] {
        let _ = Qcow2Header::parse(&h[..cut], len);
        let _ = Qcow2Header::parse(&h[..cut], cut as u64);
    }
}
