//! Crash consistency of allocating writes and their flush: the host writes are recorded from
//! the first allocating write through the flush, and the image as a crash after each of them
//! would leave it is checked with QEMU (`testutil::crash`): it reads the old or the new disk,
//! imgfs reads the same, and a block QEMU then allocates lands on none of the data.

use super::*;
use crate::host::fault::{self, Op};
use crate::testutil::crash::CrashCheck;

#[test]
fn every_write_of_an_allocation_and_its_flush_leaves_an_image_qemu_reads() {
    let dir = TempDir::new();
    let Some(path) = create(&dir, "c.vhd", "force_size=on", 64 * MIB) else {
        return;
    };
    qemu_io(&path, &["write -P 0x11 0 64k", "write -P 0x12 5M 4k"]);
    let watch = fault::watch(&path);
    let img = open_rw(&path);
    let mut model = read_all(&img);
    let write = |img: &VhdImage, model: &mut Vec<u8>, offset: u64, len: usize, byte: u8| {
        img.write_at(&vec![byte; len], offset).unwrap();
        model[offset as usize..offset as usize + len].fill(byte);
    };
    write(&img, &mut model, MIB + 100, 5000, 0x21);
    img.flush().unwrap();
    let old = model.clone();
    watch.start();
    write(&img, &mut model, 200, 300, 0x31); // in place
    write(&img, &mut model, 20 * MIB + 7, 70_000, 0x32); // a new block
    write(&img, &mut model, 40 * MIB - 1000, 3 * MIB as usize, 0x33); // three new blocks
    img.flush().unwrap();
    let recording = watch.stop();
    drop(img);
    assert_eq!(recording.ops().last(), Some(&Op::Sync));
    let read_ours = |p: &Path| read_all(&open_rw(p));
    let check = CrashCheck {
        format: "vpc",
        old: &old,
        new: &model,
        fresh: 60 * MIB,
        read_ours: &read_ours,
    };
    check.every_prefix(&path, &recording);
}

#[test]
fn a_torn_last_footer_opens_from_the_copy_and_new_blocks_go_past_it() {
    let dir = TempDir::new();
    let Some(path) = create(&dir, "c.vhd", "force_size=on", 16 * MIB) else {
        return;
    };
    let watch = fault::watch(&path);
    let img = open_rw(&path);
    watch.start();
    img.write_at(&[0x5a; 4096], 3 * MIB).unwrap();
    let recording = watch.stop();
    drop(img);
    // The first write makes room: a footer behind the new block. Torn, it is no footer.
    assert!(matches!(
        &recording.ops()[..2],
        [Op::Write { .. }, Op::Sync]
    ));
    let mut torn = recording.after_writes(1);
    let len = torn.len();
    torn[len - 512..len - 400].fill(0);
    std::fs::write(&path, &torn).unwrap();
    let img = open_rw(&path);
    assert!(detail(&img, "footer").contains("the copy at offset 0 is used"));
    assert!(read_all(&img).iter().all(|&b| b == 0));
    img.write_at(&[0x6b; 512], 9 * MIB).unwrap();
    img.flush().unwrap();
    drop(img);
    let bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > len, "the new block went past the torn end");
    assert_eq!(&bytes[bytes.len() - 512..], &bytes[..512]);
    let mut expected = vec![0u8; 16 * MIB as usize];
    expected[9 * MIB as usize..9 * MIB as usize + 512].fill(0x6b);
    assert!(qemu_bytes(&path) == expected);
    assert!(read_all(&open_rw(&path)) == expected);
}
