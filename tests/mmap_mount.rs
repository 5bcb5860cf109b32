//! mmap of the raw files of every writable format: they are opened with direct I/O, and the
//! kernel maps them anyway (FUSE_DIRECT_IO_ALLOW_MMAP), keeping the mapping and direct reads
//! and writes coherent.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use common::*;

/// (qemu-img format, file name, create options, whether qemu-img can check it).
const FORMATS: [(&str, &str, &[&str], bool); 6] = [
    ("qcow2", "disk.qcow2", &[], true),
    ("qcow", "disk.qcow", &[], false),
    ("vdi", "disk.vdi", &[], true),
    ("vhdx", "disk.vhdx", &[], true),
    ("vpc", "disk.vhd", &["-o", "force_size=on"], false),
    ("vmdk", "disk.vmdk", &[], true),
];

#[test]
fn a_mapped_raw_file_and_direct_io_see_each_others_writes() {
    if !can_mount() {
        return;
    }
    for (format, name, options, checkable) in FORMATS {
        mapped_case(format, name, options, checkable);
    }
}

fn mapped_case(format: &str, name: &str, options: &[&str], checkable: bool) {
    let (dir, src) = empty_source(&format!("mmap-{format}"));
    create_filled(&src, format, name, options, "8M", &["write -P 0x31 0 1M"]);
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let raw = mount.path(&format!("{name}.raw"));
    let mapped_file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&raw)
        .unwrap();
    let len = 8 << 20;
    // SAFETY: a shared mapping of a file we keep open for as long as the mapping lives.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            mapped_file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(
        map,
        libc::MAP_FAILED,
        "{format}: mmap: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the mapping is `len` bytes long and nothing else aliases it here.
    let bytes = unsafe { std::slice::from_raw_parts_mut(map.cast::<u8>(), len) };
    assert_eq!(bytes[100], 0x31, "{format}: mapped reads see the image");

    bytes[2 << 20..(2 << 20) + 4096].fill(0x55);
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&raw)
        .unwrap();
    let mut seen = [0u8; 4096];
    direct.read_exact_at(&mut seen, 2 << 20).unwrap();
    assert_eq!(
        seen, [0x55; 4096],
        "{format}: a direct read sees the mapped write"
    );

    direct.write_all_at(&[0x66; 4096], 3 << 20).unwrap();
    assert!(
        bytes[3 << 20..(3 << 20) + 4096].iter().all(|&b| b == 0x66),
        "{format}: the mapping sees a direct write"
    );

    // SAFETY: the mapping from above, written back and unmapped once.
    unsafe {
        assert_eq!(libc::msync(map, len, libc::MS_SYNC), 0);
        assert_eq!(libc::munmap(map, len), 0);
    }
    drop((mapped_file, direct));
    mount.unmount();
    if checkable {
        assert_check_clean(format, &src.join(name));
    }
    qemu_io(
        format,
        &src.join(name),
        &[
            "read -P 0x55 2M 4k",
            "read -P 0x66 3M 4k",
            "read -P 0x31 0 1M",
        ],
    );
}
