//! One crash round: mount a fresh image, let writer threads write unique slots with an fsync
//! every few writes, kill the daemon with SIGKILL at a chosen moment, and check the image with
//! qemu-img and a fresh imgfs mount. A round has two crashes: one at a random moment (or while
//! a flush is in progress), then one right after the remount, while the daemon recovers from
//! the first (replays a VHDX log, rebuilds lazy refcounts) and starts writing again.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use crate::common::*;
use crate::model::{self, Slot, WindowBytes};
use crate::variants::Variant;

/// When the daemon is killed.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// So many milliseconds after the writers start.
    AfterMillis(u64),
    /// So many microseconds after the n-th fsync starts (inside a write-back, often).
    InFlush { nth: usize, micros: u64 },
    /// So many microseconds after the writers start opening the image (while it recovers).
    Early { micros: u64 },
    /// Like `AfterMillis`, with a copy of the image renamed over it after `replace_ms`.
    Replaced { replace_ms: u64, after_ms: u64 },
}

/// What a round adds to the variant's figures.
pub struct Report {
    pub leaks: u64,
    /// Slots whose fsync returned before the kill, and slots planned, over both crashes.
    pub fsynced: usize,
    pub planned: usize,
    /// Resizes tried during a crash, and how many the image kept.
    pub resizes: usize,
    pub grown: usize,
}

/// A resize tried while the writers wrote: the disk's size before, and the one asked for.
#[derive(Debug, Clone, Copy)]
struct Growth {
    before: u64,
    target: u64,
}

pub fn run(variant: &Variant, seed: u64) -> Result<Report, (String, TempDir)> {
    let dir = TempDir::new(&format!("crash-{}", variant.name));
    match run_in(variant, seed, &dir) {
        Ok(report) => Ok(report),
        Err(e) => Err((e, dir)),
    }
}

fn run_in(variant: &Variant, seed: u64, dir: &TempDir) -> Result<Report, String> {
    let mut rng = Rng::new(seed);
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    (variant.make)(&src);
    let untouched: Vec<(PathBuf, Vec<u8>)> = variant
        .untouched
        .iter()
        .map(|name| (src.join(name), std::fs::read(src.join(name)).unwrap()))
        .collect();
    let (mut old, _) = read_through_imgfs(variant, &src, &dir.join("first-mnt"))?;
    if variant.qemu_reads {
        let theirs = qemu_windows(variant, &src.join(variant.image), variant.format, dir)?;
        if theirs != old {
            return Err("before the round, imgfs and qemu-img read different bytes".into());
        }
    }
    let kills = if variant.replaced {
        vec![Kill::Replaced {
            replace_ms: 2 + rng.below(40),
            after_ms: 2 + rng.below(60),
        }]
    } else {
        let first = match rng.below(2) {
            0 => Kill::AfterMillis(5 + rng.below(200)),
            _ => Kill::InFlush {
                nth: 1 + rng.below(6) as usize,
                micros: rng.below(3000),
            },
        };
        vec![
            first,
            Kill::Early {
                micros: rng.below(20_000),
            },
        ]
    };
    let (mut leaks, mut fsynced, mut planned, mut resizes, mut grown) = (0, 0, 0, 0, 0);
    for (phase, kill) in kills.into_iter().enumerate() {
        let slots = model::plan_slots(&mut rng, &variant.windows, 0.4);
        let mnt = dir.join(&format!("mnt{phase}"));
        let replacement = dir.join("replacement.img");
        if variant.replaced {
            std::fs::copy(src.join(variant.image), &replacement).unwrap();
        }
        let (durable, growth) = write_and_kill(variant, &src, &mnt, dir, &slots, kill, &mut rng);
        fsynced += durable.iter().filter(|&&d| d).count();
        planned += slots.len();
        let context = |e: String| format!("crash {} ({kill:?}): {e}", phase + 1);
        let (written, image) = match kill {
            // The writes went to the file renamed away; the new one must be untouched.
            Kill::Replaced { .. } => {
                let now = std::fs::read(src.join(variant.image)).unwrap();
                if now != std::fs::read(&replacement).unwrap() {
                    return Err(context(
                        "the image renamed over the served one changed".into(),
                    ));
                }
                (dir.join("kept.img"), dir.join("kept.img"))
            }
            _ => (src.join(variant.image), src.join(variant.image)),
        };
        // In overlay mode the writes are in the overlay, once the first one made it.
        let overlay = dir.join("changes").join(format!("{}.qcow2", variant.image));
        let (image, format) = match variant.overlay && overlay.exists() {
            true => (overlay, "qcow2"),
            false => (image, variant.format),
        };
        if variant.qemu_reads {
            let (theirs, leaked) =
                qemu_check_and_read(variant, &image, format, dir).map_err(context)?;
            leaks += leaked;
            model::check(&variant.windows, &old, &theirs, &slots, &durable)
                .map_err(|e| context(format!("qemu-img reads: {e}")))?;
            if written == src.join(variant.image) {
                let (ours, size) = read_through_imgfs(variant, &src, &dir.join("check-mnt"))?;
                if ours != theirs {
                    return Err(context("imgfs and qemu-img read different bytes".into()));
                }
                if let Some(growth) = growth {
                    let theirs = qemu_virtual_size(variant, &image, format).map_err(context)?;
                    // VHD: QEMU reads the footer copy at the start, imgfs the one at the end,
                    // and a crash between their writes leaves them apart until imgfs's next
                    // write; each must still be the old size or the new one.
                    if format == "vpc" {
                        check_growth(growth, theirs)
                            .map_err(|e| context(format!("qemu-img: {e}")))?;
                    } else if theirs != size {
                        return Err(context(format!(
                            "after {growth:?}: imgfs serves {size} bytes, qemu-img says {theirs}"
                        )));
                    }
                    resizes += 1;
                    grown += usize::from(check_growth(growth, size).map_err(context)?);
                }
            }
            old = theirs;
        } else {
            let (ours, size) = read_through_imgfs(variant, &src, &dir.join("check-mnt"))?;
            model::check(&variant.windows, &old, &ours, &slots, &durable)
                .map_err(|e| context(format!("imgfs reads: {e}")))?;
            if let Some(growth) = growth {
                resizes += 1;
                grown += usize::from(check_growth(growth, size).map_err(context)?);
            }
            old = ours;
        }
        for (path, bytes) in &untouched {
            if std::fs::read(path).unwrap() != *bytes {
                return Err(context(format!("{} changed", path.display())));
            }
        }
    }
    Ok(Report {
        leaks,
        fsynced,
        planned,
        resizes,
        grown,
    })
}

/// The size after a crash during `growth` must be the old one or the new one; whether the
/// disk grew.
fn check_growth(growth: Growth, size: u64) -> Result<bool, String> {
    match size {
        s if s == growth.target => Ok(true),
        s if s == growth.before => Ok(false),
        s => Err(format!("after {growth:?} the disk has {s} bytes")),
    }
}

/// The arguments that open `image` as `format` in qemu-img: with the variant's passphrase
/// when it is the variant's encrypted image (the encrypted variants are qcow2).
fn qemu_image(variant: &Variant, image: &Path, format: &str) -> Vec<std::ffi::OsString> {
    match variant.passphrase {
        Some(passphrase) if format == variant.format => qemu_encrypted_qcow2(image, passphrase)
            .into_iter()
            .map(Into::into)
            .collect(),
        _ => vec!["-f".into(), format.into(), image.into()],
    }
}

/// The virtual size `qemu-img info` reports for `image`.
fn qemu_virtual_size(variant: &Variant, image: &Path, format: &str) -> Result<u64, String> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .args(qemu_image(variant, image, format))
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "qemu-img info: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    info["virtual-size"]
        .as_u64()
        .ok_or_else(|| "qemu-img info: no virtual-size".to_string())
}

/// Mounts `src`, writes `slots` from two or three threads (an fsync every few writes), in
/// some rounds grows the disk from another thread meanwhile, kills the daemon as `kill` says,
/// removes the dead mount, and returns which slots were fsync'ed and the growth tried.
fn write_and_kill(
    variant: &Variant,
    src: &Path,
    mnt: &Path,
    dir: &TempDir,
    slots: &[Slot],
    kill: Kill,
    rng: &mut Rng,
) -> (Vec<bool>, Option<Growth>) {
    let args = mount_args(variant, src);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mount = Mount::new(src, mnt, &args);
    let pid = daemon_pid(&mount.mnt);
    let exit = ExitWatch::new(pid);
    let raw = mount.path(&format!("{}.raw", variant.image));
    let durable: Arc<Vec<AtomicBool>> =
        Arc::new((0..slots.len()).map(|_| AtomicBool::new(false)).collect());
    let (syncing, fsyncs) = mpsc::channel::<()>();
    let threads = 2 + rng.below(2) as usize;
    let writers: Vec<_> = (0..threads)
        .map(|t| {
            let mine: Vec<(usize, Slot)> = slots
                .iter()
                .cloned()
                .enumerate()
                .filter(|(i, _)| i % threads == t)
                .collect();
            let every = 1 + rng.below(4) as usize;
            // The second writer opens with O_DIRECT: the whole host pages of its large writes
            // bypass the host page cache.
            let direct = t == 1;
            let (raw, durable, syncing) = (raw.clone(), durable.clone(), syncing.clone());
            std::thread::spawn(move || write_slots(&raw, &mine, every, direct, &durable, &syncing))
        })
        .collect();
    drop(syncing);
    let grower = (variant.grows && rng.below(2) == 0).then(|| {
        let before = std::fs::metadata(&raw).map_or(0, |m| m.len());
        let growth = Growth {
            before,
            target: before + (1 + rng.below(4)) * (1 << 20),
        };
        let (raw, delay) = (raw.clone(), rng.below(40));
        let thread = std::thread::spawn(move || {
            // At a random moment among the writes, as the kill's is.
            std::thread::sleep(Duration::from_millis(delay));
            if let Ok(file) = std::fs::OpenOptions::new().write(true).open(&raw) {
                let _ = file.set_len(growth.target);
            }
        });
        (growth, thread)
    });
    match kill {
        Kill::AfterMillis(ms) => std::thread::sleep(Duration::from_millis(ms)),
        Kill::InFlush { nth, micros } => {
            for _ in 0..nth {
                if fsyncs.recv_timeout(Duration::from_secs(10)).is_err() {
                    break;
                }
            }
            std::thread::sleep(Duration::from_micros(micros));
        }
        Kill::Early { micros } => std::thread::sleep(Duration::from_micros(micros)),
        Kill::Replaced {
            replace_ms,
            after_ms,
        } => {
            std::thread::sleep(Duration::from_millis(replace_ms));
            let image = src.join(variant.image);
            std::fs::hard_link(&image, dir.join("kept.img")).unwrap();
            let staged = dir.join("staged.img");
            std::fs::copy(dir.join("replacement.img"), &staged).unwrap();
            std::fs::rename(&staged, &image).unwrap();
            std::thread::sleep(Duration::from_millis(after_ms));
        }
    }
    // SAFETY: kill on the daemon's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    exit.wait();
    for writer in writers {
        writer.join().unwrap();
    }
    let growth = grower.map(|(growth, thread)| {
        thread.join().unwrap();
        growth
    });
    // `imgfs umount` removes the mount a dead daemon left.
    crate::common::run(Command::new(IMGFS).arg("umount").arg(&mount.mnt));
    mount.forget_unmounted();
    let durable = durable.iter().map(|d| d.load(Ordering::SeqCst)).collect();
    (durable, growth)
}

/// One writer (`direct`: with O_DIRECT): its slots in order, an fsync after every `every`
/// writes, marking them durable once it returned; stops at the first error (the daemon is gone).
fn write_slots(
    raw: &Path,
    slots: &[(usize, Slot)],
    every: usize,
    direct: bool,
    durable: &[AtomicBool],
    syncing: &mpsc::Sender<()>,
) {
    use std::os::unix::fs::OpenOptionsExt;
    let flags = if direct { libc::O_DIRECT } else { 0 };
    let Ok(file) = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(flags)
        .open(raw)
    else {
        return;
    };
    for chunk in slots.chunks(every) {
        for (_, slot) in chunk {
            let done = match slot.discard {
                true => punch(&file, slot.offset, slot.data.len() as u64),
                false => file.write_all_at(&slot.data, slot.offset),
            };
            if done.is_err() {
                return;
            }
        }
        let _ = syncing.send(());
        if file.sync_all().is_err() {
            return;
        }
        for (i, _) in chunk {
            durable[*i].store(true, Ordering::SeqCst);
        }
    }
}

/// `fallocate(PUNCH_HOLE | KEEP_SIZE)`, as `fallocate -p` and a loop device's discard send it.
fn punch(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a descriptor we own; it takes no pointers.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// The options a variant is mounted with: overlays go next to the source tree.
fn mount_args(variant: &Variant, src: &Path) -> Vec<String> {
    let mut args = match variant.overlay {
        true => vec![
            "--overlay".into(),
            src.with_file_name("changes").display().to_string(),
        ],
        false => Vec::new(),
    };
    if let Some(passphrase) = variant.passphrase {
        let key = src.with_file_name("key");
        std::fs::write(&key, passphrase).unwrap();
        args.extend(["--key-file".into(), key.display().to_string()]);
    }
    args
}

/// The windows of the image and the size of its disk, as a fresh imgfs mount of `src` reads
/// them.
fn read_through_imgfs(
    variant: &Variant,
    src: &Path,
    mnt: &Path,
) -> Result<(WindowBytes, u64), String> {
    let args = mount_args(variant, src);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mount = Mount::new(src, mnt, &args);
    let raw = mount.path(&format!("{}.raw", variant.image));
    let file = std::fs::File::open(&raw).map_err(|e| format!("imgfs: open: {e}"))?;
    let windows = read_windows(&file, variant)?;
    let size = file
        .metadata()
        .map_err(|e| format!("imgfs: stat: {e}"))?
        .len();
    drop(file);
    mount.unmount();
    Ok((windows, size))
}

fn read_windows(file: &std::fs::File, variant: &Variant) -> Result<WindowBytes, String> {
    variant
        .windows
        .iter()
        .map(|w| {
            let mut buf = vec![0u8; w.len as usize];
            file.read_exact_at(&mut buf, w.offset)
                .map_err(|e| format!("read at {:#x}: {e}", w.offset))?;
            Ok(buf)
        })
        .collect()
}

/// `qemu-img check` of a copy of the image (opened read-write first, as QEMU would use it:
/// that replays a VHDX log and repairs lazy refcounts, and leaks are repaired and counted),
/// then its windows as `qemu-img convert` reads them.
fn qemu_check_and_read(
    variant: &Variant,
    image: &Path,
    format: &str,
    dir: &TempDir,
) -> Result<(WindowBytes, u64), String> {
    let copy_dir = dir.join("qemu-copy");
    let _ = std::fs::remove_dir_all(&copy_dir);
    std::fs::create_dir_all(&copy_dir).unwrap();
    // The whole directory: extents and backing files come along.
    for entry in std::fs::read_dir(image.parent().unwrap()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, copy_dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    let copy = copy_dir.join(image.file_name().unwrap());
    let mut leaks = 0;
    if variant.qemu_checks {
        // Only qcow2 and VHDX take repairs; the others are checked as they are.
        if matches!(format, "qcow2" | "vhdx") {
            let repair = qemu_check(variant, format, &copy, true);
            leaks = leaked_clusters(&repair.1);
            if !matches!(repair.0, Some(0) | Some(3)) {
                return Err(format!("qemu-img check -r leaks: {}", repair.1));
            }
        }
        let check = qemu_check(variant, format, &copy, false);
        if check.0 != Some(0) {
            return Err(format!("qemu-img check: {}", check.1));
        }
    }
    let windows = qemu_windows(variant, &copy, format, dir)?;
    std::fs::remove_dir_all(&copy_dir).unwrap();
    Ok((windows, leaks))
}

fn qemu_check(
    variant: &Variant,
    format: &str,
    image: &Path,
    repair: bool,
) -> (Option<i32>, String) {
    let mut cmd = Command::new("qemu-img");
    cmd.arg("check");
    if repair {
        cmd.args(["-r", "leaks"]);
    }
    let out = cmd
        .args(qemu_image(variant, image, format))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// The leaked clusters `qemu-img check` reports ("N leaked clusters were found").
fn leaked_clusters(text: &str) -> u64 {
    text.lines()
        .filter(|l| l.contains("leaked clusters"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
}

/// The windows of `image` as `qemu-img convert -O raw` reads them.
fn qemu_windows(
    variant: &Variant,
    image: &Path,
    format: &str,
    dir: &TempDir,
) -> Result<WindowBytes, String> {
    let out = dir.join("qemu-read.raw");
    let status = Command::new("qemu-img")
        .args(["convert", "-U"])
        .args(qemu_image(variant, image, format))
        .args(["-O", "raw"])
        .arg(&out)
        .output()
        .unwrap();
    if !status.status.success() {
        return Err(format!(
            "qemu-img convert: {}",
            String::from_utf8_lossy(&status.stderr)
        ));
    }
    let file = std::fs::File::open(&out).unwrap();
    let windows = read_windows(&file, variant);
    std::fs::remove_file(&out).unwrap();
    windows
}
