//! Shared harness of the NBD tests: an `imgfs nbd` daemon in the foreground on a Unix socket or
//! an ephemeral loopback port, stopped with SIGTERM (so it writes back) when the test ends, and
//! helpers around the client tools (qemu-img, qemu-io, nbdinfo, nbdcopy).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::IMGFS;

/// Whether the libnbd tools are here; CI must have them (scripts/setup.sh installs them).
pub fn have_libnbd_tools() -> bool {
    let found = ["nbdinfo", "nbdcopy"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !found && std::env::var("CI").as_deref() == Ok("true") {
        panic!("nbdinfo and nbdcopy are needed in CI (apt-get install libnbd-bin)");
    }
    if !found {
        eprintln!("skipping: nbdinfo/nbdcopy missing (apt-get install libnbd-bin)");
    }
    found
}

/// A running `imgfs nbd` in the foreground; stopped with SIGTERM on `stop` or drop.
pub struct NbdServer {
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    /// `nbd+unix:///` URI prefix for the socket, or `nbd://127.0.0.1:PORT/` for TCP.
    base: String,
    pub socket: Option<PathBuf>,
    pub port: Option<u16>,
}

impl NbdServer {
    /// Serves `src` on a Unix socket in `dir`, with `extra` arguments.
    pub fn unix(src: &Path, dir: &Path, extra: &[&str]) -> Self {
        let socket = dir.join("nbd.sock");
        let mut args = vec!["--socket".to_string(), socket.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut server = Self::start(src, &args);
        server.base = "nbd+unix:///".into();
        server.socket = Some(socket);
        server
    }

    /// Serves `src` on an ephemeral loopback port, with `extra` arguments.
    pub fn tcp(src: &Path, extra: &[&str]) -> Self {
        let mut args = vec!["--listen".to_string(), "127.0.0.1:0".to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut server = Self::start(src, &args);
        let port = server
            .log()
            .lines()
            .find_map(|l| {
                l.split("NBD: listening on 127.0.0.1:")
                    .nth(1)?
                    .trim()
                    .parse()
                    .ok()
            })
            .expect("the server logs its port");
        server.base = format!("nbd://127.0.0.1:{port}/");
        server.port = Some(port);
        server
    }

    fn start(src: &Path, args: &[String]) -> Self {
        let mut child = Command::new(IMGFS)
            .arg("nbd")
            .arg("--foreground")
            .args(args)
            .arg(src)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start imgfs nbd");
        let log = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready) = mpsc::channel();
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let is_ready = line.contains("over NBD");
                sink.lock().unwrap().push_str(&(line + "\n"));
                if is_ready {
                    let _ = ready_tx.send(true);
                }
            }
            let _ = ready_tx.send(false);
        });
        let server = NbdServer {
            child: Some(child),
            log,
            base: String::new(),
            socket: None,
            port: None,
        };
        let ok = ready.recv_timeout(Duration::from_secs(60)).unwrap_or(false);
        assert!(ok, "imgfs nbd did not start:\n{}", server.log());
        server
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The URI of export `name`.
    pub fn uri(&self, name: &str) -> String {
        match &self.socket {
            Some(socket) => format!("{}{name}?socket={}", self.base, socket.display()),
            None => format!("{}{name}", self.base),
        }
    }

    /// SIGTERM, then waits for the daemon to write back and exit; asserts a clean exit and no
    /// error in its log.
    pub fn stop(mut self) -> String {
        let status = self.terminate();
        let log = self.log();
        assert!(status, "imgfs nbd exited with an error:\n{log}");
        let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
        assert!(errors.is_empty(), "daemon logged errors:\n{log}");
        log
    }

    fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        // SAFETY: kill with the pid of our own child, which has not been waited for yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().is_ok_and(|s| s.success())
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Runs a client tool and returns its output, panicking with it unless it succeeded.
pub fn client(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// qemu-io commands on an NBD URI (one connection).
pub fn qemu_io_nbd(uri: &str, commands: &[&str]) {
    let mut args = vec!["-f", "raw"];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    client("qemu-io", &args);
}

/// The image's content as read over NBD by qemu-img.
pub fn read_nbd(uri: &str, out: &Path) -> Vec<u8> {
    client(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            uri,
            out.to_str().unwrap(),
        ],
    );
    let data = std::fs::read(out).unwrap();
    std::fs::remove_file(out).unwrap();
    data
}

/// `qemu-img map --output=json` as (start, length, data, zero), neighbours with the same
/// classification merged, so maps of different granularity compare.
pub fn qemu_map(args: &[&str]) -> Vec<(u64, u64, bool, bool)> {
    let mut full = vec!["map", "--output=json"];
    full.extend_from_slice(args);
    let out = client("qemu-img", &full);
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut merged: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in entries {
        let start = e["start"].as_u64().unwrap();
        let len = e["length"].as_u64().unwrap();
        let data = e["data"].as_bool().unwrap();
        let zero = e["zero"].as_bool().unwrap();
        match merged.last_mut() {
            Some(last) if last.2 == data && last.3 == zero && last.0 + last.1 == start => {
                last.1 += len
            }
            _ => merged.push((start, len, data, zero)),
        }
    }
    merged
}
