//! mmap of the raw files: they are opened with direct I/O, and the kernel maps them anyway
//! (FUSE_DIRECT_IO_ALLOW_MMAP), keeping the mapping and direct reads and writes coherent.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use common::*;

#[test]
fn a_mapped_raw_file_and_direct_io_see_each_others_writes() {
    if !can_mount() {
        return;
    }
    let (dir, src) = empty_source("mmap");
    create_filled(
        &src,
        "qcow2",
        "disk.qcow2",
        &[],
        "8M",
        &["write -P 0x31 0 1M"],
    );
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let raw = mount.path("disk.qcow2.raw");
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
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the mapping is `len` bytes long and nothing else aliases it here.
    let bytes = unsafe { std::slice::from_raw_parts_mut(map.cast::<u8>(), len) };
    assert_eq!(bytes[100], 0x31, "mapped reads see the image");

    bytes[2 << 20..(2 << 20) + 4096].fill(0x55);
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&raw)
        .unwrap();
    let mut seen = [0u8; 4096];
    direct.read_exact_at(&mut seen, 2 << 20).unwrap();
    assert_eq!(seen, [0x55; 4096], "a direct read sees the mapped write");

    direct.write_all_at(&[0x66; 4096], 3 << 20).unwrap();
    assert!(bytes[3 << 20..(3 << 20) + 4096].iter().all(|&b| b == 0x66));

    // SAFETY: the mapping from above, written back and unmapped once.
    unsafe {
        assert_eq!(libc::msync(map, len, libc::MS_SYNC), 0);
        assert_eq!(libc::munmap(map, len), 0);
    }
    drop((mapped_file, direct));
    mount.unmount();
    assert_check_clean("qcow2", &src.join("disk.qcow2"));
    qemu_io(
        "qcow2",
        &src.join("disk.qcow2"),
        &[
            "read -P 0x55 2M 4k",
            "read -P 0x66 3M 4k",
            "read -P 0x31 0 1M",
        ],
    );
}
