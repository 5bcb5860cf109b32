//! `imgfs map [--json] IMAGE`: the allocation map of an image and its chain, shaped like
//! `qemu-img map`: each range with the layer of the chain it comes from (depth) and whether it
//! is there (present), reads as zeros (zero) or holds data (data).

use std::path::Path;

use super::info::{open_for_inspection, root_for};
use crate::image::{push_extent, Extent, ExtentState};

/// One range, with `qemu-img map --output=json`'s fields: `offset` is where it is stored in
/// its layer's file (or VMDK extent, or qcow2 data file), for data stored as it is.
#[derive(Debug, PartialEq, Eq, serde::Serialize)]
struct MapEntry {
    start: u64,
    length: u64,
    depth: u32,
    present: bool,
    zero: bool,
    data: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
}

impl MapEntry {
    fn of(e: &Extent) -> Self {
        let data = matches!(e.state, ExtentState::Data | ExtentState::StoredZeros);
        MapEntry {
            start: e.offset,
            length: e.len,
            depth: e.layer,
            present: e.state != ExtentState::Unallocated,
            zero: e.state != ExtentState::Data,
            data,
            offset: e.host.filter(|_| data),
        }
    }
}

pub fn run(path: &Path, root: Option<&Path>, json: bool) -> Result<(), String> {
    // As `qemu-img info` does: an encrypted image whose key is not given shows its metadata.
    crate::meta::keyring::inspect_only();
    let image = open_for_inspection(path, root_for(path, root))?;
    let size = image.size();
    let mut extents = Vec::new();
    let mut at = 0;
    // In windows, so a huge, mostly empty disk does not build one giant list at once.
    while at < size {
        let len = (1u64 << 34).min(size - at);
        for extent in image.block_status(at, len).map_err(|e| e.to_string())? {
            push_extent(&mut extents, extent);
        }
        at += len;
    }
    let entries: Vec<MapEntry> = extents.iter().map(MapEntry::of).collect();
    if json {
        let text = serde_json::to_string_pretty(&entries).map_err(|e| e.to_string())?;
        println!("{text}");
        return Ok(());
    }
    println!(
        "{:<20}{:<20}{:<8}{:<14}Mapped to",
        "Offset", "Length", "Depth", "State"
    );
    for e in &entries {
        let state = match (e.data, e.zero, e.present) {
            (true, false, _) => "data",
            (true, true, _) => "data, zero",
            (false, _, true) => "zero",
            (false, _, false) => "unallocated",
        };
        let mapped = e.offset.map(|o| format!("{o:#x}")).unwrap_or_default();
        println!(
            "{:<#20x}{:<#20x}{:<8}{state:<14}{mapped}",
            e.start, e.length, e.depth
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_carry_qemu_img_maps_flags() {
        let e = |state, layer| Extent {
            offset: 0,
            len: 512,
            state,
            layer,
            host: Some(4096),
        };
        let data = MapEntry::of(&e(ExtentState::Data, 1));
        assert!(data.present && data.data && !data.zero && data.depth == 1);
        assert_eq!(data.offset, Some(4096));
        let stored = MapEntry::of(&e(ExtentState::StoredZeros, 0));
        assert!(stored.present && stored.data && stored.zero && stored.offset.is_some());
        let zero = MapEntry::of(&e(ExtentState::Zero, 0));
        assert!(zero.present && zero.zero && !zero.data);
        let hole = MapEntry::of(&e(ExtentState::Unallocated, 0));
        assert!(!hole.present && hole.zero && !hole.data && hole.offset.is_none());
    }
}
