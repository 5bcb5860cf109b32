//! `imgfs overlay status|diff|discard|commit`: what the overlays of `imgfs mount --overlay DIR`
//! hold, dropping them, or writing them into their originals through the originals' own
//! drivers (allocation, write-back order and QEMU's locks as for any write).

use std::path::{Path, PathBuf};

use crate::catalog::overlay::{
    changed_ranges, overlay_paths, Origin, ORIGIN_SUFFIX, OVERLAY_SUFFIX,
};
use crate::format::links::PlainLinks;
use crate::format::{self, OpenOptions};
use crate::image::{Extent, ExtentState};

#[derive(clap::Subcommand, Debug)]
pub enum OverlayCommand {
    /// Which images have changes in DIR, how many bytes, since when.
    #[command(after_help = "Example:\n  imgfs overlay status ./changes")]
    Status {
        /// The overlay directory given to `imgfs mount --overlay`.
        dir: PathBuf,
    },
    /// The changed ranges of one image, like `qemu-img map`.
    #[command(after_help = "Example:\n  imgfs overlay diff ./changes pc1/disk.vmdk --json")]
    Diff {
        dir: PathBuf,
        /// The image's path relative to the source tree (as under the mount, without .raw).
        image: PathBuf,
        /// Print JSON: a list of {start, length, zero}.
        #[arg(long)]
        json: bool,
    },
    /// Forget the changes of one image (removes its overlay).
    #[command(after_help = "Example:\n  imgfs overlay discard ./changes pc1/disk.vmdk --yes")]
    Discard {
        dir: PathBuf,
        image: PathBuf,
        /// Really remove them.
        #[arg(long)]
        yes: bool,
    },
    /// Write the changes of one image into its original, then remove the overlay. Refused
    /// while the image is mounted.
    #[command(after_help = "Example:\n  imgfs overlay commit ./changes pc1/disk.vmdk")]
    Commit { dir: PathBuf, image: PathBuf },
}

pub fn run(command: OverlayCommand) -> Result<(), String> {
    match command {
        OverlayCommand::Status { dir } => status(&dir),
        OverlayCommand::Diff { dir, image, json } => diff(&dir, &image, json),
        OverlayCommand::Discard { dir, image, yes } => discard(&dir, &image, yes),
        OverlayCommand::Commit { dir, image } => commit(&dir, &image),
    }
}

/// The overlay and its record for `image` in `dir`, which must exist.
fn found(dir: &Path, image: &Path) -> Result<(PathBuf, PathBuf, Origin), String> {
    let (overlay, origin_path) = overlay_paths(dir, image);
    if !overlay.exists() {
        return Err(format!(
            "{} has no changes in {}",
            image.display(),
            dir.display()
        ));
    }
    let origin = Origin::read(&origin_path).map_err(|e| e.to_string())?;
    Ok((overlay, origin_path, origin))
}

fn changed_bytes(extents: &[Extent]) -> u64 {
    extents.iter().map(|e| e.len).sum()
}

/// Every overlay below `dir`, as (image relative path, overlay path).
fn overlays_below(dir: &Path) -> Vec<(PathBuf, PathBuf)> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(at) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&at) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(path);
                continue;
            }
            let suffix = format!("{OVERLAY_SUFFIX}{ORIGIN_SUFFIX}");
            let name = path.to_string_lossy();
            if let Some(stem) = name.strip_suffix(&suffix) {
                let rel = Path::new(stem).strip_prefix(dir).unwrap_or(Path::new(stem));
                found.push((
                    rel.to_path_buf(),
                    PathBuf::from(format!("{stem}{OVERLAY_SUFFIX}")),
                ));
            }
        }
    }
    found.sort();
    found
}

fn status(dir: &Path) -> Result<(), String> {
    let overlays = overlays_below(dir);
    if overlays.is_empty() {
        println!("no changes in {}", dir.display());
        return Ok(());
    }
    println!(
        "{:<40} {:>14}  {:<20}  state",
        "image", "changed bytes", "since"
    );
    for (rel, overlay) in overlays {
        let (_, _, origin) = match found(dir, &rel) {
            Ok(found) => found,
            Err(e) => {
                println!("{:<40} {:>14}  {:<20}  {e}", rel.display(), "-", "-");
                continue;
            }
        };
        let changed = changed_ranges(&overlay)
            .map(|e| changed_bytes(&e).to_string())
            .unwrap_or_else(|e| format!("({e})"));
        let state = match Origin::of(&origin.original, &origin.root, &origin.format) {
            Ok(now) => origin.mismatch(&now).unwrap_or_else(|| "ok".into()),
            Err(e) => format!("original unreadable: {e}"),
        };
        println!(
            "{:<40} {:>14}  {:<20}  {state}",
            rel.display(),
            changed,
            since(origin.created)
        );
    }
    Ok(())
}

/// A UTC date for seconds since the epoch (civil-from-days, as in the proleptic calendar).
fn since(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let rest = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60
    )
}

#[derive(serde::Serialize)]
struct Range {
    start: u64,
    length: u64,
    zero: bool,
}

fn diff(dir: &Path, image: &Path, json: bool) -> Result<(), String> {
    let (overlay, _, _) = found(dir, image)?;
    let extents = changed_ranges(&overlay).map_err(|e| e.to_string())?;
    if json {
        let ranges: Vec<Range> = extents
            .iter()
            .map(|e| Range {
                start: e.offset,
                length: e.len,
                zero: !e.state.is_data(),
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&ranges).unwrap_or_default()
        );
        return Ok(());
    }
    println!("{:<20}{:<20}changed to", "Offset", "Length");
    for e in &extents {
        let what = if !e.state.is_data() { "zeros" } else { "data" };
        println!("{:<#20x}{:<#20x}{what}", e.offset, e.len);
    }
    println!("{} bytes changed", changed_bytes(&extents));
    Ok(())
}

/// Refuses while an imgfs mount (or QEMU) has the overlay open.
fn check_not_in_use(overlay: &Path) -> Result<(), String> {
    match format::held_for_writing(overlay) {
        Ok(false) => Ok(()),
        Ok(true) => Err(format!(
            "{} is in use (mounted?): unmount first",
            overlay.display()
        )),
        Err(e) => Err(e.to_string()),
    }
}

fn remove(overlay: &Path, origin: &Path) -> Result<(), String> {
    std::fs::remove_file(overlay).map_err(|e| format!("{}: {e}", overlay.display()))?;
    std::fs::remove_file(origin).map_err(|e| format!("{}: {e}", origin.display()))
}

fn discard(dir: &Path, image: &Path, yes: bool) -> Result<(), String> {
    let (overlay, origin_path, _) = found(dir, image)?;
    if !yes {
        return Err(format!(
            "this removes the changes of {} for good: repeat with --yes",
            image.display()
        ));
    }
    check_not_in_use(&overlay)?;
    remove(&overlay, &origin_path)?;
    println!("discarded the changes of {}", image.display());
    Ok(())
}

fn commit(dir: &Path, image: &Path) -> Result<(), String> {
    let (overlay, origin_path, origin) = found(dir, image)?;
    check_not_in_use(&overlay)?;
    let now =
        Origin::of(&origin.original, &origin.root, &origin.format).map_err(|e| e.to_string())?;
    if let Some(why) = origin.mismatch(&now) {
        return Err(format!("not committed: {why}"));
    }
    let extents = changed_ranges(&overlay).map_err(|e| e.to_string())?;
    let changes = format::open_alone(&overlay).map_err(|e| e.to_string())?;
    let mut links = PlainLinks::new(&origin.root, false).map_err(|e| e.to_string())?;
    let options = OpenOptions::default();
    let target_format = commit_format(&origin.original, &origin.format)?;
    let target = format::open_probed(&origin.original, target_format, &options, &mut links)
        .map_err(|e| e.to_string())?;
    if let Some(reason) = target.read_only_reason() {
        return Err(format!(
            "{} cannot be written: {reason}",
            origin.original.display()
        ));
    }
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    for extent in &extents {
        let mut at = extent.offset;
        while at < extent.offset + extent.len {
            let len = CHUNK.min(extent.offset + extent.len - at) as usize;
            let piece = &mut buf[..len];
            match extent.state {
                ExtentState::Zero | ExtentState::StoredZeros => piece.fill(0),
                _ => changes.read_at(piece, at).map_err(|e| e.to_string())?,
            }
            target.write_at(piece, at).map_err(|e| e.to_string())?;
            at += len as u64;
        }
    }
    target.flush().map_err(|e| e.to_string())?;
    drop(target);
    remove(&overlay, &origin_path)?;
    println!(
        "committed {} bytes into {}",
        changed_bytes(&extents),
        origin.original.display()
    );
    Ok(())
}

/// The format to write the original at `path` in: what it is, which must be what was recorded
/// when the overlay was made (`recorded`); raw, which has no magic to find, only if recorded so.
fn commit_format(path: &Path, recorded: &str) -> Result<format::Format, String> {
    let probed = format::probe_file(path).map_err(|e| e.to_string())?;
    match (probed, format::Format::from_name(recorded)) {
        (Some(found), Some(want)) if found == want => Ok(found),
        (None, Some(format::Format::Raw)) => Ok(format::Format::Raw),
        (found, _) => Err(format!(
            "not committed: {} is {}, but the overlay was made over a {recorded} image",
            path.display(),
            found.map_or("no image imgfs recognises", |f| f.name())
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_writes_the_original_only_in_the_format_recorded() {
        let dir = crate::testutil::TempDir::new();
        let raw = dir.path().join("disk.dd");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        let mut qcow2 = b"QFI\xfb\x00\x00\x00\x03".to_vec();
        qcow2.resize(4096, 0);
        let fake = dir.path().join("disk.qcow2");
        std::fs::write(&fake, qcow2).unwrap();
        assert_eq!(commit_format(&raw, "raw"), Ok(format::Format::Raw));
        assert_eq!(commit_format(&fake, "qcow2"), Ok(format::Format::Qcow2));
        for (path, recorded) in [(&raw, "qcow2"), (&fake, "raw"), (&raw, "bogus")] {
            let err = commit_format(path, recorded).unwrap_err();
            assert!(err.contains("not committed"), "{err}");
        }
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(since(0), "1970-01-01 00:00");
        assert_eq!(since(1_795_000_000), "2026-11-18 11:06");
    }
}
