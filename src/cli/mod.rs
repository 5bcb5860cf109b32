//! The `imgfs` command line: `mount`, `umount` and `info`, parsed with clap; logging set up
//! here so every command logs the same way.

mod daemon;
mod info;
mod mount;
mod notify;
mod options;
mod umount;

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "imgfs",
    version,
    about = "Serve VDI (and soon VHDX, VMDK, QCOW/QCOW2) images as raw files through FUSE"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Mount every image below SRC as a raw file below MNT.
    Mount(mount::MountArgs),
    /// Flush every image of an imgfs mount, unmount it and wait for its daemon to exit.
    Umount {
        /// The mount point.
        mnt: PathBuf,
    },
    /// Show what imgfs sees in an image (like `qemu-img info`).
    Info {
        /// Print JSON, shaped like `qemu-img info --output=json`.
        #[arg(long)]
        json: bool,
        /// The directory tree backing files must lie in (default: the image's directory).
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
        /// The image file.
        image: PathBuf,
    },
}

/// Runs the command line and returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse_from(options::mount_helper_form(std::env::args_os().collect()));
    init_logging();
    let result = match cli.command {
        Command::Mount(args) => mount::run(args),
        Command::Umount { mnt } => umount::run(&mnt),
        Command::Info { json, root, image } => info::run(&image, root.as_deref(), json),
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
    let _ = builder.try_init();
}
