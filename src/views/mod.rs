//! Views: `Image` adapters over an image, served as files of their own. Today the partitions
//! of a disk (`partition`, found by `table`); internal snapshots are the drivers' own views.

pub mod partition;
pub mod table;

pub use partition::PartitionView;
pub use table::{read_table, Partition, PartitionTable, TableKind};
