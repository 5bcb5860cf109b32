//! The small source tree an input describes, written to a fresh directory that is removed
//! again afterwards. Images need real host files (positional I/O, QEMU's lock bytes), so the
//! tree lives on tmpfs when there is one: no disk I/O, and fdatasync costs nothing.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::input::{FileSpec, FILE_NAMES};

/// Where trees are made: `$IMGFS_FUZZ_DIR`, else /dev/shm, else the temp directory.
fn base_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("IMGFS_FUZZ_DIR") {
        return PathBuf::from(dir);
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        return shm.to_path_buf();
    }
    std::env::temp_dir()
}

/// A directory holding the files of one input; removed on drop.
pub struct Tree {
    dir: PathBuf,
}

impl Tree {
    /// Writes `files` as `a`, `b`, `c` into a new directory. `None` if the host refuses
    /// (that is the harness's environment failing, not imgfs).
    pub fn write(files: &[FileSpec<'_>]) -> Option<Tree> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = base_dir().join(format!("imgfs-fuzz-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).ok()?;
        let tree = Tree { dir };
        for (spec, name) in files.iter().zip(FILE_NAMES) {
            let file = File::create(tree.dir.join(name)).ok()?;
            // set_len first: the gaps between chunks stay holes.
            file.set_len(spec.len).ok()?;
            for (offset, bytes) in &spec.chunks {
                file.write_all_at(bytes, *offset).ok()?;
            }
            drop(file);
            if spec.seal {
                super::seal::seal_vhdx(&tree.dir.join(name));
            }
        }
        Some(tree)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The image under test.
    pub fn top(&self) -> PathBuf {
        self.dir.join(FILE_NAMES[0])
    }

    /// Bytes the tree's files occupy on the host (holes excluded), so a run can stop
    /// allocating before an image with huge blocks fills the host's memory.
    pub fn host_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        FILE_NAMES
            .iter()
            .filter_map(|name| std::fs::metadata(self.dir.join(name)).ok())
            .map(|m| m.blocks().saturating_mul(512))
            .sum()
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
