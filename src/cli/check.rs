//! `imgfs check [--json] [--repair leaks|all] IMAGE`: the metadata consistency check of
//! `format::check`, printed the way `qemu-img check` prints it (findings on stderr, the
//! summary or `--output=json`'s JSON on stdout) and ending with its exit codes: 0 clean,
//! 1 the check failed (or the image could not be opened), 2 corruptions, 3 leaks only.
//! qemu-img's 63 ("this format does not support checks") is never needed: every format imgfs
//! serves has a check.

use std::cell::Cell;
use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use super::info::root_for;
use crate::format::check::{self, CheckReport, Repair};

/// The progress line appears only for checks that take longer than this.
const PROGRESS_AFTER: Duration = Duration::from_secs(1);

/// What `--repair` accepts, as `qemu-img check -r` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RepairArg {
    /// Give back leaked clusters (qcow2), correct blocks_allocated (VDI), replay a VHDX's
    /// dirty log.
    Leaks,
    /// Also rebuild qcow2 refcounts that are too low and rewrite a damaged VHD footer copy.
    All,
}

/// `qemu-img check --output=json`'s object: zero counts are left out, as qemu-img does.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
struct CheckJson<'a> {
    filename: &'a str,
    format: &'a str,
    check_errors: u64,
    #[serde(skip_serializing_if = "is_zero")]
    image_end_offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    corruptions: u64,
    #[serde(skip_serializing_if = "is_zero")]
    leaks: u64,
    #[serde(skip_serializing_if = "is_zero")]
    corruptions_fixed: u64,
    #[serde(skip_serializing_if = "is_zero")]
    leaks_fixed: u64,
    #[serde(skip_serializing_if = "is_zero")]
    total_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    allocated_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    fragmented_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    compressed_clusters: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Runs the check and returns the process exit code.
pub fn run(path: &Path, root: Option<&Path>, repair: Option<RepairArg>, json: bool) -> i32 {
    // Metadata only: an encrypted image needs no key for it.
    crate::meta::keyring::inspect_only();
    let repair = repair.map(|r| match r {
        RepairArg::Leaks => Repair::Leaks,
        RepairArg::All => Repair::All,
    });
    // The drivers' info lines at open ("refcounts are dirty; they will be rebuilt before a
    // write") speak of serving the image, not of checking it; warnings still show.
    if std::env::var_os("RUST_LOG").is_none() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    let progress = ProgressLine::new();
    let result = check::check(path, root_for(path, root), repair, &|done, total| {
        progress.show(done, total)
    });
    progress.clear();
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            // Like qemu-img's "Could not open": an image whose header or tables cannot even
            // be read, or that uses a feature imgfs does not implement.
            eprintln!("imgfs: {e}");
            return 1;
        }
    };
    for line in &report.messages {
        eprintln!("{line}");
    }
    for why in &report.not_repaired {
        eprintln!("imgfs: not repaired: {why}");
    }
    let name = path.display().to_string();
    if json {
        match json_text(&to_json(&name, &report)) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("imgfs: {e}");
                return 1;
            }
        }
    } else {
        print!("{}", to_text(&report));
    }
    report.exit_code()
}

fn to_json<'a>(name: &'a str, r: &'a CheckReport) -> CheckJson<'a> {
    CheckJson {
        filename: name,
        format: r.format,
        check_errors: r.check_errors,
        image_end_offset: r.image_end_offset.unwrap_or(0),
        corruptions: r.corruptions,
        leaks: r.leaks,
        corruptions_fixed: r.corruptions_fixed,
        leaks_fixed: r.leaks_fixed,
        total_clusters: r.total_clusters.unwrap_or(0),
        allocated_clusters: r.allocated_clusters.unwrap_or(0),
        fragmented_clusters: r.fragmented_clusters.unwrap_or(0),
        compressed_clusters: r.compressed_clusters.unwrap_or(0),
    }
}

/// The JSON text, indented by four spaces as qemu-img indents it.
fn json_text(value: &CheckJson) -> Result<String, String> {
    use serde::Serialize;
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    value
        .serialize(&mut serializer)
        .map_err(|e| e.to_string())?;
    String::from_utf8(out).map_err(|e| e.to_string())
}

/// The summary `qemu-img check` prints, word for word.
fn to_text(r: &CheckReport) -> String {
    let mut out = String::new();
    if r.leaks_fixed > 0 || r.corruptions_fixed > 0 {
        out += &format!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked \
             clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
            r.leaks_fixed, r.corruptions_fixed
        );
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        out += "No errors were found on the image.\n";
    } else {
        if r.corruptions > 0 {
            out += &format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further \
                 writes to the image may corrupt it.\n",
                r.corruptions
            );
        }
        if r.leaks > 0 {
            out += &format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk \
                 space, but no harm to data.\n",
                r.leaks
            );
        }
        if r.check_errors > 0 {
            out += &format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            );
        }
    }
    let total = r.total_clusters.unwrap_or(0);
    let allocated = r.allocated_clusters.unwrap_or(0);
    if total > 0 && allocated > 0 {
        let pct = |n: u64, of: u64| n as f64 * 100.0 / of as f64;
        out += &format!(
            "{allocated}/{total} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed \
             clusters\n",
            pct(allocated, total),
            pct(r.fragmented_clusters.unwrap_or(0), allocated),
            pct(r.compressed_clusters.unwrap_or(0), allocated),
        );
    }
    if let Some(end) = r.image_end_offset.filter(|&e| e > 0) {
        out += &format!("Image end offset: {end}\n");
    }
    out
}

/// A percentage on stderr, rewritten in place, for checks that outlast `PROGRESS_AFTER` on a
/// terminal; nothing otherwise, so scripts and pipes see only the report.
struct ProgressLine {
    start: Instant,
    enabled: bool,
    shown: Cell<Option<u64>>,
}

impl ProgressLine {
    fn new() -> Self {
        ProgressLine {
            start: Instant::now(),
            enabled: std::io::stderr().is_terminal(),
            shown: Cell::new(None),
        }
    }

    fn show(&self, done: u64, total: u64) {
        if !self.enabled || total == 0 || self.start.elapsed() < PROGRESS_AFTER {
            return;
        }
        let tenths = (u128::from(done.min(total)) * 1000 / u128::from(total)) as u64;
        if self.shown.get() == Some(tenths) {
            return;
        }
        self.shown.set(Some(tenths));
        eprint!("\r    ({}.{}/100%)", tenths / 10, tenths % 10);
    }

    fn clear(&self) {
        if self.shown.get().is_some() {
            eprint!("\r{:20}\r", "");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Format;

    #[test]
    fn text_matches_qemu_img_for_leaks_and_corruptions() {
        let mut r = CheckReport::new(Format::Qcow2);
        assert_eq!(to_text(&r), "No errors were found on the image.\n");
        r.leak("Leaked cluster 21 refcount=1 reference=0");
        r.total_clusters = Some(1024);
        r.allocated_clusters = Some(16);
        r.image_end_offset = Some(1441792);
        assert_eq!(
            to_text(&r),
            "\n1 leaked clusters were found on the image.\nThis means waste of disk space, but \
             no harm to data.\n16/1024 = 1.56% allocated, 0.00% fragmented, 0.00% compressed \
             clusters\nImage end offset: 1441792\n"
        );
        r.corruption("ERROR cluster 6 refcount=0 reference=1");
        assert!(to_text(&r).starts_with(
            "\n1 errors were found on the image.\nData may be corrupted, or further writes to \
             the image may corrupt it.\n\n1 leaked"
        ));
    }

    #[test]
    fn json_leaves_out_zero_counts_like_qemu_img() {
        let mut r = CheckReport::new(Format::Vdi);
        let text = serde_json::to_string(&to_json("a.vdi", &r)).unwrap();
        assert_eq!(
            text,
            r#"{"filename":"a.vdi","format":"vdi","check-errors":0}"#
        );
        r.leaks_fixed = 1;
        r.total_clusters = Some(8);
        let value = serde_json::to_value(to_json("a.vdi", &r)).unwrap();
        assert_eq!(value["leaks-fixed"], 1);
        assert_eq!(value["total-clusters"], 8);
        assert!(value.get("leaks").is_none());
        let text = json_text(&to_json("a.vdi", &r)).unwrap();
        assert!(
            text.starts_with("{\n    \"filename\": \"a.vdi\",\n"),
            "{text}"
        );
    }
}
