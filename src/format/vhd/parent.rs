//! Finding the parent of a differencing VHD. The child names it three ways: parent locators
//! with a relative Windows path (W2ru) and an absolute one (W2ku), and the parent's UTF-16 name
//! in the dynamic header. They are tried in that order: the relative path next to the child,
//! then the file name of the absolute path next to the child (images copied off a Windows host
//! keep their names, not their drive letters), then the header's name. Every candidate must lie
//! inside the source tree (`links::resolve`), and the first whose footer carries the child's
//! parent UUID is the parent; a different time stamp is only logged (copying a file changes
//! the time stamp tools record, not the data).

use std::path::Path;
use std::time::UNIX_EPOCH;

use super::footer::{timestamp_text, vhd_time, Footer, FOOTER_LEN};
use super::header::{W2KU, W2RU};
use crate::error::{Error, Result};
use crate::format::backing::Backing;
use crate::format::links::{self, Chain, Links};
use crate::format::Format;
use crate::host::HostFile;

/// Who a differencing disk's parent is and where the child says to look for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentRef {
    pub uuid: [u8; 16],
    pub timestamp: u32,
    /// The name in the dynamic header.
    pub unicode_name: String,
    /// Each locator: its platform code and its path, or why it cannot be used.
    pub locators: Vec<(String, std::result::Result<String, String>)>,
}

impl ParentRef {
    /// The names to try, relative to the child's directory, in order, without repeats.
    pub fn candidates(&self) -> Vec<String> {
        let code = |c: [u8; 4]| c.escape_ascii().to_string();
        let paths = |wanted: [u8; 4]| {
            self.locators
                .iter()
                .filter(move |(c, _)| *c == code(wanted))
                .filter_map(|(_, path)| path.as_ref().ok())
        };
        let mut names: Vec<String> = Vec::new();
        names.extend(paths(W2RU).filter_map(|p| relative_name(p)));
        names.extend(paths(W2KU).filter_map(|p| file_name(p)));
        names.extend(file_name(&self.unicode_name));
        let mut seen = Vec::new();
        names.retain(|n| {
            let new = !seen.contains(n);
            seen.push(n.clone());
            new
        });
        names
    }
}

/// A relative Windows path (`.\sub\base.vhd`, `..\base.vhd`) as a relative Unix one.
fn relative_name(path: &str) -> Option<String> {
    let parts: Vec<&str> = path
        .split(['\\', '/'])
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    // A drive or UNC prefix makes it no relative path.
    if parts.is_empty() || parts[0].contains(':') || path.starts_with(['\\', '/']) {
        return None;
    }
    Some(parts.join("/"))
}

/// The last component of a Windows (or Unix) path.
fn file_name(path: &str) -> Option<String> {
    path.rsplit(['\\', '/'])
        .next()
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .map(str::to_string)
}

/// The footer of the VHD in `file`: at its end, or (a dynamic disk whose last footer is
/// damaged) its copy at offset 0.
pub fn footer_of(file: &HostFile) -> Result<Footer> {
    let len = file.len()?;
    let mut raw = [0u8; FOOTER_LEN];
    if len >= FOOTER_LEN as u64 {
        file.read_exact_at(&mut raw, len - FOOTER_LEN as u64)?;
        if let Ok(footer) = Footer::parse(&raw) {
            return Ok(footer);
        }
    }
    file.read_exact_at(&mut raw, 0)?;
    Footer::parse(&raw).map_err(|e| e.context("no valid VHD footer"))
}

/// Finds and opens the parent of the differencing image at `chain.parent_path()` (see the
/// module doc), through `links` so the catalog shares it read-only.
pub fn open_parent(parent: &ParentRef, chain: &Chain, links: &mut dyn Links) -> Result<Backing> {
    let mut tried = Vec::new();
    for name in parent.candidates() {
        let path = match links::resolve(links.root(), chain.parent_path(), name.as_ref(), "parent")
        {
            Ok(path) => path,
            Err(e) => {
                tried.push(e.to_string());
                continue;
            }
        };
        let file = HostFile::open(&path, false).map_err(|e| e.with_path(&path))?;
        let footer = match footer_of(&file) {
            Ok(footer) => footer,
            Err(e) => {
                tried.push(e.with_path(&path).to_string());
                continue;
            }
        };
        if footer.unique_id != parent.uuid {
            tried.push(format!(
                "{} has UUID {}, the child's parent UUID is {}",
                path.display(),
                uuid::Uuid::from_bytes(footer.unique_id),
                uuid::Uuid::from_bytes(parent.uuid)
            ));
            continue;
        }
        check_timestamp(parent.timestamp, &footer, &file, &path, chain.parent_path());
        drop(file);
        let image = links.open_backing(&path, Some(Format::Vhd), chain)?;
        return Ok(Backing::new(image, &path));
    }
    if tried.is_empty() {
        tried.push("it names no parent file imgfs can look for".into());
    }
    Err(Error::corrupt(format!(
        "the parent of this differencing image was not found: {}",
        tried.join("; ")
    )))
}

/// Logs when the child's parent time stamp is neither the parent's footer time stamp nor its
/// file's modification time (what Hyper-V records): the parent may have changed since.
fn check_timestamp(expected: u32, footer: &Footer, file: &HostFile, path: &Path, child: &Path) {
    let modified = file
        .metadata()
        .ok()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| vhd_time(d.as_secs()));
    if expected == footer.timestamp || Some(expected) == modified {
        return;
    }
    log::info!(
        "{}: its parent time stamp ({}) is neither the parent {}'s own ({}) nor its file's \
         modification time; the parent may have been written since the child was made",
        child.display(),
        timestamp_text(expected),
        path.display(),
        timestamp_text(footer.timestamp)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parent_ref(locators: &[(&str, &str)], name: &str) -> ParentRef {
        ParentRef {
            uuid: [1; 16],
            timestamp: 0,
            unicode_name: name.into(),
            locators: locators
                .iter()
                .map(|(c, p)| (c.to_string(), Ok(p.to_string())))
                .collect(),
        }
    }

    #[test]
    fn candidates_come_relative_first_then_file_names_without_repeats() {
        let p = parent_ref(
            &[
                ("W2ku", "C:\\images\\base.vhd"),
                ("W2ru", ".\\sub\\..\\base.vhd"),
                ("Mac ", "ignored"),
            ],
            "other.vhd",
        );
        assert_eq!(p.candidates(), ["sub/../base.vhd", "base.vhd", "other.vhd"]);
        let p = parent_ref(
            &[("W2ru", "C:\\x.vhd"), ("W2ku", "\\\\server\\share\\")],
            "",
        );
        assert!(p.candidates().is_empty(), "{:?}", p.candidates());
        let p = parent_ref(
            &[("W2ru", "..\\base.vhd"), ("W2ku", "D:\\base.vhd")],
            "base.vhd",
        );
        assert_eq!(p.candidates(), ["../base.vhd", "base.vhd"]);
        let mut p = parent_ref(&[], "C:\\vms\\disk.vhd");
        p.locators
            .push(("W2ru".into(), Err("outside the file".into())));
        assert_eq!(p.candidates(), ["disk.vhd"]);
    }
}
