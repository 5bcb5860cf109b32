//! Hostile NBD clients against `imgfs nbd` on 127.0.0.1: truncated, oversized and out-of-range
//! requests, bad magics, names that try to leave the source tree, too many connections, and a
//! client that disconnects in the middle of a write. Each is cut off or refused without harming
//! a well-behaved client connected beside it, and the image stays consistent.
//!
//! The client here is written from the protocol document, independent of the server's code.
//! Every read has a timeout, so no test can hang on a server that does not answer.

mod common;
mod nbd_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use nbd_support::*;

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;

struct Client(TcpStream);

impl Client {
    /// Connects and reads the greeting; `None` if the server closed at once.
    fn connect(port: u16) -> Option<Client> {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut c = Client(stream);
        let mut hello = [0u8; 18];
        c.0.read_exact(&mut hello).ok()?;
        assert_eq!(&hello[..8], b"NBDMAGIC");
        c.send(&3u32.to_be_bytes());
        Some(c)
    }

    fn send(&mut self, bytes: &[u8]) {
        // The server may have closed already: that is what some tests expect.
        let _ = self.0.write_all(bytes);
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut out = IHAVEOPT.to_be_bytes().to_vec();
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        self.send(&out);
    }

    /// Reads option replies up to the final one; returns its type.
    fn final_reply(&mut self) -> u32 {
        loop {
            let mut head = [0u8; 20];
            self.0.read_exact(&mut head).unwrap();
            let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
            let mut data = vec![0u8; len as usize];
            self.0.read_exact(&mut data).unwrap();
            if kind != 3 {
                return kind;
            }
        }
    }

    /// NBD_OPT_GO on `name`; the final reply type.
    fn go(&mut self, name: &str) -> u32 {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &data);
        self.final_reply()
    }

    fn request(&mut self, kind: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut out = REQUEST_MAGIC.to_be_bytes().to_vec();
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(payload);
        self.send(&out);
    }

    /// A simple reply: (cookie, error), with `data` bytes behind it when there is no error.
    fn reply(&mut self, data: usize) -> (u64, u32, Vec<u8>) {
        let mut head = [0u8; 16];
        self.0.read_exact(&mut head).unwrap();
        assert_eq!(
            u32::from_be_bytes(head[..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        let error = u32::from_be_bytes(head[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(head[8..16].try_into().unwrap());
        let mut payload = vec![0u8; if error == 0 { data } else { 0 }];
        self.0.read_exact(&mut payload).unwrap();
        (cookie, error, payload)
    }

    /// Whether the server closed the connection (EOF before the timeout).
    fn closed(&mut self) -> bool {
        let mut buf = [0u8; 64];
        loop {
            match self.0.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    /// A write and a read back must work.
    fn round_trip(&mut self, cookie: u64, offset: u64) {
        self.request(CMD_WRITE, cookie, offset, 4, b"good");
        assert_eq!(self.reply(0), (cookie, 0, vec![]));
        self.request(CMD_READ, cookie + 1, offset, 4, &[]);
        assert_eq!(self.reply(4), (cookie + 1, 0, b"good".to_vec()));
    }
}

#[test]
fn hostile_clients_are_cut_off_and_harm_no_one_else() {
    let (dir, src) = empty_source("nbd-hostile");
    create_filled(&src, "qcow2", "disk.qcow2", &[], "16M", &[]);
    std::fs::write(dir.join("secret.raw"), b"outside the tree").unwrap();
    let server = NbdServer::tcp(&src, &[]);
    let port = server.port.unwrap();
    let mut good = Client::connect(port).unwrap();
    assert_eq!(good.go("disk.qcow2"), REP_ACK);
    good.round_trip(1, 0);

    // A handshake cut short.
    let mut c = Client::connect(port).unwrap();
    c.send(&IHAVEOPT.to_be_bytes()[..5]);
    drop(c);
    // A bad option magic, and option data of 4 GiB announced.
    let mut c = Client::connect(port).unwrap();
    c.send(&[0x55; 16]);
    assert!(c.closed());
    let mut c = Client::connect(port).unwrap();
    let mut huge = IHAVEOPT.to_be_bytes().to_vec();
    huge.extend_from_slice(&3u32.to_be_bytes());
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&huge);
    assert!(c.closed());
    // Names that try to leave the tree or name nothing served.
    let mut c = Client::connect(port).unwrap();
    let outside = dir.join("secret");
    for name in [
        "../secret",
        outside.to_str().unwrap(),
        "a/../disk.qcow2",
        "disk.qcow2.raw",
    ] {
        assert_eq!(c.go(name), REP_ERR_UNKNOWN, "{name}");
    }
    // Requests out of range get errors and the connection goes on.
    assert_eq!(c.go("disk.qcow2"), REP_ACK);
    c.request(CMD_READ, 7, 16 << 20, 512, &[]);
    assert_eq!(c.reply(512).1, 22);
    c.request(CMD_READ, 8, u64::MAX - 10, 512, &[]);
    assert_eq!(c.reply(512).1, 22);
    c.request(CMD_WRITE, 9, (16 << 20) - 2, 4, b"past");
    assert_eq!(c.reply(0).1, 28);
    c.request(99, 10, 0, 0, &[]);
    assert_eq!(c.reply(0).1, 22);
    c.round_trip(11, 4096);
    // A write of 4 GiB announced, then a bad request magic: both close the connection.
    c.request(CMD_WRITE, 13, 0, u32::MAX, &[0; 1000]);
    assert!(c.closed());
    let mut c = Client::connect(port).unwrap();
    assert_eq!(c.go("disk.qcow2"), REP_ACK);
    c.send(&[0xee; 28]);
    assert!(c.closed());

    good.round_trip(20, 8192);
    good.request(CMD_FLUSH, 22, 0, 0, &[]);
    assert_eq!(good.reply(0).1, 0);
    drop(good);
    let log = server.stop();
    assert!(log.contains("closing the connection"), "{log}");
    assert_check_clean("qcow2", &src.join("disk.qcow2"));
}

#[test]
fn a_client_gone_mid_write_leaves_the_image_consistent() {
    let (dir, src) = empty_source("nbd-cut");
    create_filled(&src, "qcow2", "disk.qcow2", &[], "16M", &[]);
    let server = NbdServer::tcp(&src, &[]);
    let mut c = Client::connect(server.port.unwrap()).unwrap();
    assert_eq!(c.go("disk.qcow2"), REP_ACK);
    let mut expected = vec![0u8; 16 << 20];
    for i in 0..8u64 {
        let data = vec![0x10 + i as u8; 65536];
        let offset = i * (1 << 20);
        c.request(CMD_WRITE, i, offset, data.len() as u32, &data);
        expected[offset as usize..offset as usize + 65536].copy_from_slice(&data);
    }
    // Acknowledged writes must survive what follows.
    let mut acked: Vec<u64> = (0..8)
        .map(|_| c.reply(0))
        .map(|(cookie, e, _)| {
            assert_eq!(e, 0);
            cookie
        })
        .collect();
    acked.sort();
    assert_eq!(acked, (0..8).collect::<Vec<u64>>());
    // The last write stops after 100 KiB of its 1 MiB and the client is gone.
    c.request(CMD_WRITE, 99, 10 << 20, 1 << 20, &vec![0xff; 100 << 10]);
    drop(c);
    // Another client sees every complete write, and nothing of the cut one.
    let mut other = Client::connect(server.port.unwrap()).unwrap();
    assert_eq!(other.go("disk.qcow2"), REP_ACK);
    other.request(CMD_FLUSH, 1, 0, 0, &[]);
    assert_eq!(other.reply(0).1, 0);
    drop(other);
    server.stop();
    let image = src.join("disk.qcow2");
    assert_check_clean("qcow2", &image);
    assert_compare_equal("qcow2", &image, &expected, &dir);
}

#[test]
fn connections_beyond_the_limit_are_refused() {
    let (_dir, src) = empty_source("nbd-limit");
    create_filled(&src, "vdi", "disk.vdi", &[], "4M", &[]);
    let server = NbdServer::tcp(&src, &["--max-connections", "2"]);
    let port = server.port.unwrap();
    let mut a = Client::connect(port).unwrap();
    let mut b = Client::connect(port).unwrap();
    assert_eq!(a.go("disk.vdi"), REP_ACK);
    assert_eq!(b.go("disk.vdi"), REP_ACK);
    assert!(
        Client::connect(port).is_none(),
        "a third connection was served"
    );
    a.round_trip(1, 0);
    drop((a, b));
    let log = server.stop();
    assert!(log.contains("--max-connections"), "{log}");
}

#[test]
fn a_network_address_needs_tls_or_insecure() {
    let (_dir, src) = empty_source("nbd-insecure");
    // Refused before anything listens.
    let out = std::process::Command::new(IMGFS)
        .args(["nbd", "--foreground", "--listen", "0.0.0.0:0"])
        .arg(&src)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tls-cert") && err.contains("--insecure"),
        "{err}"
    );
}
