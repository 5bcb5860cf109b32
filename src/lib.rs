//! imgfs: serves virtual-disk images (VDI, VHD, VHDX, VMDK, QCOW, QCOW2 and LUKS1, with backing
//! chains, internal snapshots and partitions) as flat raw files through FUSE. Layers, top to bottom:
//! `cli`, `fs`, `catalog`, `views`, `format`, `meta`, `host`.

pub mod catalog;
pub mod cli;
pub mod error;
pub mod format;
pub mod fs;
#[doc(hidden)]
pub mod fuzzing;
pub mod host;
pub mod image;
pub mod meta;
pub mod nbd;
pub mod views;

#[cfg(test)]
mod testutil;
