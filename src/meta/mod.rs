//! Helpers shared by the format drivers: endian-explicit field access, dirty tracking of
//! in-memory tables that are written back on flush, and the bounded table cache.

pub mod bytes;
pub mod dirty;
pub mod table_cache;
