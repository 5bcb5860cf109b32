//! The `imgfs` command: all work happens in the library's `cli` module.

fn main() {
    std::process::exit(imgfs::cli::main());
}
