//! The `imgfs` command line: `mount`, `umount`, `info`, `check`, `map`, and the man page and shell
//! completions generated from the same definitions; parsed with clap, logging set up here so
//! every command logs the same way.

mod check;
mod daemon;
mod docs;
mod info;
mod map;
mod mount;
mod nbd;
mod notify;
mod options;
mod overlay;
mod pidfile;
mod scratch;
mod source;
mod umount;

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

const EXAMPLES: &str = "\
Examples:
  imgfs mount ./images /mnt/raw        serve every image below ./images
  ls /mnt/raw                          disk.vdi.raw  disk.vdi.parts  vm/disk.vmdk.raw ...
  mount -o loop,ro /mnt/raw/disk.vdi.parts/p1.raw /mnt/guest
  qemu-img convert -O qcow2 /mnt/raw/vm/disk.vmdk.raw disk.qcow2
  imgfs umount /mnt/raw                write everything back, unmount, wait for the daemon
  imgfs info --json ./images/disk.vdi

  fstab: /srv/images /mnt/raw fuse.imgfs ro,allow_other,nofail 0 0";

#[derive(Parser, Debug)]
#[command(
    name = "imgfs",
    version,
    about = "Serve VDI, VHD, VHDX, VMDK, QCOW, QCOW2 and LUKS images as raw files through FUSE",
    long_about = "Serve every VDI, VHD, VHDX, VMDK, QCOW, QCOW2 and LUKS1 image below a directory as a flat \
        raw file, readable and writable, through FUSE: `dd`, `losetup`, `fdisk`, `mount -o \
        loop` and `qemu-img convert` work on a guest disk without a VM. Backing chains, \
        internal snapshots (read-only) and partitions (as files) are served too.",
    after_help = EXAMPLES
)]
pub struct Cli {
    /// A file holding the passphrase of encrypted images (qcow2 with LUKS or the legacy AES,
    /// qcow with AES, LUKS1 containers), as QEMU's `--object secret,file=FILE` (also tried
    /// without a final newline); may be repeated, each encrypted image opening with the first
    /// that unlocks it.
    #[arg(long, value_name = "FILE", global = true)]
    key_file: Vec<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// Adds the passphrase in `file` for encrypted images (`--key-file`, `-o key_file=`).
fn add_key_file(file: &std::path::Path) -> Result<(), String> {
    crate::meta::keyring::add_passphrase_file(file).map_err(|e| format!("--key-file: {e}"))
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Mount every image below SRC as a raw file below MNT (also as `imgfs SRC MNT -o OPTS`,
    /// the form mount.fuse3 runs for `mount -t fuse.imgfs` and fstab lines).
    #[command(after_help = "Examples:
  imgfs mount ./images /mnt/raw
  imgfs mount --read-only --allow-other ./evidence /mnt/raw
  imgfs mount -o ro,uid=1000,gid=1000,umask=022 ./images /mnt/raw
  imgfs mount --foreground ./images /mnt/raw      (for systemd: Type=notify)")]
    Mount(mount::MountArgs),
    /// Serve every image below SRC over NBD (qemu-img, nbdcopy, nbdinfo, nbd-client attach
    /// them as `nbd://HOST/PATH`), each image an export named by its path without `.raw`.
    #[command(after_help = "Examples:
  imgfs nbd ./images                                   loopback, port 10809
  imgfs nbd ./images --listen 0.0.0.0:10809 --tls-cert c.pem --tls-key k.pem
  imgfs nbd ./images --socket /run/imgfs.sock --read-only --allow 'vm/**'
  nbdinfo --list nbd://localhost
  qemu-img convert -O qcow2 nbd://localhost/vm/disk.vdi copy.qcow2")]
    Nbd(nbd::NbdArgs),
    /// Flush every image of an imgfs mount, unmount it and wait for its daemon to exit. Exit
    /// status 1, after unmounting, names the images whose write-back failed while mounted.
    #[command(after_help = "Example:\n  imgfs umount /mnt/raw")]
    Umount {
        /// The mount point.
        mnt: PathBuf,
    },
    /// Show what imgfs sees in an image (like `qemu-img info`): format, sizes, why it would
    /// be read-only, backing file, snapshots, partitions.
    #[command(after_help = "Examples:
  imgfs info ./images/disk.vdi
  imgfs info --json --root ./images ./images/vm/overlay.qcow2
  imgfs info /mnt/raw/vm/disk.vdi.raw     (the image a mount serves, and why it is read-only now)")]
    Info {
        /// Print JSON, shaped like `qemu-img info --output=json`.
        #[arg(long)]
        json: bool,
        /// The directory tree backing files must lie in (default: the image's directory).
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
        /// Also show the changes kept for the image in this overlay directory (the image's
        /// path below it is taken relative to --root).
        #[arg(long, value_name = "DIR")]
        overlay: Option<PathBuf>,
        /// The image file, or a raw file of a running imgfs mount (its image, with the
        /// daemon's reason it is read-only).
        image: PathBuf,
    },
    /// Check an image's metadata for corruptions and leaks (like `qemu-img check`), and
    /// repair what is safe to repair. Exit status: 0 clean, 1 the check failed or the image
    /// could not be opened, 2 corrupt, 3 leaked clusters only.
    #[command(after_help = "Examples:
  imgfs check ./images/disk.qcow2
  imgfs check --json ./images/disk.vdi
  imgfs check --repair leaks ./images/disk.qcow2     (not while QEMU or a mount uses it)")]
    Check {
        /// Print JSON, shaped like `qemu-img check --output=json`.
        #[arg(long)]
        json: bool,
        /// Repair leaks only, or all that can be repaired safely (like `qemu-img check -r`);
        /// refused while another process or an imgfs mount uses the image.
        #[arg(long, short = 'r', value_name = "WHAT")]
        repair: Option<check::RepairArg>,
        /// The directory tree an external data file must lie in (default: the image's
        /// directory).
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
        /// The image file.
        image: PathBuf,
    },
    /// Show the allocation map of an image and its chain (like `qemu-img map`).
    #[command(after_help = "Examples:
  imgfs map ./images/vm/overlay.qcow2
  imgfs map --json --root ./images ./images/vm/overlay.qcow2")]
    Map {
        /// Print JSON, shaped like `qemu-img map --output=json` (without host offsets).
        #[arg(long)]
        json: bool,
        /// The directory tree backing files must lie in (default: the image's directory).
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
        /// The image file.
        image: PathBuf,
    },
    /// Inspect, drop or commit the changes kept by `imgfs mount --overlay DIR`.
    #[command(subcommand)]
    Overlay(overlay::OverlayCommand),
    /// Print a shell completion script.
    #[command(
        after_help = "Example:\n  imgfs completions bash > /usr/share/bash-completion/completions/imgfs"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (imgfs.1), or write it with one page per command into DIR.
    #[command(
        after_help = "Examples:\n  imgfs manual | man -l -\n  imgfs manual --dir /usr/local/share/man/man1"
    )]
    Manual {
        /// Write imgfs.1 and imgfs-COMMAND.1 into this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// Runs the command line and returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse_from(options::mount_helper_form(std::env::args_os().collect()));
    init_logging();
    // Read before a daemon forks and changes to `/`, so relative names mean what they say.
    if let Err(message) = cli.key_file.iter().try_for_each(|f| add_key_file(f)) {
        eprintln!("imgfs: {message}");
        return 1;
    }
    let result = match cli.command {
        Command::Mount(args) => mount::run(args),
        Command::Nbd(args) => nbd::run(args),
        Command::Umount { mnt } => umount::run(&mnt),
        Command::Info {
            json,
            root,
            overlay,
            image,
        } => info::run(&image, root.as_deref(), overlay.as_deref(), json),
        Command::Map { json, root, image } => map::run(&image, root.as_deref(), json),
        Command::Check {
            json,
            repair,
            root,
            image,
        } => return check::run(&image, root.as_deref(), repair, json),
        Command::Overlay(command) => overlay::run(command),
        Command::Completions { shell } => docs::completions(shell),
        Command::Manual { dir } => docs::manual(dir.as_deref()),
    };
    match result {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("imgfs: {message}");
            1
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`). Under systemd (JOURNAL_STREAM set)
/// each line carries a `<N>` syslog priority prefix that journald understands.
fn init_logging() {
    let env = env_logger::Env::default().default_filter_or("info,fuser=error");
    let mut builder = env_logger::Builder::from_env(env);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.format(|out, record| {
            let priority = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(out, "<{priority}>{}", record.args())
        });
    }
    let logger = builder.build();
    let max = logger.filter();
    if log::set_boxed_logger(Box::new(GoneRepliesQuiet(logger))).is_ok() {
        log::set_max_level(max);
    }
}

/// Whether a log record is fuser's report that a reply found its request gone: writing it to
/// /dev/fuse fails with ENOENT when the kernel no longer waits for it (the request was
/// interrupted, its sender gone: udev's probe of a loop device being detached, a killed
/// reader). Nothing is lost, so it is no error of the daemon's.
fn is_reply_to_gone_request(target: &str, level: log::Level, message: &str) -> bool {
    target == "fuser::reply"
        && level == log::Level::Error
        && message.starts_with("Failed to send FUSE reply")
        && message.ends_with("(os error 2)")
}

/// The logger, with fuser's reports of replies to gone requests told at debug level.
struct GoneRepliesQuiet(env_logger::Logger);

impl log::Log for GoneRepliesQuiet {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        if record.target() == "fuser::reply" {
            let message = record.args().to_string();
            if is_reply_to_gone_request(record.target(), record.level(), &message) {
                log::debug!("{message} (the request was interrupted; nothing lost)");
                return;
            }
        }
        self.0.log(record)
    }

    fn flush(&self) {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_replies_to_gone_requests_are_told_quietly() {
        let gone = "Failed to send FUSE reply: No such file or directory (os error 2)";
        let error = log::Level::Error;
        assert!(is_reply_to_gone_request("fuser::reply", error, gone));
        let bad = "Failed to send FUSE reply: Invalid argument (os error 22)";
        assert!(!is_reply_to_gone_request("fuser::reply", error, bad));
        assert!(!is_reply_to_gone_request("imgfs::fs", error, gone));
        assert!(!is_reply_to_gone_request(
            "fuser::reply",
            log::Level::Warn,
            gone
        ));
    }
}
