//! Corrupt and hostile images: bad checksums, overlapping regions, BAT entries and logs
//! pointing outside their place, bad metadata values, and a mutation loop that must never
//! panic.
