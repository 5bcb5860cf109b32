//! The files an image points at: backing files and external data files. Their names are
//! resolved relative to the image, must stay inside the source tree, and backing chains are
//! bounded in depth and checked for loops before anything below is opened.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Format;
use crate::error::{Error, ErrorKind, Result};
use crate::image::Image;

/// How many images a chain may hold below the top one (QEMU has no fixed limit; 64 is far
/// beyond real chains and keeps a hostile chain from exhausting memory or file descriptors).
pub const MAX_CHAIN_DEPTH: usize = 64;

/// Opens the backing files an image needs. The catalog implements it to share one read-only
/// instance of a backing file between every image above it and its own raw file;
/// `PlainLinks` opens a fresh instance each time.
pub trait Links {
    /// The directory that backing and data files must stay inside (canonical).
    fn root(&self) -> &Path;

    /// The image at `path` (canonical, inside the root), read-only, to serve as a backing file
    /// of the images in `chain`. `format` is the format the image above records for it; `None`
    /// means probe it (and fall back to raw, as QEMU does).
    fn open_backing(
        &mut self,
        path: &Path,
        format: Option<Format>,
        chain: &Chain,
    ) -> Result<Arc<dyn Image>>;
}

/// Opens backing files without sharing, for `imgfs info` and tests.
pub struct PlainLinks {
    root: PathBuf,
    inspect: bool,
}

impl PlainLinks {
    /// Links confined to `root`; `inspect` opens backing files without locks, as `imgfs info`.
    pub fn new(root: &Path, inspect: bool) -> Result<Self> {
        let root = root
            .canonicalize()
            .map_err(|e| Error::io("resolve the source tree", e).with_path(root))?;
        Ok(PlainLinks { root, inspect })
    }
}

impl Links for PlainLinks {
    fn root(&self) -> &Path {
        &self.root
    }

    fn open_backing(
        &mut self,
        path: &Path,
        format: Option<Format>,
        chain: &Chain,
    ) -> Result<Arc<dyn Image>> {
        let inspect = self.inspect;
        super::open_backing_file(path, format, chain, self, inspect)
    }
}

/// The images above the one being opened, top first, as canonical paths.
#[derive(Debug, Clone)]
pub struct Chain {
    above: Vec<PathBuf>,
}

impl Chain {
    /// The chain of a top image (nothing above it yet).
    pub fn top(path: &Path) -> Self {
        Chain {
            above: vec![path.to_path_buf()],
        }
    }

    /// The chain one level further down, for opening `path` below every image in `self`;
    /// refuses loops and chains deeper than `MAX_CHAIN_DEPTH`.
    pub fn below(&self, path: &Path) -> Result<Chain> {
        if let Some(at) = self.above.iter().position(|p| p == path) {
            let names: Vec<String> = self.above[at..]
                .iter()
                .chain(std::iter::once(&path.to_path_buf()))
                .map(|p| p.display().to_string())
                .collect();
            return Err(Error::corrupt(format!(
                "the backing chain loops: {}",
                names.join(" -> ")
            )));
        }
        if self.above.len() > MAX_CHAIN_DEPTH {
            return Err(Error::unsupported(format!(
                "the backing chain is deeper than {MAX_CHAIN_DEPTH} images"
            )));
        }
        let mut above = self.above.clone();
        above.push(path.to_path_buf());
        Ok(Chain { above })
    }

    /// The top image's path.
    pub fn top_path(&self) -> &Path {
        self.above
            .first()
            .map(PathBuf::as_path)
            .unwrap_or(Path::new(""))
    }

    /// The image directly above the one being opened.
    pub fn parent_path(&self) -> &Path {
        self.above
            .last()
            .map(PathBuf::as_path)
            .unwrap_or(Path::new(""))
    }
}

/// Resolves `name`, which the image at `image` records for a `what` (e.g. "backing file"),
/// to a canonical path inside `root`. Relative names are relative to the image's directory,
/// as in QEMU; symbolic links are resolved before the check, so none can lead outside.
pub fn resolve(root: &Path, image: &Path, name: &OsStr, what: &str) -> Result<PathBuf> {
    let bytes = name.as_bytes();
    if bytes.is_empty() {
        return Err(Error::corrupt(format!("the {what} name is empty")));
    }
    if bytes.starts_with(b"json:") {
        return Err(Error::unsupported(format!(
            "the {what} is given as a json: specification, which imgfs does not open"
        )));
    }
    let name = Path::new(OsStr::from_bytes(
        bytes.strip_prefix(b"file:").unwrap_or(bytes),
    ));
    let joined = match image.parent() {
        Some(dir) if name.is_relative() => dir.join(name),
        _ => name.to_path_buf(),
    };
    let resolved = joined.canonicalize().map_err(|e| {
        let message = if e.kind() == std::io::ErrorKind::NotFound {
            format!("the {what} {} does not exist", joined.display())
        } else {
            format!("cannot resolve the {what} {}: {e}", joined.display())
        };
        Error::new(ErrorKind::Corrupt, message)
    })?;
    if !resolved.starts_with(root) {
        return Err(Error::out_of_range(format!(
            "the {what} {} is outside the source tree {}",
            resolved.display(),
            root.display()
        )));
    }
    if !resolved.is_file() {
        return Err(Error::corrupt(format!(
            "the {what} {} is not a regular file",
            resolved.display()
        )));
    }
    Ok(resolved)
}

/// The format a backing-format field names (`qemu-img create -F`).
pub fn format_named(name: &str) -> Result<Format> {
    match name {
        "raw" | "file" => Ok(Format::Raw),
        "vdi" => Ok(Format::Vdi),
        "qcow" => Ok(Format::Qcow),
        "qcow2" => Ok(Format::Qcow2),
        "vhdx" => Ok(Format::Vhdx),
        "vpc" | "vhd" => Ok(Format::Vhd),
        "vmdk" => Ok(Format::Vmdk),
        other => Err(Error::unsupported(format!(
            "backing format {other:?} is not one imgfs reads"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    fn tree() -> (TempDir, PathBuf) {
        let dir = TempDir::new();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("base.img"), b"x").unwrap();
        std::fs::write(root.join("sub/top.img"), b"x").unwrap();
        (dir, root)
    }

    #[test]
    fn names_resolve_relative_to_the_image_and_stay_inside_the_tree() {
        let (_dir, root) = tree();
        let top = root.join("sub/top.img");
        let base = root.join("base.img");
        let name = OsStr::new("../base.img");
        assert_eq!(resolve(&root, &top, name, "backing file").unwrap(), base);
        let absolute = base.clone().into_os_string();
        assert_eq!(
            resolve(&root, &top, &absolute, "backing file").unwrap(),
            base
        );
        let prefixed = OsStr::new("file:../base.img");
        assert_eq!(
            resolve(&root, &top, prefixed, "backing file").unwrap(),
            base
        );

        let sub = root.join("sub");
        let err = resolve(&sub, &top, name, "backing file").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::OutOfRange);
        assert!(err.to_string().contains("outside the source tree"), "{err}");
    }

    #[test]
    fn symlinks_cannot_lead_out_of_the_tree() {
        let (_dir, root) = tree();
        let outside = TempDir::new();
        let secret = outside.path().join("secret.img");
        std::fs::write(&secret, b"s").unwrap();
        std::os::unix::fs::symlink(&secret, root.join("link.img")).unwrap();
        let top = root.join("sub/top.img");
        let err = resolve(&root, &top, OsStr::new("../link.img"), "backing file").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::OutOfRange);
    }

    #[test]
    fn bad_names_give_clear_errors() {
        let (_dir, root) = tree();
        let top = root.join("sub/top.img");
        for (name, expect) in [
            ("", "empty"),
            ("missing.img", "does not exist"),
            ("json:{\"driver\":\"raw\"}", "json:"),
            ("..", "not a regular file"),
        ] {
            let err = resolve(&root, &top, OsStr::new(name), "backing file").unwrap_err();
            assert!(err.to_string().contains(expect), "{name}: {err}");
        }
    }

    #[test]
    fn chains_refuse_loops_and_excess_depth() {
        let a = Path::new("/t/a");
        let b = Path::new("/t/b");
        let chain = Chain::top(a).below(b).unwrap();
        assert_eq!(chain.top_path(), a);
        assert_eq!(chain.parent_path(), b);
        let err = chain.below(a).unwrap_err();
        assert!(err.to_string().contains("/t/a -> /t/b -> /t/a"), "{err}");

        let mut deep = Chain::top(Path::new("/t/0"));
        for i in 1..=MAX_CHAIN_DEPTH {
            deep = deep.below(&PathBuf::from(format!("/t/{i}"))).unwrap();
        }
        let err = deep.below(Path::new("/t/last")).unwrap_err();
        assert!(err.to_string().contains("deeper than 64"), "{err}");
    }

    #[test]
    fn backing_format_names_map_to_formats() {
        assert_eq!(format_named("qcow2").unwrap(), Format::Qcow2);
        assert_eq!(format_named("raw").unwrap(), Format::Raw);
        assert_eq!(format_named("vpc").unwrap(), Format::Vhd);
        assert!(format_named("nbd").is_err());
    }
}
