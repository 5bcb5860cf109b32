//! Test helpers: a temporary directory removed on drop (std has none, and one small type does
//! not justify a crate), fake images and openers for the layers above the drivers, the qemu
//! runners and assertions every format's tests share, pause points (`pause`) that replay a
//! race in one chosen interleaving, the crash-consistency checks of a flush (`crash`), and
//! the fault walks that fail or cut every host operation of a workload (`faults`) or of a
//! resize (`resize`).

pub mod crash;
pub mod discard;
pub mod encrypted;
pub mod faults;
pub mod pause;
pub mod resize;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("imgfs-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    /// A temporary directory in memory (tmpfs) where the machine has one: for tests that
    /// rewrite their images hundreds of times and never need them on a disk.
    pub fn in_memory() -> Self {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            return Self::new();
        }
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = shm.join(format!("imgfs-test-{}-m{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An in-memory image whose allocation is tracked per 4 KiB block, for testing the layers above
/// the format drivers.
pub struct MemImage {
    pub data: std::sync::RwLock<Vec<u8>>,
    pub allocated: std::sync::RwLock<Vec<bool>>,
    pub flushes: AtomicU64,
    pub read_only: Option<String>,
    /// Names of fake internal snapshots; snapshot i reads as bytes i + 1.
    pub snapshots: Vec<String>,
    /// Kept open like a real image keeps its backing file (never read).
    #[allow(dead_code)]
    pub backing: Option<std::sync::Arc<dyn crate::image::Image>>,
}

pub const MEM_BLOCK: u64 = 4096;

impl MemImage {
    pub fn new(size: usize, read_only: Option<String>) -> Self {
        MemImage {
            data: std::sync::RwLock::new(vec![0; size]),
            allocated: std::sync::RwLock::new(vec![false; size.div_ceil(MEM_BLOCK as usize)]),
            flushes: AtomicU64::new(0),
            read_only,
            snapshots: Vec::new(),
            backing: None,
        }
    }
}

impl crate::image::Image for MemImage {
    fn size(&self) -> u64 {
        self.data.read().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::error::Result<()> {
        crate::image::check_range(self.size(), offset, buf.len())?;
        let o = offset as usize;
        buf.copy_from_slice(&self.data.read().unwrap()[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> crate::error::Result<()> {
        if let Some(r) = &self.read_only {
            return Err(crate::error::Error::read_only(r.clone()));
        }
        crate::image::check_range(self.size(), offset, buf.len())?;
        let o = offset as usize;
        self.data.write().unwrap()[o..o + buf.len()].copy_from_slice(buf);
        let mut alloc = self.allocated.write().unwrap();
        let first = offset / MEM_BLOCK;
        let last = (offset + buf.len() as u64).div_ceil(MEM_BLOCK);
        for b in first..last {
            alloc[b as usize] = true;
        }
        Ok(())
    }
    fn flush(&self) -> crate::error::Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn is_dirty(&self) -> bool {
        false
    }
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> crate::error::Result<Vec<crate::image::Extent>> {
        use crate::image::{push_extent, Extent, ExtentState};
        let end = (offset + len).min(self.size());
        let alloc = self.allocated.read().unwrap();
        let mut out = Vec::new();
        let mut at = offset;
        while at < end {
            let next = ((at / MEM_BLOCK + 1) * MEM_BLOCK).min(end);
            let state = if alloc[(at / MEM_BLOCK) as usize] {
                ExtentState::Data
            } else {
                ExtentState::Unallocated
            };
            push_extent(
                &mut out,
                Extent {
                    offset: at,
                    len: next - at,
                    state,
                    layer: 0,
                    host: None,
                },
            );
            at = next;
        }
        Ok(out)
    }
    fn allocated_bytes(&self) -> u64 {
        self.allocated
            .read()
            .unwrap()
            .iter()
            .filter(|&&a| a)
            .count() as u64
            * MEM_BLOCK
    }
    fn read_only_reason(&self) -> Option<String> {
        self.read_only.clone()
    }
    fn snapshot_names(&self) -> Vec<String> {
        self.snapshots.clone()
    }
    fn snapshot(
        &self,
        name: &str,
    ) -> crate::error::Result<std::sync::Arc<dyn crate::image::Image>> {
        let index = self
            .snapshots
            .iter()
            .position(|s| s == name)
            .ok_or_else(|| crate::error::Error::unsupported("no such snapshot"))?;
        let image = MemImage::new(self.data.read().unwrap().len(), None);
        image.data.write().unwrap().fill(index as u8 + 1);
        Ok(std::sync::Arc::new(MemImage {
            read_only: Some("a snapshot".into()),
            ..image
        }))
    }
    fn info(&self) -> crate::image::ImageInfo {
        crate::image::ImageInfo {
            format: "mem",
            subformat: String::new(),
            virtual_size: self.size(),
            cluster_size: Some(MEM_BLOCK),
            allocated_bytes: self.allocated_bytes(),
            read_only_reason: self.read_only.clone(),
            details: Vec::new(),
        }
    }
}

/// Opens files whose first line is `FAKEIMG <size>` as `MemImage`s of that size (read-only when
/// the line ends in a space; a second line `backing <name>` names a backing file, opened through
/// the links), files starting with `BADIMG` as failing images, and hides everything else;
/// counts the opens that serve an image (not the inspecting ones) and the probes; while
/// `transient_failures` is above zero, each open fails with EMFILE and counts it down.
#[derive(Default)]
pub struct FakeOpener {
    pub opens: std::sync::Arc<AtomicU64>,
    pub probes: std::sync::Arc<AtomicU64>,
    pub transient_failures: std::sync::Arc<AtomicU64>,
}

impl FakeOpener {
    fn fail_transiently(&self) -> crate::error::Result<()> {
        let left = &self.transient_failures;
        if left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            let e = std::io::Error::from_raw_os_error(libc::EMFILE);
            return Err(crate::error::Error::io("open", e));
        }
        Ok(())
    }
}

/// A fake image file: its size, read-only flag, backing name and snapshot names.
struct FakeFile {
    size: usize,
    read_only: bool,
    backing: Option<String>,
    snapshots: Vec<String>,
}

fn parse_fake(path: &Path) -> Option<FakeFile> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut lines = text.split('\n');
    let first = lines.next()?.strip_prefix("FAKEIMG ")?;
    let mut fake = FakeFile {
        size: first.trim().parse().ok()?,
        read_only: first.ends_with(' '),
        backing: None,
        snapshots: Vec::new(),
    };
    for line in lines {
        if let Some(name) = line.strip_prefix("backing ") {
            fake.backing = Some(name.to_string());
        } else if let Some(name) = line.strip_prefix("snapshot ") {
            fake.snapshots.push(name.to_string());
        }
    }
    Some(fake)
}

impl crate::catalog::Opener for FakeOpener {
    fn probe(&self, path: &Path) -> crate::error::Result<Option<crate::format::Format>> {
        self.probes.fetch_add(1, Ordering::Relaxed);
        let head = std::fs::read(path).unwrap_or_default();
        let image = head.starts_with(b"BADIMG") || parse_fake(path).is_some();
        Ok(image.then_some(crate::format::Format::Vdi))
    }

    fn open(
        &self,
        path: &Path,
        _format: crate::format::Format,
        options: &crate::format::OpenOptions,
        links: &mut dyn crate::format::links::Links,
    ) -> crate::error::Result<std::sync::Arc<dyn crate::image::Image>> {
        self.fail_transiently()?;
        let fake = parse_fake(path)
            .ok_or_else(|| crate::error::Error::corrupt("bad magic in test image"))?;
        if !options.inspect {
            self.opens.fetch_add(1, Ordering::Relaxed);
        }
        let mut backing = None;
        if let Some(name) = &fake.backing {
            let chain = crate::format::links::Chain::top(path);
            let backing_path =
                crate::format::links::resolve(links.root(), path, name.as_ref(), "backing file")?;
            backing = Some(links.open_backing(&backing_path, None, &chain)?);
        }
        let read_only = match (fake.read_only, options.read_only && !options.inspect) {
            (true, _) => Some("test read-only".to_string()),
            (false, true) => Some(
                options
                    .reason
                    .clone()
                    .unwrap_or_else(|| "served read-only by request".into()),
            ),
            (false, false) => None,
        };
        Ok(std::sync::Arc::new(MemImage {
            snapshots: fake.snapshots,
            backing,
            ..MemImage::new(fake.size, read_only)
        }))
    }

    fn open_backing(
        &self,
        path: &Path,
        _format: Option<crate::format::Format>,
        chain: &crate::format::links::Chain,
        links: &mut dyn crate::format::links::Links,
        inspect: bool,
    ) -> crate::error::Result<std::sync::Arc<dyn crate::image::Image>> {
        let below = chain.below(path)?;
        let fake =
            parse_fake(path).ok_or_else(|| crate::error::Error::corrupt("not a fake image"))?;
        if !inspect {
            self.opens.fetch_add(1, Ordering::Relaxed);
        }
        let mut backing = None;
        if let Some(name) = &fake.backing {
            let backing_path =
                crate::format::links::resolve(links.root(), path, name.as_ref(), "backing file")?;
            backing = Some(links.open_backing(&backing_path, None, &below)?);
        }
        let reason = Some("test backing file".to_string());
        Ok(std::sync::Arc::new(MemImage {
            backing,
            ..MemImage::new(fake.size, reason)
        }))
    }
}

/// A small deterministic generator (xorshift64), so test failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Runs a qemu tool; `None` (the caller skips) when it is missing, except in CI.
pub fn qemu<S: AsRef<std::ffi::OsStr>>(tool: &str, args: &[S]) -> Option<std::process::Output> {
    match std::process::Command::new(tool).args(args).output() {
        Ok(out) => Some(out),
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipping: {tool} not runnable: {e}");
            None
        }
        Err(e) => panic!("{tool} is required in CI: {e}"),
    }
}

/// Uses an image the way a hostile-input test needs: reads at the start, middle and end,
/// block status, info, and (when `write`) two writes and a flush; errors are fine, panics not.
pub fn exercise_image(img: &dyn crate::image::Image, write: bool) {
    let size = img.size();
    let mut buf = vec![0u8; 256 << 10];
    for offset in [0, size / 2, size.saturating_sub(buf.len() as u64)] {
        let len = buf.len().min(size.saturating_sub(offset) as usize);
        let _ = img.read_at(&mut buf[..len], offset);
    }
    let _ = img.block_status(0, size.min(64 << 20));
    let _ = img.info();
    if write && size > 0 {
        let _ = img.write_at(&[0x5a; 5000], (size - 1) / 4);
        let _ = img.write_at(&[0xa5; 1], size - 1);
        let _ = img.flush();
    }
}

/// Hostile-input harness: `rounds` deterministic mutations of the valid image `base`, each
/// written to `path` and handed to `open_and_use`, which returns whether the image opened.
/// No round may panic, and both outcomes must be common (so the mutations hit real checks).
pub fn assert_mutations_never_panic(
    base: &[u8],
    path: &Path,
    rounds: u32,
    mut mutate: impl FnMut(&mut Vec<u8>, &mut Rng),
    open_and_use: impl Fn(&Path) -> bool + std::panic::RefUnwindSafe,
) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut opened, mut refused) = (0, 0);
    for round in 0..rounds {
        let mut bytes = base.to_vec();
        mutate(&mut bytes, &mut rng);
        if rng.below(8) == 0 {
            bytes.truncate(rng.below(bytes.len() as u64) as usize);
        }
        std::fs::write(path, &bytes).unwrap();
        match std::panic::catch_unwind(|| open_and_use(path)) {
            Ok(true) => opened += 1,
            Ok(false) => refused += 1,
            Err(_) => panic!(
                "round {round} panicked; mutated image left at {}",
                path.display()
            ),
        }
    }
    assert!(
        opened > 100 && refused > 100,
        "opened {opened}, refused {refused}"
    );
}

/// A test path as `&str` (test paths are ASCII).
pub fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs a qemu tool with `args` split on spaces (paths must not contain spaces) and asserts
/// success; `None` when the tool is missing outside CI.
pub fn qemu_run(tool: &str, args: &str) -> Option<()> {
    let args: Vec<&str> = args.split_whitespace().collect();
    let out = qemu(tool, &args)?;
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(())
}

/// Runs qemu-io commands (each one `-c` argument) on the `format` image at `path`; each must
/// succeed.
pub fn qemu_io_on(format: &str, path: &Path, commands: &[&str]) -> Option<()> {
    let mut args: Vec<&std::ffi::OsStr> = vec!["-f".as_ref(), format.as_ref()];
    for c in commands {
        args.extend([std::ffi::OsStr::new("-c"), std::ffi::OsStr::new(c)]);
    }
    args.push(path.as_os_str());
    let out = qemu("qemu-io", &args)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("failed"),
        "qemu-io {commands:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(())
}

/// The raw bytes qemu-img reads from `path` (`extra` goes before the file name, e.g.
/// `-f vmdk` or `-l snapshot.name=s1`).
pub fn qemu_raw_of(path: &Path, extra: &str) -> Option<Vec<u8>> {
    let out = path.with_extension("expected.raw");
    if let Some(args) = encrypted::opened_with_secret(extra, path) {
        let mut convert: Vec<std::ffi::OsString> = vec!["convert".into(), "-U".into()];
        convert.extend(args);
        convert.extend(["-O".into(), "raw".into(), out.clone().into()]);
        let done = qemu("qemu-img", &convert)?;
        assert!(
            done.status.success(),
            "{}",
            String::from_utf8_lossy(&done.stderr)
        );
        let bytes = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        return Some(bytes);
    }
    qemu_run(
        "qemu-img",
        &format!(
            "convert -U {extra} -O raw {} {}",
            path_str(path),
            path_str(&out)
        ),
    )?;
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    Some(bytes)
}

/// `qemu-img check` of the `format` image at `path`: its exit status (2 for corruptions, 3
/// for leaked clusters only, 63 for a format it cannot check) and everything it printed.
pub fn qemu_check(format: &str, path: &Path) -> Option<(Option<i32>, String)> {
    let out = match encrypted::opened_with_secret(&format!("-f {format}"), path) {
        Some(args) => {
            let mut check: Vec<std::ffi::OsString> = vec!["check".into()];
            check.extend(args);
            qemu("qemu-img", &check)?
        }
        None => qemu("qemu-img", &["check", "-f", format, path_str(path)])?,
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.code(), text))
}

/// `qemu-img check` of the `format` image at `path` must pass: no corruption, no leak.
pub fn assert_qemu_check_clean(format: &str, path: &Path) {
    let Some((code, text)) = qemu_check(format, path) else {
        return;
    };
    assert!(
        code == Some(0) && !text.contains("ERROR") && !text.contains("leak"),
        "qemu-img check {}: {text}",
        path.display()
    );
}

/// `qemu-img check` of the `format` image at `path` must find no corruption: leaked clusters
/// are allowed (what a crash may leave), and so is a format qemu-img cannot check (qcow v1).
pub fn assert_qemu_check_no_errors(format: &str, path: &Path) {
    let Some((code, text)) = qemu_check(format, path) else {
        return;
    };
    let unsupported = code == Some(63) && text.contains("does not support checks");
    assert!(
        (code == Some(0) || code == Some(3) || unsupported) && !text.contains("ERROR"),
        "qemu-img check {}: {text}",
        path.display()
    );
}

/// `qemu-img compare` of the `format` image at `path` with the raw bytes `expected` must say
/// identical.
pub fn assert_qemu_compare_equal(format: &str, path: &Path, expected: &[u8]) {
    let raw = path.with_extension("expected-compare.raw");
    std::fs::write(&raw, expected).unwrap();
    let out = qemu(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            format,
            path_str(&raw),
            path_str(path),
        ],
    );
    std::fs::remove_file(&raw).unwrap();
    let Some(out) = out else {
        return;
    };
    assert!(
        out.status.success(),
        "qemu-img compare {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The bytes a string of hex digits spells (test vectors).
pub fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
