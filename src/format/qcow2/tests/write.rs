//! Writes through `Qcow2Image` on images of every kind qemu-img makes: random unaligned writes
//! from four threads into unallocated, allocated, zero, compressed, snapshot-shared and backed
//! clusters, then flush and drop; `qemu-img check` must find no errors and no leaks,
//! `qemu-img compare` the expected bytes, internal snapshots must be unchanged, and a reopen
//! must read the same.

use super::*;

/// How to build the image a case writes to.
#[derive(Default, Clone, Copy)]
struct Setup<'a> {
    /// `qemu-img create -o` options (besides the backing file).
    options: &'a str,
    /// Fill some clusters with `write -c` (not possible with an external data file).
    compressed: bool,
    /// Take two internal snapshots around the fills.
    snapshots: bool,
    /// Leave the image with its dirty bit set (needs lazy_refcounts=on in `options`).
    crash: bool,
    /// A backing file: `Some("raw")` or `Some("qcow2")`.
    backing: Option<&'a str>,
    /// An external data file, `Some(raw)`.
    data_file: Option<bool>,
}

const SIZE: u64 = 8 * MIB;

fn open_rw(path: &Path, backing: Option<Backing>) -> Qcow2Image {
    let file = HostFile::open(path, true).unwrap();
    let header = Qcow2Header::read(&file).unwrap();
    let data_file = header
        .data_file()
        .map(|name| HostFile::open(&path.parent().unwrap().join(Path::new(name)), true).unwrap());
    Qcow2Image::open(file, header, data_file, backing, None).unwrap()
}

fn cluster_size_of(path: &Path) -> u64 {
    let file = HostFile::open(path, false).unwrap();
    Qcow2Header::read(&file).unwrap().cluster_size()
}

/// qemu-io fills that leave every kind of cluster behind, for clusters of `cs` bytes.
fn fills(cs: u64, compressed: bool) -> Vec<String> {
    let align = |x: u64| x / cs * cs;
    let mut c = vec![
        "write -P 0x11 0 1M".to_string(),
        "write -P 0x12 3M 700k".to_string(),
        format!("write -P 0x13 {} 300k", 5 * MIB + 4096),
        // Zeros over data (kept allocated) and over data with unmap allowed.
        "write -z 256k 256k".to_string(),
        format!("write -z -u {} 128k", 3 * MIB + 64 * KIB),
    ];
    // Compressed writes only go to unallocated clusters.
    if compressed && align(MIB + MIB / 2) >= MIB {
        c.push(format!("write -c -P 0x21 {} {cs}", align(MIB + MIB / 2)));
    }
    if compressed {
        c.push(format!("write -c -P 0x22 {} {cs}", align(6 * MIB)));
        if cs <= 64 * KIB {
            c.push(format!("write -c -P 0x23 {} {}", align(2 * MIB), 4 * cs));
        }
    }
    c
}

/// Random writes for four threads, each in its own quarter of the first 7 MiB, plus 999
/// bytes each into one shared cluster at 7.5 MiB; `expected` gets them all.
fn plan(expected: &mut [u8], cs: u64) -> Vec<Vec<(u64, Vec<u8>)>> {
    let region = 7 * MIB / 4;
    let max_len = (cs * 5 / 2).clamp(1000, 256 * KIB);
    let mut plans = Vec::new();
    for t in 0..4u64 {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ (t + 1);
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut writes = Vec::new();
        for _ in 0..30 {
            let len = 1 + next() % max_len;
            let offset = t * region + next() % (region - len);
            let byte = (next() % 255 + 1) as u8;
            writes.push((offset, vec![byte; len as usize]));
        }
        writes.push((15 * MIB / 2 + t * 1000 + 7, vec![0xe0 + t as u8; 999]));
        plans.push(writes);
    }
    for writes in &plans {
        for (offset, data) in writes {
            expected[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
        }
    }
    plans
}

fn run_threads(img: &Arc<Qcow2Image>, plans: Vec<Vec<(u64, Vec<u8>)>>) {
    let threads: Vec<_> = plans
        .into_iter()
        .map(|writes| {
            let img = Arc::clone(img);
            std::thread::spawn(move || {
                for (offset, data) in writes {
                    img.write_at(&data, offset).unwrap();
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|h| h.join().unwrap());
}

/// Builds the image `setup` describes in `dir`; returns its path and the backing to pass.
fn build(dir: &TempDir, setup: Setup) -> Option<(PathBuf, Option<Backing>)> {
    let path = dir.path().join("w.qcow2");
    let mut options = setup.options.to_string();
    let mut backing = None;
    let mut extra = String::new();
    if let Some(format) = setup.backing {
        let base = dir.path().join(format!("base.{format}"));
        run(
            "qemu-img",
            &format!("create -q -f {format} {} {SIZE}", p(&base)),
        )?;
        let io_format = if format == "raw" { "raw" } else { "qcow2" };
        let out = qemu(
            "qemu-io",
            &[
                "-f",
                io_format,
                "-c",
                "write -P 0x5b 0 8M",
                "-c",
                "write -P 0x5c 1M 1M",
                p(&base),
            ],
        )?;
        assert!(out.status.success());
        let image: Arc<dyn Image> = if format == "raw" {
            let bytes = std::fs::read(&base).unwrap();
            let mem = MemImage::new(bytes.len(), None);
            mem.write_at(&bytes, 0).unwrap();
            Arc::new(mem)
        } else {
            Arc::new(open(&base))
        };
        backing = Some(Backing::new(image, &base));
        extra = format!("-b {} -F {format}", p(&base));
    }
    if let Some(raw) = setup.data_file {
        let data = dir.path().join("w.data");
        let sep = if options.is_empty() { "" } else { "," };
        options = format!("{options}{sep}data_file={},data_file_raw={raw}", p(&data));
    }
    let opts = if options.is_empty() {
        String::new()
    } else {
        format!("-o {options}")
    };
    run(
        "qemu-img",
        &format!("create -q -f qcow2 {opts} {extra} {} {SIZE}", p(&path)),
    )?;
    let cs = cluster_size_of(&path);
    let commands = fills(cs, setup.compressed);
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    qemu_io(&path, &commands)?;
    if setup.snapshots {
        run("qemu-img", &format!("snapshot -c s1 {}", p(&path)))?;
        qemu_io(&path, &["write -P 0x44 2M 1M", "write -z 512k 64k"])?;
        run("qemu-img", &format!("snapshot -c s2 {}", p(&path)))?;
        qemu_io(&path, &["write -P 0x45 5M 64k"])?;
    }
    if setup.crash {
        // qemu-io killed by its own signal leaves the dirty bit set.
        let out = Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                "write -P 0x5a 7M 192k",
                "-c",
                "sigraise 9",
            ])
            .arg(&path)
            .output()
            .ok()?;
        assert!(!out.status.success());
        assert!(Qcow2Header::read(&HostFile::open(&path, false).unwrap())
            .unwrap()
            .is_dirty());
    }
    Some((path, backing))
}

/// The whole check of one kind of image.
fn write_case(setup: Setup) {
    let dir = TempDir::new();
    let Some((path, backing)) = build(&dir, setup) else {
        return;
    };
    let cs = cluster_size_of(&path);
    let mut expected = qemu_raw(&path, "").unwrap();
    let snapshots: Vec<(String, Vec<u8>)> = if setup.snapshots {
        ["s1", "s2"]
            .iter()
            .map(|s| {
                let extra = format!("-l snapshot.name={s}");
                (s.to_string(), qemu_raw(&path, &extra).unwrap())
            })
            .collect()
    } else {
        Vec::new()
    };
    let plans = plan(&mut expected, cs);
    let img = Arc::new(open_rw(&path, backing.clone()));
    assert_eq!(img.read_only_reason(), None);
    run_threads(&img, plans);
    assert_same(&read_all(&*img), &expected, "before flush");
    assert!(img.is_dirty());
    img.flush().unwrap();
    assert!(!img.is_dirty());
    drop(img);

    let what = setup.options;
    assert_check_clean(&path);
    assert_compare_equal(&path, &expected);
    for (name, before) in &snapshots {
        let after = qemu_raw(&path, &format!("-l snapshot.name={name}")).unwrap();
        assert_same(&after, before, &format!("{what}: snapshot {name}"));
    }
    let header = Qcow2Header::read(&HostFile::open(&path, false).unwrap()).unwrap();
    assert!(!header.is_dirty(), "{what}: dirty bit cleared");
    let again = open_rw(&path, backing);
    assert_same(&read_all(&again), &expected, &format!("{what}: reopened"));
}

#[test]
fn writes_compat_0_10() {
    write_case(Setup {
        options: "compat=0.10",
        compressed: true,
        ..Setup::default()
    });
}

#[test]
fn writes_compat_1_1_64k() {
    write_case(Setup {
        options: "compat=1.1",
        compressed: true,
        ..Setup::default()
    });
}

#[test]
fn writes_512_byte_clusters() {
    write_case(Setup {
        options: "cluster_size=512",
        compressed: true,
        ..Setup::default()
    });
}

#[test]
fn writes_4k_clusters() {
    write_case(Setup {
        options: "cluster_size=4k",
        compressed: true,
        ..Setup::default()
    });
}

#[test]
fn writes_2m_clusters() {
    write_case(Setup {
        options: "cluster_size=2M",
        compressed: true,
        ..Setup::default()
    });
}

#[test]
fn writes_refcount_bits_1_16_64() {
    for bits in [1, 16, 64] {
        write_case(Setup {
            options: &format!("refcount_bits={bits},cluster_size=4k"),
            compressed: true,
            ..Setup::default()
        });
    }
}

#[test]
fn writes_extended_l2() {
    write_case(Setup {
        options: "extended_l2=on",
        compressed: true,
        ..Setup::default()
    });
    write_case(Setup {
        options: "extended_l2=on,cluster_size=2M",
        ..Setup::default()
    });
}

#[test]
fn writes_zstd_compressed() {
    write_case(Setup {
        options: "compression_type=zstd",
        compressed: true,
        ..Setup::default()
    });
}

#[test]
fn writes_external_data_file() {
    write_case(Setup {
        data_file: Some(false),
        ..Setup::default()
    });
    write_case(Setup {
        data_file: Some(true),
        ..Setup::default()
    });
}

#[test]
fn writes_over_backing_files() {
    write_case(Setup {
        backing: Some("raw"),
        compressed: true,
        ..Setup::default()
    });
    write_case(Setup {
        backing: Some("qcow2"),
        options: "extended_l2=on",
        ..Setup::default()
    });
}

#[test]
fn writes_leave_internal_snapshots_unchanged() {
    write_case(Setup {
        snapshots: true,
        compressed: true,
        ..Setup::default()
    });
}

#[test]
fn writes_rebuild_dirty_lazy_refcounts_first() {
    write_case(Setup {
        options: "lazy_refcounts=on",
        crash: true,
        ..Setup::default()
    });
}

#[test]
fn opening_does_not_modify_the_file() {
    let dir = TempDir::new();
    let Some((path, _)) = build(
        &dir,
        Setup {
            options: "lazy_refcounts=on",
            crash: true,
            ..Setup::default()
        },
    ) else {
        return;
    };
    let before = std::fs::read(&path).unwrap();
    let img = open_rw(&path, None);
    read_all(&img);
    img.flush().unwrap();
    drop(img);
    assert!(std::fs::read(&path).unwrap() == before);
}

#[test]
fn the_refcount_table_grows_and_describes_itself() {
    let dir = TempDir::new();
    let path = dir.path().join("g.qcow2");
    let create = format!(
        "create -q -f qcow2 -o cluster_size=512,refcount_bits=64 {} 8M",
        p(&path)
    );
    if run("qemu-img", &create).is_none() {
        return;
    }
    let before = Qcow2Header::read(&HostFile::open(&path, false).unwrap()).unwrap();
    let img = open_rw(&path, None);
    let mut expected = vec![0u8; SIZE as usize];
    // 64 refcounts per block, 64 blocks per table cluster: the first table covers 2 MiB.
    // Each even 64 KiB chunk is written but for its last 16 KiB, whose L2 table exists then.
    let chunk = 64 * KIB as usize;
    let head = 48 * KIB as usize;
    for (i, part) in expected.chunks_mut(chunk).enumerate().step_by(2) {
        part[..head].fill(i as u8 + 1);
        img.write_at(&part[..head], (i * chunk) as u64).unwrap();
    }
    img.flush().unwrap();
    // The old table's clusters are free now and go to the next data clusters; writing there
    // again, in place, must not be taken for a write over the refcount table.
    for pass in 0..2u8 {
        for (i, part) in expected.chunks_mut(chunk).enumerate().step_by(2).take(8) {
            part[head..].fill(0x80 + pass);
            img.write_at(&part[head..], (i * chunk + head) as u64)
                .unwrap();
        }
    }
    img.flush().unwrap();
    drop(img);
    let after = Qcow2Header::read(&HostFile::open(&path, false).unwrap()).unwrap();
    assert!(
        after.refcount_table_clusters > before.refcount_table_clusters,
        "{} -> {}",
        before.refcount_table_clusters,
        after.refcount_table_clusters
    );
    assert_check_clean(&path);
    assert_compare_equal(&path, &expected);
}

#[test]
fn a_crash_before_flush_leaks_at_most() {
    let dir = TempDir::new();
    let Some((path, _)) = build(
        &dir,
        Setup {
            options: "cluster_size=4k",
            compressed: true,
            snapshots: true,
            ..Setup::default()
        },
    ) else {
        return;
    };
    let img = open_rw(&path, None);
    let flushed: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8 + 1).collect();
    img.write_at(&flushed, 1_000_000).unwrap();
    img.flush().unwrap();
    // More writes (allocations, copies of shared clusters and of compressed ones), never
    // flushed: dropping the image is the crash.
    for i in 0..50u64 {
        img.write_at(&[0xcc; 7000], 2 * MIB + i * 97_000).unwrap();
    }
    drop(img);
    let out = qemu("qemu-img", &["check", p(&path)]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("ERROR") && matches!(out.status.code(), Some(0 | 3)),
        "{text}"
    );
    let raw = qemu_raw(&path, "").unwrap();
    assert_same(&raw[1_000_000..1_300_000], &flushed, "flushed data");
}

#[test]
fn racing_partial_writes_into_one_cluster_allocate_it_once_and_keep_every_byte() {
    for options in ["cluster_size=64k", "extended_l2=on"] {
        let dir = TempDir::new();
        let path = dir.path().join("race.qcow2");
        let create = format!("create -q -f qcow2 -o {options} {} 8M", p(&path));
        if run("qemu-img", &create).is_none() {
            return;
        }
        // Clusters 8.. are compressed, the rest unallocated.
        qemu_io(
            &path,
            &["write -c -P 0x31 512k 64k", "write -c -P 0x32 576k 64k"],
        )
        .unwrap();
        let mut expected = qemu_raw(&path, "").unwrap();
        let img = Arc::new(open_rw(&path, None));
        let threads = 4u64;
        let barrier = Arc::new(std::sync::Barrier::new(threads as usize));
        // Each round all threads write their own 3000-byte slice of one fresh cluster (or a
        // compressed one) at once; slices of neighbouring threads share subclusters.
        let clusters: Vec<u64> = (0..12)
            .map(|i| i * 64 * KIB)
            .chain([512 * KIB, 576 * KIB])
            .collect();
        for &cluster in &clusters {
            for t in 0..threads {
                let at = (cluster + 1000 + t * 3000) as usize;
                expected[at..at + 3000].fill(0x80 + t as u8);
            }
        }
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (img, barrier, clusters) =
                    (Arc::clone(&img), Arc::clone(&barrier), clusters.clone());
                std::thread::spawn(move || {
                    for cluster in clusters {
                        barrier.wait();
                        img.write_at(&[0x80 + t as u8; 3000], cluster + 1000 + t * 3000)
                            .unwrap();
                    }
                })
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
        assert_same(&read_all(&*img), &expected, options);
        img.flush().unwrap();
        drop(img);
        assert_check_clean(&path);
        assert_compare_equal(&path, &expected);
    }
}

fn assert_check_clean(path: &Path) {
    crate::testutil::assert_qemu_check_clean("qcow2", path);
}

fn assert_compare_equal(path: &Path, expected: &[u8]) {
    crate::testutil::assert_qemu_compare_equal("qcow2", path, expected);
}

/// A large write into a fresh image goes out as runs of contiguous new clusters, one host
/// write each: a new L2 table between them (the run across an L2 table's reach) and a
/// cluster written in place (already the image's own) split runs, and everything reads back
/// and checks clean.
#[test]
fn whole_clusters_are_written_in_contiguous_runs() {
    let dir = TempDir::new();
    let path = dir.path().join("runs.qcow2");
    // 4 KiB clusters: one L2 table covers 2 MiB.
    let create = format!("create -q -f qcow2 -o cluster_size=4k {} {SIZE}", p(&path));
    if run("qemu-img", &create).is_none() {
        return;
    }
    qemu_io(&path, &["write -P 0x31 1M 4k"]).unwrap();
    let mut expected = qemu_raw(&path, "").unwrap();
    let watch = crate::host::fault::watch(&path);
    let img = open_rw(&path, None);
    img.write_at(&[0; 1], 0).unwrap();
    let writes_before = watch.counts().writes;
    // 3 MiB + 100 bytes from 512 KiB + 100: a partial cluster at each end, 767 whole ones.
    let data: Vec<u8> = (0..3 * MIB + 100).map(|i| (i % 253) as u8 + 1).collect();
    let at = 512 * KIB + 100;
    img.write_at(&data, at).unwrap();
    let writes = watch.counts().writes - writes_before;
    expected[at as usize..(at + data.len() as u64) as usize].copy_from_slice(&data);
    expected[0] = 0;
    assert!(
        writes < 40,
        "{writes} host writes for 769 clusters: whole clusters not gathered into runs"
    );
    assert_same(&read_all(&img), &expected, "before the flush");
    img.flush().unwrap();
    drop(img);
    assert_check_clean(&path);
    assert_compare_equal(&path, &expected);
}
