//! The crash harness: kill -9 of the daemon at random moments while threads write and fsync,
//! for every writable format, sub-format and chain, then `qemu-img check` and a read of every
//! byte through qemu-img and a fresh imgfs mount: every fsync'ed write is there, every other
//! sector holds its old bytes or its new ones, and both read the same.
//!
//! CI runs one round per variant. `scripts/crash.sh [--rounds N] [--format F]` runs more:
//! environment `IMGFS_CRASH_ROUNDS` (rounds per variant), `IMGFS_CRASH_VARIANT` (variants whose
//! name contains it), `IMGFS_CRASH_SEED` (to replay a run). A failed round's directory is kept
//! under `$TMPDIR/imgfs-crash-failures/` for inspection.

#[path = "../common/mod.rs"]
mod common;
mod model;
mod round;
mod variants;

use common::*;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn a_daemon_killed_at_any_moment_loses_no_fsynced_write() {
    if !can_mount() {
        return;
    }
    let rounds = env_u64("IMGFS_CRASH_ROUNDS").unwrap_or(1);
    let filter = std::env::var("IMGFS_CRASH_VARIANT").unwrap_or_default();
    let seed = env_u64("IMGFS_CRASH_SEED").unwrap_or_else(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        now.map_or(1, |d| d.as_nanos() as u64)
    });
    println!("crash harness: seed {seed}, {rounds} round(s) per variant");
    let mut table = vec![
        "| variant | rounds | failures | fsync'ed / planned writes | resizes kept / tried \
         | leaked clusters | checked by |"
            .to_string(),
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |".to_string(),
    ];
    let mut failures = Vec::new();
    for (v, variant) in variants::all().iter().enumerate() {
        if !variant.name.contains(&filter) {
            continue;
        }
        let (mut failed, mut leaks, mut fsynced, mut planned) = (0, 0, 0, 0);
        let (mut resizes, mut grown) = (0, 0);
        for r in 0..rounds {
            let round_seed = seed ^ ((v as u64) << 48) ^ r.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            match round::run(variant, round_seed) {
                Ok(report) => {
                    leaks += report.leaks;
                    fsynced += report.fsynced;
                    planned += report.planned;
                    resizes += report.resizes;
                    grown += report.grown;
                }
                Err((e, dir)) => {
                    failed += 1;
                    let kept = keep_failure(&dir, variant.name, r);
                    failures.push(format!(
                        "{} round {r} (seed {round_seed}): {e}; files kept in {}",
                        variant.name,
                        kept.display()
                    ));
                }
            }
        }
        let oracle = match (variant.qemu_reads, variant.qemu_checks) {
            (true, true) => "qemu-img check and convert, imgfs",
            (true, false) => "qemu-img convert, imgfs",
            _ => "imgfs (qemu-img cannot open it)",
        };
        let resized = match variant.grows {
            true => format!("{grown} / {resizes}"),
            false => "-".into(),
        };
        let row = format!(
            "| {} | {rounds} | {failed} | {fsynced} / {planned} | {resized} | {leaks} | {oracle} |",
            variant.name
        );
        println!("{row}");
        table.push(row);
    }
    println!("\n{}", table.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Moves a failed round's directory out of the way of its cleanup.
fn keep_failure(dir: &TempDir, variant: &str, round: u64) -> std::path::PathBuf {
    let keep = std::env::temp_dir().join("imgfs-crash-failures");
    let _ = std::fs::create_dir_all(&keep);
    let target = keep.join(format!("{variant}-{round}-{}", std::process::id()));
    match std::fs::rename(dir.path(), &target) {
        Ok(()) => target,
        Err(_) => dir.path().to_path_buf(),
    }
}

#[test]
fn the_model_accepts_old_or_new_sectors_only() {
    use model::*;
    let windows = [Window {
        offset: 0,
        len: 8192,
    }];
    let old = vec![vec![1u8; 8192]];
    let slots = vec![
        Slot {
            offset: 100,
            data: vec![2; 1000],
            discard: false,
        },
        Slot {
            offset: 4096,
            data: vec![3; 600],
            discard: false,
        },
    ];
    let all = apply(&windows, &old, &slots);
    assert!(check(&windows, &old, &all, &slots, &[true, true]).is_ok());
    assert!(check(&windows, &old, &old, &slots, &[false, false]).is_ok());
    assert!(check(&windows, &old, &old, &slots, &[true, false]).is_err());
    // The first slot half landed, sector by sector: fine unless it was fsync'ed.
    let mut half = old.clone();
    half[0][100..512].fill(2);
    assert!(check(&windows, &old, &half, &slots, &[false, false]).is_ok());
    assert!(check(&windows, &old, &half, &slots, &[true, false]).is_err());
    // Part of a sector, and a byte no slot wrote.
    let mut torn = old.clone();
    torn[0][600..700].fill(2);
    assert!(check(&windows, &old, &torn, &slots, &[false, false]).is_err());
    let mut stray = all.clone();
    stray[0][8000] = 9;
    assert!(check(&windows, &old, &stray, &slots, &[true, true]).is_err());
}
