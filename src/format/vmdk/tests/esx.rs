//! ESXi snapshot extents, read-only: COWD (vmfsSparse) and seSparse deltas built by hand,
//! read through their descriptors and compared with qemu-img, alone and over a parent.

use std::path::Path;

use super::{assert_reads_like_qemu, create, qemu_io, read_all, try_open, MIB};
use crate::error::ErrorKind;
use crate::format::vmdk::esx::testing::{cowd, sesparse};
use crate::format::vmdk::{cid_of, is_bare_extent};
use crate::host::HostFile;
use crate::image::ExtentState;
use crate::testutil::TempDir;

fn descriptor(path: &Path, create_type: &str, parent: Option<(&str, u32)>, extent: &str) {
    let (hint, parent_cid) = match parent {
        Some((name, cid)) => (format!("parentFileNameHint=\"{name}\"\n"), cid),
        None => (String::new(), 0xffff_ffff),
    };
    let text = format!(
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=fffffffe\n\
         parentCID={parent_cid:08x}\nisNativeSnapshot=\"no\"\ncreateType=\"{create_type}\"\n\
         {hint}\n# Extent description\n{extent}\n\n# The Disk Data Base\n#DDB\n\n\
         ddb.adapterType = \"lsilogic\"\nddb.virtualHWVersion = \"14\"\n"
    );
    std::fs::write(path, text).unwrap();
}

#[test]
fn cowd_delta_disks_read_like_qemu_and_are_read_only() {
    let dir = TempDir::new();
    let delta = dir.path().join("d-delta.vmdk");
    let path = dir.path().join("d.vmdk");
    // 4 MiB, 512-byte grains: grains 0, 1, 7 and 4095 (the end of the only grain table).
    std::fs::write(
        &delta,
        cowd(8192, &[(0, 0x11), (1, 0x22), (7, 0x33), (4095, 0x44)]),
    )
    .unwrap();
    descriptor(
        &path,
        "vmfsSparse",
        None,
        "RW 8192 VMFSSPARSE \"d-delta.vmdk\"",
    );
    let img = try_open(&path, false).unwrap();
    let all = read_all(img.as_ref());
    assert_eq!(&all[..512], &[0x11; 512]);
    assert_eq!(&all[3584..4096], &[0x33; 512]);
    assert_eq!(&all[4095 * 512..4096 * 512], &[0x44; 512]);
    assert!(all[4096 * 512..].iter().all(|&b| b == 0));
    assert_reads_like_qemu(img.as_ref(), &path, "COWD");
    let reason = img.read_only_reason().unwrap();
    assert!(reason.contains("COWD"), "{reason}");
    assert_eq!(
        img.write_at(&[1], 0).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    assert!(is_bare_extent(&HostFile::open(&delta, false).unwrap()).unwrap());
}

#[test]
fn sesparse_deltas_read_like_qemu_over_their_parent() {
    let dir = TempDir::new();
    let base = dir.path().join("base.vmdk");
    if create(&base, "subformat=monolithicFlat", "4M").is_none() {
        return;
    }
    qemu_io(&base, &["write -P 0x5b 0 4M"]).unwrap();
    let base_cid = cid_of(&HostFile::open(&base, false).unwrap()).unwrap();
    let delta = dir.path().join("snap-sesparse.vmdk");
    let path = dir.path().join("snap.vmdk");
    // Grains 0 and 2 allocated, 5 zero, 1000 allocated; the rest shows the parent.
    let extent = sesparse(8192, &[(0, 0x11), (2, 0x22), (1000, 0x33)], &[5]);
    std::fs::write(&delta, extent).unwrap();
    descriptor(
        &path,
        "seSparse",
        Some(("base.vmdk", base_cid)),
        "RW 8192 SESPARSE \"snap-sesparse.vmdk\"",
    );
    let img = try_open(&path, true).unwrap();
    let all = read_all(img.as_ref());
    assert_eq!(&all[..4096], &[0x11; 4096]);
    assert_eq!(&all[4096..8192], &[0x5b; 4096]);
    assert_eq!(&all[5 * 4096..6 * 4096], &[0; 4096]);
    assert_eq!(&all[1000 * 4096..1001 * 4096], &[0x33; 4096]);
    assert_reads_like_qemu(img.as_ref(), &path, "seSparse");
    let status = img.block_status(0, 6 * 4096).unwrap();
    let states: Vec<_> = status
        .iter()
        .map(|s| (s.offset / 4096, s.state, s.layer))
        .collect();
    assert_eq!(
        states,
        [
            (0, ExtentState::Data, 0),
            (1, ExtentState::Data, 1),
            (2, ExtentState::Data, 0),
            (3, ExtentState::Data, 1),
            (5, ExtentState::Zero, 0),
        ]
    );
    assert!(img.read_only_reason().unwrap().contains("seSparse"));
    assert_eq!(img.size(), 4 * MIB);
}

#[test]
fn hostile_sesparse_and_cowd_extents_are_refused() {
    let dir = TempDir::new();
    let path = dir.path().join("h.vmdk");
    let delta = dir.path().join("h-sesparse.vmdk");
    let case = |bytes: Vec<u8>, kind: &str| {
        std::fs::write(&delta, bytes).unwrap();
        descriptor(
            &path,
            "seSparse",
            None,
            &format!("RW 8192 {kind} \"h-sesparse.vmdk\""),
        );
        match try_open(&path, true) {
            Err(e) => e.to_string(),
            Ok(img) => {
                let mut buf = vec![0u8; img.size() as usize];
                img.read_at(&mut buf, 0)
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default()
            }
        }
    };
    let good = sesparse(8192, &[(0, 1)], &[]);
    assert_eq!(case(good.clone(), "SESPARSE"), "");
    let put = |mut b: Vec<u8>, at: usize, v: u64| {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        b
    };
    for (bytes, expect) in [
        (put(good.clone(), 8, 0x3_0000_0000), "version"),
        (put(good.clone(), 24, 16), "grain size 16"),
        (put(good.clone(), 40, 1), "flags"),
        (put(good.clone(), 512 + 24, 1), "journal"),
        (
            put(good.clone(), 4096 * 512, 0x2000_0000_0000_0000),
            "not a grain table number",
        ),
        (
            put(good.clone(), 4096 * 512, 0x1000_0000_0fff_ffff),
            "beyond the end",
        ),
        (
            put(good.clone(), 6144 * 512, 0x3000_0000_ffff_ffff),
            "beyond the end",
        ),
        (
            put(good.clone(), 6144 * 512, 0x7000_0000_0000_0000),
            "invalid entry",
        ),
        (put(good.clone(), 136, 0), "grain directory has 0 entries"),
        (put(good.clone(), 16, 1 << 50), "capacity"),
    ] {
        let e = case(bytes, "SESPARSE");
        assert!(e.contains(expect), "{expect}: {e}");
    }
    let mut bad_cowd = cowd(8192, &[(0, 1)]);
    bad_cowd[24..28].copy_from_slice(&1u32.to_le_bytes());
    let e = case(bad_cowd, "VMFSSPARSE");
    assert!(e.contains("the capacity needs 2"), "{e}");
    let mut bad_cowd = cowd(8192, &[(0, 1)]);
    bad_cowd[1024..1028].copy_from_slice(&0x00ff_ffffu32.to_le_bytes());
    let e = case(bad_cowd, "VMFSSPARSE");
    assert!(e.contains("beyond the end"), "{e}");
    let e = case(vec![0u8; 4096], "SESPARSE");
    assert!(e.contains("not a seSparse extent"), "{e}");
}

/// Fuzz seeds (see `scripts/fuzz-seeds.sh`): a COWD and a seSparse delta disk, whose extents
/// QEMU does not create, each named `b` by its descriptor.
#[test]
#[ignore = "writes fuzz seeds; run by scripts/fuzz-seeds.sh"]
fn fuzz_seed_cowd_and_sesparse() {
    let dir = TempDir::new();
    let path = dir.path().join("d.vmdk");
    descriptor(&path, "vmfsSparse", None, "RW 8192 VMFSSPARSE \"b\"");
    let extent = cowd(8192, &[(0, 0x11), (7, 0x33), (4095, 0x44)]);
    crate::fuzzing::tests::write_seed("vmdk", "cowd", &[std::fs::read(&path).unwrap(), extent]);
    descriptor(&path, "seSparse", None, "RW 8192 SESPARSE \"b\"");
    let extent = sesparse(8192, &[(0, 0x11), (2, 0x22), (1000, 0x33)], &[5]);
    crate::fuzzing::tests::write_seed("vmdk", "sesparse", &[std::fs::read(&path).unwrap(), extent]);
}
