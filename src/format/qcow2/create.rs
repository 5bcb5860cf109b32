//! Creating an empty qcow2 image (version 3), optionally over a backing file: the overlays
//! imgfs writes changes into instead of an original.
//!
//! ```text
//! cluster 0        header (104 bytes), backing-format extension, end marker, backing name
//! cluster 1        refcount table (one cluster; entry 0 -> cluster 2)
//! cluster 2        refcount block (16-bit refcounts; clusters 0..end are used once)
//! cluster 3..      L1 table, all entries zero (nothing allocated: reads go to the backing)
//! ```
//! Written whole in one go and synced; the driver grows refcounts and L2 tables from there.

use std::io::Write;
use std::path::Path;

use super::header::{MAGIC, MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS};
use crate::error::{Error, Result};

const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const HEADER_LEN: u32 = 104;
const REFCOUNT_ORDER: u32 = 4;

/// What the new image is.
#[derive(Debug, Clone)]
pub struct NewImage<'a> {
    /// Virtual size in bytes.
    pub size: u64,
    pub cluster_bits: u32,
    /// The backing file's name as the image records it (relative to the image, or absolute),
    /// and its format.
    pub backing: Option<(&'a str, &'a str)>,
}

fn put_u32(buf: &mut [u8], at: usize, value: u32) {
    buf[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

fn put_u64(buf: &mut [u8], at: usize, value: u64) {
    buf[at..at + 8].copy_from_slice(&value.to_be_bytes());
}

/// The bytes of a new, empty image (see the module doc for the layout).
pub fn image_bytes(spec: &NewImage) -> Result<Vec<u8>> {
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&spec.cluster_bits) {
        return Err(Error::out_of_range(format!(
            "cluster_bits {} is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}",
            spec.cluster_bits
        )));
    }
    let cluster = 1u64 << spec.cluster_bits;
    // One L2 table maps cluster/8 clusters.
    let per_l1 = cluster * (cluster / 8);
    let l1_entries = spec.size.div_ceil(per_l1).max(1);
    let l1_bytes = l1_entries * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(Error::out_of_range(format!(
            "a {} byte disk needs {l1_bytes} bytes of L1 table with {cluster}-byte clusters",
            spec.size
        )));
    }
    let l1_clusters = l1_bytes.div_ceil(cluster);
    let clusters = 3 + l1_clusters;
    // One refcount block of 16-bit entries covers cluster/2 clusters.
    if clusters > cluster / 2 {
        return Err(Error::out_of_range(
            "the L1 table does not fit one refcount block",
        ));
    }
    let mut out = vec![0u8; (clusters * cluster) as usize];
    let head = &mut out[..cluster as usize];
    head[..4].copy_from_slice(&MAGIC);
    put_u32(head, 4, 3);
    put_u32(head, 20, spec.cluster_bits);
    put_u64(head, 24, spec.size);
    put_u32(head, 36, l1_entries as u32);
    put_u64(head, 40, 3 * cluster);
    put_u64(head, 48, cluster);
    put_u32(head, 56, 1);
    put_u32(head, 96, REFCOUNT_ORDER);
    put_u32(head, 100, HEADER_LEN);
    let mut at = HEADER_LEN as usize;
    if let Some((name, format)) = spec.backing {
        let format = format.as_bytes();
        let padded = format.len().next_multiple_of(8);
        let needed = at + 8 + padded + 8 + name.len();
        if name.is_empty() || name.len() > 1023 || needed > cluster as usize {
            return Err(Error::out_of_range(format!(
                "the backing file name {name:?} does not fit the header"
            )));
        }
        put_u32(head, at, EXT_BACKING_FORMAT);
        put_u32(head, at + 4, format.len() as u32);
        head[at + 8..at + 8 + format.len()].copy_from_slice(format);
        at += 8 + padded;
        // The end-of-extensions marker is eight zero bytes, already there.
        at += 8;
        head[at..at + name.len()].copy_from_slice(name.as_bytes());
        put_u64(head, 8, at as u64);
        put_u32(head, 16, name.len() as u32);
    }
    out[cluster as usize..cluster as usize + 8].copy_from_slice(&(2 * cluster).to_be_bytes());
    let block = 2 * cluster as usize;
    for i in 0..clusters as usize {
        out[block + 2 * i..block + 2 * i + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    Ok(out)
}

/// Creates the image at `path` (which must not exist yet) and syncs it.
pub fn create(path: &Path, spec: &NewImage) -> Result<()> {
    let bytes = image_bytes(spec).map_err(|e| e.with_path(path))?;
    let io = |e| Error::io("create", e).with_path(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io)?;
    file.write_all(&bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{qemu, TempDir};

    #[test]
    fn new_images_check_clean_and_read_through_to_their_backing_file() {
        let dir = TempDir::new();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0x3c; 1 << 20]).unwrap();
        for cluster_bits in [9, 16, 21] {
            let path = dir.path().join(format!("over{cluster_bits}.qcow2"));
            let spec = NewImage {
                size: 3 << 20,
                cluster_bits,
                backing: Some(("base.raw", "raw")),
            };
            create(&path, &spec).unwrap();
            let Some(check) = qemu("qemu-img", &["check".as_ref(), path.as_os_str()]) else {
                return;
            };
            assert!(check.status.success(), "{check:?}");
            let map = qemu(
                "qemu-io",
                &[
                    "-c".as_ref(),
                    "read -P 0x3c 0 1M".as_ref(),
                    "-c".as_ref(),
                    "read -P 0 1M 2M".as_ref(),
                    path.as_os_str(),
                ],
            )
            .unwrap();
            assert!(map.status.success(), "{map:?}");
        }
        let plain = dir.path().join("plain.qcow2");
        let spec = NewImage {
            size: 1 << 40,
            cluster_bits: 16,
            backing: None,
        };
        create(&plain, &spec).unwrap();
        assert!(
            create(&plain, &spec).is_err(),
            "never over an existing file"
        );
        let info = qemu("qemu-img", &["check".as_ref(), plain.as_os_str()]).unwrap();
        assert!(info.status.success(), "{info:?}");
    }

    #[test]
    fn impossible_images_are_refused() {
        let spec = |size, cluster_bits, backing| NewImage {
            size,
            cluster_bits,
            backing,
        };
        assert!(image_bytes(&spec(1 << 20, 8, None)).is_err());
        assert!(image_bytes(&spec(1 << 50, 9, None)).is_err());
        let long = "x".repeat(2000);
        assert!(image_bytes(&spec(1 << 20, 16, Some((&long, "raw")))).is_err());
    }
}
