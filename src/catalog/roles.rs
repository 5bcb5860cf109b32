//! Which files of the source tree are backing files (or parents) of which images, computed
//! from the tree itself: every image version in the catalog names the files below it in its
//! chain, and a file named by at least one is a backing file. Nothing here counts references to
//! open instances, so what the catalog holds open never changes a file's role.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

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

    /// An image (relative path) whose chain holds file `id`, if any: then `id` is a backing
    /// file and must not be written.
    pub fn image_above(&self, id: FileId) -> Option<&Path> {
        self.above
            .get(&id)
            .and_then(|users| users.first())
            .map(|(_, rel)| rel.as_path())
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

    #[test]
    fn a_file_is_a_backing_file_while_any_image_above_it_is_recorded() {
        let base = (1, 10);
        let mid = (1, 11);
        let mut roles = Roles::default();
        let top = image(1, "top.qcow2", vec![mid, base]);
        let other = image(2, "other.qcow2", vec![base]);
        roles.add(&top);
        roles.add(&other);
        assert_eq!(roles.image_above(mid), Some(Path::new("top.qcow2")));
        assert!(roles.image_above(base).is_some());
        roles.remove(&top);
        assert_eq!(roles.image_above(mid), None);
        assert_eq!(roles.image_above(base), Some(Path::new("other.qcow2")));
        roles.remove(&other);
        assert_eq!(roles.image_above(base), None, "writable again");
    }
}
