//! imgfs: serves virtual-disk images as flat raw files through FUSE. Layers, top to bottom:
//! `cli`, `fs`, `catalog`, `format`, `meta`, `host`.

pub mod catalog;
pub mod error;
pub mod format;
pub mod fs;
pub mod host;
pub mod image;
pub mod meta;

#[cfg(test)]
mod testutil;
