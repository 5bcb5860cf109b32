//! The images the crash harness writes into: every writable format and sub-format, chains of
//! images over bases, and an image replaced while mounted. Each is made fresh for a round,
//! half pre-filled with a known pattern (qemu-img convert -n, or through a mount where QEMU
//! cannot write the format).

use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::common::*;
use crate::model::Window;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
/// A disk larger than one 2 GiB extent; only windows of it are written and checked.
const LARGE: u64 = 3072 * MIB;

/// How a variant is made and checked.
pub struct Variant {
    pub name: &'static str,
    /// The image's format as qemu-img names it.
    pub format: &'static str,
    /// Whether qemu-img reads the image (then it is the oracle for every check).
    pub qemu_reads: bool,
    /// Whether `qemu-img check` checks this format.
    pub qemu_checks: bool,
    /// The image's file name in the source tree.
    pub image: &'static str,
    pub windows: Vec<Window>,
    /// Makes the image (and the files it stands on) in `src`, pre-filled.
    pub make: fn(&Path),
    /// Files of `src` that must never change (the bases under the image).
    pub untouched: &'static [&'static str],
    /// A copy of the image is renamed over it while it is being written.
    pub replaced: bool,
    /// Mounted with `--overlay`: the writes go into a qcow2 overlay, the image never changes.
    pub overlay: bool,
    /// The disk can grow: in some rounds a thread grows the raw file (`truncate`) while the
    /// writers write, and the size after the crash must be the old one or the new one.
    pub grows: bool,
    /// The image is encrypted with this passphrase (given to imgfs and QEMU).
    pub passphrase: Option<&'static str>,
}

/// The passphrase of the encrypted variants.
pub const PASSPHRASE: &str = "crash-pw";

fn whole(size: u64) -> Vec<Window> {
    vec![Window {
        offset: 0,
        len: size,
    }]
}

pub fn all() -> Vec<Variant> {
    let plain = |name, format, image, make: fn(&Path)| Variant {
        name,
        format,
        qemu_reads: true,
        qemu_checks: true,
        image,
        windows: whole(SIZE),
        make,
        untouched: &[],
        replaced: false,
        overlay: false,
        grows: false,
        passphrase: None,
    };
    // The variants whose format grows (a qcow2 L1 table of 512-byte clusters has no room for
    // the growth, so it moves).
    let growing = |v: Variant| Variant { grows: true, ..v };
    vec![
        growing(plain("vdi-1m", "vdi", "disk.vdi", |src| {
            create(src, "vdi", "disk.vdi", &[])
        })),
        Variant {
            qemu_reads: false,
            qemu_checks: false,
            ..plain("vdi-4k", "vdi", "disk.vdi", make_vdi_4k)
        },
        growing(plain("qcow2-64k", "qcow2", "disk.qcow2", |src| {
            create(src, "qcow2", "disk.qcow2", &[])
        })),
        growing(plain("qcow2-512", "qcow2", "disk.qcow2", |src| {
            create(src, "qcow2", "disk.qcow2", &["-o", "cluster_size=512"])
        })),
        growing(plain("qcow2-2m", "qcow2", "disk.qcow2", |src| {
            create(src, "qcow2", "disk.qcow2", &["-o", "cluster_size=2M"])
        })),
        growing(plain("qcow2-lazy", "qcow2", "disk.qcow2", |src| {
            create(src, "qcow2", "disk.qcow2", &["-o", "lazy_refcounts=on"])
        })),
        growing(plain("qcow2-extl2", "qcow2", "disk.qcow2", |src| {
            create(src, "qcow2", "disk.qcow2", &["-o", "extended_l2=on"])
        })),
        Variant {
            untouched: &["base.qcow2"],
            grows: true,
            ..plain("qcow2-backing", "qcow2", "top.qcow2", |src| {
                create(src, "qcow2", "base.qcow2", &[]);
                let backing = ["-b", "base.qcow2", "-F", "qcow2"];
                create_empty(src, "qcow2", "top.qcow2", &backing);
            })
        },
        Variant {
            qemu_checks: false,
            grows: true,
            ..plain("qcow", "qcow", "disk.qcow", |src| {
                create(src, "qcow", "disk.qcow", &[])
            })
        },
        growing(plain("vhdx-1m", "vhdx", "disk.vhdx", |src| {
            create(src, "vhdx", "disk.vhdx", &["-o", "block_size=1M"])
        })),
        growing(plain("vhdx-32m", "vhdx", "disk.vhdx", |src| {
            create(src, "vhdx", "disk.vhdx", &["-o", "block_size=32M"])
        })),
        Variant {
            qemu_reads: false,
            qemu_checks: false,
            untouched: &["parent.vhdx"],
            ..plain(
                "vhdx-differencing",
                "vhdx",
                "child.vhdx",
                make_vhdx_differencing,
            )
        },
        Variant {
            qemu_reads: false,
            qemu_checks: false,
            untouched: &["parent.vdi"],
            ..plain(
                "vdi-differencing",
                "vdi",
                "child.vdi",
                make_vdi_differencing,
            )
        },
        // qemu-img check does not check VHD ("vpc"); convert reads it. force_size keeps the
        // disk at SIZE instead of rounding it up to a CHS geometry.
        Variant {
            qemu_checks: false,
            grows: true,
            ..plain("vhd-dynamic", "vpc", "disk.vhd", |src| {
                create(src, "vpc", "disk.vhd", &["-o", "force_size=on"])
            })
        },
        Variant {
            qemu_checks: false,
            ..plain("vhd-fixed", "vpc", "disk.vhd", |src| {
                let options = ["-o", "subformat=fixed,force_size=on"];
                create(src, "vpc", "disk.vhd", &options)
            })
        },
        Variant {
            qemu_reads: false,
            qemu_checks: false,
            untouched: &["parent.vhd"],
            ..plain(
                "vhd-differencing",
                "vpc",
                "child.vhd",
                make_vhd_differencing,
            )
        },
        plain("vmdk-sparse", "vmdk", "disk.vmdk", |src| {
            create(src, "vmdk", "disk.vmdk", &[])
        }),
        Variant {
            windows: windows_for(LARGE),
            ..plain("vmdk-2gb-sparse", "vmdk", "disk.vmdk", |src| {
                let options = ["-o", "subformat=twoGbMaxExtentSparse"];
                create_sized(src, "vmdk", "disk.vmdk", &options, LARGE);
            })
        },
        plain("vmdk-flat", "vmdk", "disk.vmdk", |src| {
            create(
                src,
                "vmdk",
                "disk.vmdk",
                &["-o", "subformat=monolithicFlat"],
            )
        }),
        Variant {
            untouched: &["parent.vmdk"],
            ..plain("vmdk-child", "vmdk", "child.vmdk", |src| {
                create(src, "vmdk", "parent.vmdk", &[]);
                let backing = ["-b", "parent.vmdk", "-F", "vmdk"];
                create_empty(src, "vmdk", "child.vmdk", &backing);
            })
        },
        Variant {
            overlay: true,
            untouched: &["disk.vmdk"],
            ..plain("vmdk-overlay", "vmdk", "disk.vmdk", |src| {
                create(src, "vmdk", "disk.vmdk", &[])
            })
        },
        Variant {
            replaced: true,
            ..plain("vdi-replaced", "vdi", "disk.vdi", |src| {
                create(src, "vdi", "disk.vdi", &[])
            })
        },
        Variant {
            passphrase: Some(PASSPHRASE),
            ..plain("qcow2-luks", "qcow2", "disk.qcow2", make_luks_qcow2)
        },
    ]
}

/// A LUKS-encrypted qcow2 image (4 KiB clusters: many allocations), pre-filled like the
/// others through QEMU with the passphrase.
fn make_luks_qcow2(src: &Path) {
    let image = src.join("disk.qcow2");
    let secret = format!("secret,id=s,data={PASSPHRASE}");
    let options = "cluster_size=4096,encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10";
    let size = SIZE.to_string();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        &secret,
        "-o",
        options,
        path_str(&image),
        &size,
    ]);
    let pattern = src.with_file_name("disk.qcow2.pattern");
    pattern_file(&pattern, SIZE, &windows_for(SIZE));
    let target = format!(
        "driver=qcow2,encrypt.key-secret=s,file.filename={}",
        path_str(&image)
    );
    qemu_img(&[
        "convert",
        "-q",
        "-n",
        "--target-is-zero",
        "--object",
        &secret,
        "-f",
        "raw",
        "--target-image-opts",
        path_str(&pattern),
        &target,
    ]);
    std::fs::remove_file(&pattern).unwrap();
}

/// The pattern a variant's windows start with: their first halves, the rest zeros.
pub fn pattern_at(offset: u64) -> u8 {
    ((offset / 512).wrapping_mul(7) ^ (offset % 251)) as u8
}

/// A sparse raw file of `size` bytes holding the pattern in the first half of each window.
fn pattern_file(path: &Path, size: u64, windows: &[Window]) {
    let file = std::fs::File::create(path).unwrap();
    file.set_len(size).unwrap();
    for window in windows {
        let half = window.len / 2;
        let bytes: Vec<u8> = (window.offset..window.offset + half)
            .map(pattern_at)
            .collect();
        file.write_all_at(&bytes, window.offset).unwrap();
    }
}

/// The windows a variant of `size` bytes checks (as `all` gives them).
fn windows_for(size: u64) -> Vec<Window> {
    let two_gib = 2048 * MIB;
    if size > two_gib {
        vec![
            Window {
                offset: 0,
                len: 16 * MIB,
            },
            Window {
                offset: two_gib - 8 * MIB,
                len: 16 * MIB,
            },
        ]
    } else {
        whole(size)
    }
}

fn create(src: &Path, format: &str, name: &str, options: &[&str]) {
    create_sized(src, format, name, options, SIZE);
}

/// Creates `name` and pre-fills the first half of its windows with the pattern.
fn create_sized(src: &Path, format: &str, name: &str, options: &[&str], size: u64) {
    let image = src.join(name);
    create_image(&image, format, options, size);
    let pattern = src.with_file_name(format!("{name}.pattern"));
    pattern_file(&pattern, size, &windows_for(size));
    qemu_img(&[
        "convert",
        "-q",
        "-n",
        "--target-is-zero",
        "-f",
        "raw",
        "-O",
        format,
        path_str(&pattern),
        path_str(&image),
    ]);
    std::fs::remove_file(&pattern).unwrap();
}

/// Creates `name` empty (an image over a backing file: it shows the base's pattern).
fn create_empty(src: &Path, format: &str, name: &str, options: &[&str]) {
    create_image(&src.join(name), format, options, SIZE);
}

fn create_image(image: &Path, format: &str, options: &[&str], size: u64) {
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", format];
    args.extend(options);
    args.extend([path_str(image), &size]);
    qemu_img(&args);
}

/// A dynamic VDI with 4 KiB blocks: qemu-img writes only 1 MiB blocks, so its header is
/// rewritten by hand; pre-filled through an imgfs mount, since QEMU cannot open it.
fn make_vdi_4k(src: &Path) {
    let image = src.join("disk.vdi");
    create_image(&image, "vdi", &[], SIZE);
    let blocks = (SIZE / 4096) as u32;
    let offset_bmap = 512u32;
    let offset_data = (offset_bmap + blocks * 4).next_multiple_of(4096);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    let put = |at: u64, value: u32| file.write_all_at(&value.to_le_bytes(), at).unwrap();
    put(344, offset_data);
    put(376, 4096);
    put(384, blocks);
    put(388, 0);
    file.set_len(u64::from(offset_data)).unwrap();
    file.write_all_at(&vec![0xff; blocks as usize * 4], u64::from(offset_bmap))
        .unwrap();
    drop(file);
    fill_through_a_mount(src, "disk.vdi");
}

/// A dynamic VHDX parent, pre-filled, and an empty differencing child of it (qemu-img cannot
/// make one; imgfs's own helper links it); pre-filled through the parent, like a chain.
fn make_vhdx_differencing(src: &Path) {
    create(src, "vhdx", "parent.vhdx", &["-o", "block_size=1M"]);
    vhdx_child(src, "parent.vhdx", "child.vhdx", &SIZE.to_string());
}

/// A dynamic VDI parent, pre-filled, and an empty differencing child of it (a VirtualBox
/// snapshot: qemu-img cannot make or read one; imgfs's own helper links it by UUID).
fn make_vdi_differencing(src: &Path) {
    create(src, "vdi", "parent.vdi", &[]);
    let (child, parent) = (src.join("child.vdi"), src.join("parent.vdi"));
    imgfs::format::vdi::make_differencing(&child, &parent).unwrap();
}

/// A dynamic VHD parent, pre-filled, and an empty differencing child of it (qemu-img cannot
/// make one; imgfs's own helper does, with the locators Hyper-V writes).
fn make_vhd_differencing(src: &Path) {
    create(src, "vpc", "parent.vhd", &["-o", "force_size=on"]);
    let (child, parent) = (src.join("child.vhd"), src.join("parent.vhd"));
    imgfs::format::vhd::make_differencing(&child, &parent, "parent.vhd").unwrap();
}

/// Writes the pattern into `name` through an imgfs mount of `src`.
fn fill_through_a_mount(src: &Path, name: &str) {
    let mnt = src.with_file_name("fill-mnt");
    let mount = Mount::new(src, &mnt, &[]);
    let raw = std::fs::OpenOptions::new()
        .write(true)
        .open(mount.path(&format!("{name}.raw")))
        .unwrap();
    for window in windows_for(SIZE) {
        let half = window.len / 2;
        let bytes: Vec<u8> = (window.offset..window.offset + half)
            .map(pattern_at)
            .collect();
        raw.write_all_at(&bytes, window.offset).unwrap();
    }
    raw.sync_all().unwrap();
    drop(raw);
    mount.unmount();
    std::fs::remove_dir(&mnt).unwrap();
}
