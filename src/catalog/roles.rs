//! Which files of the source tree are backing files (or parents) of which images, computed
//! from the tree itself: every image version in the catalog names the files below it in its
//! chain, and a file named by at least one is a backing file. Nothing here counts references to
//! open instances, so what the catalog holds open never changes a file's role.

use std::collections::HashMap;
use std::path::PathBuf;

use super::record::{FileId, ImageFile};

/// The images above each backing file, by image version.
#[derive(Debug, Default)]
pub struct Roles {
    above: HashMap<FileId, Vec<(u64, PathBuf)>>,
}

impl Roles {
    /// Records that `image` uses every file of its chain.
    pub fn add(&mut self, image: &ImageFile) {
        for id in &image.summary.below {
            self.above
                .entry(*id)
                .or_default()
                .push((image.version, image.rel.clone()));
        }
    }

    /// Forgets what `add(image)` recorded.
    pub fn remove(&mut self, image: &ImageFile) {
        for id in &image.summary.below {
            if let Some(users) = self.above.get_mut(id) {
                users.retain(|(version, _)| *version != image.version);
                if users.is_empty() {
                    self.above.remove(id);
                }
            }
        }
    }

    /// The images (relative paths) whose chains hold file `id`, if any: then `id` is a
    /// backing file and must not be written.
    pub fn images_above(&self, id: FileId) -> Option<ImagesAbove> {
        let users = self.above.get(&id)?;
        let (_, first) = users.first()?;
        Some(ImagesAbove {
            first: first.clone(),
            others: users.len() - 1,
        })
    }
}

/// The images above a backing file: the first recorded and how many more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagesAbove {
    pub first: PathBuf,
    pub others: usize,
}

impl std::fmt::Display for ImagesAbove {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.first.display())?;
        match self.others {
            0 => Ok(()),
            1 => write!(f, " and 1 other image"),
            n => write!(f, " and {n} other images"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::record::Summary;
    use crate::format::Format;

    fn image(version: u64, rel: &str, below: Vec<FileId>) -> ImageFile {
        let dir = crate::testutil::TempDir::new();
        let path = dir.path().join("x");
        std::fs::write(&path, b"x").unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let summary = Summary {
            format: Format::Qcow2,
            size: 0,
            allocated: 0,
            inherent_read_only: None,
            snapshots: Vec::new(),
            below,
            header_hash: 0,
            partitions: Ok(None),
        };
        ImageFile::new(rel.into(), path, version, summary, &meta, 0)
    }

    fn roles_label(roles: &Roles, id: FileId) -> Option<String> {
        roles.images_above(id).map(|above| above.to_string())
    }

    #[test]
    fn a_file_is_a_backing_file_while_any_image_above_it_is_recorded() {
        let base = (1, 10);
        let mid = (1, 11);
        let mut roles = Roles::default();
        let top = image(1, "top.qcow2", vec![mid, base]);
        let other = image(2, "other.qcow2", vec![base]);
        roles.add(&top);
        roles.add(&other);
        assert_eq!(roles_label(&roles, mid).as_deref(), Some("top.qcow2"));
        assert_eq!(
            roles_label(&roles, base).as_deref(),
            Some("top.qcow2 and 1 other image")
        );
        roles.remove(&top);
        assert_eq!(roles.images_above(mid), None);
        assert_eq!(roles_label(&roles, base).as_deref(), Some("other.qcow2"));
        roles.remove(&other);
        assert_eq!(roles.images_above(base), None, "writable again");
    }
}
