//! The listening side: TCP and Unix sockets, one thread per connection (handshake, then the
//! transmission phase with its workers), a limit on connections, and an orderly stop.
//!
//! A connection that breaks the protocol is closed with a log line naming the peer; it shares
//! nothing with other connections but the exports' images, so no other client notices. The
//! handshake must finish within `HANDSHAKE_TIMEOUT`, so idle sockets cannot hold connection
//! slots. Stopping shuts the listeners, then the receiving side of every connection so that
//! requests already read are served and replied to, and waits for them (at most
//! `STOP_GRACE`, then the connections are cut).

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::conn::{Channel, Socket};
use super::exports::Exports;
use super::handshake::{negotiate, HandshakeConfig};
use super::transmit::{transmit, Limits};

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(addr) => write!(f, "{addr}"),
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// How a server runs.
#[derive(Clone)]
pub struct ServerConfig {
    pub listen: Vec<Listen>,
    /// Present: every connection must start TLS before anything else.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub max_connections: usize,
    pub limits: Limits,
}

/// How long a client has to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stop waits for connections to finish their requests before cutting them.
const STOP_GRACE: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A socket of a live connection, as the server keeps it to end the connection.
trait Live: Send + Sync {
    fn shutdown_read(&self);
    fn shutdown(&self);
}

impl Live for TcpStream {
    fn shutdown_read(&self) {
        let _ = TcpStream::shutdown(self, std::net::Shutdown::Read);
    }
    fn shutdown(&self) {
        let _ = TcpStream::shutdown(self, std::net::Shutdown::Both);
    }
}

impl Live for UnixStream {
    fn shutdown_read(&self) {
        let _ = UnixStream::shutdown(self, std::net::Shutdown::Read);
    }
    fn shutdown(&self) {
        let _ = UnixStream::shutdown(self, std::net::Shutdown::Both);
    }
}

struct Shared {
    exports: Arc<dyn Exports>,
    handshake: HandshakeConfig,
    limits: Limits,
    max_connections: usize,
    stopping: AtomicBool,
    conns: Mutex<HashMap<u64, Arc<dyn Live>>>,
    ended: Condvar,
    next_id: AtomicU64,
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    fn raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }
}

/// A running NBD server.
pub struct Server {
    shared: Arc<Shared>,
    listeners: Vec<Arc<Listener>>,
    acceptors: Vec<JoinHandle<()>>,
    /// The addresses actually bound (port 0 resolved).
    bound: Vec<Listen>,
}

fn bind(listen: &Listen) -> Result<Listener, String> {
    match listen {
        Listen::Tcp(addr) => TcpListener::bind(addr)
            .map(Listener::Tcp)
            .map_err(|e| format!("cannot listen on {addr}: {e}")),
        Listen::Unix(path) => {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                // A socket left by a daemon that is gone may be replaced; a live one may not.
                let stale = meta.file_type().is_socket()
                    && UnixStream::connect(path)
                        .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
                if !stale {
                    return Err(format!("{} exists already", path.display()));
                }
                std::fs::remove_file(path)
                    .map_err(|e| format!("cannot remove the stale {}: {e}", path.display()))?;
            }
            UnixListener::bind(path)
                .map(|l| Listener::Unix(l, path.clone()))
                .map_err(|e| format!("cannot listen on {}: {e}", path.display()))
        }
    }
}

impl Server {
    /// Binds every address (all or nothing), then serves `exports` on them.
    pub fn start(exports: Arc<dyn Exports>, config: ServerConfig) -> Result<Server, String> {
        let mut listeners = Vec::new();
        let mut bound = Vec::new();
        for listen in &config.listen {
            let listener = bind(listen)?;
            bound.push(match &listener {
                Listener::Tcp(l) => Listen::Tcp(
                    l.local_addr()
                        .map_err(|e| format!("cannot read the address of {listen}: {e}"))?,
                ),
                Listener::Unix(_, path) => Listen::Unix(path.clone()),
            });
            listeners.push(Arc::new(listener));
        }
        let shared = Arc::new(Shared {
            exports,
            handshake: HandshakeConfig { tls: config.tls },
            limits: config.limits,
            max_connections: config.max_connections.max(1),
            stopping: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            ended: Condvar::new(),
            next_id: AtomicU64::new(0),
        });
        let mut server = Server {
            shared,
            listeners: Vec::new(),
            acceptors: Vec::new(),
            bound,
        };
        for listener in listeners {
            let shared = Arc::clone(&server.shared);
            let accepting = Arc::clone(&listener);
            let thread = std::thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || accept_loop(&shared, &accepting))
                .map_err(|e| format!("cannot start the NBD accept thread: {e}"))?;
            server.listeners.push(listener);
            server.acceptors.push(thread);
        }
        for listen in &server.bound {
            log::info!("NBD: listening on {listen}");
        }
        Ok(server)
    }

    pub fn bound(&self) -> &[Listen] {
        &self.bound
    }

    /// How many connections are open.
    pub fn connections(&self) -> usize {
        lock(&self.shared.conns).len()
    }

    /// Stops accepting, lets open connections finish the requests they have read, and
    /// returns once every connection has ended (and its exports were written back).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for listener in &self.listeners {
            // SAFETY: shutting down a listening socket we own wakes its blocked accept(); the
            // descriptor stays open (and owned) until the listener is dropped below.
            unsafe { libc::shutdown(listener.raw_fd(), libc::SHUT_RDWR) };
        }
        for thread in self.acceptors.drain(..) {
            let _ = thread.join();
        }
        for listener in self.listeners.drain(..) {
            if let Listener::Unix(_, path) = listener.as_ref() {
                let _ = std::fs::remove_file(path);
            }
        }
        let mut conns = lock(&self.shared.conns);
        for conn in conns.values() {
            conn.shutdown_read();
        }
        let deadline = Instant::now() + STOP_GRACE;
        while !conns.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!(
                    "NBD: cutting {} connection(s) that did not finish",
                    conns.len()
                );
                for conn in conns.values() {
                    conn.shutdown();
                }
                break;
            }
            conns = self
                .shared
                .ended
                .wait_timeout(conns, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        // Cut ones end promptly: their sockets fail every read and write now.
        while !conns.is_empty() {
            conns = self
                .shared
                .ended
                .wait(conns)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.shared.stopping.load(Ordering::SeqCst) {
            self.shutdown();
        }
    }
}

/// An accepted connection: its socket for the connection, for the server, and the peer.
type Accepted = (Arc<dyn Socket>, Arc<dyn Live>, String);

fn accept_loop(shared: &Arc<Shared>, listener: &Listener) {
    loop {
        let accepted: std::io::Result<Accepted> = match listener {
            Listener::Tcp(l) => l.accept().map(|(s, peer)| {
                // Replies are whole messages: send each at once.
                let _ = s.set_nodelay(true);
                let s = Arc::new(s);
                (
                    s.clone() as Arc<dyn Socket>,
                    s as Arc<dyn Live>,
                    peer.to_string(),
                )
            }),
            Listener::Unix(l, path) => l.accept().map(|(s, _)| {
                let s = Arc::new(s);
                let peer = format!("unix:{}", path.display());
                (s.clone() as Arc<dyn Socket>, s as Arc<dyn Live>, peer)
            }),
        };
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        match accepted {
            Ok((sock, live, peer)) => admit(shared, sock, live, peer),
            Err(e) => {
                log::warn!("NBD: accept failed: {e}");
                // Out of descriptors, most likely: give the open connections a moment instead
                // of spinning on the same error.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn admit(shared: &Arc<Shared>, sock: Arc<dyn Socket>, live: Arc<dyn Live>, peer: String) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    {
        let mut conns = lock(&shared.conns);
        if conns.len() >= shared.max_connections {
            log::warn!(
                "NBD: refusing {peer}: {} connections are open already (--max-connections)",
                conns.len()
            );
            live.shutdown();
            return;
        }
        conns.insert(id, live);
    }
    let conn_shared = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name("nbd-conn".into())
        .spawn(move || {
            serve_connection(conn_shared.as_ref(), sock, &peer);
            let mut conns = lock(&conn_shared.conns);
            conns.remove(&id);
            conn_shared.ended.notify_all();
        });
    if let Err(e) = spawned {
        log::warn!("NBD: cannot start a connection thread: {e}");
        if let Some(live) = lock(&shared.conns).remove(&id) {
            live.shutdown();
        }
    }
}

/// Runs one connection from the first byte to the last.
pub fn serve_connection(
    shared_exports: &impl ConnectionContext,
    sock: Arc<dyn Socket>,
    peer: &str,
) {
    if let Err(e) = sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT)) {
        log::warn!("NBD {peer}: {e}");
    }
    let mut ch = Channel::new(Arc::clone(&sock));
    match negotiate(
        &mut ch,
        shared_exports.exports(),
        shared_exports.handshake(),
    ) {
        Ok(None) => log::debug!("NBD {peer}: left during the handshake"),
        Err(e) => log::warn!("NBD {peer}: closing the connection: {e}"),
        Ok(Some(negotiated)) => {
            let _ = sock.set_read_timeout(None);
            let export = &negotiated.export;
            log::info!(
                "NBD {peer}: attached {} ({}{})",
                export.name,
                if export.writable {
                    "read-write"
                } else {
                    "read-only"
                },
                if ch.is_tls() { ", TLS" } else { "" }
            );
            match transmit(&mut ch, &negotiated, shared_exports.limits()) {
                Ok(()) => log::info!("NBD {peer}: detached {}", export.name),
                Err(e) => log::warn!("NBD {peer}: closing the connection: {e}"),
            }
        }
    }
    ch.writer().close();
}

/// What a connection needs from its server (a trait, so tests and the fuzz target can run a
/// connection without one).
pub trait ConnectionContext {
    fn exports(&self) -> &dyn Exports;
    fn handshake(&self) -> &HandshakeConfig;
    fn limits(&self) -> Limits;
}

impl ConnectionContext for Shared {
    fn exports(&self) -> &dyn Exports {
        self.exports.as_ref()
    }
    fn handshake(&self) -> &HandshakeConfig {
        &self.handshake
    }
    fn limits(&self) -> Limits {
        self.limits
    }
}
