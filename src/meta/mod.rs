//! Helpers shared by the format drivers: endian-explicit field access, dirty tracking of
//! in-memory tables that are written back on flush, the bounded table cache, the decompression
//! of compressed clusters, and the memory budget of an image's tables.

pub mod budget;
pub mod bytes;
pub mod compress;
pub mod dirty;
pub mod table_cache;
