//! Decompression shared by the formats: deflate (qcow and qcow2 clusters as raw deflate, VMDK
//! grains as zlib streams) and zstd frames (qcow2), plus a one-entry cache of the last cluster
//! inflated, since small sequential reads through a compressed cluster ask for it many times.
//!
//! Stored compressed lengths are only known roughly (qcow2 to the sector, qcow and VMDK with
//! padding), so the input usually carries padding, or the start of the next compressed
//! cluster, after the stream. The decoders therefore stop as soon as the output is full and
//! ignore what follows; a stream that ends before producing enough, or stops making progress,
//! is corrupt.

use std::sync::{Arc, Mutex, PoisonError};

use flate2::{Decompress, FlushDecompress, Status};
use zstd::stream::raw::{Decoder as ZstdDecoder, InBuffer, Operation, OutBuffer};

use crate::error::{Error, Result};

/// How a deflate stream is wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deflate {
    /// No header or checksum (qcow, qcow2: zlib with window bits -12).
    Raw,
    /// A zlib header and Adler-32 trailer (VMDK streamOptimized grains).
    Zlib,
}

/// Inflates `input` into `out` until `out` is full or the stream ends, and returns how many
/// bytes it produced: at least `min_len`, or the stream is corrupt.
pub fn inflate(input: &[u8], out: &mut [u8], wrapper: Deflate, min_len: usize) -> Result<usize> {
    let mut inflater = Decompress::new(wrapper == Deflate::Zlib);
    let short = |produced: u64| {
        Error::corrupt(format!(
            "compressed data inflates to {produced} bytes, not {min_len}"
        ))
    };
    loop {
        let consumed = inflater.total_in() as usize;
        let produced = inflater.total_out() as usize;
        if produced >= out.len() {
            return Ok(produced);
        }
        let (Some(rest_in), Some(rest_out)) = (input.get(consumed..), out.get_mut(produced..))
        else {
            return Err(Error::corrupt(
                "internal: deflate position outside its buffers",
            ));
        };
        let status = inflater
            .decompress(rest_in, rest_out, FlushDecompress::None)
            .map_err(|e| Error::corrupt(format!("compressed data does not inflate: {e}")))?;
        let total = inflater.total_out() as usize;
        let progressed = inflater.total_in() as usize != consumed || total != produced;
        if total >= out.len() {
            return Ok(total);
        }
        if status == Status::StreamEnd || !progressed {
            return if total >= min_len {
                Ok(total)
            } else {
                Err(short(inflater.total_out()))
            };
        }
    }
}

/// Fills all of `out` from the zstd frame at the start of `input`.
pub fn zstd_frame(input: &[u8], out: &mut [u8]) -> Result<()> {
    let mut decoder = ZstdDecoder::new().map_err(|e| Error::io("create a zstd decoder", e))?;
    let want = out.len();
    let mut input = InBuffer::around(input);
    let mut output = OutBuffer::around(out);
    loop {
        let (read, written) = (input.pos(), output.pos());
        let hint = decoder
            .run(&mut input, &mut output)
            .map_err(|e| Error::corrupt(format!("compressed data is not valid zstd: {e}")))?;
        if output.pos() >= want {
            return Ok(());
        }
        // 0 means the frame ended; anything else with no progress means the input ran out.
        if hint == 0 || (input.pos() == read && output.pos() == written) {
            return Err(Error::corrupt(format!(
                "compressed data decodes to {} bytes, not {want}",
                output.pos()
            )));
        }
    }
}

/// The last cluster (or grain) inflated, by its position in the file.
#[derive(Default)]
pub struct LastInflated(Mutex<Option<(u64, Arc<Vec<u8>>)>>);

impl LastInflated {
    /// The bytes inflated from file position `at`: the kept copy, or what `inflate` makes
    /// (then kept). `inflate` runs with no lock held.
    pub fn get_or_inflate(
        &self,
        at: u64,
        inflate: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<Arc<Vec<u8>>> {
        let cached = self
            .lock()
            .as_ref()
            .filter(|(kept_at, _)| *kept_at == at)
            .map(|(_, data)| Arc::clone(data));
        if let Some(data) = cached {
            return Ok(data);
        }
        let data = Arc::new(inflate()?);
        *self.lock() = Some((at, Arc::clone(&data)));
        Ok(data)
    }

    /// Forgets the kept copy (its file space is about to be reused).
    pub fn clear(&self) {
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(u64, Arc<Vec<u8>>)>> {
        // The slot holds a complete value or none at every moment: poisoning changes nothing.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    fn deflate(data: &[u8], zlib: bool) -> Vec<u8> {
        let mut c = Compress::new(Compression::default(), zlib);
        let mut out = vec![0u8; data.len() + 1024];
        c.compress(data, &mut out, FlushCompress::Finish).unwrap();
        out.truncate(c.total_out() as usize);
        out
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i / 100 % 251) as u8).collect()
    }

    #[test]
    fn deflate_streams_with_trailing_padding_fill_the_output() {
        let data = pattern(65536);
        for (wrapper, zlib) in [(Deflate::Raw, false), (Deflate::Zlib, true)] {
            let mut input = deflate(&data, zlib);
            input.extend_from_slice(&[0xaa; 700]);
            let mut out = vec![0u8; 65536];
            assert_eq!(inflate(&input, &mut out, wrapper, 65536).unwrap(), 65536);
            assert_eq!(out, data);
        }
    }

    #[test]
    fn a_stream_shorter_than_the_buffer_is_fine_down_to_min_len() {
        let data = pattern(4096);
        let input = deflate(&data, true);
        let mut out = vec![0u8; 8192];
        assert_eq!(
            inflate(&input, &mut out, Deflate::Zlib, 4096).unwrap(),
            4096
        );
        let e = inflate(&input, &mut out, Deflate::Zlib, 8192).unwrap_err();
        assert!(e.to_string().contains("4096"), "{e}");
    }

    #[test]
    fn zstd_frame_with_trailing_padding() {
        let data = pattern(65536);
        let mut input = zstd::bulk::compress(&data, 3).unwrap();
        input.extend_from_slice(&[0; 300]);
        let mut out = vec![0u8; 65536];
        zstd_frame(&input, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn short_or_garbage_streams_are_corrupt() {
        let data = pattern(4096);
        let mut out = vec![0u8; 8192];
        let raw = deflate(&data, false);
        assert!(inflate(&raw, &mut out, Deflate::Raw, 8192).is_err());
        assert!(inflate(&raw[..raw.len() / 2], &mut out, Deflate::Raw, 8192).is_err());
        assert!(inflate(&[0xff; 64], &mut out, Deflate::Raw, 1).is_err());
        assert!(inflate(&[], &mut out, Deflate::Raw, 1).is_err());
        let zstd = zstd::bulk::compress(&data, 3).unwrap();
        let e = zstd_frame(&zstd, &mut out).unwrap_err();
        assert!(e.to_string().contains("4096"), "{e}");
        assert!(zstd_frame(&zstd[..zstd.len() / 2], &mut out).is_err());
        assert!(zstd_frame(&[0xff; 64], &mut out).is_err());
        assert!(zstd_frame(&[], &mut out).is_err());
    }

    #[test]
    fn the_last_inflated_cluster_is_kept_by_position() {
        let last = LastInflated::default();
        let a = last.get_or_inflate(10, || Ok(vec![1])).unwrap();
        let again = last.get_or_inflate(10, || panic!("kept")).unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        let b = last.get_or_inflate(20, || Ok(vec![2])).unwrap();
        assert_eq!(*b, [2]);
        last.clear();
        assert!(last
            .get_or_inflate(20, || Err(Error::corrupt("x")))
            .is_err());
    }
}
