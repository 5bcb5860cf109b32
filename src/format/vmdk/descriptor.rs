//! The VMDK descriptor: the text that names a disk's extents, its content ID and its parent.
//! It is a file of its own (`monolithicFlat`, `twoGbMaxExtent*`, `vmfs*`, `seSparse`) or
//! embedded in a hosted sparse extent (`monolithicSparse`, `streamOptimized`).
//!
//! ```text
//! # Disk DescriptorFile                      comments start with '#'
//! version=1
//! CID=3cb07c18                               content ID, 32-bit hex, renewed on first write
//! parentCID=ffffffff                         the parent's CID (ffffffff: no parent)
//! createType="twoGbMaxExtentSparse"
//! parentFileNameHint="base.vmdk"             the parent, relative to this descriptor
//! RW 4194304 SPARSE "disk-s001.vmdk"         access, sectors, type, file name[, offset]
//! RW 4194304 FLAT "disk-flat.vmdk" 2048      FLAT: offset of the extent in the file, sectors
//! RDONLY 1024 ZERO                           ZERO extents name no file
//! ddb.adapterType = "lsilogic"               the disk database: free-form keys
//! ```
//!
//! Parsing works on bytes: file names are kept as the bytes the descriptor holds (it may be in
//! a legacy code page), everything else is ASCII. Every count is checked against hard caps, so
//! a hostile descriptor gives a clear error naming its line instead of an absurd disk.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use crate::error::{Error, Result};

pub const SECTOR_SIZE: u64 = 512;
/// Descriptor files larger than this are not descriptors (QEMU reads at most 1 MiB).
pub const MAX_DESCRIPTOR_LEN: u64 = 1 << 20;
/// More extents than this would exhaust file descriptors; a twoGbMaxExtent disk of 8 TiB has
/// 4096.
pub const MAX_EXTENTS: usize = 4096;
/// The largest virtual disk imgfs serves from a VMDK: 1 PiB (seSparse tops out at 64 TiB).
pub const MAX_DISK_SECTORS: u64 = 1 << 41;
/// What `parentCID` says when there is no parent.
pub const NO_PARENT_CID: u32 = 0xffff_ffff;

/// How an extent may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    ReadOnly,
    NoAccess,
}

impl Access {
    pub fn name(self) -> &'static str {
        match self {
            Access::ReadWrite => "RW",
            Access::ReadOnly => "RDONLY",
            Access::NoAccess => "NOACCESS",
        }
    }
}

/// How an extent stores its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentType {
    /// Hosted sparse extent (KDMV, or COWD in old descriptors).
    Sparse,
    /// Preallocated data at an offset in a plain file.
    Flat,
    /// ESXi's preallocated extent: FLAT at offset 0.
    Vmfs,
    /// ESXi's COWD delta extent.
    VmfsSparse,
    /// ESXi 6.5+ space-efficient sparse extent.
    SeSparse,
    /// Reads as zeros, names no file.
    Zero,
    /// Raw device mappings: a device, not a file; never served.
    VmfsRdm,
    VmfsRaw,
}

impl ExtentType {
    fn parse(word: &str) -> Option<ExtentType> {
        Some(match word {
            "SPARSE" => ExtentType::Sparse,
            "FLAT" => ExtentType::Flat,
            "VMFS" => ExtentType::Vmfs,
            "VMFSSPARSE" => ExtentType::VmfsSparse,
            "SESPARSE" => ExtentType::SeSparse,
            "ZERO" => ExtentType::Zero,
            "VMFSRDM" => ExtentType::VmfsRdm,
            "VMFSRAW" => ExtentType::VmfsRaw,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            ExtentType::Sparse => "SPARSE",
            ExtentType::Flat => "FLAT",
            ExtentType::Vmfs => "VMFS",
            ExtentType::VmfsSparse => "VMFSSPARSE",
            ExtentType::SeSparse => "SESPARSE",
            ExtentType::Zero => "ZERO",
            ExtentType::VmfsRdm => "VMFSRDM",
            ExtentType::VmfsRaw => "VMFSRAW",
        }
    }
}

/// One extent line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    pub access: Access,
    pub sectors: u64,
    pub kind: ExtentType,
    /// The file, as written (relative to the descriptor unless absolute); `None` for ZERO.
    pub file: Option<Vec<u8>>,
    /// For FLAT and VMFS: where the extent starts in its file, in sectors.
    pub offset: u64,
    /// 1-based line number, for messages.
    pub line: usize,
}

impl ExtentLine {
    pub fn file_name(&self) -> Option<&OsStr> {
        self.file.as_deref().map(OsStr::from_bytes)
    }
}

/// A parsed descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub version: u32,
    pub cid: u32,
    pub parent_cid: u32,
    pub create_type: String,
    pub parent_hint: Option<Vec<u8>>,
    pub extents: Vec<ExtentLine>,
    /// `ddb.*` keys (without the prefix) and values, in file order.
    pub ddb: Vec<(String, String)>,
}

impl Descriptor {
    /// Parses descriptor text; an embedded descriptor ends at its first NUL byte.
    pub fn parse(text: &[u8]) -> Result<Descriptor> {
        Self::parse_lines(text, false)
    }

    /// Parses the descriptor embedded in a sparse extent that is itself the disk, whose
    /// extent lines nothing reads: lines that are neither a key = value pair nor an extent
    /// are skipped, as QEMU skips them (qemu-img writes a file name holding a newline into
    /// the extent line as it is, cut in two).
    pub fn parse_embedded(text: &[u8]) -> Result<Descriptor> {
        Self::parse_lines(text, true)
    }

    fn parse_lines(text: &[u8], skip_bad_lines: bool) -> Result<Descriptor> {
        let text = text.split(|&b| b == 0).next().unwrap_or_default();
        if text.len() as u64 > MAX_DESCRIPTOR_LEN {
            return Err(Error::unsupported(format!(
                "the VMDK descriptor is {} bytes long, more than the {MAX_DESCRIPTOR_LEN} \
                 imgfs reads",
                text.len()
            )));
        }
        let mut version = None;
        let mut cid = None;
        let mut parent_cid = None;
        let mut create_type = None;
        let mut parent_hint = None;
        let mut extents = Vec::new();
        let mut ddb = Vec::new();
        let mut total: u64 = 0;
        for (index, raw) in text.split(|&b| b == b'\n').enumerate() {
            let line_no = index + 1;
            let line = trim(raw);
            if line.is_empty() || line.starts_with(b"#") {
                continue;
            }
            let bad =
                |what: String| Error::corrupt(format!("VMDK descriptor line {line_no}: {what}"));
            let extent = match parse_extent(line, line_no) {
                Err(what) if skip_bad_lines => {
                    log::debug!("skipping VMDK descriptor line {line_no}: {what}");
                    continue;
                }
                parsed => parsed.map_err(bad)?,
            };
            if let Some(extent) = extent {
                total = total
                    .checked_add(extent.sectors)
                    .filter(|&t| t <= MAX_DISK_SECTORS)
                    .ok_or_else(|| {
                        bad(format!(
                            "the extents add up to more than {MAX_DISK_SECTORS} sectors"
                        ))
                    })?;
                if extents.len() == MAX_EXTENTS {
                    return Err(bad(format!("more than {MAX_EXTENTS} extents")));
                }
                extents.push(extent);
                continue;
            }
            let Some(eq) = line.iter().position(|&b| b == b'=') else {
                if skip_bad_lines {
                    continue;
                }
                return Err(bad(format!(
                    "{:?} is neither a key = value pair nor an extent",
                    shown(line)
                )));
            };
            let key = String::from_utf8_lossy(trim(&line[..eq])).into_owned();
            let value = unquote(trim(&line[eq + 1..]));
            let text_value = || String::from_utf8_lossy(value).into_owned();
            match key.as_str() {
                "version" => {
                    let v = text_value();
                    version = Some(
                        v.parse::<u32>()
                            .map_err(|_| bad(format!("version {v:?} is not a number")))?,
                    );
                }
                "CID" => cid = Some(parse_cid(value).map_err(bad)?),
                "parentCID" => parent_cid = Some(parse_cid(value).map_err(bad)?),
                "createType" => create_type = Some(text_value()),
                "parentFileNameHint" => parent_hint = (!value.is_empty()).then(|| value.to_vec()),
                _ => {
                    if let Some(name) = key.strip_prefix("ddb.") {
                        ddb.push((name.to_string(), text_value()));
                    }
                }
            }
        }
        let version = version.unwrap_or(1);
        if !(1..=3).contains(&version) {
            return Err(Error::unsupported(format!(
                "VMDK descriptor version {version} is not supported (1 to 3 are)"
            )));
        }
        let cid = cid.ok_or_else(|| Error::corrupt("the VMDK descriptor has no CID"))?;
        Ok(Descriptor {
            version,
            cid,
            parent_cid: parent_cid.unwrap_or(NO_PARENT_CID),
            create_type: create_type.unwrap_or_default(),
            parent_hint,
            extents,
            ddb,
        })
    }

    /// The total size of the extents, in sectors (checked against the cap when parsed).
    pub fn sectors(&self) -> u64 {
        self.extents.iter().map(|e| e.sectors).sum()
    }

    pub fn ddb_value(&self, key: &str) -> Option<&str> {
        self.ddb
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn parent_hint_name(&self) -> Option<&OsStr> {
        self.parent_hint.as_deref().map(OsStr::from_bytes)
    }

    /// Refuses descriptors imgfs cannot serve: raw device mappings, no extents.
    pub fn check_servable(&self) -> Result<()> {
        for e in &self.extents {
            if matches!(e.kind, ExtentType::VmfsRdm | ExtentType::VmfsRaw) {
                return Err(Error::unsupported(format!(
                    "VMDK extent on line {} is a raw device mapping ({}), which imgfs does not \
                     serve",
                    e.line,
                    e.kind.name()
                )));
            }
        }
        if self.extents.is_empty() {
            return Err(Error::corrupt("the VMDK descriptor names no extents"));
        }
        Ok(())
    }
}

/// `text` with the value of its `CID` line replaced by `cid`, everything else unchanged. The
/// result is never shorter than `text`: a shorter value is padded with spaces, so a descriptor
/// rewritten in place leaves no stale bytes behind.
pub fn with_cid(text: &[u8], cid: u32) -> Result<Vec<u8>> {
    let text = text.split(|&b| b == 0).next().unwrap_or_default();
    let mut out = Vec::with_capacity(text.len() + 8);
    let mut found = false;
    let mut rest = text;
    while !rest.is_empty() {
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .map_or(rest.len(), |p| p + 1);
        let (line, tail) = rest.split_at(end);
        rest = tail;
        let body = trim(line);
        let is_cid = !found
            && body
                .iter()
                .position(|&b| b == b'=')
                .is_some_and(|eq| trim(&body[..eq]) == b"CID");
        if !is_cid {
            out.extend_from_slice(line);
            continue;
        }
        found = true;
        let mut new_line = format!("CID={cid:08x}").into_bytes();
        let old_body_len = line.len() - line_ending(line).len();
        while new_line.len() < old_body_len {
            new_line.push(b' ');
        }
        out.extend_from_slice(&new_line);
        out.extend_from_slice(line_ending(line));
    }
    if !found {
        return Err(Error::corrupt("the VMDK descriptor has no CID line"));
    }
    Ok(out)
}

fn line_ending(line: &[u8]) -> &[u8] {
    if line.ends_with(b"\r\n") {
        &line[line.len() - 2..]
    } else if line.ends_with(b"\n") {
        &line[line.len() - 1..]
    } else {
        &[]
    }
}

fn parse_cid(value: &[u8]) -> std::result::Result<u32, String> {
    let text = String::from_utf8_lossy(value);
    u32::from_str_radix(text.trim(), 16)
        .map_err(|_| format!("CID {text:?} is not a 32-bit hex number"))
}

/// An extent line, `None` when `line` does not start with an access keyword.
fn parse_extent(line: &[u8], line_no: usize) -> std::result::Result<Option<ExtentLine>, String> {
    let (first, rest) = word(line);
    let access = match first {
        b"RW" => Access::ReadWrite,
        b"RDONLY" => Access::ReadOnly,
        b"NOACCESS" => Access::NoAccess,
        _ => return Ok(None),
    };
    let (count, rest) = word(rest);
    let count = String::from_utf8_lossy(count);
    let sectors: u64 = count
        .parse()
        .map_err(|_| format!("extent size {count:?} is not a number of sectors"))?;
    if sectors == 0 || sectors > MAX_DISK_SECTORS {
        return Err(format!(
            "extent size {sectors} sectors is outside 1..={MAX_DISK_SECTORS}"
        ));
    }
    let (kind_word, rest) = word(rest);
    let kind_text = String::from_utf8_lossy(kind_word);
    let kind = ExtentType::parse(&kind_text)
        .ok_or_else(|| format!("unknown extent type {kind_text:?}"))?;
    let rest = trim(rest);
    let (file, rest) = if kind == ExtentType::Zero && rest.is_empty() {
        (None, rest)
    } else {
        let inner = rest
            .strip_prefix(b"\"")
            .ok_or_else(|| format!("the {kind_text} extent names no quoted file"))?;
        let close = inner
            .iter()
            .position(|&b| b == b'"')
            .ok_or_else(|| "the extent's file name has no closing quote".to_string())?;
        if close == 0 {
            return Err("the extent's file name is empty".into());
        }
        (Some(inner[..close].to_vec()), trim(&inner[close + 1..]))
    };
    let mut offset: u64 = 0;
    if !rest.is_empty() {
        let (number, tail) = word(rest);
        let text = String::from_utf8_lossy(number);
        if !trim(tail).is_empty() || !matches!(kind, ExtentType::Flat | ExtentType::Vmfs) {
            return Err(format!(
                "unexpected text after the extent's file name: {:?}",
                shown(rest)
            ));
        }
        offset = text
            .parse()
            .map_err(|_| format!("extent offset {text:?} is not a number of sectors"))?;
    }
    // The extent's bytes must be addressable in its file.
    offset
        .checked_add(sectors)
        .and_then(|end| end.checked_mul(SECTOR_SIZE))
        .filter(|&end| end <= i64::MAX as u64)
        .ok_or_else(|| format!("extent offset {offset} + {sectors} sectors overflows"))?;
    Ok(Some(ExtentLine {
        access,
        sectors,
        kind,
        file,
        offset,
        line: line_no,
    }))
}

/// The first whitespace-separated word of `s` and what follows it.
fn word(s: &[u8]) -> (&[u8], &[u8]) {
    let s = trim(s);
    let end = s
        .iter()
        .position(|b| b.is_ascii_whitespace())
        .unwrap_or(s.len());
    s.split_at(end)
}

fn trim(s: &[u8]) -> &[u8] {
    s.trim_ascii()
}

fn unquote(s: &[u8]) -> &[u8] {
    s.strip_prefix(b"\"")
        .and_then(|s| s.strip_suffix(b"\""))
        .unwrap_or(s)
}

fn shown(s: &[u8]) -> String {
    let text = String::from_utf8_lossy(s);
    text.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ESXI: &str = "# Disk DescriptorFile\r\n\
        version=1\r\n\
        encoding=\"UTF-8\"\r\n\
        CID=fffffffe\r\n\
        parentCID=3cb07c18\r\n\
        isNativeSnapshot=\"no\"\r\n\
        createType=\"vmfsSparse\"\r\n\
        parentFileNameHint=\"my disk.vmdk\"\r\n\
        # Extent description\r\n\
        RW 8388608 VMFSSPARSE \"my disk-000001-delta.vmdk\"\r\n\
        \r\n\
        # The Disk Data Base\r\n\
        #DDB\r\n\
        \r\n\
        ddb.adapterType = \"lsilogic\"\r\n\
        ddb.longContentID = \"5d6e1b0e0a2b9c3b1e6f3a44fffffffe\"\r\n\
        ddb.uuid = \"60 00 C2 9a 6b 49 1d 06-a3 2f 4b 40 19 2c 45 1d\"\r\n\
        ddb.virtualHWVersion = \"13\"\r\n";

    #[test]
    fn esxi_descriptor_with_crlf_parent_and_ddb_keys() {
        let d = Descriptor::parse(ESXI.as_bytes()).unwrap();
        assert_eq!(d.version, 1);
        assert_eq!(d.cid, 0xffff_fffe);
        assert_eq!(d.parent_cid, 0x3cb0_7c18);
        assert_eq!(d.create_type, "vmfsSparse");
        assert_eq!(d.parent_hint_name(), Some(OsStr::new("my disk.vmdk")));
        assert_eq!(d.extents.len(), 1);
        let e = &d.extents[0];
        assert_eq!(
            (e.access, e.sectors, e.kind),
            (Access::ReadWrite, 8388608, ExtentType::VmfsSparse)
        );
        assert_eq!(e.file_name(), Some(OsStr::new("my disk-000001-delta.vmdk")));
        assert_eq!(e.line, 10);
        assert_eq!(d.ddb_value("adapterType"), Some("lsilogic"));
        assert_eq!(d.ddb_value("virtualHWVersion"), Some("13"));
        assert_eq!(d.ddb.len(), 4);
        d.check_servable().unwrap();
    }

    #[test]
    fn every_extent_form_parses() {
        let text = b"# Disk DescriptorFile\nCID=12345678\ncreateType=\"custom\"\n\
            RW 100 FLAT \"a-flat.vmdk\" 2048\n\
            RDONLY 200 SPARSE \"b.vmdk\"\n\
            NOACCESS 300 ZERO\n\
            RW 400 VMFS \"c-flat.vmdk\"\n\
            RW 500 SESPARSE \"d-sesparse.vmdk\"\n\
            RW 600 VMFSRDM \"e-rdm.vmdk\"\n\
            ddb.geometry.heads = \"16\"\n\0\0garbage after the NUL";
        let d = Descriptor::parse(text).unwrap();
        assert_eq!(d.version, 1, "version defaults to 1");
        assert_eq!(d.parent_cid, NO_PARENT_CID);
        let kinds: Vec<_> = d
            .extents
            .iter()
            .map(|e| (e.access, e.kind, e.offset))
            .collect();
        assert_eq!(
            kinds,
            [
                (Access::ReadWrite, ExtentType::Flat, 2048),
                (Access::ReadOnly, ExtentType::Sparse, 0),
                (Access::NoAccess, ExtentType::Zero, 0),
                (Access::ReadWrite, ExtentType::Vmfs, 0),
                (Access::ReadWrite, ExtentType::SeSparse, 0),
                (Access::ReadWrite, ExtentType::VmfsRdm, 0),
            ]
        );
        assert_eq!(d.extents[2].file, None);
        assert_eq!(d.sectors(), 2100);
        let e = d.check_servable().unwrap_err();
        assert!(
            e.to_string().contains("raw device mapping (VMFSRDM)"),
            "{e}"
        );
    }

    #[test]
    fn hostile_descriptors_give_clear_errors() {
        let with = |lines: &str| {
            let text = format!("# Disk DescriptorFile\nCID=1\n{lines}\n");
            Descriptor::parse(text.as_bytes())
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        for (lines, expect) in [
            (
                "RW 99999999999999999999 FLAT \"a\" 0",
                "not a number of sectors",
            ),
            ("RW 0 FLAT \"a\" 0", "outside 1..="),
            ("RW 2199023255553 ZERO", "outside 1..="),
            ("RW 2199023255552 ZERO\nRW 1 ZERO", "add up to more than"),
            ("RW 10 FLOPPY \"a\"", "unknown extent type \"FLOPPY\""),
            ("RW 10 FLAT a.vmdk 0", "names no quoted file"),
            ("RW 10 FLAT \"a.vmdk 0", "no closing quote"),
            ("RW 10 FLAT \"\" 0", "file name is empty"),
            ("RW 10 SPARSE \"a\" 7", "unexpected text"),
            ("RW 10 FLAT \"a\" 18446744073709551615", "overflows"),
            ("RW 10 FLAT \"a\" x", "not a number of sectors"),
            ("just some words", "line 3"),
            ("parentCID=xyz", "not a 32-bit hex number"),
            ("version=9", "version 9 is not supported"),
        ] {
            let err = with(lines);
            assert!(err.contains(expect), "{lines:?}: {err}");
        }
        let err = Descriptor::parse(b"# Disk DescriptorFile\nRW 1 ZERO\n").unwrap_err();
        assert!(err.to_string().contains("no CID"), "{err}");
        let none = Descriptor::parse(b"# Disk DescriptorFile\nCID=1\n").unwrap();
        assert!(none
            .check_servable()
            .unwrap_err()
            .to_string()
            .contains("no extents"));
        let mut many = String::from("CID=1\n");
        for _ in 0..=MAX_EXTENTS {
            many.push_str("RW 1 ZERO\n");
        }
        let err = Descriptor::parse(many.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("more than 4096 extents"), "{err}");
    }

    #[test]
    fn with_cid_replaces_only_the_cid_line_and_never_shrinks() {
        let text = b"# Disk DescriptorFile\r\nversion=1\r\nCID=1a\r\nparentCID=ffffffff\r\n";
        let out = with_cid(text, 0xdead_beef).unwrap();
        assert_eq!(
            out,
            b"# Disk DescriptorFile\r\nversion=1\r\nCID=deadbeef\r\nparentCID=ffffffff\r\n"
        );
        let long = b"CID=000000000001\nparentCID=ffffffff\n";
        let out = with_cid(long, 5).unwrap();
        assert_eq!(out, b"CID=00000005    \nparentCID=ffffffff\n");
        assert_eq!(Descriptor::parse(&out).unwrap().cid, 5);
        assert_eq!(Descriptor::parse(&out).unwrap().parent_cid, NO_PARENT_CID);
        assert!(with_cid(b"parentCID=1\n", 5).is_err());
    }

    #[test]
    fn an_embedded_descriptor_skips_the_lines_it_cannot_parse() {
        let text = b"# Disk DescriptorFile\nversion=1\nCID=0000002a\nparentCID=ffffffff\n\
            createType=\"monolithicSparse\"\nRW 8192 SPARSE \"cut\nname.vmdk\"\n\
            ddb.adapterType = \"ide\"\n";
        let err = Descriptor::parse(text).unwrap_err();
        assert!(err.to_string().contains("no closing quote"), "{err}");
        let parsed = Descriptor::parse_embedded(text).unwrap();
        assert_eq!(parsed.cid, 0x2a);
        assert!(parsed.extents.is_empty());
        assert_eq!(parsed.ddb_value("adapterType"), Some("ide"));
    }
}
