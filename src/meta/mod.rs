//! Helpers shared by the format drivers: endian-explicit field access and dirty tracking of
//! in-memory tables that are written back on flush.

pub mod bytes;
pub mod dirty;
