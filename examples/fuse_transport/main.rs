//! Prototype for issue 16: serves one all-zero file through FUSE over either transport, so
//! that `scripts/bench-transport.sh` can measure them side by side:
//!
//! ```text
//! fuse_transport --transport dev|uring [--size 1G] [--threads 4] [--depth 8] MNT
//! ```
//!
//! Both transports run the same hand-written handler on the raw protocol (`proto.rs`); they
//! differ only in how requests arrive and replies leave:
//! - `dev`: `--threads` request threads, each blocking in `read(2)` on its own cloned /dev/fuse
//!   descriptor and replying with `writev(2)` (what fuser 0.18 does with `clone_fd`, as imgfs
//!   runs it, 4 threads by default);
//! - `uring`: FUSE_INIT answered with `FUSE_OVER_IO_URING`, then one io_uring per possible CPU
//!   with `--depth` entries registered (`FUSE_IO_URING_CMD_REGISTER`) and each answer sent with
//!   `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`; the main thread keeps reading /dev/fuse for FORGET
//!   and INTERRUPT. Needs /sys/module/fuse/parameters/enable_uring set to Y.
//!
//! Mounts with mount(2) directly (root only), serves until unmounted, then exits. Prints one
//! line saying which transport is live (or why the ring could not be registered) to stderr.

mod dev;
mod proto;
mod uring;

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use proto::{init_flag, op, InHeader, InitIn, ZeroFs, IN_HEADER_LEN};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Transport {
    /// read(2) and writev(2) on /dev/fuse, one cloned descriptor per thread.
    Dev,
    /// FUSE over io_uring, one ring per possible CPU.
    Uring,
}

#[derive(Parser, Debug)]
#[command(about = "Serve one all-zero file over FUSE, by /dev/fuse or by io_uring")]
struct Args {
    #[arg(long, value_enum)]
    transport: Transport,
    /// Size of the file, in bytes or with a K, M or G suffix.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Request threads of the dev transport.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Ring entries per queue of the uring transport (libfuse's default is 8).
    #[arg(long, default_value_t = 8)]
    depth: usize,
    /// Do not pin each queue thread to its CPU.
    #[arg(long)]
    no_pin: bool,
    /// Serve every queue from each of this many unpinned rings (threads) instead of one pinned
    /// ring per queue (0).
    #[arg(long, default_value_t = 0)]
    shared_rings: usize,
    /// Set up the rings with IORING_SETUP_SINGLE_ISSUER and IORING_SETUP_DEFER_TASKRUN.
    #[arg(long)]
    defer_taskrun: bool,
    /// Where to mount.
    mountpoint: PathBuf,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = num.parse().map_err(|e| format!("bad size {s:?}: {e}"))?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .ok_or_else(|| format!("size {s:?} too large"))
}

fn mount(fuse: &File, mountpoint: &Path) -> io::Result<()> {
    let target = CString::new(mountpoint.as_os_str().as_bytes())?;
    let options = CString::new(format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other",
        fuse.as_raw_fd()
    ))?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            c"zerofs".as_ptr(),
            target.as_ptr(),
            c"fuse.zerofs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_RDONLY,
            options.as_ptr().cast(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads FUSE_INIT from the mount's descriptor and answers it, asking for io_uring when
/// `uring`; returns whether the kernel offered it.
fn init(fuse: &File, uring: bool) -> io::Result<bool> {
    let mut buf = dev::request_buffer();
    let n = dev::read_request(fuse, &mut buf)?
        .ok_or_else(|| io::Error::other("unmounted before FUSE_INIT"))?;
    let h = InHeader::parse(&buf[..n]).ok_or_else(|| io::Error::other("short FUSE_INIT"))?;
    if h.opcode != op::INIT {
        return Err(io::Error::other(format!(
            "expected FUSE_INIT, got opcode {}",
            h.opcode
        )));
    }
    let offered = InitIn::parse(&buf[IN_HEADER_LEN..n]);
    if offered.major != 7 {
        dev::send_reply(fuse, h.unique, -libc::EPROTO, &[])?;
        return Err(io::Error::other(format!("FUSE protocol {}", offered.major)));
    }
    let mut want = init_flag::ASYNC_READ | init_flag::BIG_WRITES | init_flag::MAX_PAGES;
    if uring {
        want |= init_flag::OVER_IO_URING;
    }
    let mut out = [0u8; 64];
    let (len, agreed) = proto::init_reply(&offered, want, &mut out);
    eprintln!(
        "FUSE {}.{}: kernel flags {:#x}, agreed {:#x}, io_uring offered: {}",
        offered.major,
        offered.minor,
        offered.flags,
        agreed,
        offered.flags & init_flag::OVER_IO_URING != 0
    );
    dev::send_reply(fuse, h.unique, 0, &out[..len])?;
    Ok(offered.flags & init_flag::OVER_IO_URING != 0)
}

/// Starts one queue thread per possible CPU and waits until each has registered its entries
/// (or one failed). A failure is reported, not fatal: the kernel then falls back to /dev/fuse.
fn start_uring(fs: &Arc<ZeroFs>, fuse: &File, args: &Args) -> io::Result<Vec<Worker>> {
    let queues = imgfs::fs::ring::cmd::possible_cpus()?;
    let (tx, rx) = mpsc::channel();
    let mut workers = Vec::new();
    let all: Vec<u16> = (0..queues)
        .map(|q| u16::try_from(q).map_err(io::Error::other))
        .collect::<io::Result<_>>()?;
    let rings: Vec<(Vec<u16>, Option<usize>)> = if args.shared_rings > 0 {
        (0..args.shared_rings)
            .map(|_| (all.clone(), None))
            .collect()
    } else {
        all.iter()
            .map(|&q| (vec![q], (!args.no_pin).then_some(usize::from(q))))
            .collect()
    };
    let nrings = rings.len();
    for (i, (qids, pin)) in rings.into_iter().enumerate() {
        let (fs, fuse, tx) = (fs.clone(), fuse.try_clone()?, tx.clone());
        let (depth, defer) = (args.depth, args.defer_taskrun);
        let name = format!("ring {i}");
        let handle = thread::Builder::new()
            .name(format!("fuse-r{i}"))
            .spawn(move || uring::serve_queue(fs, fuse, qids, depth, pin, defer, tx))?;
        workers.push((name, handle));
    }
    drop(tx);
    let mut failed = Vec::new();
    for _ in 0..nrings {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => failed.push(e),
            Err(e) => failed.push(format!("no answer from a queue thread: {e}")),
        }
    }
    if failed.is_empty() {
        eprintln!(
            "transport uring: {queues} queue(s) x {} entries registered",
            args.depth
        );
    } else {
        eprintln!(
            "transport uring FAILED, serving on /dev/fuse: {}",
            failed.join("; ")
        );
    }
    Ok(workers)
}

/// A request-serving thread and what to call it in the closing count.
type Worker = (String, thread::JoinHandle<io::Result<u64>>);

fn run(args: &Args) -> io::Result<()> {
    let fuse = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    mount(&fuse, &args.mountpoint)?;
    let fs = Arc::new(ZeroFs { size: args.size });
    let uring = args.transport == Transport::Uring;
    let offered = init(&fuse, uring)?;
    let mut workers = Vec::new();
    if uring {
        if !offered {
            eprintln!(
                "transport uring FAILED, serving on /dev/fuse: the kernel did not offer \
                 FUSE_OVER_IO_URING (enable_uring off?)"
            );
        } else {
            workers = start_uring(&fs, &fuse, args)?;
        }
    } else {
        for i in 1..args.threads {
            let (fs, clone) = (fs.clone(), dev::clone_fd(&fuse)?);
            let handle = thread::Builder::new()
                .name("fuse-dev".into())
                .spawn(move || dev::serve(fs, clone))?;
            workers.push((format!("/dev/fuse clone {i}"), handle));
        }
        eprintln!("transport dev: {} thread(s)", args.threads.max(1));
    }
    // The main thread serves the mount's own descriptor: every request for dev, FORGET and
    // INTERRUPT (and everything, after a failed registration) for uring, until the file
    // system is unmounted, which ends the other threads too.
    let mut counts = vec![format!("/dev/fuse {}", dev::serve(fs, fuse)?)];
    for (name, handle) in workers {
        match handle.join() {
            Ok(Ok(n)) => counts.push(format!("{name} {n}")),
            Ok(Err(e)) => counts.push(format!("{name} failed: {e}")),
            Err(_) => counts.push(format!("{name} panicked")),
        }
    }
    eprintln!("requests served: {}", counts.join(", "));
    Ok(())
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("fuse_transport: {e}");
        std::process::exit(1);
    }
}
