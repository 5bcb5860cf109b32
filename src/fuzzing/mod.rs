//! The fuzzing harness, in the library so that the cargo-fuzz targets under `fuzz/` are
//! three-line wrappers and `cargo test` replays their corpora on the stable toolchain.
//!
//! An input describes up to three files (`input`): the image under test and files it may name
//! as backing file, parent or extent. They are written to a fresh directory on tmpfs (`tree`),
//! the image is opened with one driver whatever its magic, then read, written, flushed,
//! reopened and read again (`exercise`), or served through the catalog and the filesystem core
//! for `lseek` and reads (`status`). Errors from imgfs are expected (hostile input must give a
//! clean `Err`); a broken invariant (`check`) panics, which is how a fuzzer learns of it.

mod check;
mod exercise;
pub mod input;
mod seal;
mod status;
mod tree;

#[cfg(test)]
pub(crate) mod tests;

pub use check::Violation;
pub use exercise::{Outcome, Trust};

use crate::format::Format;

/// The passphrase every fuzzed process is given: the encrypted seeds are made with it, so
/// mutated images reach key-slot unlocking, decryption and encrypted writes.
pub const PASSPHRASE: &[u8] = b"fuzz";
/// PBKDF2 iterations accepted by the fuzz targets (the seeds use fewer): a mutated count must
/// not make one input take seconds.
const FUZZ_ITERATIONS: u32 = 1 << 14;

/// The fuzz targets, by the name of their directory under `fuzz/fuzz_targets` and the seeds.
pub const TARGETS: [&str; 8] = [
    "vdi", "qcow", "qcow2", "vhdx", "vhd", "vmdk", "luks", "status",
];

/// Runs the target called `name` on `data`; `Err` for a broken invariant, or an unknown name.
pub fn run(name: &str, data: &[u8]) -> Result<Outcome, Violation> {
    run_trusting(name, data, Trust::Input)
}

/// `run` for an input whose images are known to be consistent (the seeds), which allows every
/// check (`Trust`).
pub fn run_seed(name: &str, data: &[u8]) -> Result<Outcome, Violation> {
    run_trusting(name, data, Trust::Consistent)
}

fn run_trusting(name: &str, data: &[u8], trust: Trust) -> Result<Outcome, Violation> {
    crate::meta::keyring::add_passphrase(PASSPHRASE);
    let format = match name {
        "vdi" => Format::Vdi,
        "qcow" => Format::Qcow,
        "qcow2" => Format::Qcow2,
        "vhdx" => Format::Vhdx,
        "vhd" => Format::Vhd,
        "vmdk" => Format::Vmdk,
        "luks" => Format::Luks,
        "status" => return status::run(data, trust),
        other => return Err(Violation(format!("no fuzz target called {other:?}"))),
    };
    exercise::run(format, data, trust)
}

/// Runs a target and panics on a broken invariant: the panic is the report a fuzzer sees.
fn report(name: &str, data: &[u8]) -> Outcome {
    // Only in the fuzzer's own process: the replay tests share theirs with other tests.
    crate::meta::crypt::limit_iterations(FUZZ_ITERATIONS);
    match run(name, data) {
        Ok(outcome) => outcome,
        Err(v) => panic!("imgfs {name} invariant broken: {v}"),
    }
}

/// Opens `data` as a VDI image and exercises it.
pub fn exercise_vdi(data: &[u8]) -> Outcome {
    report("vdi", data)
}

/// Opens `data` as a QCOW (version 1) image and exercises it.
pub fn exercise_qcow(data: &[u8]) -> Outcome {
    report("qcow", data)
}

/// Opens `data` as a QCOW2 image and exercises it.
pub fn exercise_qcow2(data: &[u8]) -> Outcome {
    report("qcow2", data)
}

/// Opens `data` as a VHDX image and exercises it.
pub fn exercise_vhdx(data: &[u8]) -> Outcome {
    report("vhdx", data)
}

/// Opens `data` as a VHD image and exercises it.
pub fn exercise_vhd(data: &[u8]) -> Outcome {
    report("vhd", data)
}

/// Opens `data` as a VMDK image (descriptor or sparse extent) and exercises it.
pub fn exercise_vmdk(data: &[u8]) -> Outcome {
    report("vmdk", data)
}

/// Opens `data` as a LUKS1 container (with the passphrase `PASSPHRASE`) and exercises it.
pub fn exercise_luks(data: &[u8]) -> Outcome {
    report("luks", data)
}

/// Serves `data`'s tree through the catalog and filesystem core and checks lseek and reads.
pub fn exercise_status(data: &[u8]) -> Outcome {
    report("status", data)
}
