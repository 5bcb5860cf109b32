//! `imgfs info [--json] IMAGE`: what imgfs sees in one image, as text or as JSON shaped like
//! `qemu-img info --output=json` (with imgfs's extra fields).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::format::links::PlainLinks;
use crate::format::{self, OpenOptions};
use crate::image::ImageInfo;
use crate::views::{PartitionTable, TableKind};

pub fn run(path: &Path, root: Option<&Path>, json: bool) -> Result<(), String> {
    // Backing files must lie in `root`: by default next to the image or below, never above.
    let root = match (root, path.parent()) {
        (Some(root), _) => root,
        (None, Some(dir)) if !dir.as_os_str().is_empty() => dir,
        (None, _) => Path::new("."),
    };
    let mut links = PlainLinks::new(root, true).map_err(|e| e.to_string())?;
    let options = OpenOptions {
        read_only: true,
        inspect: true,
        reason: None,
    };
    let image = format::open(path, &options, &mut links).map_err(|e| e.to_string())?;
    let mut info = image.info();
    // `info` opens read-only by design: only the image's own reasons are worth showing.
    info.read_only_reason = format::inherent_read_only_reason(info.read_only_reason);
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

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn to_json(name: &str, disk_size: u64, info: &ImageInfo, table: Option<&PartitionTable>) -> String {
    let mut fields = vec![
        format!("\"filename\": {}", json_string(name)),
        format!("\"format\": {}", json_string(info.format)),
        format!("\"virtual-size\": {}", info.virtual_size),
        format!("\"actual-size\": {disk_size}"),
    ];
    if let Some(cluster) = info.cluster_size {
        fields.push(format!("\"cluster-size\": {cluster}"));
    }
    fields.push(format!("\"allocated-size\": {}", info.allocated_bytes));
    fields.push(format!("\"subformat\": {}", json_string(&info.subformat)));
    let reason = info
        .read_only_reason
        .as_deref()
        .map_or("null".to_string(), json_string);
    fields.push(format!("\"read-only-reason\": {reason}"));
    let details: Vec<String> = info
        .details
        .iter()
        .map(|(k, v)| format!("            {}: {}", json_string(k), json_string(v)))
        .collect();
    fields.push(format!(
        "\"format-specific\": {{\n        \"type\": {},\n        \"data\": {{\n{}\n        }}\n    }}",
        json_string(info.format),
        details.join(",\n")
    ));
    if let Some(table) = table {
        let parts: Vec<String> = table
            .partitions
            .iter()
            .map(|p| {
                let name = p.name.as_deref().map_or("null".to_string(), json_string);
                format!(
                    "{{\"number\": {}, \"start\": {}, \"length\": {}, \"type\": {}, \"name\": {name}}}",
                    p.number,
                    p.start,
                    p.len,
                    json_string(&p.kind)
                )
            })
            .collect();
        fields.push(format!(
            "\"partitions\": {{\"type\": \"{}\", \"entries\": [{}]}}",
            table_kind(table),
            parts.join(", ")
        ));
    }
    format!("{{\n    {}\n}}", fields.join(",\n    "))
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
        assert_eq!(json.matches('{').count(), json.matches('}').count());
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
        assert!(json.contains("\"number\": 2, \"start\": 1048576"), "{json}");
        assert!(json.contains("\"name\": \"root\""), "{json}");
    }
}
