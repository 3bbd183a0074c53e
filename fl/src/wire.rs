//! The two payloads of a federated round: a model's weights (the global weights the registry
//! hands out, checkpoints, the final model) and a station's update (its weight delta, how many
//! samples it trained on, fp32 or 8-bit).
//!
//! Weights `b"AMW\x01"`: tensor count (u32 LE); per tensor its name (u16 LE length, UTF-8),
//! rank (u8) and dims (u32 LE each); then every tensor's f32 LE values in the same order.
//! Update `b"AMU\x01"`: encoding (u8: 0 fp32, 1 8-bit `quant`), samples (u64 LE), value count
//! (u32 LE), then the values (fp32 LE, or a `quant` payload).
//!
//! Decoders check every length before reading and refuse trailing bytes, non-finite values
//! and absurd sizes: a hostile payload is an error, never a panic or a huge allocation.

use crate::quant;

const WEIGHTS_MAGIC: &[u8; 4] = b"AMW\x01";
const UPDATE_MAGIC: &[u8; 4] = b"AMU\x01";
/// At most this many tensors in a weight set.
pub const MAX_TENSORS: usize = 4096;
/// At most this many values in a weight set or an update (256 MiB of f32).
pub const MAX_VALUES: usize = 64 << 20;
const MAX_RANK: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad magic: not {0}")]
    Magic(&'static str),
    #[error("truncated at byte {0}")]
    Truncated(usize),
    #[error("{0} trailing bytes")]
    Trailing(usize),
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("tensor name is not UTF-8 or empty")]
    Name,
    #[error("duplicate tensor name {0:?}")]
    Duplicate(String),
    #[error("non-finite value at {0}")]
    NotFinite(usize),
    #[error("unknown update encoding {0}")]
    Encoding(u8),
    #[error("8-bit payload: {0}")]
    Quant(#[from] quant::QuantError),
    #[error("update has {got} values, the model has {expected}")]
    Mismatch { expected: usize, got: usize },
}

/// One named tensor of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A model's weights, in a fixed order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Weights {
    pub tensors: Vec<Tensor>,
}

impl Weights {
    /// All values, tensor after tensor.
    pub fn flat(&self) -> Vec<f32> {
        self.tensors
            .iter()
            .flat_map(|t| t.data.iter().copied())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same layout with `flat`'s values (which must have `len()` values).
    pub fn with_flat(&self, flat: &[f32]) -> Result<Weights, WireError> {
        if flat.len() != self.len() {
            return Err(WireError::Mismatch {
                expected: self.len(),
                got: flat.len(),
            });
        }
        let mut at = 0;
        let tensors = self
            .tensors
            .iter()
            .map(|t| {
                let n = t.data.len();
                at += n;
                Tensor {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    data: flat[at - n..at].to_vec(),
                }
            })
            .collect();
        Ok(Weights { tensors })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.len() * 4 + self.tensors.len() * 48);
        out.extend_from_slice(WEIGHTS_MAGIC);
        out.extend_from_slice(&(self.tensors.len() as u32).to_le_bytes());
        for t in &self.tensors {
            out.extend_from_slice(&(t.name.len() as u16).to_le_bytes());
            out.extend_from_slice(t.name.as_bytes());
            out.push(t.shape.len() as u8);
            for d in &t.shape {
                out.extend_from_slice(&(*d as u32).to_le_bytes());
            }
        }
        for t in &self.tensors {
            for x in &t.data {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Weights, WireError> {
        let mut r = Reader { bytes, at: 0 };
        if r.take(4)? != WEIGHTS_MAGIC {
            return Err(WireError::Magic("a weight set"));
        }
        let count = r.u32()? as usize;
        if count > MAX_TENSORS {
            return Err(WireError::TooLarge(format!("{count} tensors")));
        }
        let mut heads: Vec<(String, Vec<usize>, usize)> = Vec::with_capacity(count);
        let mut total = 0usize;
        for _ in 0..count {
            let n = r.u16()? as usize;
            let name = std::str::from_utf8(r.take(n)?)
                .ok()
                .filter(|s| !s.is_empty())
                .ok_or(WireError::Name)?
                .to_string();
            if heads.iter().any(|(h, _, _)| *h == name) {
                return Err(WireError::Duplicate(name));
            }
            let rank = r.take(1)?[0] as usize;
            if rank > MAX_RANK {
                return Err(WireError::TooLarge(format!("rank {rank}")));
            }
            let mut shape = Vec::with_capacity(rank);
            let mut elements = 1usize;
            for _ in 0..rank {
                let d = r.u32()? as usize;
                elements = elements
                    .checked_mul(d)
                    .filter(|e| *e <= MAX_VALUES)
                    .ok_or_else(|| WireError::TooLarge(format!("tensor {name:?}")))?;
                shape.push(d);
            }
            total += elements;
            if total > MAX_VALUES {
                return Err(WireError::TooLarge(format!("{total} values")));
            }
            heads.push((name, shape, elements));
        }
        let mut tensors = Vec::with_capacity(count);
        let mut index = 0;
        for (name, shape, elements) in heads {
            let data = r.f32s(elements, index)?;
            index += elements;
            tensors.push(Tensor { name, shape, data });
        }
        r.end()?;
        Ok(Weights { tensors })
    }
}

/// How an update's values travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encoding {
    Fp32,
    /// 8-bit blockwise (`quant`): about a quarter of the bytes.
    Q8,
}

/// A station's contribution to a round.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub samples: u64,
    pub delta: Vec<f32>,
}

impl Update {
    pub fn encode(&self, encoding: Encoding) -> Result<Vec<u8>, WireError> {
        if let Some(i) = self.delta.iter().position(|x| !x.is_finite()) {
            return Err(WireError::NotFinite(i));
        }
        let mut out = Vec::with_capacity(17 + self.delta.len() * 4);
        out.extend_from_slice(UPDATE_MAGIC);
        out.push(match encoding {
            Encoding::Fp32 => 0,
            Encoding::Q8 => 1,
        });
        out.extend_from_slice(&self.samples.to_le_bytes());
        out.extend_from_slice(&(self.delta.len() as u32).to_le_bytes());
        match encoding {
            Encoding::Fp32 => {
                for x in &self.delta {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
            Encoding::Q8 => out.extend_from_slice(&quant::encode(&self.delta)?),
        }
        Ok(out)
    }

    /// The update and how it travelled. Non-finite values are refused here (a NaN can also
    /// be screened later, but it never needs to get that far).
    pub fn decode(bytes: &[u8]) -> Result<(Update, Encoding), WireError> {
        let mut r = Reader { bytes, at: 0 };
        if r.take(4)? != UPDATE_MAGIC {
            return Err(WireError::Magic("an update"));
        }
        let encoding = match r.take(1)?[0] {
            0 => Encoding::Fp32,
            1 => Encoding::Q8,
            other => return Err(WireError::Encoding(other)),
        };
        let samples = r.u64()?;
        let len = r.u32()? as usize;
        if len > MAX_VALUES {
            return Err(WireError::TooLarge(format!("{len} values")));
        }
        let delta = match encoding {
            Encoding::Fp32 => {
                let d = r.f32s(len, 0)?;
                r.end()?;
                d
            }
            Encoding::Q8 => {
                let d = quant::decode(&bytes[r.at..])?;
                if d.len() != len {
                    return Err(WireError::Mismatch {
                        expected: len,
                        got: d.len(),
                    });
                }
                d
            }
        };
        Ok((Update { samples, delta }, encoding))
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or(WireError::Truncated(self.at))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }

    /// `n` finite f32 values; `first` numbers them in errors.
    fn f32s(&mut self, n: usize, first: usize) -> Result<Vec<f32>, WireError> {
        let raw = self.take(n.checked_mul(4).ok_or(WireError::Truncated(self.at))?)?;
        raw.chunks_exact(4)
            .enumerate()
            .map(|(i, c)| {
                let x = f32::from_le_bytes(c.try_into().expect("4"));
                if x.is_finite() {
                    Ok(x)
                } else {
                    Err(WireError::NotFinite(first + i))
                }
            })
            .collect()
    }

    fn end(&self) -> Result<(), WireError> {
        match self.bytes.len() - self.at {
            0 => Ok(()),
            n => Err(WireError::Trailing(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn model() -> Weights {
        Weights {
            tensors: vec![
                Tensor {
                    name: "conv.w".into(),
                    shape: vec![2, 1, 3, 3],
                    data: (0..18).map(|i| i as f32 * 0.1 - 0.9).collect(),
                },
                Tensor {
                    name: "conv.b".into(),
                    shape: vec![2],
                    data: vec![0.5, -0.25],
                },
            ],
        }
    }

    #[test]
    fn weights_round_trip_and_flat_layout() {
        let w = model();
        let back = Weights::decode(&w.encode()).unwrap();
        assert_eq!(back, w);
        let flat = w.flat();
        assert_eq!(flat.len(), 20);
        assert_eq!(flat[18], 0.5);
        assert_eq!(w.with_flat(&flat).unwrap(), w);
        assert!(matches!(
            w.with_flat(&flat[1..]),
            Err(WireError::Mismatch { .. })
        ));
    }

    #[test]
    fn weights_refuse_corruption() {
        let bytes = model().encode();
        assert!(matches!(
            Weights::decode(&bytes[..bytes.len() - 1]),
            Err(WireError::Truncated(_))
        ));
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(Weights::decode(&long), Err(WireError::Trailing(1)));
        let mut nan = bytes.clone();
        let at = nan.len() - 4;
        nan[at..].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(Weights::decode(&nan), Err(WireError::NotFinite(19)));
        let mut magic = bytes;
        magic[0] = b'X';
        assert!(matches!(Weights::decode(&magic), Err(WireError::Magic(_))));
        // A header that claims a huge tensor is refused before anything is allocated.
        let mut huge = Vec::from(*WEIGHTS_MAGIC);
        huge.extend_from_slice(&1u32.to_le_bytes());
        huge.extend_from_slice(&1u16.to_le_bytes());
        huge.push(b'w');
        huge.push(2);
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Weights::decode(&huge),
            Err(WireError::TooLarge(_))
        ));
    }

    #[test]
    fn updates_round_trip_in_both_encodings() {
        let u = Update {
            samples: 96,
            delta: (0..5000)
                .map(|i| ((i * 37) % 101) as f32 / 1000.0 - 0.05)
                .collect(),
        };
        let fp = u.encode(Encoding::Fp32).unwrap();
        assert_eq!(Update::decode(&fp).unwrap(), (u.clone(), Encoding::Fp32));
        let q = u.encode(Encoding::Q8).unwrap();
        assert!(
            q.len() * 100 <= fp.len() * 26,
            "{} vs {}",
            q.len(),
            fp.len()
        );
        let (back, enc) = Update::decode(&q).unwrap();
        assert_eq!((back.samples, enc), (96, Encoding::Q8));
        let step = 0.1 / 255.0;
        for (a, b) in back.delta.iter().zip(&u.delta) {
            assert!((a - b).abs() <= step, "{a} vs {b}");
        }
        let bad = Update {
            samples: 1,
            delta: vec![0.0, f32::INFINITY],
        };
        assert_eq!(bad.encode(Encoding::Fp32), Err(WireError::NotFinite(1)));
        let mut unknown = fp;
        unknown[4] = 7;
        assert_eq!(Update::decode(&unknown), Err(WireError::Encoding(7)));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Weights::decode(&bytes);
            let _ = Update::decode(&bytes);
            let mut w = Vec::from(*WEIGHTS_MAGIC);
            w.extend_from_slice(&bytes);
            let _ = Weights::decode(&w);
            let mut u = Vec::from(*UPDATE_MAGIC);
            u.extend_from_slice(&bytes);
            let _ = Update::decode(&u);
        }
    }
}
