//! Decompression of qcow2 compressed clusters: raw deflate (zlib without its header, as QEMU
//! writes it with window bits -12) or a zstd frame, per the header's compression type.
//!
//! The compressed length on disk is only known to the 512-byte sector, so the input usually
//! carries padding, or the start of the next compressed cluster, after the stream. Both
//! decoders therefore stop as soon as the cluster buffer is full and ignore what follows;
//! a stream that ends before filling the cluster, or stops making progress, is corrupt.

use flate2::{Decompress, FlushDecompress, Status};
use zstd::stream::raw::{Decoder as ZstdDecoder, InBuffer, Operation, OutBuffer};

use super::header::CompressionType;
use crate::error::{Error, Result};

/// Fills all of `cluster` by decompressing `input`.
pub fn decompress(kind: CompressionType, input: &[u8], cluster: &mut [u8]) -> Result<()> {
    match kind {
        CompressionType::Zlib => inflate_raw(input, cluster),
        CompressionType::Zstd => zstd_frame(input, cluster),
    }
}

fn inflate_raw(input: &[u8], cluster: &mut [u8]) -> Result<()> {
    let mut inflater = Decompress::new(false);
    loop {
        let consumed = inflater.total_in() as usize;
        let produced = inflater.total_out() as usize;
        if produced >= cluster.len() {
            return Ok(());
        }
        let (Some(rest_in), Some(rest_out)) = (input.get(consumed..), cluster.get_mut(produced..))
        else {
            return Err(Error::corrupt(
                "internal: deflate position outside its buffers",
            ));
        };
        let status = inflater
            .decompress(rest_in, rest_out, FlushDecompress::None)
            .map_err(|e| Error::corrupt(format!("compressed cluster does not inflate: {e}")))?;
        let progressed =
            inflater.total_in() as usize != consumed || inflater.total_out() as usize != produced;
        if inflater.total_out() as usize >= cluster.len() {
            return Ok(());
        }
        if status == Status::StreamEnd || !progressed {
            return Err(Error::corrupt(format!(
                "compressed cluster inflates to {} bytes, not {}",
                inflater.total_out(),
                cluster.len()
            )));
        }
    }
}

fn zstd_frame(input: &[u8], cluster: &mut [u8]) -> Result<()> {
    let mut decoder = ZstdDecoder::new().map_err(|e| Error::io("create a zstd decoder", e))?;
    let want = cluster.len();
    let mut input = InBuffer::around(input);
    let mut output = OutBuffer::around(cluster);
    loop {
        let (read, written) = (input.pos(), output.pos());
        let hint = decoder
            .run(&mut input, &mut output)
            .map_err(|e| Error::corrupt(format!("compressed cluster is not valid zstd: {e}")))?;
        if output.pos() >= want {
            return Ok(());
        }
        // 0 means the frame ended; anything else with no progress means the input ran out.
        if hint == 0 || (input.pos() == read && output.pos() == written) {
            return Err(Error::corrupt(format!(
                "compressed cluster decodes to {} bytes, not a whole cluster",
                output.pos()
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    fn deflate_raw(data: &[u8]) -> Vec<u8> {
        let mut c = Compress::new(Compression::default(), false);
        let mut out = vec![0u8; data.len() + 1024];
        c.compress(data, &mut out, FlushCompress::Finish).unwrap();
        out.truncate(c.total_out() as usize);
        out
    }

    fn cluster_pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i / 100 % 251) as u8).collect()
    }

    #[test]
    fn raw_deflate_with_trailing_padding() {
        let data = cluster_pattern(65536);
        let mut input = deflate_raw(&data);
        input.extend_from_slice(&[0xaa; 700]);
        let mut out = vec![0u8; 65536];
        decompress(CompressionType::Zlib, &input, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn zstd_frame_with_trailing_padding() {
        let data = cluster_pattern(65536);
        let mut input = zstd::bulk::compress(&data, 3).unwrap();
        input.extend_from_slice(&[0; 300]);
        let mut out = vec![0u8; 65536];
        decompress(CompressionType::Zstd, &input, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn short_or_garbage_streams_are_corrupt() {
        let data = cluster_pattern(4096);
        let mut out = vec![0u8; 8192];
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let input = match kind {
                CompressionType::Zlib => deflate_raw(&data),
                CompressionType::Zstd => zstd::bulk::compress(&data, 3).unwrap(),
            };
            let e = decompress(kind, &input, &mut out).unwrap_err();
            assert!(e.to_string().contains("4096"), "{e}");
            assert!(decompress(kind, &input[..input.len() / 2], &mut out).is_err());
            assert!(decompress(kind, &[0xff; 64], &mut out).is_err());
            assert!(decompress(kind, &[], &mut out).is_err());
        }
    }
}
