//! DICOM RLE Lossless (PS3.5 Annex G) decoding of one frame, for every bit depth.
//!
//! dicom-rs 0.10's RLE adapter refuses 32-bit data (RT Dose), so the station decodes RLE
//! itself: a 64-byte header of segment offsets, one PackBits-coded segment per byte plane
//! (most significant byte first), every length and offset checked against the frame's bytes.
//! Output is little-endian samples, ready for the rescale in `pixels`.

/// Decode an RLE frame of `pixels` single-sample pixels of `bytes_per_sample` bytes into
/// little-endian bytes.
pub(crate) fn decode(
    frame: &[u8],
    pixels: usize,
    bytes_per_sample: usize,
) -> Result<Vec<u8>, String> {
    if frame.len() < 64 {
        return Err(format!(
            "RLE frame of {} bytes has no 64-byte header",
            frame.len()
        ));
    }
    let word = |i: usize| {
        u32::from_le_bytes([
            frame[4 * i],
            frame[4 * i + 1],
            frame[4 * i + 2],
            frame[4 * i + 3],
        ]) as usize
    };
    let segments = word(0);
    if segments != bytes_per_sample {
        return Err(format!(
            "RLE frame has {segments} segments; {bytes_per_sample}-byte samples need {bytes_per_sample}"
        ));
    }
    let offsets: Vec<usize> = (1..=segments).map(word).collect();
    let mut out = vec![0u8; pixels * bytes_per_sample];
    for (s, &start) in offsets.iter().enumerate() {
        let end = offsets.get(s + 1).copied().unwrap_or(frame.len());
        if start < 64 || start > end || end > frame.len() {
            return Err(format!(
                "RLE segment {} spans bytes {start}..{end} of a {}-byte frame",
                s + 1,
                frame.len()
            ));
        }
        // Segment 0 holds the most significant bytes.
        let lane = bytes_per_sample - 1 - s;
        unpack_bits(&frame[start..end], pixels, |i, b| {
            out[i * bytes_per_sample + lane] = b
        })
        .map_err(|e| format!("RLE segment {}: {e}", s + 1))?;
    }
    Ok(out)
}

/// PackBits: a header byte n ≥ 0 copies the next n + 1 bytes, n in -127..=-1 repeats the
/// next byte 1 - n times, -128 does nothing. Emits exactly `wanted` bytes (an encoder may pad
/// the last run); fewer is an error.
fn unpack_bits(
    mut input: &[u8],
    wanted: usize,
    mut emit: impl FnMut(usize, u8),
) -> Result<(), String> {
    let mut done = 0;
    while done < wanted {
        let Some((&header, rest)) = input.split_first() else {
            return Err(format!("ends after {done} of {wanted} bytes"));
        };
        input = rest;
        let n = header as i8;
        if n >= 0 {
            let count = n as usize + 1;
            let literal = input
                .get(..count)
                .ok_or_else(|| format!("literal run of {count} past the end"))?;
            for &b in literal.iter().take(wanted - done) {
                emit(done, b);
                done += 1;
            }
            input = &input[count..];
        } else if n != -128 {
            let count = 1 - isize::from(n) as usize;
            let (&b, rest) = input.split_first().ok_or("replicate run past the end")?;
            input = rest;
            for _ in 0..count.min(wanted - done) {
                emit(done, b);
                done += 1;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::decode;
    use proptest::prelude::*;

    /// A PackBits encoder (runs of 3+ equal bytes replicated, the rest literal), to round-trip.
    fn pack_bits(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < data.len() {
            let mut run = 1;
            while i + run < data.len() && data[i + run] == data[i] && run < 128 {
                run += 1;
            }
            if run >= 3 {
                out.push((1 - run as isize) as i8 as u8);
                out.push(data[i]);
                i += run;
                continue;
            }
            let start = i;
            while i < data.len() && i - start < 128 {
                let ahead = data[i..].iter().take(3).all(|b| *b == data[i]) && data.len() - i >= 3;
                if ahead {
                    break;
                }
                i += 1;
            }
            out.push((i - start - 1) as u8);
            out.extend_from_slice(&data[start..i]);
        }
        out
    }

    fn encode(samples: &[u32], bytes_per_sample: usize) -> Vec<u8> {
        let mut segments = Vec::new();
        for lane in (0..bytes_per_sample).rev() {
            let plane: Vec<u8> = samples.iter().map(|v| (v >> (8 * lane)) as u8).collect();
            let mut seg = pack_bits(&plane);
            if seg.len() % 2 == 1 {
                seg.push(0x80); // no-op padding to an even length, as encoders do
            }
            segments.push(seg);
        }
        let mut frame = vec![0u8; 64];
        frame[..4].copy_from_slice(&(bytes_per_sample as u32).to_le_bytes());
        let mut offset = 64;
        for (s, seg) in segments.iter().enumerate() {
            frame[4 + 4 * s..8 + 4 * s].copy_from_slice(&(offset as u32).to_le_bytes());
            offset += seg.len();
        }
        for seg in segments {
            frame.extend(seg);
        }
        frame
    }

    fn little_endian(samples: &[u32], bytes_per_sample: usize) -> Vec<u8> {
        samples
            .iter()
            .flat_map(|v| v.to_le_bytes().into_iter().take(bytes_per_sample))
            .collect()
    }

    proptest! {
        #[test]
        fn round_trips_every_depth(
            bytes_per_sample in prop::sample::select(vec![1usize, 2, 4]),
            runs in prop::collection::vec((any::<u32>(), 1usize..300), 1..20),
        ) {
            let mask = if bytes_per_sample == 4 { u32::MAX } else { (1u32 << (8 * bytes_per_sample)) - 1 };
            let samples: Vec<u32> = runs
                .iter()
                .flat_map(|(v, n)| std::iter::repeat_n(v & mask, *n))
                .collect();
            let frame = encode(&samples, bytes_per_sample);
            let decoded = decode(&frame, samples.len(), bytes_per_sample).unwrap();
            prop_assert_eq!(decoded, little_endian(&samples, bytes_per_sample));
        }

        #[test]
        fn arbitrary_bytes_never_panic(frame in prop::collection::vec(any::<u8>(), 0..400), pixels in 0usize..500) {
            let _ = decode(&frame, pixels, 2);
        }
    }

    #[test]
    fn refuses_inconsistent_frames() {
        let frame = encode(&[1, 2, 3, 4], 2);
        assert!(decode(&frame, 4, 1).unwrap_err().contains("segments"));
        assert!(decode(&frame[..63], 4, 2).unwrap_err().contains("header"));
        assert!(decode(&frame, 5, 2).unwrap_err().contains("ends after"));
        let mut bad = frame.clone();
        bad[8..12].copy_from_slice(&10_000u32.to_le_bytes());
        assert!(decode(&bad, 4, 2).unwrap_err().contains("spans"));
    }
}
