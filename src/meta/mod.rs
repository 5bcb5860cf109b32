//! Helpers shared by the format drivers: endian-explicit field access, dirty tracking of
//! in-memory tables that are written back on flush, the bounded table cache, the decompression
//! of compressed clusters, the encryption of encrypted images' data and the passphrases for it,
//! the memory budget of an image's tables, and what a driver does when write-back fails.

pub mod budget;
pub mod bytes;
pub mod compress;
pub mod crypt;
pub mod dirty;
pub mod keyring;
pub mod table_cache;
pub mod write_back;
