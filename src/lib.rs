//! imgfs: serves virtual-disk images (VDI today; QCOW/QCOW2, VHDX and VMDK next) as flat raw
//! files through FUSE. Layers, top to bottom: `cli`, `fs`, `catalog`, `format`, `meta`, `host`.

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

#[cfg(test)]
mod testutil;
