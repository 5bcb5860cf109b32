//! Replays the committed fuzz corpora (`fuzz/seeds`, `fuzz/regressions`) through the same
//! functions the fuzz targets call, so CI checks them without a nightly toolchain.

use std::path::{Path, PathBuf};

use super::{run, run_seed, TARGETS};

fn corpus_files(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

/// Every seed of `target` opens and keeps every invariant; every regression input (crashes
/// found by fuzzing) keeps them too.
fn replay(target: &str) {
    let seeds = corpus_files("seeds", target);
    assert!(!seeds.is_empty(), "no seeds for {target}");
    for seed in seeds {
        let data = std::fs::read(&seed).unwrap();
        match run_seed(target, &data) {
            Ok(outcome) => assert!(outcome.opened, "{}: did not open", seed.display()),
            Err(v) => panic!("{}: {v}", seed.display()),
        }
    }
    for input in corpus_files("regressions", target) {
        let data = std::fs::read(&input).unwrap();
        if let Err(v) = run(target, &data) {
            panic!("{}: {v}", input.display());
        }
    }
}

// One test per target, so that they run in parallel.
#[test]
fn replay_vdi() {
    replay("vdi");
}

#[test]
fn replay_qcow() {
    replay("qcow");
}

#[test]
fn replay_qcow2() {
    replay("qcow2");
}

#[test]
fn replay_vhdx() {
    replay("vhdx");
}

#[test]
fn replay_vhd() {
    replay("vhd");
}

#[test]
fn replay_luks() {
    replay("luks");
}

#[test]
fn replay_vmdk() {
    replay("vmdk");
}

/// The seeds with partition tables lead the fuzzer to the partitions' raw files: an MBR with
/// an extended partition's chain of EBRs, and a GPT.
#[test]
fn status_seeds_reach_partitions() {
    for (seed, expected) in [("vdi-mbr-logical", 3), ("qcow2-gpt", 2)] {
        let data = std::fs::read(format!("fuzz/seeds/status/{seed}")).unwrap();
        let outcome = run_seed("status", &data).unwrap();
        assert_eq!(outcome.partitions, expected, "{seed}");
    }
}

#[test]
fn replay_status() {
    replay("status");
}

#[test]
fn every_target_has_a_replay_test() {
    assert_eq!(
        TARGETS,
        ["vdi", "qcow", "qcow2", "vhdx", "vhd", "vmdk", "luks", "status"]
    );
}

/// Writes `files` (the image under test first) as the seed `name` of `target` into the
/// directory named by `$IMGFS_FUZZ_SEEDS`, for the ignored `fuzz_seed` tests of the format
/// modules that build images QEMU cannot make. `false` when the variable is not set.
pub fn write_seed(target: &str, name: &str, files: &[Vec<u8>]) -> bool {
    let Some(dir) = std::env::var_os("IMGFS_FUZZ_SEEDS") else {
        return false;
    };
    let files: Vec<Vec<u8>> = files
        .iter()
        .map(|f| {
            let packed = super::input::sparse(f);
            if packed.len() < f.len() {
                packed
            } else {
                f.clone()
            }
        })
        .collect();
    let dir = Path::new(&dir).join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), super::input::join(&files, &[])).unwrap();
    let outcome = run_seed(target, &std::fs::read(dir.join(name)).unwrap()).unwrap();
    assert!(outcome.opened, "seed {target}/{name} does not open");
    true
}

/// Runs the inputs named by `IMGFS_FUZZ_REPLAY=target:file[:file...]`, to debug a crash in a
/// plain test build (logs, debugger) instead of the fuzzer.
#[test]
#[ignore = "debugging aid: IMGFS_FUZZ_REPLAY=target:file"]
fn replay_named_inputs() {
    let Ok(spec) = std::env::var("IMGFS_FUZZ_REPLAY") else {
        return;
    };
    let mut parts = spec.split(':');
    let target = parts.next().unwrap_or_default();
    for file in parts {
        let data = std::fs::read(file).unwrap();
        match run(target, &data) {
            Ok(outcome) => eprintln!("{file}: {outcome:?}"),
            Err(v) => panic!("{file}: {v}"),
        }
    }
}
