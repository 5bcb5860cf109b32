//! `Image::raw_file` for qcow2: an external data file with the raw bit is the disk, read
//! directly; one without the bit, an image without a data file and a snapshot view are not.

use super::*;

/// A 4 MiB qcow2 image `name` with `options`, in which `{dir}` stands for the directory.
fn create(dir: &TempDir, name: &str, options: &str) -> Option<PathBuf> {
    let path = dir.path().join(name);
    let options = options.replace("{dir}", p(dir.path()));
    run(
        "qemu-img",
        &format!("create -q -f qcow2 -o {options} {} 4M", p(&path)),
    )?;
    qemu_io(
        &path,
        &[
            "write -P 0x5a 0 1M",
            "write -z 1M 64k",
            "write -P 0xa5 3M 64k",
        ],
    )?;
    Some(path)
}

#[test]
fn a_raw_external_data_file_is_the_raw_file_of_the_active_disk() {
    let dir = TempDir::new();
    let Some(raw) = create(
        &dir,
        "raw.qcow2",
        "data_file={dir}/raw.data,data_file_raw=on",
    ) else {
        return;
    };
    let img = open(&raw);
    let file = img.raw_file().unwrap();
    assert!(file.path().ends_with("raw.data"));
    let mut direct = vec![0u8; 4 << 20];
    file.read_exact_at(&mut direct, 0).unwrap();
    assert_eq!(direct, read_all(&img));
    assert_eq!(direct, qemu_raw(&raw, "-f qcow2").unwrap());

    let plain = create(
        &dir,
        "plain.qcow2",
        "data_file={dir}/plain.data,data_file_raw=off",
    )
    .unwrap();
    assert!(open(&plain).raw_file().is_none(), "without the raw bit");
    let own = create(&dir, "own.qcow2", "cluster_size=65536").unwrap();
    assert!(open(&own).raw_file().is_none(), "without a data file");

    // A data file of another length is not the disk.
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("raw.data"))
        .unwrap()
        .set_len(5 << 20)
        .unwrap();
    assert!(open(&raw).raw_file().is_none(), "a longer data file");
}
