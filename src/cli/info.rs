//! `imgfs info [--json] IMAGE`: what imgfs sees in one image, as text or as JSON shaped like
//! `qemu-img info --output=json` (with imgfs's extra fields).

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::daemon;
use crate::fs::core::{XATTR_OVERLAY, XATTR_PID, XATTR_READ_ONLY_REASON, XATTR_SOURCE};

use crate::format::links::PlainLinks;
use crate::format::{self, OpenOptions};
use crate::image::ImageInfo;
use crate::views::{PartitionTable, TableKind};

/// The tree an image's backing files must lie in: `root`, else the image's own directory
/// (below it, never above).
pub(super) fn root_for<'a>(path: &'a Path, root: Option<&'a Path>) -> &'a Path {
    match (root, path.parent()) {
        (Some(root), _) => root,
        (None, Some(dir)) if !dir.as_os_str().is_empty() => dir,
        (None, _) => Path::new("."),
    }
}

/// Opens the image at `path` (and its chain, inside `root`) for inspection: no locks, no writes.
/// A file of no format is a raw disk, as for qemu-img (and as imgfs serves one named as the
/// source of a mount).
pub(super) fn open_for_inspection(
    path: &Path,
    root: &Path,
) -> Result<std::sync::Arc<dyn crate::image::Image>, String> {
    let mut links = PlainLinks::new(root, true).map_err(|e| e.to_string())?;
    let options = OpenOptions {
        read_only: true,
        inspect: true,
        reason: None,
    };
    let format = format::probe_file(path)
        .map_err(|e| e.with_path(path).to_string())?
        .unwrap_or(format::Format::Raw);
    format::open_probed(path, format, &options, &mut links).map_err(|e| e.to_string())
}

pub fn run(
    path: &Path,
    root: Option<&Path>,
    overlay: Option<&Path>,
    json: bool,
) -> Result<(), String> {
    // As `qemu-img info` does: an encrypted image whose key is not given shows its metadata.
    crate::meta::keyring::inspect_only();
    // A raw file of an imgfs mount stands for its image: show that one, with the daemon's
    // reason it is read-only now (a failed write-back, a backing file's role) if it is, and
    // what the mount's overlay keeps for it.
    let served = served_image(path);
    let (path, root, overlay) = match &served {
        Some(served) => (
            served.source.as_path(),
            root.or(served.root.as_deref()),
            overlay.or(served.overlay.as_deref()),
        ),
        None => (path, root, overlay),
    };
    let root = root_for(path, root);
    let image = open_for_inspection(path, root)?;
    let mut info = image.info();
    info.read_only_reason = match &served {
        Some(served) => served.read_only_reason.clone(),
        // `info` opens read-only by design: only the image's own reasons are worth showing.
        None => format::inherent_read_only_reason(info.read_only_reason),
    };
    if let Some(dir) = overlay {
        info.details
            .push(("overlay", overlay_state(dir, root, path)));
    }
    let disk_size = std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0);
    let name = path.display().to_string();
    let table = match crate::views::read_table(image.as_ref()) {
        Ok(table) => table,
        Err(e) => {
            eprintln!("imgfs: the partition table is not usable: {e}");
            None
        }
    };
    if json {
        println!("{}", to_json(&name, disk_size, &info, table.as_ref()));
    } else {
        print!("{}", to_text(&name, disk_size, &info, table.as_ref()));
    }
    Ok(())
}

/// What a running daemon says about the raw file at `path` of its mount.
struct ServedImage {
    /// The image file it shows.
    source: PathBuf,
    /// The source tree of the mount, where the image's backing files must lie.
    root: Option<PathBuf>,
    /// The mount's overlay directory (`--overlay`).
    overlay: Option<PathBuf>,
    read_only_reason: Option<String>,
}

/// The image the raw file at `path` shows, if `path` is a raw file of an imgfs mount.
fn served_image(path: &Path) -> Option<ServedImage> {
    let xattr_path = |path: &Path, name| {
        daemon::getxattr(path, name)
            .ok()
            .map(|bytes| PathBuf::from(OsString::from_vec(bytes)))
    };
    if !path.is_file() {
        return None;
    }
    let source = xattr_path(path, XATTR_SOURCE)?;
    let read_only_reason = daemon::getxattr(path, XATTR_READ_ONLY_REASON)
        .ok()
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
    // The mount's root is the directory that answers with the daemon's pid.
    let absolute = std::fs::canonicalize(path).ok()?;
    let mount = absolute
        .ancestors()
        .skip(1)
        .find(|dir| daemon::getxattr(dir, XATTR_PID).is_ok());
    Some(ServedImage {
        source,
        root: mount.and_then(|mnt| xattr_path(mnt, XATTR_SOURCE)),
        overlay: mount.and_then(|mnt| xattr_path(mnt, XATTR_OVERLAY)),
        read_only_reason,
    })
}

/// What the overlay directory `dir` keeps for the image at `path` (below `root`).
fn overlay_state(dir: &Path, root: &Path, path: &Path) -> String {
    let canonical = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let image = canonical(path);
    let rel = image
        .strip_prefix(canonical(root))
        .unwrap_or(&image)
        .to_path_buf();
    let (overlay, _) = crate::catalog::overlay::overlay_paths(dir, &rel);
    if !overlay.exists() {
        return "none (no changes)".into();
    }
    match crate::catalog::overlay::changed_ranges(&overlay) {
        Ok(changed) => format!(
            "{}, {} bytes changed",
            overlay.display(),
            changed.iter().map(|e| e.len).sum::<u64>()
        ),
        Err(e) => format!("{}: {e}", overlay.display()),
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.3} {}", UNITS[unit]).replace(".000 ", " ")
    }
}

fn table_kind(table: &PartitionTable) -> &'static str {
    match table.kind {
        TableKind::Mbr => "mbr",
        TableKind::Gpt => "gpt",
    }
}

fn to_text(name: &str, disk_size: u64, info: &ImageInfo, table: Option<&PartitionTable>) -> String {
    let mut out = format!("image: {name}\nfile format: {}\n", info.format);
    if !info.subformat.is_empty() {
        out += &format!("subformat: {}\n", info.subformat);
    }
    out += &format!(
        "virtual size: {} ({} bytes)\n",
        human(info.virtual_size),
        info.virtual_size
    );
    out += &format!("disk size: {}\n", human(disk_size));
    if let Some(cluster) = info.cluster_size {
        out += &format!("cluster_size: {cluster}\n");
    }
    out += &format!(
        "allocated: {} ({} bytes)\n",
        human(info.allocated_bytes),
        info.allocated_bytes
    );
    match &info.read_only_reason {
        Some(reason) => out += &format!("read-only: {reason}\n"),
        None => out += "read-only: no\n",
    }
    if !info.details.is_empty() {
        out += "Format specific information:\n";
        for (key, value) in &info.details {
            out += &format!("    {key}: {value}\n");
        }
    }
    if let Some(table) = table {
        out += &format!("Partitions ({}):\n", table_kind(table));
        for p in &table.partitions {
            out += &format!(
                "    p{}: {} at offset {} ({} bytes), type {}",
                p.number,
                human(p.len),
                p.start,
                p.len,
                p.kind
            );
            if let Some(name) = &p.name {
                out += &format!(", name {name:?}");
            }
            out += "\n";
        }
        if let Some(note) = &table.note {
            out += &format!("    note: {note}\n");
        }
    }
    out
}

/// `imgfs info --json`: the fields of `qemu-img info --output=json`, and imgfs's own.
#[derive(serde::Serialize)]
#[serde(rename_all = "kebab-case")]
struct InfoJson<'a> {
    filename: &'a str,
    format: &'a str,
    virtual_size: u64,
    actual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_size: Option<u64>,
    allocated_size: u64,
    subformat: &'a str,
    read_only_reason: Option<&'a str>,
    format_specific: FormatSpecific<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    partitions: Option<PartitionsJson<'a>>,
}

#[derive(serde::Serialize)]
struct FormatSpecific<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    data: serde_json::Map<String, serde_json::Value>,
}

#[derive(serde::Serialize)]
struct PartitionsJson<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    entries: Vec<PartitionJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<&'a str>,
}

#[derive(serde::Serialize)]
struct PartitionJson<'a> {
    number: u32,
    start: u64,
    length: u64,
    #[serde(rename = "type")]
    kind: &'a str,
    name: Option<&'a str>,
}

fn to_json(name: &str, disk_size: u64, info: &ImageInfo, table: Option<&PartitionTable>) -> String {
    let data = info
        .details
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone())))
        .collect();
    let json = InfoJson {
        filename: name,
        format: info.format,
        virtual_size: info.virtual_size,
        actual_size: disk_size,
        cluster_size: info.cluster_size,
        allocated_size: info.allocated_bytes,
        subformat: &info.subformat,
        read_only_reason: info.read_only_reason.as_deref(),
        format_specific: FormatSpecific {
            kind: info.format,
            data,
        },
        partitions: table.map(|table| PartitionsJson {
            kind: table_kind(table),
            entries: table
                .partitions
                .iter()
                .map(|p| PartitionJson {
                    number: p.number,
                    start: p.start,
                    length: p.len,
                    kind: &p.kind,
                    name: p.name.as_deref(),
                })
                .collect(),
            note: table.note.as_deref(),
        }),
    };
    // Serialising plain strings and numbers cannot fail.
    serde_json::to_string_pretty(&json).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ImageInfo {
        ImageInfo {
            format: "vdi",
            subformat: "dynamic".into(),
            virtual_size: 10 << 20,
            cluster_size: Some(1 << 20),
            allocated_bytes: 2 << 20,
            read_only_reason: Some("a \"quoted\"\nreason".into()),
            details: vec![("uuid", "abc".into())],
        }
    }

    #[test]
    fn json_is_escaped_and_carries_qemu_field_names() {
        let json = to_json("d\\isk.vdi", 4096, &sample(), None);
        assert!(json.contains("\"virtual-size\": 10485760"), "{json}");
        assert!(json.contains("\"filename\": \"d\\\\isk.vdi\""), "{json}");
        assert!(
            json.contains("\"read-only-reason\": \"a \\\"quoted\\\"\\nreason\""),
            "{json}"
        );
        assert!(json.contains("\"uuid\": \"abc\""), "{json}");
        let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed["format-specific"]["data"]["uuid"], "abc");
        assert_eq!(parsed["cluster-size"], 1 << 20);
    }

    #[test]
    fn text_shows_sizes_humanly() {
        let text = to_text("disk.vdi", 1536, &sample(), None);
        assert!(
            text.contains("virtual size: 10 MiB (10485760 bytes)"),
            "{text}"
        );
        assert!(text.contains("disk size: 1.500 KiB"), "{text}");
        assert!(text.contains("    uuid: abc"), "{text}");
    }

    #[test]
    fn partitions_are_shown_in_text_and_json() {
        use crate::views::Partition;
        let table = PartitionTable {
            kind: TableKind::Gpt,
            partitions: vec![Partition {
                number: 2,
                start: 1 << 20,
                len: 4 << 20,
                kind: "0fc63daf-8483-4772-8e79-3d69d8477de4".into(),
                name: Some("root".into()),
            }],
            note: None,
        };
        let text = to_text("disk.vdi", 0, &sample(), Some(&table));
        assert!(text.contains("Partitions (gpt):"), "{text}");
        assert!(
            text.contains("p2: 4 MiB at offset 1048576 (4194304 bytes)"),
            "{text}"
        );
        assert!(text.contains("name \"root\""), "{text}");
        let json = to_json("disk.vdi", 0, &sample(), Some(&table));
        let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
        let entry = &parsed["partitions"]["entries"][0];
        assert_eq!(
            (entry["number"].clone(), entry["start"].clone()),
            (2.into(), (1 << 20).into())
        );
        assert!(json.contains("\"name\": \"root\""), "{json}");
    }
}
