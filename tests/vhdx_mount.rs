//! VHDX through a real imgfs mount, with qemu-img as the oracle: fixed and dynamic images of
//! several block sizes read like `qemu-img convert -O raw`, writes from several threads
//! leave images that `qemu-img check` passes and `qemu-img compare` finds equal to the
//! expected bytes (also with 4 KiB logical sectors), and a daemon killed while it writes leaves an image whose log QEMU and
//! imgfs replay alike, with every fsync'ed write in it.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;

use common::*;

const MIB: u64 = 1 << 20;

/// (file name, qemu-img options, virtual size): fixed and dynamic, block sizes from 1 to 256
/// MiB, sizes that are not a multiple of the block size.
const IMAGES: [(&str, &str, u64); 6] = [
    (
        "dynamic-1m.vhdx",
        "subformat=dynamic,block_size=1M",
        5 * MIB + 512,
    ),
    (
        "dynamic-8m.vhdx",
        "subformat=dynamic,block_size=8M",
        20 * MIB + 4096,
    ),
    (
        "dynamic-32m.vhdx",
        "subformat=dynamic,block_size=32M",
        70 * MIB,
    ),
    (
        "dynamic-256m.vhdx",
        "subformat=dynamic,block_size=256M",
        260 * MIB,
    ),
    (
        "fixed-1m.vhdx",
        "subformat=fixed,block_size=1M",
        5 * MIB + 512,
    ),
    (
        "fixed-8m.vhdx",
        "subformat=fixed,block_size=8M,block_state_zero=off",
        20 * MIB + 4096,
    ),
];

fn make(src: &Path, name: &str, options: &str, size: u64) {
    let path = src.join(name);
    let size_arg = size.to_string();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        options,
        path_str(&path),
        &size_arg,
    ]);
    let fills = [
        "write -P 0xab 0 4k".to_string(),
        format!("write -P 0x12 {} 100000", size / 2 + 1000),
        format!("write -P 0x34 {} 4096", size - 4096),
    ];
    let fills: Vec<&str> = fills.iter().map(String::as_str).collect();
    qemu_io("vhdx", &path, &fills);
}

#[test]
fn fixed_and_dynamic_vhdx_images_read_like_qemu_img_convert() {
    if !can_mount() {
        return;
    }
    let dir = TempDir::new("vhdx-read");
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    for (name, options, size) in IMAGES {
        make(&src, name, options, size);
    }
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let mut expected: Vec<String> = IMAGES.iter().map(|(n, _, _)| format!("{n}.raw")).collect();
    expected.sort();
    assert_eq!(ls(&mount.mnt), expected);
    for (name, _, size) in IMAGES {
        let raw = mount.path(&format!("{name}.raw"));
        assert_eq!(std::fs::metadata(&raw).unwrap().len(), size, "{name}");
        assert_served_like_qemu(&mount, &src, &dir, "vhdx", name);
    }
    mount.unmount();
    for (name, _, _) in IMAGES {
        assert_check_clean("vhdx", &src.join(name));
    }
}

#[test]
fn threaded_random_writes_pass_qemu_check_and_compare_equal() {
    if !can_mount() {
        return;
    }
    let dir = TempDir::new("vhdx-write");
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let names = ["dynamic-1m.vhdx", "dynamic-8m.vhdx", "fixed-8m.vhdx"];
    let mut expected = Vec::new();
    for name in names {
        let (_, options, size) = IMAGES.iter().find(|(n, _, _)| *n == name).unwrap();
        make(&src, name, options, *size);
        expected.push(qemu_raw("vhdx", &src.join(name), &dir));
    }
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    for (i, name) in names.iter().enumerate() {
        let size = expected[i].len() as u64;
        let plan =
            plan_threaded_writes(&mut expected[i], 4, 30, 100_000, size - 2 * MIB, size - MIB);
        run_threaded_writes(&mount.path(&format!("{name}.raw")), &plan);
    }
    for (i, name) in names.iter().enumerate() {
        let served = std::fs::read(mount.path(&format!("{name}.raw"))).unwrap();
        assert!(
            served == expected[i],
            "{name}: read-back through the mount differs"
        );
    }
    mount.unmount();
    for (i, name) in names.iter().enumerate() {
        assert_check_clean("vhdx", &src.join(name));
        assert_compare_equal("vhdx", &src.join(name), &expected[i], &dir);
    }
}

/// The crash test's disk: 64 MiB in slots of 512 KiB, one write per slot, in an order and
/// with offsets, lengths and bytes that depend only on the write's number.
const CRASH_DISK: u64 = 64 * MIB;
const SLOT: u64 = 512 * 1024;
const SLOTS: usize = (CRASH_DISK / SLOT) as usize;

/// Write `i` of the crash test: an unaligned piece of its own slot.
fn crash_write(order: &[u64], i: usize) -> (u64, Vec<u8>) {
    let mut rng = Rng::new(0xc4a5 + i as u64);
    let offset = order[i] * SLOT + rng.below(4096);
    let len = 1 + rng.below(SLOT - 4096 - 1);
    (offset, rng.bytes(len as usize))
}

/// What the crash test's writer reports.
enum Event {
    /// It starts an fsync after this many writes.
    Syncing(usize),
    /// That many writes are durable: the fsync returned.
    Durable(usize),
}

/// Whether the current header of the VHDX file names a log entry to replay (the header with
/// the higher sequence number has a log GUID). A torn read at worst makes the kill come early.
fn log_is_dirty(file: &std::fs::File) -> bool {
    let mut headers = [[0u8; 64]; 2];
    for (slot, at) in headers.iter_mut().zip([64 * 1024, 128 * 1024]) {
        file.read_exact_at(slot, at).unwrap();
    }
    let sequence = |h: &[u8; 64]| u64::from_le_bytes(h[8..16].try_into().unwrap());
    let current = headers.iter().max_by_key(|h| sequence(h)).unwrap();
    current[48..64].iter().any(|&b| b != 0)
}

/// A permutation of the slots, so writes land all over the disk.
fn slot_order() -> Vec<u64> {
    let mut order: Vec<u64> = (0..SLOTS as u64).collect();
    let mut rng = Rng::new(0x0bde);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    order
}

/// kill -9 of the daemon while a writer is writing: every write the writer fsync'ed is in the
/// image for QEMU (which replays the log on a read-write open) and for imgfs (which replays it
/// on mount), both see the same disk, slots nobody wrote are still zeros, and the image checks
/// clean once replayed.
#[test]
fn a_daemon_killed_while_writing_loses_no_fsynced_write() {
    if !can_mount() {
        return;
    }
    let (dir, src, image) = source_with_image(
        "vhdx-kill",
        "vhdx",
        "disk.vhdx",
        &CRASH_DISK.to_string(),
        &["-o", "subformat=dynamic,block_size=1M"],
    );
    let order = slot_order();
    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let raw = mount.path("disk.vhdx.raw");
    let pid = daemon_pid(&mount.mnt);
    let exit = ExitWatch::new(pid);

    // The writer fsyncs after every third write and says when it starts an fsync and how many
    // writes are durable when it returns; it stops at the first error, once the daemon is gone.
    let (events_tx, events) = mpsc::channel::<Event>();
    let writer = {
        let (raw, order) = (raw.clone(), order.clone());
        std::thread::spawn(move || {
            let file = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
            let mut attempted = 0;
            for i in 0..SLOTS {
                let (offset, data) = crash_write(&order, i);
                attempted = i + 1;
                if file.write_all_at(&data, offset).is_err() {
                    break;
                }
                if (i + 1) % 3 == 0 {
                    let _ = events_tx.send(Event::Syncing(i + 1));
                    if file.sync_all().is_err() {
                        break;
                    }
                    let _ = events_tx.send(Event::Durable(i + 1));
                }
            }
            attempted
        })
    };
    // Killed once 30 writes are durable, as soon as the image's header names a log entry (the
    // daemon is then in the middle of writing back the BAT), or else after 90 writes.
    let image_file = std::fs::File::open(&image).unwrap();
    let mut durable = 0;
    let mut syncing = 0;
    loop {
        for event in events.try_iter() {
            match event {
                Event::Durable(n) => durable = n,
                Event::Syncing(n) => syncing = n,
            }
        }
        if durable >= 30 && (log_is_dirty(&image_file) || syncing >= 90) {
            break;
        }
        assert!(!writer.is_finished(), "the writer stopped before the kill");
        std::thread::yield_now();
    }
    // SAFETY: kill on the daemon's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    exit.wait();
    let attempted = writer.join().unwrap();
    // An fsync that returned before the daemon died counts too.
    for event in events.try_iter() {
        if let Event::Durable(n) = event {
            durable = durable.max(n);
        }
    }
    assert!(
        attempted < SLOTS,
        "the daemon was killed while the writer was still writing"
    );
    run(Command::new(IMGFS).arg("umount").arg(&mount.mnt));
    assert!(!is_mount_point(&mount.mnt));
    mount.forget_unmounted();

    // QEMU replays the log of one copy, imgfs that of the image itself.
    let copy = dir.join("qemu-copy.vhdx");
    std::fs::copy(&image, &copy).unwrap();
    qemu_img(&["check", "-q", "-r", "leaks", "-f", "vhdx", path_str(&copy)]);
    assert_check_clean("vhdx", &copy);
    let theirs = qemu_raw("vhdx", &copy, &dir);
    assert_eq!(theirs.len() as u64, CRASH_DISK);
    for i in 0..durable {
        let (offset, data) = crash_write(&order, i);
        let at = offset as usize;
        assert!(
            theirs[at..at + data.len()] == data[..],
            "fsync'ed write {i} at {offset} is missing after QEMU's replay"
        );
    }
    for slot in &order[attempted..] {
        let at = (slot * SLOT) as usize;
        assert!(
            theirs[at..at + SLOT as usize].iter().all(|&b| b == 0),
            "slot {slot} was never written"
        );
    }

    let mount = Mount::new(&src, &dir.join("mnt2"), &[]);
    let raw = mount.path("disk.vhdx.raw");
    for i in 0..durable {
        let (offset, data) = crash_write(&order, i);
        assert!(
            read_range(&raw, offset, data.len()) == data,
            "fsync'ed write {i} at {offset} is missing after imgfs's replay"
        );
    }
    let ours = std::fs::read(&raw).unwrap();
    assert!(ours == theirs, "imgfs and QEMU replay the log alike");
    mount.unmount();
    assert_check_clean("vhdx", &image);
}

/// Sets the logical sector size item of a qemu-img VHDX (QEMU only makes 512-byte ones). With
/// fewer than 4096 blocks the BAT of a dynamic image is laid out the same either way.
fn set_logical_sector_size(path: &Path, value: u32) {
    const METADATA_REGION: u128 = 0x8b7ca206_4790_4b9a_b8fe_575f050f886e;
    const LOGICAL_SECTOR_SIZE: u128 = 0x8141bf1d_a96f_4709_ba47_f233a8faab5f;
    let bytes = std::fs::read(path).unwrap();
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    // Both tables: a header, then 32-byte entries starting with the GUID (on-disk byte order).
    let find = |table: usize, header: usize, count: usize, guid: u128| {
        let guid = uuid::Uuid::from_u128(guid).to_bytes_le();
        (0..count)
            .map(|i| table + header + 32 * i)
            .find(|&at| bytes[at..at + 16] == guid)
            .unwrap()
    };
    let regions = 192 * 1024;
    let entry = find(regions, 16, u32_at(regions + 8) as usize, METADATA_REGION);
    let meta = u64::from_le_bytes(bytes[entry + 16..entry + 24].try_into().unwrap()) as usize;
    let count = u16::from_le_bytes([bytes[meta + 10], bytes[meta + 11]]) as usize;
    let item = find(meta, 32, count, LOGICAL_SECTOR_SIZE);
    let at = meta + u32_at(item + 16) as usize;
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(&value.to_le_bytes(), at as u64).unwrap();
}

#[test]
fn images_with_4k_logical_sectors_take_threaded_writes() {
    if !can_mount() {
        return;
    }
    let size = 24 * MIB;
    let (dir, src, image) = source_with_image(
        "vhdx-4k",
        "vhdx",
        "4k.vhdx",
        &size.to_string(),
        &["-o", "subformat=dynamic,block_size=1M"],
    );
    qemu_io("vhdx", &image, &["write -P 0x42 3M 2M"]);
    let mut expected = qemu_raw("vhdx", &image, &dir);
    set_logical_sector_size(&image, 4096);
    let info = run(Command::new(IMGFS).args(["info"]).arg(&image));
    let info = String::from_utf8(info.stdout).unwrap();
    assert!(info.contains("logical_sector_size: 4096"), "{info}");

    let mount = Mount::new(&src, &dir.join("mnt"), &[]);
    let raw = mount.path("4k.vhdx.raw");
    assert!(
        std::fs::read(&raw).unwrap() == expected,
        "served before writes"
    );
    let plan = plan_threaded_writes(&mut expected, 4, 30, 100_000, size - 2 * MIB, size - MIB);
    run_threaded_writes(&raw, &plan);
    assert!(std::fs::read(&raw).unwrap() == expected, "read back");
    mount.unmount();
    let mount = Mount::new(&src, &dir.join("mnt2"), &[]);
    let raw = mount.path("4k.vhdx.raw");
    assert!(
        std::fs::read(&raw).unwrap() == expected,
        "after a new mount"
    );
    mount.unmount();

    // Back at 512-byte sectors QEMU reads the same layout: it must check clean and be equal.
    set_logical_sector_size(&image, 512);
    assert_check_clean("vhdx", &image);
    assert_compare_equal("vhdx", &image, &expected, &dir);
}
