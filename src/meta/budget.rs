//! The memory imgfs allows one image's metadata: the tables a driver holds whole (a VDI block
//! map, a qcow L1 table, a VHDX BAT and the dirty log replayed in memory, the grain
//! directories of every VMDK extent) may take at most `MAX_TABLE_MEMORY` together, counted as
//! they sit in memory while being read. Drivers with several such tables add them up in a
//! `TableBudget` before reading each. Caches of the
//! tables read on demand (L2 tables, refcount blocks, grain tables) are bounded on their own,
//! at a few MiB each.
//!
//! Headers are checked against their format's hard caps and against the file; this is the
//! last bound, because a sparse file costs its creator nothing whatever length it claims, and
//! a daemon serving many images cannot let one of them take gigabytes. 256 MiB of tables
//! covers a 64 TiB disk in every format with the block sizes their tools write.

use crate::error::{Error, Result};

/// The most memory the whole-held tables of one image may take.
pub const MAX_TABLE_MEMORY: u64 = 256 << 20;

/// Refuses an image whose tables held whole would take `bytes` (`what` names them).
pub fn check_table_memory(what: &str, bytes: u64) -> Result<()> {
    if bytes > MAX_TABLE_MEMORY {
        return Err(Error::unsupported(format!(
            "the {what} would take {} MiB of memory, more than the {} MiB imgfs allows one \
             image's tables",
            bytes.div_ceil(1 << 20),
            MAX_TABLE_MEMORY >> 20
        )));
    }
    Ok(())
}

/// What one image's tables took so far, for drivers that hold several.
#[derive(Debug, Default)]
pub struct TableBudget {
    used: u64,
}

impl TableBudget {
    /// Accounts for `bytes` more of table memory (`what` names the table), or refuses the
    /// image if all its tables together would take more than `MAX_TABLE_MEMORY`.
    pub fn take(&mut self, what: &str, bytes: u64) -> Result<()> {
        let total = self.used.saturating_add(bytes);
        if total > MAX_TABLE_MEMORY && self.used > 0 {
            return Err(Error::unsupported(format!(
                "the {what} would take {} MiB of memory, and the image's other tables {} MiB: \
                 more than the {} MiB imgfs allows one image's tables",
                bytes.div_ceil(1 << 20),
                self.used.div_ceil(1 << 20),
                MAX_TABLE_MEMORY >> 20
            )));
        }
        check_table_memory(what, total)?;
        self.used = total;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_up_to_the_budget_pass_and_larger_ones_are_named() {
        assert!(check_table_memory("block map", MAX_TABLE_MEMORY).is_ok());
        let e = check_table_memory("block map", MAX_TABLE_MEMORY + 1).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Unsupported);
        assert!(
            e.to_string().contains("the block map would take 257 MiB"),
            "{e}"
        );
    }
}
