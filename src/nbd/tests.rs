//! Whole connections over an in-memory socket: a scripted client, the server's replies parsed
//! back. Covers the handshake, every command, hostile input, and a replay of a small corpus
//! through the fuzz entry point.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::conn::{MemSocket, Socket};
use super::handshake::HandshakeConfig;
use super::mem::{fuzz_session, run_connection, MemDisk, MemExports, Standalone};
use super::proto::*;
use super::server::serve_connection;
use super::transmit::Limits;
use crate::image::Image;

/// What a client sends, built step by step.
#[derive(Clone)]
struct Script(Vec<u8>);

fn string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

impl Script {
    fn new() -> Self {
        Script(
            (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
                .to_be_bytes()
                .to_vec(),
        )
    }

    fn option(mut self, option: u32, data: &[u8]) -> Self {
        self.0.extend_from_slice(&IHAVEOPT.to_be_bytes());
        self.0.extend_from_slice(&option.to_be_bytes());
        self.0.extend_from_slice(&(data.len() as u32).to_be_bytes());
        self.0.extend_from_slice(data);
        self
    }

    fn info(self, option: u32, name: &str, infos: &[u16]) -> Self {
        let mut data = string(name);
        data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            data.extend_from_slice(&i.to_be_bytes());
        }
        self.option(option, &data)
    }

    fn meta(self, option: u32, name: &str, queries: &[&str]) -> Self {
        let mut data = string(name);
        data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            data.extend(string(q));
        }
        self.option(option, &data)
    }

    /// STRUCTURED_REPLY, base:allocation and qemu:allocation-depth, then GO `name`.
    fn structured_go(self, name: &str) -> Self {
        self.option(OPT_STRUCTURED_REPLY, &[])
            .meta(
                OPT_SET_META_CONTEXT,
                name,
                &[CONTEXT_BASE_ALLOCATION, CONTEXT_ALLOCATION_DEPTH],
            )
            .info(OPT_GO, name, &[INFO_BLOCK_SIZE])
    }

    fn request(mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Self {
        self.0.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        self.0.extend_from_slice(&flags.to_be_bytes());
        self.0.extend_from_slice(&kind.to_be_bytes());
        self.0.extend_from_slice(&cookie.to_be_bytes());
        self.0.extend_from_slice(&offset.to_be_bytes());
        self.0.extend_from_slice(&len.to_be_bytes());
        self
    }

    fn write(self, cookie: u64, offset: u64, data: &[u8]) -> Self {
        let mut s = self.request(CMD_WRITE, 0, cookie, offset, data.len() as u32);
        s.0.extend_from_slice(data);
        s
    }

    fn raw(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }

    fn disc(self) -> Self {
        self.request(CMD_DISC, 0, 0, 0, 0)
    }
}

/// One option reply: option, reply type, data.
type OptionReply = (u32, u32, Vec<u8>);

/// A transmission reply, by cookie: the error (0 if none), read data reassembled from data and
/// hole chunks (or a simple reply's payload), block-status chunks, and which chunk types came.
#[derive(Debug, Default, Clone)]
struct Answer {
    error: u32,
    data: HashMap<u64, Vec<u8>>,
    status: Vec<(u32, Vec<(u32, u32)>)>,
    types: Vec<u16>,
    done: bool,
}

struct Parsed {
    options: Vec<OptionReply>,
    answers: HashMap<u64, Answer>,
    /// Bytes after the handshake that were not parsed (a cut connection leaves none).
    rest: usize,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Parses server output; `reads` gives the length of each simple read reply by cookie.
fn parse(out: &[u8], reads: &HashMap<u64, usize>) -> Parsed {
    assert_eq!(be64(out, 0), NBDMAGIC);
    assert_eq!(be64(out, 8), IHAVEOPT);
    let mut at = 18;
    let mut options = Vec::new();
    while out.len() >= at + 20 && be64(out, at) == OPTION_REPLY_MAGIC {
        let len = be32(out, at + 16) as usize;
        options.push((
            be32(out, at + 8),
            be32(out, at + 12),
            out[at + 20..at + 20 + len].to_vec(),
        ));
        at += 20 + len;
    }
    let mut answers: HashMap<u64, Answer> = HashMap::new();
    while out.len() >= at + 16 {
        match be32(out, at) {
            SIMPLE_REPLY_MAGIC => {
                let cookie = be64(out, at + 8);
                let a = answers.entry(cookie).or_default();
                a.error = be32(out, at + 4);
                a.done = true;
                at += 16;
                if let (0, Some(&len)) = (a.error, reads.get(&cookie)) {
                    a.data.insert(0, out[at..at + len].to_vec());
                    at += len;
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let flags = u16::from_be_bytes(out[at + 4..at + 6].try_into().unwrap());
                let kind = u16::from_be_bytes(out[at + 6..at + 8].try_into().unwrap());
                let cookie = be64(out, at + 8);
                let len = be32(out, at + 16) as usize;
                let p = &out[at + 20..at + 20 + len];
                let a = answers.entry(cookie).or_default();
                a.types.push(kind);
                a.done |= flags & REPLY_FLAG_DONE != 0;
                match kind {
                    REPLY_TYPE_OFFSET_DATA => {
                        a.data.insert(be64(p, 0), p[8..].to_vec());
                    }
                    REPLY_TYPE_OFFSET_HOLE => {
                        a.data.insert(be64(p, 0), vec![0; be32(p, 8) as usize]);
                    }
                    REPLY_TYPE_BLOCK_STATUS => {
                        let d = (4..p.len())
                            .step_by(8)
                            .map(|i| (be32(p, i), be32(p, i + 4)));
                        a.status.push((be32(p, 0), d.collect()));
                    }
                    REPLY_TYPE_ERROR => a.error = be32(p, 0),
                    _ => {}
                }
                at += 20 + len;
            }
            other => panic!("unexpected reply magic {other:#x} at {at}"),
        }
    }
    Parsed {
        options,
        answers,
        rest: out.len() - at,
    }
}

impl Answer {
    /// The read data in offset order, as one buffer.
    fn bytes(&self) -> Vec<u8> {
        let mut parts: Vec<_> = self.data.iter().collect();
        parts.sort_by_key(|(offset, _)| **offset);
        parts.into_iter().flat_map(|(_, d)| d.clone()).collect()
    }
}

fn context(disks: Vec<(&str, Arc<MemDisk>)>) -> Standalone {
    Standalone {
        exports: MemExports::new(disks.into_iter().map(|(n, d)| (n.to_string(), d)).collect()),
        handshake: HandshakeConfig::default(),
        limits: Limits {
            workers: 3,
            inflight_bytes: 1 << 20,
        },
    }
}

fn run(ctx: &Standalone, script: &Script, reads: &[(u64, usize)]) -> Parsed {
    let out = run_connection(ctx, &script.0, 13);
    parse(&out, &reads.iter().copied().collect())
}

#[test]
fn handshake_lists_informs_and_goes() {
    let disk = Arc::new(MemDisk::new(1 << 20, false));
    let ro = Arc::new(MemDisk::new(8192, true));
    let ctx = context(vec![("vm/a.vdi", disk), ("b.qcow2", ro)]);
    let script = Script::new()
        .option(OPT_LIST, &[])
        .info(OPT_INFO, "b.qcow2", &[INFO_NAME, INFO_DESCRIPTION])
        .info(OPT_INFO, "nope", &[])
        .option(99, b"whatever")
        .option(OPT_STARTTLS, &[])
        .meta(OPT_LIST_META_CONTEXT, "vm/a.vdi", &[])
        .option(OPT_STRUCTURED_REPLY, &[])
        .meta(OPT_LIST_META_CONTEXT, "vm/a.vdi", &[])
        .meta(OPT_LIST_META_CONTEXT, "vm/a.vdi", &["qemu:", "other:x"])
        .info(OPT_GO, "vm/a.vdi", &[])
        .disc();
    let p = run(&ctx, &script, &[]);
    let kinds: Vec<(u32, u32)> = p.options.iter().map(|(o, k, _)| (*o, *k)).collect();
    assert_eq!(
        kinds,
        vec![
            (OPT_LIST, REP_SERVER),
            (OPT_LIST, REP_SERVER),
            (OPT_LIST, REP_ACK),
            (OPT_INFO, REP_INFO),
            (OPT_INFO, REP_INFO),
            (OPT_INFO, REP_INFO),
            (OPT_INFO, REP_INFO),
            (OPT_INFO, REP_ACK),
            (OPT_INFO, REP_ERR_UNKNOWN),
            (99, REP_ERR_UNSUP),
            (OPT_STARTTLS, REP_ERR_POLICY),
            (OPT_LIST_META_CONTEXT, REP_ERR_INVALID),
            (OPT_STRUCTURED_REPLY, REP_ACK),
            (OPT_LIST_META_CONTEXT, REP_META_CONTEXT),
            (OPT_LIST_META_CONTEXT, REP_META_CONTEXT),
            (OPT_LIST_META_CONTEXT, REP_ACK),
            (OPT_LIST_META_CONTEXT, REP_META_CONTEXT),
            (OPT_LIST_META_CONTEXT, REP_ACK),
            (OPT_GO, REP_INFO),
            (OPT_GO, REP_INFO),
            (OPT_GO, REP_ACK),
        ]
    );
    assert_eq!(&p.options[0].2[4..], b"vm/a.vdi1048576 bytes in memory");
    // NBD_INFO_EXPORT of the read-only export: size 8192, READ_ONLY set.
    let export = &p.options[3].2;
    assert_eq!(be64(export, 2), 8192);
    let flags = u16::from_be_bytes(export[10..12].try_into().unwrap());
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    assert_ne!(flags & FLAG_CAN_MULTI_CONN, 0);
    let block = &p.options[4].2;
    assert_eq!(
        (be32(block, 2), be32(block, 6), be32(block, 10)),
        (1, 4096, MAX_PAYLOAD)
    );
    assert_eq!(&p.options[5].2[2..], b"b.qcow2");
    assert_eq!(&p.options[16].2[4..], CONTEXT_ALLOCATION_DEPTH.as_bytes());
    assert_eq!(p.rest, 0);
}

#[test]
fn commands_read_write_zero_and_report_status() {
    // The requests below depend on each other's effects, which only one worker orders (so
    // reads go to it too, not to the connection's thread): a real client waits for the
    // replies it depends on.
    let disk = Arc::new(MemDisk::new(1 << 20, false).uncached());
    let mut ctx = context(vec![("d", disk.clone())]);
    ctx.limits.workers = 1;
    let pattern: Vec<u8> = (0..20000u32).map(|i| (i % 251) as u8 + 1).collect();
    let script = Script::new()
        .structured_go("d")
        .write(1, 8192, &pattern)
        .request(CMD_FLUSH, 0, 2, 0, 0)
        .request(CMD_READ, 0, 3, 0, 65536)
        .request(CMD_BLOCK_STATUS, 0, 4, 0, 1 << 20)
        .request(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 5, 8192, 4096)
        .request(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 6, 65536, 4096)
        .request(CMD_WRITE_ZEROES, CMD_FLAG_FUA, 7, 8192, 4096)
        .request(CMD_TRIM, 0, 8, 0, 4096)
        .request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 9, 4096, 1 << 19)
        .request(CMD_CACHE, 0, 10, 0, 4096)
        .disc();
    let p = run(&ctx, &script, &[]);
    for cookie in [1, 2, 3, 4, 6, 7, 8, 9, 10] {
        assert_eq!(p.answers[&cookie].error, 0, "cookie {cookie}");
        assert!(p.answers[&cookie].done, "cookie {cookie}");
    }
    assert_eq!(p.answers[&5].error, ENOTSUP);
    let read = p.answers[&3].bytes();
    let mut expected = vec![0u8; 65536];
    expected[8192..8192 + pattern.len()].copy_from_slice(&pattern);
    assert!(read == expected);
    assert!(p.answers[&3].types.contains(&REPLY_TYPE_OFFSET_HOLE));
    // base:allocation: a hole, the written blocks, a hole to the end.
    let status = &p.answers[&4].status;
    let base = status.iter().find(|(id, _)| *id == 1).unwrap();
    assert_eq!(
        base.1,
        vec![
            (8192, STATE_HOLE | STATE_ZERO),
            (20480, 0),
            ((1 << 20) - 28672, STATE_HOLE | STATE_ZERO)
        ]
    );
    let depth = status.iter().find(|(id, _)| *id == 2).unwrap();
    assert_eq!(depth.1[1], (20480, 1));
    let one = &p.answers[&9].status;
    assert!(one.iter().all(|(_, d)| d.len() == 1 && d[0].0 <= 1 << 19));
    let mut after = expected.clone();
    after[8192..12288].fill(0);
    assert!(disk.contents()[..65536] == after[..]);
}

#[test]
fn reads_from_the_page_cache_and_from_workers_answer_the_same() {
    let pattern: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8 + 1).collect();
    let filled = |disk: MemDisk| {
        disk.write_at(&pattern[..70_000], 4096).unwrap();
        disk.write_at(&pattern[..200_000], 300_000).unwrap();
        Arc::new(disk)
    };
    let cached = filled(MemDisk::new(1 << 20, false));
    let uncached = filled(MemDisk::new(1 << 20, false).uncached());
    // Small and large reads, over data, holes and both; with structured replies and without.
    let reads = [
        (0, 4096),
        (4000, 200),
        (0, 131_072),
        (8192, 131_073),
        (290_000, 20_000),
        (299_999, 512),
        (0, 1 << 20),
        (900_000, 65536),
    ];
    let mut answers = Vec::new();
    for disk in [&cached, &uncached] {
        for structured in [true, false] {
            let ctx = context(vec![("d", Arc::clone(disk))]);
            let mut script = match structured {
                true => Script::new().structured_go("d"),
                false => Script::new().option(OPT_EXPORT_NAME, b"d"),
            };
            for (cookie, &(offset, len)) in (1u64..).zip(&reads) {
                script = script.request(CMD_READ, 0, cookie, offset, len);
            }
            let out = run_connection(&ctx, &script.disc().0, 13);
            let lengths = (1u64..).zip(reads.iter().map(|&(_, len)| len as usize));
            let out = match structured {
                true => out,
                // The export-name reply is size and flags only (NO_ZEROES).
                false => [&out[..18], &out[28..]].concat(),
            };
            let p = parse(&out, &lengths.collect());
            let bytes: Vec<Vec<u8>> = (1..=reads.len() as u64)
                .map(|cookie| p.answers[&cookie].bytes())
                .collect();
            answers.push(bytes);
        }
    }
    let contents = cached.contents();
    for (i, &(offset, len)) in reads.iter().enumerate() {
        let expected = &contents[offset as usize..offset as usize + len as usize];
        for run in &answers {
            assert!(run[i] == expected, "read {i} at {offset} (+{len})");
        }
    }
    // The cached disk answered the small reads on the connection's thread (two runs of five);
    // the other one never could, so its workers served everything.
    assert_eq!(cached.cached_reads(), 10);
    assert_eq!(uncached.cached_reads(), 0);
}

#[test]
fn replies_to_a_burst_of_cached_reads_go_out_in_one_write() {
    let disk = Arc::new(MemDisk::new(1 << 20, false));
    let pattern: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    disk.write_at(&pattern, 0).unwrap();
    let ctx = context(vec![("d", Arc::clone(&disk))]);
    // The whole script arrives at once, so the reads are all received before the first reply
    // is due: a connection with one read and one with sixteen make as many writes.
    let writes_and_output = |reads: u64| {
        let mut script = Script::new().structured_go("d");
        for cookie in 1..=reads {
            script = script.request(CMD_READ, 0, cookie, cookie * 5000, 1024);
        }
        let sock = Arc::new(MemSocket::new(script.disc().0, 1 << 20));
        serve_connection(&ctx, Arc::clone(&sock) as Arc<dyn Socket>, "memory");
        (sock.writes(), sock.output())
    };
    let (one, _) = writes_and_output(1);
    let (writes, out) = writes_and_output(16);
    assert_eq!(writes, one);
    let p = parse(&out, &(1..=16).map(|c| (c, 1024)).collect());
    for cookie in 1..=16u64 {
        let at = cookie as usize * 5000;
        assert!(
            p.answers[&cookie].bytes() == pattern[at..at + 1024],
            "read {cookie}"
        );
    }
    assert_eq!(disk.cached_reads(), 17);
}

#[test]
fn writes_are_served_here_only_after_everything_before_them() {
    // Reads need "the disk", so they go to the one worker; a write behind a read must not
    // overtake it, and writes with nothing before them are served without the worker.
    let disk = Arc::new(MemDisk::new(1 << 20, false).uncached());
    let mut ctx = context(vec![("d", disk.clone())]);
    ctx.limits.workers = 1;
    let mut script = Script::new()
        .structured_go("d")
        .write(1, 0, &[0xa1; 4096])
        .request(CMD_READ, 0, 2, 0, 4096)
        .write(3, 0, &[0xb2; 4096]);
    for cookie in 4..20 {
        script = script.write(cookie, cookie * 4096, &[cookie as u8; 4096]);
    }
    let p = run(&ctx, &script.disc(), &[]);
    assert!(p.answers[&2].bytes() == [0xa1; 4096]);
    assert!(disk.contents()[..4096] == [0xb2; 4096]);
    for cookie in 4..20u64 {
        assert_eq!(p.answers[&cookie].error, 0);
        let at = cookie as usize * 4096;
        assert!(disk.contents()[at..at + 4096]
            .iter()
            .all(|&b| b == cookie as u8));
    }
    // Write 1 had nothing before it, so the connection's thread served it. Write 3 went to the
    // worker if the read was still there when it arrived (the usual case, but the worker may
    // be done by then, so its count is not asserted; the bytes above show the order held).
    let on_worker = disk.worker_writes();
    assert!(on_worker <= 17, "{on_worker} writes on the worker");
}

#[test]
fn after_a_slow_write_the_next_writes_go_to_workers() {
    let disk = Arc::new(MemDisk::new(1 << 20, false).slow_writes(Duration::from_millis(3)));
    let mut ctx = context(vec![("d", disk.clone())]);
    ctx.limits.workers = 1;
    let mut script = Script::new().structured_go("d");
    for cookie in 0..10 {
        script = script.write(cookie, cookie * 4096, &[1; 4096]);
    }
    let p = run(&ctx, &script.disc(), &[]);
    assert!((0..10).all(|cookie| p.answers[&cookie].error == 0));
    // The first was served by the connection's thread and took long: the other nine went to
    // the worker.
    assert_eq!(disk.worker_writes(), 9);
}

#[test]
fn simple_replies_and_export_name_work_without_structured_replies() {
    let disk = Arc::new(MemDisk::new(65536, false));
    disk.write_at(b"hello", 100).unwrap();
    let ctx = context(vec![("only", disk)]);
    // The default export (empty name) is the only one.
    let script = Script::new()
        .option(OPT_EXPORT_NAME, b"")
        .request(CMD_READ, 0, 1, 96, 16)
        .request(CMD_READ, 0, 2, 65530, 16)
        .request(CMD_BLOCK_STATUS, 0, 3, 0, 4096)
        .disc();
    let out = run_connection(&ctx, &script.0, 5);
    // Size and flags, no zeroes (NO_ZEROES was negotiated).
    assert_eq!(be64(&out, 18), 65536);
    let rest = [&out[..18], &out[28..]].concat();
    let p = parse(&rest, &[(1, 16)].into_iter().collect());
    assert_eq!(&p.answers[&1].data[&0][4..9], b"hello");
    assert_eq!(p.answers[&2].error, EINVAL);
    assert_eq!(p.answers[&3].error, EINVAL);
}

#[test]
fn read_only_exports_refuse_writes_with_eperm() {
    let ro = Arc::new(MemDisk::new(65536, true));
    let ctx = context(vec![("ro", ro)]);
    let script = Script::new()
        .structured_go("ro")
        .write(1, 0, b"x")
        .request(CMD_TRIM, 0, 2, 0, 512)
        .request(CMD_WRITE_ZEROES, 0, 3, 0, 512)
        .request(CMD_FLUSH, 0, 4, 0, 0)
        .disc();
    let p = run(&ctx, &script, &[]);
    assert_eq!(p.answers[&1].error, EPERM);
    assert_eq!(p.answers[&2].error, EPERM);
    assert_eq!(p.answers[&3].error, EPERM);
    assert_eq!(p.answers[&4].error, 0);
}

#[test]
fn bad_requests_get_errors_and_the_connection_goes_on() {
    let disk = Arc::new(MemDisk::new(65536, false));
    let ctx = context(vec![("d", disk)]);
    let script = Script::new()
        .option(OPT_STRUCTURED_REPLY, &[])
        .info(OPT_GO, "d", &[])
        .request(CMD_READ, 0, 1, 65000, 1000)
        .request(CMD_READ, CMD_FLAG_REQ_ONE, 2, 0, 512)
        .request(42, 0, 3, 0, 0)
        .request(CMD_BLOCK_STATUS, 0, 4, 0, 512)
        .write(5, 65535, b"ab")
        .request(CMD_READ, 0, 6, u64::MAX, 2)
        .request(CMD_READ, 0, 7, 0, MAX_PAYLOAD + 1)
        .request(CMD_READ, 0, 8, 0, 0)
        .request(CMD_READ, 0, 9, 0, 16)
        .disc();
    let p = run(&ctx, &script, &[]);
    for (cookie, errno) in [
        (1, EINVAL),
        (2, EINVAL),
        (3, EINVAL),
        (4, EINVAL),
        (5, ENOSPC),
    ] {
        assert_eq!(p.answers[&cookie].error, errno, "cookie {cookie}");
    }
    assert_eq!(p.answers[&6].error, EINVAL);
    assert_eq!(p.answers[&7].error, EINVAL);
    assert_eq!(p.answers[&8].types, vec![REPLY_TYPE_NONE]);
    assert_eq!(p.answers[&9].error, 0);
}

#[test]
fn protocol_violations_close_the_connection_and_write_nothing() {
    let disk = Arc::new(MemDisk::new(65536, false));
    let ctx = context(vec![("d", disk.clone())]);
    let go = Script::new().info(OPT_GO, "d", &[]);
    // Oversized write: the connection closes before any payload is taken.
    let big = go
        .clone()
        .request(CMD_WRITE, 0, 1, 0, MAX_PAYLOAD + 1)
        .raw(&[1; 4096]);
    let p = run(&ctx, &big, &[]);
    assert!(p.answers.is_empty());
    // A write cut off in its payload: nothing of it lands.
    let mut cut = go.clone().request(CMD_WRITE, 0, 1, 0, 8192);
    cut.0.extend_from_slice(&[7; 5000]);
    run(&ctx, &cut, &[]);
    // Bad request magic after a good request: served, then closed.
    let bad = go
        .clone()
        .request(CMD_FLUSH, 0, 1, 0, 0)
        .raw(&[0xde; 28])
        .request(CMD_FLUSH, 0, 2, 0, 0);
    let p = run(&ctx, &bad, &[]);
    assert!(p.answers.contains_key(&1) && !p.answers.contains_key(&2));
    assert!(disk.contents().iter().all(|b| *b == 0));
    // Oversized option data, unknown client flags, a bad option magic: closed at once.
    let mut huge = Script::new();
    huge.0.extend_from_slice(&IHAVEOPT.to_be_bytes());
    huge.0.extend_from_slice(&OPT_LIST.to_be_bytes());
    huge.0.extend_from_slice(&u32::MAX.to_be_bytes());
    let p = run(&ctx, &huge, &[]);
    assert!(p.options.is_empty());
    let flags = Script(0xffu32.to_be_bytes().to_vec()).option(OPT_LIST, &[]);
    assert!(run(&ctx, &flags, &[]).options.is_empty());
    let magic = Script::new().raw(&[0; 16]).option(OPT_LIST, &[]);
    assert!(run(&ctx, &magic, &[]).options.is_empty());
}

#[test]
fn tls_required_refuses_options_until_starttls() {
    // A configuration is needed only to say TLS is required; no handshake happens here.
    let ctx = Standalone {
        handshake: HandshakeConfig {
            tls: Some(test_tls_config()),
        },
        ..context(vec![("d", Arc::new(MemDisk::new(4096, false)))])
    };
    let script = Script::new()
        .option(OPT_LIST, &[])
        .info(OPT_GO, "d", &[])
        .option(OPT_EXPORT_NAME, b"d");
    let p = run(&ctx, &script, &[]);
    let kinds: Vec<u32> = p.options.iter().map(|(_, k, _)| *k).collect();
    assert_eq!(kinds, vec![REP_ERR_TLS_REQD, REP_ERR_TLS_REQD]);
    assert!(p.answers.is_empty());
}

/// A server configuration from a certificate made for the test by openssl.
fn test_tls_config() -> Arc<rustls::ServerConfig> {
    let dir = crate::testutil::TempDir::new();
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    super::tls::server_config(&cert, &key).unwrap()
}

/// A deterministic generator for the corpus mutations.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// The hand-written client sessions the NBD fuzz target starts from.
fn seed_scripts() -> [Script; 4] {
    [
        Script::new()
            .option(OPT_LIST, &[])
            .info(OPT_INFO, "disk", &[1, 2, 3]),
        Script::new()
            .structured_go("disk")
            .write(1, 4096, &[9; 3000])
            .request(CMD_READ, 0, 2, 0, 16384)
            .request(CMD_BLOCK_STATUS, 0, 3, 0, 1 << 18)
            .request(CMD_WRITE_ZEROES, 0, 4, 0, 8192)
            .request(CMD_TRIM, CMD_FLAG_FUA, 5, 0, 4096)
            .disc(),
        Script::new()
            .option(OPT_EXPORT_NAME, b"ro/disk")
            .request(CMD_READ, 0, 1, 0, 512)
            .write(2, 0, b"no"),
        Script::new().meta(OPT_SET_META_CONTEXT, "disk", &["base:allocation"]),
    ]
}

/// Writes the seed sessions to `fuzz/seeds/nbd/` (run by hand: `cargo test --lib -- --ignored
/// nbd::tests::write_fuzz_seeds`).
#[test]
#[ignore]
fn write_fuzz_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/nbd");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, script) in ["list-info", "io", "export-name", "meta"]
        .iter()
        .zip(seed_scripts())
    {
        std::fs::write(dir.join(name), &script.0).unwrap();
    }
}

#[test]
fn the_committed_fuzz_corpora_replay_through_the_fuzz_entry_point() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for kind in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(kind).join("nbd")) else {
            continue;
        };
        for entry in entries.flatten() {
            fuzz_session(&std::fs::read(entry.path()).unwrap());
            replayed += 1;
        }
    }
    assert!(replayed >= 4, "the NBD seeds are committed");
}

#[test]
fn corpus_replays_through_the_fuzz_entry_point() {
    let seeds = seed_scripts();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for seed in &seeds {
        fuzz_session(&seed.0);
        for cut in (0..seed.0.len()).step_by(3) {
            fuzz_session(&seed.0[..cut]);
        }
        for _ in 0..200 {
            let mut bytes = seed.0.clone();
            for _ in 0..1 + next(&mut rng) % 4 {
                let at = (next(&mut rng) % bytes.len() as u64) as usize;
                bytes[at] ^= 1 << (next(&mut rng) % 8);
            }
            fuzz_session(&bytes);
        }
    }
}
