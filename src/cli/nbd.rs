//! `imgfs nbd`: serves every image below SRC over NBD, alone (this command) or beside a FUSE
//! mount (`imgfs mount --nbd ADDR`, through `NbdServeArgs` and `start_server`). It daemonises,
//! reports readiness and writes back on SIGTERM exactly like `mount`.
//!
//! Listening is safe by default: loopback or a Unix socket. Any other TCP address needs TLS
//! (`--tls-cert`/`--tls-key`) or an explicit `--insecure`.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::daemon::{self, Forked, ReadyPipe};
use super::mount::{default_log_file, spawn_writeback};
use super::notify::notify;
use super::source::{start_catalog, Serving, Source};
use crate::fs::FsCore;
use crate::nbd::{CatalogExports, Limits, Listen, Server, ServerConfig};

/// The port NBD clients use when none is given.
pub const NBD_PORT: u16 = 10809;

/// How the NBD server is secured and limited; shared by `imgfs nbd` and `imgfs mount --nbd`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct NbdServeArgs {
    /// PEM certificate chain for TLS (NBD_OPT_STARTTLS, TLS 1.3); every client must use TLS.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Allow plain-text NBD on an address other than loopback.
    #[arg(long)]
    insecure: bool,
    /// Export only names matching this glob (`*` within a directory, `**` across them, `?`);
    /// may be repeated.
    #[arg(long, value_name = "EXPORT-GLOB")]
    allow: Vec<String>,
    /// Most NBD connections served at once; more are refused.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_connections: u32,
}

#[derive(clap::Args, Debug)]
pub struct NbdArgs {
    /// Stay in the foreground and log to stderr (for systemd and debugging).
    #[arg(long, short = 'f')]
    foreground: bool,
    /// Serve every image read-only.
    #[arg(long)]
    read_only: bool,
    /// Never write an original: write the changes into qcow2 overlays in DIR instead, as
    /// `imgfs mount --overlay` does (the two share the overlays).
    #[arg(long, value_name = "DIR", conflicts_with = "read_only")]
    overlay: Option<PathBuf>,
    /// Never write an original, and throw the changes away: writes go into qcow2 overlays in
    /// a scratch directory (below $TMPDIR, else /var/tmp) removed when the daemon stops, as
    /// with qemu-nbd --snapshot.
    #[arg(long, conflicts_with_all = ["read_only", "overlay"])]
    snapshot: bool,
    /// TCP address to listen on, HOST:PORT or HOST (port 10809); may be repeated
    /// [default: 127.0.0.1:10809 unless --socket is given].
    #[arg(long, value_name = "ADDR")]
    listen: Vec<String>,
    /// Unix socket to listen on; may be repeated.
    #[arg(long, value_name = "PATH")]
    socket: Vec<PathBuf>,
    /// The most threads serving the requests of one connection in parallel.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=64))]
    workers: u16,
    /// Write the daemon's pid into FILE, and remove it when the daemon has stopped (the file
    /// is locked meanwhile, so no second daemon takes it).
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,
    /// Where the background daemon logs [default: $XDG_RUNTIME_DIR/imgfs.log, else
    /// /tmp/imgfs-UID.log].
    #[arg(long)]
    log_file: Option<PathBuf>,
    #[command(flatten)]
    serve: NbdServeArgs,
    /// The directory holding the images, or one image file.
    src: PathBuf,
}

/// Parses a TCP listen address: `HOST:PORT`, `[V6]:PORT`, or a host alone (port 10809).
fn tcp_addresses(text: &str) -> Result<Vec<SocketAddr>, String> {
    let with_port = match text.parse::<std::net::IpAddr>() {
        Ok(ip) => return Ok(vec![SocketAddr::new(ip, NBD_PORT)]),
        Err(_)
            if text
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok()) =>
        {
            text.to_string()
        }
        Err(_) => format!("{text}:{NBD_PORT}"),
    };
    let addrs: Vec<SocketAddr> = with_port
        .to_socket_addrs()
        .map_err(|e| format!("listen address {text}: {e}"))?
        .collect();
    match addrs.is_empty() {
        true => Err(format!("listen address {text} resolves to nothing")),
        false => Ok(addrs),
    }
}

/// An `--nbd` value of `imgfs mount`: `unix:PATH`, a path (with a `/`), or a TCP address.
pub fn parse_listen(text: &str) -> Result<Vec<Listen>, String> {
    let socket = |path: &str| daemon::absolute(Path::new(path), "socket").map(Listen::Unix);
    if let Some(path) = text.strip_prefix("unix:") {
        return Ok(vec![socket(path)?]);
    }
    if text.starts_with('/') || text.starts_with("./") {
        return Ok(vec![socket(text)?]);
    }
    Ok(tcp_addresses(text)?.into_iter().map(Listen::Tcp).collect())
}

/// The server configuration for `listen`, refusing plain text on a network unless asked for.
pub fn server_config(
    listen: Vec<Listen>,
    args: &NbdServeArgs,
    workers: usize,
) -> Result<ServerConfig, String> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(crate::nbd::tls::server_config(cert, key)?),
        (None, None) => None,
        _ => return Err("--tls-cert and --tls-key go together".into()),
    };
    for l in &listen {
        if let Listen::Tcp(addr) = l {
            if !addr.ip().is_loopback() && tls.is_none() && !args.insecure {
                return Err(format!(
                    "{addr} is not a loopback address: serving images on a network needs \
                     --tls-cert and --tls-key (or --insecure to serve them in plain text)"
                ));
            }
        }
    }
    for glob in &args.allow {
        crate::nbd::glob::Glob::new(glob).map_err(|e| format!("--allow {glob:?}: {e}"))?;
    }
    Ok(ServerConfig {
        listen,
        tls,
        max_connections: args.max_connections as usize,
        limits: Limits {
            workers,
            ..Limits::default()
        },
    })
}

/// Starts an NBD server on the catalog `core` serves.
pub fn start_server(
    core: &FsCore,
    config: ServerConfig,
    args: &NbdServeArgs,
    read_only: bool,
) -> Result<Server, String> {
    let exports = CatalogExports::new(core.shared_catalog(), &args.allow, read_only)
        .map_err(|e| e.to_string())?;
    Server::start(Arc::new(exports), config)
}

pub fn run(mut args: NbdArgs) -> Result<(), String> {
    let src = Source::resolve(&args.src)?;
    let mut listen = Vec::new();
    for text in &args.listen {
        listen.extend(tcp_addresses(text)?.into_iter().map(Listen::Tcp));
    }
    for path in &args.socket {
        listen.push(Listen::Unix(daemon::absolute(path, "socket")?));
    }
    if listen.is_empty() {
        listen.push(Listen::Tcp(SocketAddr::from(([127, 0, 0, 1], NBD_PORT))));
    }
    // Checked (and the certificate read) before forking, so mistakes reach the terminal.
    let config = server_config(listen, &args.serve, usize::from(args.workers))?;
    args.overlay = daemon::absolute_if(args.overlay.take(), "overlay directory")?;
    args.pid_file = daemon::absolute_if(args.pid_file.take(), "pid file")?;
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
            Forked::Parent(result) => return result,
            Forked::Child(pipe) => Some(pipe),
        }
    };
    match serve(&args, &src, config, pipe) {
        Ok(()) => Ok(()),
        Err(message) => {
            log::error!("{message}");
            Err(message)
        }
    }
}

fn serve(
    args: &NbdArgs,
    src: &Source,
    config: ServerConfig,
    pipe: Option<ReadyPipe>,
) -> Result<(), String> {
    daemon::block_stop_signals();
    match daemon::raise_fd_limit() {
        Ok(limit) => log::debug!("descriptor limit {limit}"),
        Err(e) => log::warn!("cannot raise the descriptor limit: {e}"),
    }
    let serving = Serving {
        read_only: args.read_only,
        overlay: args.overlay.as_deref(),
        snapshot: args.snapshot,
        pid_file: args.pid_file.as_deref(),
        mount_point: None,
    };
    // Held until the server and every image are closed.
    let (catalog, _held) = match start_catalog(src, &serving) {
        Ok(started) => started,
        Err(e) => return daemon::fail(pipe, e),
    };
    // No mount: the core only keeps the catalog's housekeeping and write-back in one place.
    let core = Arc::new(FsCore::new(catalog));
    let server = match start_server(&core, config, &args.serve, args.read_only) {
        Ok(server) => server,
        Err(e) => return daemon::fail(pipe, e),
    };
    let (stop_writeback, writeback) = match spawn_writeback(core.clone()) {
        Ok(started) => started,
        Err(e) => return daemon::fail(pipe, format!("cannot start the write-back thread: {e}")),
    };
    log::info!("serving {} over NBD", src.path().display());
    match pipe {
        Some(pipe) => pipe.ready(),
        None => notify("READY=1"),
    }
    loop {
        let sig = daemon::wait_for_signal();
        core.flush_all();
        if sig == libc::SIGHUP {
            log::info!("SIGHUP: flushed all images");
            continue;
        }
        log::info!("signal {sig}: stopping");
        break;
    }
    notify("STOPPING=1");
    server.stop();
    drop(stop_writeback);
    let _ = writeback.join();
    match core.flush_all() {
        0 => {
            log::info!("stopped");
            Ok(())
        }
        n => Err(format!("{n} image(s) failed to flush; see the log")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse_with_and_without_ports() {
        assert_eq!(
            parse_listen("127.0.0.1").unwrap(),
            vec![Listen::Tcp("127.0.0.1:10809".parse().unwrap())]
        );
        assert_eq!(
            parse_listen("[::1]:7000").unwrap(),
            vec![Listen::Tcp("[::1]:7000".parse().unwrap())]
        );
        assert_eq!(
            parse_listen("unix:/run/x.sock").unwrap(),
            vec![Listen::Unix("/run/x.sock".into())]
        );
        assert!(parse_listen("no such host name.invalid:1").is_err());
    }

    #[test]
    fn plain_text_on_a_network_needs_insecure() {
        let open = vec![Listen::Tcp("0.0.0.0:10809".parse().unwrap())];
        let args = NbdServeArgs::default();
        assert!(server_config(open.clone(), &args, 4).is_err());
        let insecure = NbdServeArgs {
            insecure: true,
            ..NbdServeArgs::default()
        };
        assert!(server_config(open, &insecure, 4).is_ok());
        let lo = vec![Listen::Tcp("127.0.0.1:10809".parse().unwrap())];
        assert!(server_config(lo, &args, 4).is_ok());
    }
}
