//! 8-bit blockwise quantisation of updates: each block of `BLOCK` values is stored as its
//! minimum and step (two little-endian f32) and one byte per value, rounded to the nearest
//! level, so a value comes back within half a step (`(max − min) / 510`) of what was sent.
//! For large updates that is ~25.8 % of the fp32 bytes.
//!
//! Format: `b"AQ8\x01"`, value count (u32 LE), block size (u32 LE), then per block `min`,
//! `step`, and the block's bytes. `decode` checks every length before reading and refuses
//! non-finite headers, so a corrupt or hostile payload is an error, never a panic.

pub const BLOCK: usize = 1024;
const MAGIC: &[u8; 4] = b"AQ8\x01";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    #[error("not an 8-bit quantised update (bad magic)")]
    Magic,
    #[error("quantised update is truncated or has trailing bytes (expected {expected}, got {got})")]
    Length { expected: usize, got: usize },
    #[error("block size must be 1 to 65536")]
    BlockSize,
    #[error("non-finite block header")]
    NotFinite,
    #[error("cannot quantise a non-finite value at {0}")]
    Input(usize),
}

/// Quantise `values` (all finite).
pub fn encode(values: &[f32]) -> Result<Vec<u8>, QuantError> {
    if let Some(i) = values.iter().position(|x| !x.is_finite()) {
        return Err(QuantError::Input(i));
    }
    let mut out = Vec::with_capacity(12 + values.len() + values.len().div_ceil(BLOCK) * 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(values.len() as u32).to_le_bytes());
    out.extend_from_slice(&(BLOCK as u32).to_le_bytes());
    for block in values.chunks(BLOCK) {
        let min = block.iter().copied().fold(f32::INFINITY, f32::min);
        let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let step = ((f64::from(max) - f64::from(min)) / 255.0) as f32;
        out.extend_from_slice(&min.to_le_bytes());
        out.extend_from_slice(&step.to_le_bytes());
        for &x in block {
            let q = if step > 0.0 {
                ((f64::from(x) - f64::from(min)) / f64::from(step))
                    .round()
                    .clamp(0.0, 255.0) as u8
            } else {
                0
            };
            out.push(q);
        }
    }
    Ok(out)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn f32_at(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The values back; refuses anything that is not exactly what `encode` writes.
pub fn decode(bytes: &[u8]) -> Result<Vec<f32>, QuantError> {
    if bytes.len() < 12 {
        return Err(QuantError::Length {
            expected: 12,
            got: bytes.len(),
        });
    }
    if &bytes[..4] != MAGIC {
        return Err(QuantError::Magic);
    }
    let n = u32_at(bytes, 4) as usize;
    let block = u32_at(bytes, 8) as usize;
    if block == 0 || block > 65536 {
        return Err(QuantError::BlockSize);
    }
    let expected = 12 + n + n.div_ceil(block) * 8;
    if bytes.len() != expected {
        return Err(QuantError::Length {
            expected,
            got: bytes.len(),
        });
    }
    let mut out = Vec::with_capacity(n);
    let mut at = 12;
    let mut left = n;
    while left > 0 {
        let len = left.min(block);
        let min = f32_at(bytes, at);
        let step = f32_at(bytes, at + 4);
        if !min.is_finite() || !step.is_finite() {
            return Err(QuantError::NotFinite);
        }
        at += 8;
        out.extend(
            bytes[at..at + len]
                .iter()
                .map(|&q| (f64::from(min) + f64::from(q) * f64::from(step)) as f32),
        );
        at += len;
        left -= len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_large_update_is_about_a_quarter_of_fp32() {
        let v: Vec<f32> = (0..100_000)
            .map(|i| ((i as f32) * 0.37).sin() * 0.01)
            .collect();
        let q = encode(&v).unwrap();
        let ratio = q.len() as f64 / (v.len() * 4) as f64;
        assert!(ratio < 0.26, "{ratio}");
        let back = decode(&q).unwrap();
        let step = 0.02 / 255.0;
        for (a, b) in v.iter().zip(&back) {
            assert!((a - b).abs() <= step * 0.5 + 1e-7);
        }
    }

    #[test]
    fn corrupt_payloads_are_refused() {
        let q = encode(&[1.0, 2.0, 3.0]).unwrap();
        assert_eq!(
            decode(&q[..q.len() - 1]),
            Err(QuantError::Length {
                expected: q.len(),
                got: q.len() - 1
            })
        );
        let mut bad = q.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad), Err(QuantError::Magic));
        let mut bad = q.clone();
        bad[12..16].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(decode(&bad), Err(QuantError::NotFinite));
        let mut bad = q.clone();
        bad[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&bad), Err(QuantError::Length { .. })));
        assert_eq!(encode(&[0.0, f32::NAN]), Err(QuantError::Input(1)));
    }

    proptest! {
        #[test]
        fn round_trip_within_half_a_step(v in proptest::collection::vec(-1e3f32..1e3, 0..3000)) {
            let back = decode(&encode(&v).unwrap()).unwrap();
            prop_assert_eq!(back.len(), v.len());
            for (chunk, got) in v.chunks(BLOCK).zip(back.chunks(BLOCK)) {
                let lo = chunk.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = chunk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let half = (f64::from(hi) - f64::from(lo)) / 255.0 / 2.0;
                for (a, b) in chunk.iter().zip(got) {
                    prop_assert!((f64::from(*a) - f64::from(*b)).abs() <= half * 1.0001 + 1e-4);
                }
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }
    }
}
