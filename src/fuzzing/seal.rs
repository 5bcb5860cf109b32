//! Recomputes the CRC-32C checksums of a VHDX file after the fuzzer changed it. Headers,
//! region tables and log entries carry checksums a mutation almost never keeps right, so
//! without this nearly every mutated VHDX would stop at "checksum does not match" and the
//! parsing behind it would never be fuzzed. Inputs choose per file (`input::FileSpec::seal`),
//! so the checksum checks themselves stay fuzzed too.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

const FILE_SIGNATURE: &[u8] = b"vhdxfile";
const HEADER_SLOTS: [u64; 2] = [64 << 10, 128 << 10];
const HEADER_LEN: usize = 4096;
const REGION_TABLES: [u64; 2] = [192 << 10, 256 << 10];
const REGION_TABLE_LEN: usize = 64 << 10;
const LOG_SECTOR: u64 = 4096;
/// Logs are scanned for entries up to this length: real ones are 1 MiB.
const MAX_LOG_SCAN: u64 = 16 << 20;

/// CRC-32C of `buf` with its checksum field (bytes 4..8) taken as zero, stored there.
fn seal(buf: &mut [u8]) {
    if buf.len() < 8 {
        return;
    }
    buf[4..8].fill(0);
    let crc = crc32c::crc32c(buf);
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Reseals `len` bytes at `at` if they start with `signature`; returns them (resealed).
fn reseal_at(file: &File, at: u64, len: usize, signature: &[u8]) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, at).ok()?;
    if !buf.starts_with(signature) {
        return None;
    }
    seal(&mut buf);
    file.write_all_at(&buf, at).ok()?;
    Some(buf)
}

/// Reseals the headers, region tables and every log entry that lies whole inside the log of
/// the VHDX file at `path`; anything else is left alone.
pub fn seal_vhdx(path: &Path) {
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    else {
        return;
    };
    let mut magic = [0u8; 8];
    if file.read_exact_at(&mut magic, 0).is_err() || magic != FILE_SIGNATURE {
        return;
    }
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut logs = Vec::new();
    for at in HEADER_SLOTS {
        if let Some(header) = reseal_at(&file, at, HEADER_LEN, b"head") {
            let log_len = u32::from_le_bytes([header[68], header[69], header[70], header[71]]);
            let mut offset = [0u8; 8];
            offset.copy_from_slice(&header[72..80]);
            logs.push((u64::from_le_bytes(offset), u64::from(log_len)));
        }
    }
    for at in REGION_TABLES {
        reseal_at(&file, at, REGION_TABLE_LEN, b"regi");
    }
    logs.dedup();
    for (start, len) in logs {
        let end = start.saturating_add(len.min(MAX_LOG_SCAN)).min(file_len);
        let mut at = start;
        while at.saturating_add(LOG_SECTOR) <= end {
            let mut head = [0u8; 12];
            if file.read_exact_at(&mut head, at).is_err() {
                break;
            }
            let entry_len = u64::from(u32::from_le_bytes([head[8], head[9], head[10], head[11]]));
            let whole = entry_len >= LOG_SECTOR
                && entry_len % LOG_SECTOR == 0
                && at.saturating_add(entry_len) <= end;
            // Entries do not overlap: going on after a whole one keeps the work at one pass.
            if &head[..4] == b"loge" && whole {
                reseal_at(&file, at, entry_len as usize, b"loge");
                at += entry_len;
            } else {
                at += LOG_SECTOR;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored_matches(buf: &[u8]) -> bool {
        let mut copy = buf.to_vec();
        copy[4..8].fill(0);
        crc32c::crc32c(&copy).to_le_bytes() == buf[4..8]
    }

    #[test]
    fn headers_region_tables_and_whole_log_entries_are_resealed() {
        let dir = crate::testutil::TempDir::new();
        let path = dir.path().join("v");
        let mut image = vec![0u8; 2 << 20];
        image[..8].copy_from_slice(FILE_SIGNATURE);
        let log_at: u64 = 1 << 20;
        for at in HEADER_SLOTS {
            let h = &mut image[at as usize..][..HEADER_LEN];
            h[..4].copy_from_slice(b"head");
            h[4..8].copy_from_slice(&[1, 2, 3, 4]);
            h[68..72].copy_from_slice(&(1u32 << 20).to_le_bytes());
            h[72..80].copy_from_slice(&log_at.to_le_bytes());
        }
        image[REGION_TABLES[0] as usize..][..4].copy_from_slice(b"regi");
        let entry = log_at as usize + 8192;
        image[entry..entry + 4].copy_from_slice(b"loge");
        image[entry + 8..entry + 12].copy_from_slice(&8192u32.to_le_bytes());
        image[entry + 100] = 7;
        // An entry running past the end of the log is left alone.
        let past = (2 << 20) - 4096;
        image[past..past + 4].copy_from_slice(b"loge");
        image[past + 8..past + 12].copy_from_slice(&8192u32.to_le_bytes());
        std::fs::write(&path, &image).unwrap();
        seal_vhdx(&path);
        let sealed = std::fs::read(&path).unwrap();
        for at in HEADER_SLOTS {
            assert!(stored_matches(&sealed[at as usize..][..HEADER_LEN]));
        }
        assert!(stored_matches(
            &sealed[REGION_TABLES[0] as usize..][..REGION_TABLE_LEN]
        ));
        assert_eq!(
            sealed[REGION_TABLES[1] as usize..][..8],
            [0; 8],
            "no table there"
        );
        assert!(stored_matches(&sealed[entry..entry + 8192]));
        assert_eq!(sealed[past + 4..past + 8], [0; 4]);
    }
}
