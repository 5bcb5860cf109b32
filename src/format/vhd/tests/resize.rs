//! Growing VHDs (resize.rs): dynamic disks sized by `current_size` (force_size) and by their
//! CHS geometry, a differencing disk past its parent's end, the room an allocation left for
//! the next block found again; refused past the BAT's last sector, to a size no geometry
//! gives, for fixed and read-only disks; the CHS algorithm against qemu-img's; and a fault
//! walk over every host write and sync of a resize.

use super::differencing::{open_child, parent_and_child, parent_bytes};
use super::*;
use crate::format::vhd::footer::chs_for;
use crate::testutil::resize::{Oracle, ResizeWalk};

/// A 16 MiB dynamic disk sized by `current_size`, 1 MiB of 0x61 at 15 MiB: 8 BAT entries at
/// 1536, room for 128 (256 MiB) in the table's sector.
fn filled(dir: &TempDir, name: &str) -> Option<PathBuf> {
    let path = create(dir, name, "force_size=on", 16 * MIB)?;
    qemu_io(&path, &["write -P 0x61 15M 1M"]);
    Some(path)
}

#[test]
fn resize_grows_a_dynamic_disk_where_the_bat_has_room() {
    let dir = TempDir::new();
    let Some(path) = filled(&dir, "r.vhd") else {
        return;
    };
    let img = open_rw(&path);
    for (size, kind) in [
        (8 * MIB, ErrorKind::Unsupported),
        (20 * MIB + 1, ErrorKind::OutOfRange),
        (256 * MIB + 512, ErrorKind::Unsupported),
    ] {
        assert_eq!(img.resize(size).unwrap_err().kind(), kind, "{size}");
        assert_eq!(img.size(), 16 * MIB);
    }
    img.resize(100 * MIB).unwrap();
    assert_eq!(img.size(), 100 * MIB);
    assert_eq!(detail(&img, "bat"), "50 entries at 0x600");
    assert_eq!(detail(&img, "current_size"), (100 * MIB).to_string());
    img.write_at(&[0x62; 4096], 100 * MIB - 4096).unwrap();
    img.flush().unwrap();
    drop(img);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[bytes.len() - 512..], &bytes[..512], "both footers");
    assert_eq!(qemu_size(&path).unwrap().unwrap(), 100 * MIB);
    let img = open_rw(&path);
    assert_eq!(img.size(), 100 * MIB);
    let all = read_all(&img);
    assert!(all[15 * MIB as usize..16 * MIB as usize]
        .iter()
        .all(|&b| b == 0x61));
    assert!(all[16 * MIB as usize..100 * MIB as usize - 4096]
        .iter()
        .all(|&b| b == 0));
    assert!(all[100 * MIB as usize - 4096..].iter().all(|&b| b == 0x62));
    assert!(qemu_bytes(&path) == all, "QEMU reads the same");
    // Up to the end of the table's sector.
    img.resize(256 * MIB).unwrap();
    drop(img);
    assert_eq!(qemu_size(&path).unwrap().unwrap(), 256 * MIB);
    qemu_io(&path, &["write -P 0x63 255M 1M", "read -P 0x61 15M 1M"]);
    let img = open_rw(&path);
    let mut buf = vec![0u8; MIB as usize];
    img.read_at(&mut buf, 255 * MIB).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0x63),
        "QEMU's block past the old end"
    );
}

/// An allocation leaves the footer where the next block goes; a resize rewrites it there
/// too, so the next open finds that room again instead of leaving it behind.
#[test]
fn resize_keeps_the_room_an_allocation_left() {
    let dir = TempDir::new();
    let Some(path) = filled(&dir, "a.vhd") else {
        return;
    };
    let img = open_rw(&path);
    img.write_at(&[0x71; 512], 3 * MIB).unwrap();
    img.flush().unwrap();
    img.resize(64 * MIB).unwrap();
    drop(img);
    let len = std::fs::metadata(&path).unwrap().len();
    let img = open_rw(&path);
    img.write_at(&[0x72; 512], 40 * MIB).unwrap();
    img.flush().unwrap();
    drop(img);
    let span = 512 + 2 * MIB;
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len + span);
    qemu_io(
        &path,
        &[
            "read -P 0x71 3M 512",
            "read -P 0x72 40M 512",
            "read -P 0x61 15M 1M",
        ],
    );
}

/// qemu-img sizes a disk it makes by its CHS geometry (rounding the size up to one): a
/// resize keeps that rule, so only sizes a geometry gives are taken.
#[test]
fn resize_of_a_disk_sized_by_its_geometry_takes_sizes_a_geometry_gives() {
    let dir = TempDir::new();
    let Some(path) = create(&dir, "g.vhd", "", 16 * MIB) else {
        return;
    };
    qemu_io(&path, &["write -P 0x51 15M 1M"]);
    let img = open_rw(&path);
    assert_eq!(img.size(), 482 * 4 * 17 * 512);
    let e = img.resize(100 * MIB).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    // What `qemu-img create -f vpc` makes of 100 MiB.
    assert!(e.to_string().contains("104865792 bytes is the next"), "{e}");
    img.resize(104_865_792).unwrap();
    assert_eq!(detail(&img, "chs_geometry"), "1004/12/17 (204816 sectors)");
    img.write_at(&[0x52; 512], 104_865_792 - 512).unwrap();
    img.flush().unwrap();
    drop(img);
    assert_eq!(qemu_size(&path).unwrap().unwrap(), 104_865_792);
    qemu_io(
        &path,
        &[
            "read -P 0x51 15M 1M",
            "read -P 0 16M 83M",
            "read -P 0x52 104865280 512",
        ],
    );
}

/// `footer::chs_for` gives the geometry qemu-img writes, from small disks to the maximum.
#[test]
fn chs_for_agrees_with_qemu_img_create() {
    let dir = TempDir::new();
    for size in [
        MIB,
        16 * MIB,
        100 * MIB,
        1 << 30,
        10 << 30,
        31 << 30,
        130 << 30,
    ] {
        let Some(path) = create(&dir, "c.vhd", "", size) else {
            return;
        };
        let img = open_ro(&path);
        let footer = img.current_footer();
        let chs = (footer.cylinders, footer.heads, footer.sectors_per_track);
        assert_eq!(chs_for(footer.current_size / 512), chs, "{size}");
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn resize_grows_a_differencing_disk_past_its_parent() {
    let dir = TempDir::new();
    let Some((parent, child)) = parent_and_child(&dir) else {
        return;
    };
    let img = open_child(&parent, &child);
    img.resize(20 * MIB).unwrap();
    img.write_at(&[0x81; 1000], 20 * MIB - 1000).unwrap();
    img.write_at(&[0x82; 100], 8 * MIB - 50).unwrap();
    img.flush().unwrap();
    drop(img);
    let mut expected = parent_bytes();
    expected.resize(20 * MIB as usize, 0);
    expected[20 * MIB as usize - 1000..].fill(0x81);
    expected[8 * MIB as usize - 50..8 * MIB as usize + 50].fill(0x82);
    let img = open_child(&parent, &child);
    assert_eq!(img.size(), 20 * MIB);
    assert!(read_all(&img) == expected);
    drop(img);
    assert_eq!(qemu_size(&child).unwrap().unwrap(), 20 * MIB);
}

#[test]
fn resize_of_fixed_and_read_only_disks_is_refused() {
    let dir = TempDir::new();
    let Some(fixed) = create(&dir, "f.vhd", "subformat=fixed,force_size=on", 16 * MIB) else {
        return;
    };
    let e = open_rw(&fixed).resize(32 * MIB).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("fixed"), "{e}");
    let path = filled(&dir, "ro.vhd").unwrap();
    let before = std::fs::read(&path).unwrap();
    let e = open_ro(&path).resize(32 * MIB).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
    assert!(std::fs::read(&path).unwrap() == before);
}

#[test]
fn every_host_fault_during_a_resize_leaves_the_old_or_the_new_disk() {
    let dir = TempDir::in_memory();
    let Some(path) = filled(&dir, "w.vhd") else {
        return;
    };
    // An allocation of ours first, so the room it left is rewritten too.
    let img = open_rw(&path);
    img.write_at(&[0x64; 4096], 5 * MIB).unwrap();
    img.flush().unwrap();
    drop(img);
    let open = |p: &Path| -> Arc<dyn Image> { Arc::new(open_rw(p)) };
    ResizeWalk {
        format: "vpc",
        path,
        parents: Vec::new(),
        open: &open,
        new_size: 100 * MIB,
        oracle: Oracle::Check,
    }
    .all();
}
