//! What `imgfs info` shows of a qcow2 image beyond the common fields: header features, the
//! snapshot a view shows, data and backing files, bitmaps and the snapshot list.

use super::Qcow2Image;

impl Qcow2Image {
    pub(super) fn details(&self) -> Vec<(&'static str, String)> {
        let h = &self.shared.header;
        let yes_no = |b: bool| if b { "yes" } else { "no" }.to_string();
        let mut details = vec![
            ("refcount bits", h.refcount_bits().to_string()),
            ("compression type", h.compression_type.name().to_string()),
            ("extended l2", yes_no(h.extended_l2())),
            ("lazy refcounts", yes_no(h.lazy_refcounts())),
            ("dirty", yes_no(h.is_dirty())),
            ("corrupt", yes_no(h.is_corrupt())),
            ("l1 size", h.l1_size.to_string()),
        ];
        if let Some(index) = self.snapshot {
            if let Some(s) = self.shared.snapshots.get(index) {
                details.push(("snapshot", format!("{} (id {})", s.name, s.id)));
            }
        }
        if let Some(cipher) = &self.shared.cipher {
            details.push(("encryption", cipher.describe()));
        }
        if let Some(name) = h.data_file() {
            details.push(("data file", name.to_string_lossy().into_owned()));
        }
        if h.has_data_file() {
            details.push(("data file raw", yes_no(h.data_file_raw())));
        }
        if let Some(name) = h.backing_file() {
            details.push(("backing file", name.to_string_lossy().into_owned()));
        }
        if let Some(format) = h.backing_format() {
            details.push(("backing format", format.to_string()));
        }
        if let Some(bitmaps) = &h.bitmaps {
            let state = if h.bitmaps_consistent() {
                ""
            } else {
                " (inconsistent)"
            };
            details.push(("bitmaps", format!("{}{state}", bitmaps.nb_bitmaps)));
        }
        if h.autoclear_features != 0 {
            details.push(("autoclear features", format!("{:#x}", h.autoclear_features)));
        }
        let names: Vec<&str> = self
            .shared
            .snapshots
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        details.push((
            "snapshots",
            if names.is_empty() {
                "0".to_string()
            } else {
                format!("{}: {}", names.len(), names.join(", "))
            },
        ));
        details
    }
}
