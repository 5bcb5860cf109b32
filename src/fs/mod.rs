//! The filesystem served under the mount point: `core` implements every operation on plain
//! types and is tested without FUSE; `fuse` is the thin adapter that speaks fuser's API over
//! /dev/fuse, `ring` the FUSE-over-io_uring transport beside it.

mod backing;
pub mod core;
pub mod fuse;
pub mod ring;

pub use self::core::{Attr, Errno, FsCore, NodeKind};
