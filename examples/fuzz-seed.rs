//! Builds one fuzz input from image files, for `scripts/fuzz-seeds.sh`:
//!
//! ```text
//! cargo run --example fuzz-seed -- OUT IMAGE [FILE [FILE]]
//! ```
//!
//! The image under test comes first; the other files become `b` and `c` next to it (what its
//! backing file, parent or extent must be named). Each file is stored sparse when that is
//! shorter, which keeps seeds of mostly-empty images at a few KiB.

use imgfs::fuzzing::input::{join, sparse};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args.len() > 4 {
        eprintln!("usage: fuzz-seed OUT IMAGE [FILE [FILE]]");
        std::process::exit(2);
    }
    let mut files = Vec::new();
    for name in &args[1..] {
        let bytes = match std::fs::read(name) {
            Ok(bytes) => bytes,
            Err(e) => {
                eprintln!("fuzz-seed: {name}: {e}");
                std::process::exit(1);
            }
        };
        let packed = sparse(&bytes);
        files.push(if packed.len() < bytes.len() {
            packed
        } else {
            bytes
        });
    }
    if let Err(e) = std::fs::write(&args[0], join(&files, &[])) {
        eprintln!("fuzz-seed: {}: {e}", args[0]);
        std::process::exit(1);
    }
}
