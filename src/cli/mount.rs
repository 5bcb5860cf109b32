//! `imgfs mount`: checks its arguments, optionally forks into the background (returning only
//! once the mount answers), serves the FUSE session with request threads, writes metadata back
//! on a timer and on SIGTERM/SIGINT, and unmounts cleanly.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, MountOption, SessionACL};

use super::daemon::{self, Forked, ReadyPipe};
use super::notify::notify;
use super::options;
use super::source::{start_catalog, Changes, Serving, Source};
use crate::fs::core::Ownership;
use crate::fs::fuse::{Agreed, FuseAdapter};
use crate::fs::ring::RingTransport;
use crate::fs::FsCore;

/// How often dirty metadata is written back without being asked (and the tree looked at).
const WRITEBACK_INTERVAL: Duration = Duration::from_secs(5);

#[derive(clap::Args, Debug)]
pub struct MountArgs {
    /// Stay in the foreground and log to stderr (for systemd and debugging).
    #[arg(long, short = 'f')]
    foreground: bool,
    /// Serve every image read-only.
    #[arg(long)]
    read_only: bool,
    /// Let users other than the mounting one access the mount (needs user_allow_other in
    /// /etc/fuse.conf when not root).
    #[arg(long)]
    allow_other: bool,
    /// Read every raw file through the daemon, even where the kernel could read the host file
    /// of a read-only image itself (a flat VMDK, a qcow2 raw data file: FUSE passthrough).
    #[arg(long)]
    no_passthrough: bool,
    /// FUSE request threads.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,
    /// How requests reach the daemon: `uring` (FUSE over io_uring, Linux 6.14+ with the fuse
    /// module's enable_uring set), `dev` (/dev/fuse), or `auto`: io_uring where the kernel
    /// offers it, else /dev/fuse.
    #[arg(long, value_enum, default_value_t = Transport::Auto)]
    transport: Transport,
    /// Write the daemon's pid into FILE, and remove it when the daemon has stopped (the file
    /// is locked meanwhile, so no second daemon takes it).
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,
    /// Where the background daemon logs [default: $XDG_RUNTIME_DIR/imgfs.log, else
    /// /tmp/imgfs-UID.log].
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// Never write an original: write the changes into qcow2 overlays in DIR instead
    /// (DIR/<path of the image>.qcow2, backed by the original; see `imgfs overlay`).
    #[arg(long, value_name = "DIR")]
    overlay: Option<PathBuf>,
    /// Never write an original, and throw the changes away: writes go into qcow2 overlays in
    /// a scratch directory (below $TMPDIR, else /var/tmp) removed when the daemon stops, as
    /// with qemu-nbd --snapshot.
    #[arg(long)]
    snapshot: bool,
    /// Mount options, comma-separated, as in fstab: ro, allow_other, no_passthrough,
    /// snapshot, threads=N, transport=T, log_file=F, pid_file=F, overlay=DIR, key_file=F,
    /// uid=N, gid=N, umask=OCTAL (owner and mode bits the raw files show), and the standard
    /// ones mount(8) passes (rw, nodev, nosuid, noatime, nofail, ...).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// What mount(8) passes to a mount helper (`-t fuse.imgfs -n -s -v`): nothing to do here.
    #[arg(short = 't', hide = true)]
    _type: Option<String>,
    #[arg(short = 'n', hide = true)]
    _no_mtab: bool,
    #[arg(short = 's', hide = true)]
    _sloppy: bool,
    #[arg(short = 'v', hide = true)]
    _verbose: bool,
    /// Also serve the images over NBD on this address (HOST:PORT, or unix:PATH), sharing the
    /// mount's open images; may be repeated. See `imgfs nbd` for the other options.
    #[arg(long, value_name = "ADDR")]
    nbd: Vec<String>,
    #[command(flatten)]
    nbd_serve: super::nbd::NbdServeArgs,
    /// The directory holding the images, or one image file.
    src: PathBuf,
    /// The (empty) directory to mount on; or, for one image, a regular file, which then
    /// shows the image's raw content (as qemu-storage-daemon's FUSE export).
    mnt: PathBuf,
}

/// Starts FUSE over io_uring on the session's descriptor when `transport` and FUSE_INIT allow
/// it. `auto` falls back to /dev/fuse (where the kernel then keeps sending every request) when
/// the kernel did not offer it or a queue could not register; `uring` fails instead.
fn start_ring(
    transport: Transport,
    agreed: &Agreed,
    core: &Arc<FsCore>,
    dev: impl std::os::fd::AsFd,
) -> Result<Option<RingTransport>, String> {
    if transport == Transport::Dev {
        return Ok(None);
    }
    if !agreed.io_uring.load(Ordering::Acquire) {
        if transport == Transport::Uring {
            return Err(
                "--transport uring: the kernel does not offer FUSE over io_uring \
                        (Linux 6.14 or later, with /sys/module/fuse/parameters/enable_uring \
                        set to Y)"
                    .into(),
            );
        }
        log::debug!("FUSE requests over /dev/fuse: the kernel offers no io_uring");
        return Ok(None);
    }
    let passthrough = agreed.passthrough.load(Ordering::Acquire);
    match RingTransport::start(core.clone(), dev, passthrough) {
        Ok(ring) => Ok(Some(ring)),
        Err(e) if transport == Transport::Uring => Err(format!(
            "--transport uring: cannot set up FUSE over io_uring: {e}"
        )),
        Err(e) => {
            log::warn!("FUSE over io_uring failed ({e}): requests go over /dev/fuse");
            Ok(None)
        }
    }
}

pub(super) fn default_log_file() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => Path::new(&dir).join("imgfs.log"),
        // SAFETY: getuid has no preconditions.
        None => PathBuf::from(format!("/tmp/imgfs-{}.log", unsafe { libc::getuid() })),
    }
}

/// How FUSE requests reach the daemon.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Auto,
    Uring,
    Dev,
}

/// What the mount point is: an empty directory, or a regular file that one image is mounted
/// on (as qemu-storage-daemon's FUSE export is), showing the image's raw file itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MountPoint {
    Dir,
    File,
}

fn check_dirs(args: &MountArgs) -> Result<(Source, PathBuf, MountPoint), String> {
    let src = Source::resolve(&args.src)?;
    let mnt = args
        .mnt
        .canonicalize()
        .map_err(|e| format!("mount point {}: {e}", args.mnt.display()))?;
    let meta =
        std::fs::metadata(&mnt).map_err(|e| format!("mount point {}: {e}", mnt.display()))?;
    let kind = if meta.is_dir() {
        check_dir_mount_point(&src, &mnt)?;
        MountPoint::Dir
    } else if meta.is_file() {
        check_file_mount_point(&src, &mnt, &meta)?;
        MountPoint::File
    } else {
        return Err(format!(
            "mount point {} is neither a directory nor a regular file",
            mnt.display()
        ));
    };
    if !Path::new("/dev/fuse").exists() {
        return Err(
            "/dev/fuse is missing: load the fuse module (modprobe fuse) or install fuse3".into(),
        );
    }
    Ok((src, mnt, kind))
}

fn check_dir_mount_point(src: &Source, mnt: &Path) -> Result<(), String> {
    let mut entries =
        std::fs::read_dir(mnt).map_err(|e| format!("mount point {}: {e}", mnt.display()))?;
    if entries.next().is_some() {
        return Err(format!("mount point {} is not empty", mnt.display()));
    }
    if src.covers(mnt) {
        return Err(format!(
            "mount point {} lies inside the source tree",
            mnt.display()
        ));
    }
    Ok(())
}

/// A file is a mount point for one image only, and not for the image itself: imgfs opens its
/// images by name while it serves them.
fn check_file_mount_point(
    src: &Source,
    mnt: &Path,
    meta: &std::fs::Metadata,
) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    if src.only.is_none() {
        return Err(format!(
            "mount point {} is a file: a directory of images needs a directory to mount on \
             (a file takes one image, named as the source)",
            mnt.display()
        ));
    }
    let image = src.path();
    let same =
        std::fs::metadata(&image).is_ok_and(|m| (m.dev(), m.ino()) == (meta.dev(), meta.ino()));
    if same {
        return Err(format!(
            "mount point {} is the image itself: mount it on another file (an empty one \
             beside it, say {}.raw)",
            mnt.display(),
            image.display()
        ));
    }
    Ok(())
}

/// The long flags with the `-o` options applied on top, and the ownership the raw files show.
fn with_options(mut args: MountArgs) -> Result<(MountArgs, Ownership), String> {
    let options = options::parse(&args.options)?;
    args.read_only |= options.read_only;
    args.allow_other |= options.allow_other;
    args.no_passthrough |= options.no_passthrough;
    args.threads = options.threads.unwrap_or(args.threads);
    args.transport = options.transport.unwrap_or(args.transport);
    args.log_file = options.log_file.or(args.log_file);
    args.pid_file = options.pid_file.or(args.pid_file);
    args.overlay = options.overlay.or(args.overlay);
    args.snapshot |= options.snapshot;
    for file in &options.key_files {
        super::add_key_file(file)?;
    }
    Changes::from_flags(args.overlay.as_deref(), args.snapshot, args.read_only)?;
    args.overlay = daemon::absolute_if(args.overlay, "overlay directory")?;
    args.pid_file = daemon::absolute_if(args.pid_file, "pid file")?;
    let ownership = Ownership {
        uid: options.uid,
        gid: options.gid,
        umask: options.umask.unwrap_or(0),
    };
    Ok((args, ownership))
}

pub fn run(args: MountArgs) -> Result<(), String> {
    let (args, ownership) = with_options(args)?;
    let (src, mnt, mount_point) = check_dirs(&args)?;
    let nbd = nbd_config(&args)?;
    let pipe = if args.foreground {
        None
    } else {
        let path = args.log_file.clone().unwrap_or_else(default_log_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("log file {}: {e}", path.display()))?;
        match daemon::fork_daemon(log)? {
            Forked::Parent(Ok(())) => {
                return if daemon::is_fuse_mount(&mnt) {
                    Ok(())
                } else {
                    Err(format!(
                        "{} does not answer as a FUSE mount; see {}",
                        mnt.display(),
                        path.display()
                    ))
                };
            }
            Forked::Parent(Err(message)) => return Err(message),
            Forked::Child(pipe) => Some(pipe),
        }
    };
    match serve(&args, ownership, &src, (&mnt, mount_point), nbd, pipe) {
        Ok(()) => Ok(()),
        Err(message) => {
            log::error!("{message}");
            Err(message)
        }
    }
}

fn serve(
    args: &MountArgs,
    ownership: Ownership,
    src: &Source,
    (mnt, mount_point): (&Path, MountPoint),
    nbd: Option<crate::nbd::ServerConfig>,
    pipe: Option<ReadyPipe>,
) -> Result<(), String> {
    daemon::block_stop_signals();
    // Images are opened only while in use, but a deep chain or many open files still need
    // descriptors; FUSE's request threads need one each too.
    match daemon::raise_fd_limit() {
        Ok(limit) => log::debug!("descriptor limit {limit}"),
        Err(e) => log::warn!("cannot raise the descriptor limit: {e}"),
    }
    let serving = Serving {
        read_only: args.read_only,
        overlay: args.overlay.as_deref(),
        snapshot: args.snapshot,
        pid_file: args.pid_file.as_deref(),
        mount_point: Some(mnt),
    };
    // Held until the session and every image are closed.
    let (catalog, _held) = match start_catalog(src, &serving) {
        Ok(started) => started,
        Err(e) => return daemon::fail(pipe, e),
    };
    let mut core = FsCore::new(catalog).with_ownership(ownership);
    if let (MountPoint::File, Some(name)) = (mount_point, &src.only) {
        let mut raw = name.clone();
        raw.push(crate::catalog::RAW_SUFFIX);
        core = core.with_file_root(&raw);
    }
    let core = Arc::new(core);

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("imgfs:{}", src.path().display())),
        MountOption::Subtype("imgfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoAtime,
        if args.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    config.acl = if args.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(usize::from(args.threads));
    config.clone_fd = true;

    let adapter = FuseAdapter::new(core.clone())
        .with_passthrough(!args.no_passthrough)
        .with_io_uring(args.transport != Transport::Dev);
    let agreed = adapter.agreed();
    let mut session = match fuser::Session::new(adapter, mnt, &config) {
        Ok(session) => session,
        Err(e) => return daemon::fail(pipe, format!("cannot mount on {}: {e}", mnt.display())),
    };
    let ring = match start_ring(args.transport, &agreed, &core, &session) {
        Ok(ring) => ring,
        Err(e) => return daemon::fail(pipe, e),
    };
    let nbd = match nbd.map(|c| super::nbd::start_server(&core, c, &args.nbd_serve, args.read_only))
    {
        Some(Err(e)) => return daemon::fail(pipe, e),
        started => started.and_then(Result::ok),
    };
    let unmounter = session.unmount_callable();
    spawn_signal_handler(core.clone(), mnt.to_path_buf(), unmounter);
    let (stop_writeback, writeback) = match spawn_writeback(core.clone()) {
        Ok(started) => started,
        Err(e) => return daemon::fail(pipe, format!("cannot start the write-back thread: {e}")),
    };

    log::info!("serving {} on {}", src.path().display(), mnt.display());
    match pipe {
        Some(pipe) => pipe.ready(),
        None => notify("READY=1"),
    }
    let result = session.run();
    notify("STOPPING=1");
    if let Some(ring) = ring {
        ring.join();
    }
    if let Some(server) = nbd {
        server.stop();
    }
    drop(stop_writeback);
    let _ = writeback.join();
    let failed = core.flush_all();
    log::info!("unmounted {}", mnt.display());
    // Said once more at the end, so that the exit status and the last lines of the log tell
    // a service manager or a script what may be lost.
    let lost = core.lost_write_backs();
    for entry in &lost {
        log::error!("write-back failed while mounted: {entry}");
    }
    match (result, failed.max(lost.len())) {
        (Err(e), _) => Err(format!("FUSE session ended with an error: {e}")),
        (Ok(()), 0) => Ok(()),
        (Ok(()), n) => Err(format!(
            "the write-back of {n} image(s) failed, so what was written to them since their \
             last successful flush may be lost; see the log"
        )),
    }
}

/// The NBD server `--nbd` asks for, checked before the daemon forks.
fn nbd_config(args: &MountArgs) -> Result<Option<crate::nbd::ServerConfig>, String> {
    if args.nbd.is_empty() {
        return Ok(None);
    }
    let mut listen = Vec::new();
    for text in &args.nbd {
        listen.extend(super::nbd::parse_listen(text)?);
    }
    let workers = crate::nbd::Limits::default().workers;
    super::nbd::server_config(listen, &args.nbd_serve, workers).map(Some)
}

/// On SIGTERM or SIGINT: flush everything, then unmount (lazily if files are still open, so
/// the daemon exits once they close). SIGHUP only flushes.
fn spawn_signal_handler(core: Arc<FsCore>, mnt: PathBuf, mut unmounter: fuser::SessionUnmounter) {
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let sig = daemon::wait_for_signal();
            core.flush_all();
            if sig == libc::SIGHUP {
                log::info!("SIGHUP: flushed all images");
                continue;
            }
            log::info!("signal {sig}: unmounting {}", mnt.display());
            if let Err(e) = unmounter.unmount() {
                log::warn!(
                    "unmount of {} failed ({e}); detaching it lazily",
                    mnt.display()
                );
                if let Err(e) = daemon::unmount(&mnt, true) {
                    log::error!("lazy unmount of {} failed: {e}", mnt.display());
                }
            }
            return;
        });
    if let Err(e) = spawned {
        log::error!("cannot start the signal thread: {e}");
    }
}

/// Writes back dirty metadata, looks at the tree again and closes idle images every few
/// seconds until the returned sender is dropped.
pub(super) fn spawn_writeback(
    core: Arc<FsCore>,
) -> std::io::Result<(mpsc::Sender<()>, std::thread::JoinHandle<()>)> {
    let (stop, stopped) = mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("write-back".into())
        .spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(WRITEBACK_INTERVAL)
            {
                core.housekeeping();
            }
        })?;
    Ok((stop, handle))
}
