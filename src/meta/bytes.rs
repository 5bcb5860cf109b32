//! Reads and writes of little- and big-endian fields in on-disk structures, bounds-checked so a
//! short or hostile buffer gives a `Corrupt` error naming the field instead of a panic.

use crate::error::{Error, Result};

fn field<const N: usize>(buf: &[u8], offset: usize, name: &str) -> Result<[u8; N]> {
    offset
        .checked_add(N)
        .and_then(|end| buf.get(offset..end))
        .and_then(|s| <[u8; N]>::try_from(s).ok())
        .ok_or_else(|| Error::corrupt(format!("field {name} at {offset} is outside the structure")))
}

pub fn u32_le(buf: &[u8], offset: usize, name: &str) -> Result<u32> {
    field::<4>(buf, offset, name).map(u32::from_le_bytes)
}

pub fn u64_le(buf: &[u8], offset: usize, name: &str) -> Result<u64> {
    field::<8>(buf, offset, name).map(u64::from_le_bytes)
}

pub fn u16_le(buf: &[u8], offset: usize, name: &str) -> Result<u16> {
    field(buf, offset, name).map(u16::from_le_bytes)
}

pub fn u16_be(buf: &[u8], offset: usize, name: &str) -> Result<u16> {
    field::<2>(buf, offset, name).map(u16::from_be_bytes)
}

pub fn u32_be(buf: &[u8], offset: usize, name: &str) -> Result<u32> {
    field::<4>(buf, offset, name).map(u32::from_be_bytes)
}

pub fn u64_be(buf: &[u8], offset: usize, name: &str) -> Result<u64> {
    field::<8>(buf, offset, name).map(u64::from_be_bytes)
}

pub fn bytes16(buf: &[u8], offset: usize, name: &str) -> Result<[u8; 16]> {
    field::<16>(buf, offset, name)
}

/// Stores `bytes` at `offset`; the caller owns the buffer's layout, so a range outside it is a
/// programming error reported as `OutOfRange`.
pub fn put_bytes(buf: &mut [u8], offset: usize, bytes: &[u8]) -> Result<()> {
    buf.get_mut(offset..offset.saturating_add(bytes.len()))
        .ok_or_else(|| {
            Error::out_of_range(format!("internal: store at {offset} outside the buffer"))
        })?
        .copy_from_slice(bytes);
    Ok(())
}

/// Stores `value` little-endian at `offset` (see `put_bytes`).
pub fn put_u32_le(buf: &mut [u8], offset: usize, value: u32) -> Result<()> {
    put_bytes(buf, offset, &value.to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_decode_with_explicit_endianness() {
        let buf = [1u8, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(u32_le(&buf, 0, "a").unwrap(), 0x0403_0201);
        assert_eq!(u32_be(&buf, 4, "b").unwrap(), 0x0506_0708);
        assert_eq!(u16_be(&buf, 6, "b").unwrap(), 0x0708);
        assert_eq!(u64_le(&buf, 0, "c").unwrap(), 0x0807_0605_0403_0201);
        assert_eq!(u64_be(&buf, 0, "c").unwrap(), 0x0102_0304_0506_0708);
    }

    #[test]
    fn out_of_bounds_names_the_field() {
        let err = u32_le(&[0u8; 6], 4, "offset_data").unwrap_err();
        assert!(err.to_string().contains("offset_data"), "{err}");
        assert!(u64_le(&[0u8; 8], usize::MAX, "x").is_err());
        assert!(put_u32_le(&mut [0u8; 3], 0, 1).is_err());
    }
}
