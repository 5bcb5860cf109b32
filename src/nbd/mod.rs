//! The NBD front end: serves the catalog's images over the Network Block Device protocol (the
//! nbd project's `doc/proto.md`), so stock clients (qemu-img, qemu-nbd's client, nbdcopy,
//! nbdinfo, the kernel's nbd-client) attach them from other machines.
//!
//! - `proto`: the wire format, pure parsers and encoders (fuzzed through `mem::fuzz_session`).
//! - `conn`: a connection's reading and writing halves, plain or TLS.
//! - `handshake`: fixed newstyle option haggling up to the chosen export.
//! - `transmit` and `serve`: the request loop with parallel workers, and what each command does;
//!   `replies`: sending replies, one by one or in batches.
//! - `exports`: export names over the catalog's namespace; `glob`: `--allow` patterns.
//! - `server`: listeners, connection threads and limits, orderly stop; `tls`: rustls setup.
//! - `mem`: in-memory exports and a whole connection over an in-memory socket.
//!
//! Like the FUSE front end it never sees a format: it uses the catalog's handles and the
//! `Image` trait, sharing one open instance per image with FUSE when both run in one daemon.

pub mod conn;
pub mod exports;
pub mod glob;
pub mod handshake;
pub mod mem;
pub mod proto;
pub mod replies;
pub mod serve;
pub mod server;
pub mod tls;
pub mod transmit;

pub use exports::{CatalogExports, Export, ExportEntry, Exports};
pub use mem::fuzz_session;
pub use server::{Listen, Server, ServerConfig};
pub use transmit::Limits;

#[cfg(test)]
mod tests;
