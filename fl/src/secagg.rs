//! Secure aggregation by pairwise masking (Bonawitz et al. 2017, "Practical Secure
//! Aggregation for Privacy-Preserving Machine Learning", with double masking), so the registry
//! learns the sum of a round's updates and no single one.
//!
//! Per round, station `i` holds an X25519 mask key `sk_i` (its public half goes to the other
//! stations through the registry) and a self-mask seed `b_i`. It secret-shares both (Shamir,
//! `threshold` of `n`, over GF(256) byte by byte) to the other stations, then sends
//! ```text
//! y_i = x_i + PRG(b_i) + Σ_{j>i} PRG(s_ij) − Σ_{j<i} PRG(s_ij)      (mod 2^64 per coordinate)
//! ```
//! where `s_ij` is derived from X25519(sk_i, pk_j) and the round id. The pairwise masks cancel
//! in the sum. To unmask, the registry names the survivors `V` (whose `y` arrived) and the
//! dropped `D`; each surviving station reveals its shares of `b_i` for `i ∈ V` and of `sk_j` for
//! `j ∈ D` — never both for one station (`reveal` refuses) — and the registry removes the
//! self masks of the survivors and the dropped stations' pairwise masks. With fewer than
//! `threshold` survivors nothing can be reconstructed and the round fails: no update is
//! revealed. Updates are fixed-point encoded (2^-24 resolution) in the ring Z_2^64.
//!
//! Threat model: an honest-but-curious registry and any coalition of fewer than `threshold`
//! stations learn nothing about an individual update beyond the sum of the survivors. Not
//! covered: a registry that tells different stations different survivor sets (Bonawitz's
//! consistency round), and authenticity of the public keys and shares it relays (stations
//! would sign them with their station keys). Randomness is the caller's (`fill`).

use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher};
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use x25519_dalek::{PublicKey, StaticSecret};

/// Fixed-point scale: values are carried as round(x · 2^24).
pub const SCALE: f64 = 16_777_216.0;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecAggError {
    #[error("threshold {threshold} must be 2..=n ({n})")]
    Threshold { threshold: usize, n: usize },
    #[error(
        "{survivors} survivors are fewer than the threshold {threshold}: the round fails, nothing is revealed"
    )]
    BelowThreshold { survivors: usize, threshold: usize },
    #[error("asked to reveal both secrets of station {0}: refused")]
    BothSecrets(u32),
    #[error("not enough shares for station {0}")]
    MissingShares(u32),
    #[error(
        "station {0}'s reconstructed secret does not match its public key or commitment (bad shares)"
    )]
    BadShares(u32),
    #[error("station {0} is not a participant")]
    Unknown(u32),
    #[error("masked update of station {0} has the wrong length")]
    Length(u32),
    #[error("the sum carries no weight (no samples): nothing to average")]
    NoWeight,
    #[error("not a masked vector")]
    NotMasked,
    #[error("a share bundle does not parse")]
    BadBundle,
}

/// Values → ring elements.
pub fn encode(x: &[f32]) -> Vec<u64> {
    x.iter()
        .map(|&v| ((f64::from(v) * SCALE).round() as i64) as u64)
        .collect()
}

/// Ring elements (a sum) → values.
pub fn decode(sum: &[u64]) -> Vec<f32> {
    sum.iter()
        .map(|&v| (v as i64) as f64 / SCALE)
        .map(|v| v as f32)
        .collect()
}

/// A FedAvg contribution as ring elements: every coordinate of `delta` times `samples`, then
/// `samples` itself as the last coordinate, so the sum of contributions carries both the
/// weighted sum and the total weight (the weighted mean needs no individual sample count).
pub fn encode_weighted(delta: &[f32], samples: u64) -> Vec<u64> {
    let w = samples as f64;
    delta
        .iter()
        .map(|&v| f64::from(v) * w)
        .chain(std::iter::once(w))
        .map(|v| ((v * SCALE).round() as i64) as u64)
        .collect()
}

/// The weighted mean and the total weight from a sum of [`encode_weighted`] contributions.
pub fn decode_weighted(sum: &[u64]) -> Result<(Vec<f32>, f64), SecAggError> {
    let (&total, coords) = sum.split_last().ok_or(SecAggError::NoWeight)?;
    let total = (total as i64) as f64 / SCALE;
    if total < 0.5 {
        return Err(SecAggError::NoWeight);
    }
    let mean = coords
        .iter()
        .map(|&v| ((v as i64) as f64 / SCALE / total) as f32)
        .collect();
    Ok((mean, total))
}

const MASKED_MAGIC: &[u8; 8] = b"AMSKv1\0\0";

/// A masked vector on the wire: magic, count (u64 LE), elements (u64 LE).
pub fn encode_masked(y: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + y.len() * 8);
    out.extend_from_slice(MASKED_MAGIC);
    out.extend_from_slice(&(y.len() as u64).to_le_bytes());
    for v in y {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// The inverse of [`encode_masked`]; refuses anything else (a plain update, for one).
pub fn decode_masked(bytes: &[u8]) -> Result<Vec<u64>, SecAggError> {
    let rest = bytes
        .strip_prefix(&MASKED_MAGIC[..])
        .ok_or(SecAggError::NotMasked)?;
    let (count, body) = rest.split_at_checked(8).ok_or(SecAggError::NotMasked)?;
    let count = u64::from_le_bytes(count.try_into().expect("8 bytes"));
    if body.len() as u64 != count.saturating_mul(8) {
        return Err(SecAggError::NotMasked);
    }
    Ok(body
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        .collect())
}

fn prg(seed: &[u8; 32], len: usize) -> Vec<u64> {
    let mut buf = vec![0u8; len * 8];
    let mut c = ChaCha20::new(seed.into(), &[0u8; 12].into());
    c.apply_keystream(&mut buf);
    buf.chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        .collect()
}

fn kdf(label: &str, round: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"amicus-secagg-v1/");
    h.update(label.as_bytes());
    h.update((round.len() as u64).to_le_bytes());
    h.update(round);
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn pair_seed(round: &[u8], a: u32, b: u32, shared: &[u8; 32]) -> [u8; 32] {
    let (lo, hi) = (a.min(b), a.max(b));
    kdf(
        "pair",
        round,
        &[&lo.to_le_bytes(), &hi.to_le_bytes(), shared],
    )
}

fn add_into(acc: &mut [u64], v: &[u64], negate: bool) {
    for (a, x) in acc.iter_mut().zip(v) {
        *a = if negate {
            a.wrapping_sub(*x)
        } else {
            a.wrapping_add(*x)
        };
    }
}

// ---- Shamir over GF(256) ----------------------------------------------------------------

fn gf_mul(mut a: u8, mut b: u8) -> u8 {
    let mut p = 0u8;
    while b != 0 {
        if b & 1 != 0 {
            p ^= a;
        }
        let carry = a & 0x80;
        a <<= 1;
        if carry != 0 {
            a ^= 0x1b;
        }
        b >>= 1;
    }
    p
}

fn gf_inv(a: u8) -> u8 {
    // a^254 = a^-1 for a ≠ 0.
    let mut r = 1u8;
    let mut base = a;
    let mut e = 254u32;
    while e > 0 {
        if e & 1 == 1 {
            r = gf_mul(r, base);
        }
        base = gf_mul(base, base);
        e >>= 1;
    }
    r
}

/// One share: the x coordinate (participant id + 1) and one byte per secret byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub x: u8,
    pub y: Vec<u8>,
}

/// Split `secret` into shares at `xs` (distinct, non-zero); any `threshold` reconstruct it.
pub fn split(
    secret: &[u8],
    threshold: usize,
    xs: &[u8],
    fill: &mut dyn FnMut(&mut [u8]),
) -> Vec<Share> {
    let mut coeffs = vec![0u8; secret.len() * (threshold - 1)];
    fill(&mut coeffs);
    xs.iter()
        .map(|&x| Share {
            x,
            y: secret
                .iter()
                .enumerate()
                .map(|(i, &s)| {
                    // Horner: a0 + x(a1 + x(a2 + …)).
                    let c = &coeffs[i * (threshold - 1)..(i + 1) * (threshold - 1)];
                    let mut acc = 0u8;
                    for &a in c.iter().rev() {
                        acc = gf_mul(acc, x) ^ a;
                    }
                    gf_mul(acc, x) ^ s
                })
                .collect(),
        })
        .collect()
}

/// The secret from shares (Lagrange interpolation at 0); uses the first `threshold`.
pub fn combine(shares: &[Share], threshold: usize) -> Option<Vec<u8>> {
    let shares = shares.get(..threshold)?;
    let len = shares.first()?.y.len();
    let mut out = vec![0u8; len];
    for (j, sj) in shares.iter().enumerate() {
        if sj.y.len() != len || sj.x == 0 {
            return None;
        }
        let mut basis = 1u8;
        for (m, sm) in shares.iter().enumerate() {
            if m != j {
                if sm.x == sj.x {
                    return None;
                }
                // x_m / (x_m − x_j); subtraction is XOR.
                basis = gf_mul(basis, gf_mul(sm.x, gf_inv(sm.x ^ sj.x)));
            }
        }
        for (o, &y) in out.iter_mut().zip(&sj.y) {
            *o ^= gf_mul(basis, y);
        }
    }
    Some(out)
}

fn share_x(id: u32) -> u8 {
    u8::try_from(id + 1).expect("at most 255 participants")
}

// ---- stations ---------------------------------------------------------------------------

/// What station `from` gives station `to`: its shares of both of its secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareBundle {
    pub from: u32,
    pub to: u32,
    pub mask_key: Share,
    pub self_seed: Share,
}

impl ShareBundle {
    /// `from`, `to` (u32 LE), then each share as its x and 32 bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(74);
        out.extend_from_slice(&self.from.to_le_bytes());
        out.extend_from_slice(&self.to.to_le_bytes());
        for s in [&self.mask_key, &self.self_seed] {
            out.push(s.x);
            out.extend_from_slice(&s.y);
        }
        out
    }

    pub fn from_bytes(b: &[u8]) -> Result<ShareBundle, SecAggError> {
        if b.len() != 74 {
            return Err(SecAggError::BadBundle);
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let share_at = |i: usize| Share {
            x: b[i],
            y: b[i + 1..i + 33].to_vec(),
        };
        Ok(ShareBundle {
            from: u32_at(0),
            to: u32_at(4),
            mask_key: share_at(8),
            self_seed: share_at(41),
        })
    }
}

/// A station's secrets for one round.
pub struct StationSecrets {
    pub id: u32,
    mask_key: [u8; 32],
    self_seed: [u8; 32],
}

/// A share a station reveals to the registry for unmasking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revealed {
    SelfSeed { of: u32, share: Share },
    MaskKey { of: u32, share: Share },
}

impl StationSecrets {
    pub fn new(id: u32, fill: &mut dyn FnMut(&mut [u8])) -> StationSecrets {
        assert!(id < 255, "at most 255 participants");
        let mut mask_key = [0u8; 32];
        let mut self_seed = [0u8; 32];
        fill(&mut mask_key);
        fill(&mut self_seed);
        StationSecrets {
            id,
            mask_key,
            self_seed,
        }
    }

    pub fn mask_public(&self) -> [u8; 32] {
        PublicKey::from(&StaticSecret::from(self.mask_key)).to_bytes()
    }

    /// A commitment to this round's self-mask seed, sent with the public key: lets the
    /// registry tell a wrongly reconstructed seed (bad shares) from a right one.
    pub fn self_commitment(&self, round: &[u8]) -> [u8; 32] {
        kdf("commit", round, &[&self.self_seed])
    }

    /// Shares of this station's secrets for every participant (itself included).
    pub fn shares(
        &self,
        participants: &[u32],
        threshold: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<Vec<ShareBundle>, SecAggError> {
        if threshold < 2 || threshold > participants.len() {
            return Err(SecAggError::Threshold {
                threshold,
                n: participants.len(),
            });
        }
        if let Some(&p) = participants.iter().find(|&&p| p >= 255) {
            return Err(SecAggError::Unknown(p));
        }
        let xs: Vec<u8> = participants.iter().map(|&p| share_x(p)).collect();
        let a = split(&self.mask_key, threshold, &xs, fill);
        let b = split(&self.self_seed, threshold, &xs, fill);
        Ok(participants
            .iter()
            .zip(a.into_iter().zip(b))
            .map(|(&to, (mask_key, self_seed))| ShareBundle {
                from: self.id,
                to,
                mask_key,
                self_seed,
            })
            .collect())
    }

    /// This station's masked update for `round`, given every participant's mask public key.
    pub fn mask(
        &self,
        round: &[u8],
        update: &[u64],
        publics: &BTreeMap<u32, [u8; 32]>,
    ) -> Vec<u64> {
        let mut y = update.to_vec();
        let self_mask = prg(&kdf("self", round, &[&self.self_seed]), y.len());
        add_into(&mut y, &self_mask, false);
        let sk = StaticSecret::from(self.mask_key);
        for (&j, pk) in publics {
            if j == self.id {
                continue;
            }
            let shared = sk.diffie_hellman(&PublicKey::from(*pk));
            let mask = prg(&pair_seed(round, self.id, j, shared.as_bytes()), y.len());
            add_into(&mut y, &mask, j < self.id);
        }
        y
    }
}

/// A station answers the registry's unmasking request from the shares it holds (keyed by the
/// station they came from): self-seed shares of survivors, mask-key shares of the dropped.
pub fn reveal(
    held: &BTreeMap<u32, ShareBundle>,
    survivors: &BTreeSet<u32>,
    dropped: &BTreeSet<u32>,
) -> Result<Vec<Revealed>, SecAggError> {
    if let Some(&both) = survivors.intersection(dropped).next() {
        return Err(SecAggError::BothSecrets(both));
    }
    let mut out = Vec::new();
    for &i in survivors {
        let b = held.get(&i).ok_or(SecAggError::MissingShares(i))?;
        out.push(Revealed::SelfSeed {
            of: i,
            share: b.self_seed.clone(),
        });
    }
    for &j in dropped {
        let b = held.get(&j).ok_or(SecAggError::MissingShares(j))?;
        out.push(Revealed::MaskKey {
            of: j,
            share: b.mask_key.clone(),
        });
    }
    Ok(out)
}

/// The registry's side: the sum of the survivors' updates from their masked updates, the
/// participants' mask public keys and self-seed commitments, and the revealed shares. A
/// reconstructed secret that does not match its public key or commitment is refused.
pub fn unmask(
    round: &[u8],
    masked: &BTreeMap<u32, Vec<u64>>,
    publics: &BTreeMap<u32, [u8; 32]>,
    commitments: &BTreeMap<u32, [u8; 32]>,
    revealed: &[Revealed],
    threshold: usize,
) -> Result<Vec<u64>, SecAggError> {
    if masked.len() < threshold {
        return Err(SecAggError::BelowThreshold {
            survivors: masked.len(),
            threshold,
        });
    }
    let len = masked.values().next().map_or(0, Vec::len);
    let mut sum = vec![0u64; len];
    for (&i, y) in masked {
        if !publics.contains_key(&i) {
            return Err(SecAggError::Unknown(i));
        }
        if y.len() != len {
            return Err(SecAggError::Length(i));
        }
        add_into(&mut sum, y, false);
    }
    let shares_of = |of: u32, self_seed: bool| -> Vec<Share> {
        revealed
            .iter()
            .filter_map(|r| match r {
                Revealed::SelfSeed { of: o, share } if self_seed && *o == of => Some(share.clone()),
                Revealed::MaskKey { of: o, share } if !self_seed && *o == of => Some(share.clone()),
                _ => None,
            })
            .collect()
    };
    for &i in masked.keys() {
        let seed: [u8; 32] = combine(&shares_of(i, true), threshold)
            .and_then(|s| s.try_into().ok())
            .ok_or(SecAggError::MissingShares(i))?;
        if commitments.get(&i) != Some(&kdf("commit", round, &[&seed])) {
            return Err(SecAggError::BadShares(i));
        }
        add_into(&mut sum, &prg(&kdf("self", round, &[&seed]), len), true);
    }
    for (&j, pk_j) in publics {
        if masked.contains_key(&j) {
            continue;
        }
        let key: [u8; 32] = combine(&shares_of(j, false), threshold)
            .and_then(|s| s.try_into().ok())
            .ok_or(SecAggError::MissingShares(j))?;
        let sk = StaticSecret::from(key);
        if PublicKey::from(&sk).to_bytes() != *pk_j {
            return Err(SecAggError::BadShares(j));
        }
        for &i in masked.keys() {
            let shared = sk.diffie_hellman(&PublicKey::from(publics[&i]));
            let mask = prg(&pair_seed(round, i, j, shared.as_bytes()), len);
            // y_i added this mask when j > i and subtracted it when j < i: undo that.
            add_into(&mut sum, &mask, j > i);
        }
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Deterministic test randomness (SplitMix64).
    fn rng(seed: u64) -> impl FnMut(&mut [u8]) {
        let mut s = seed;
        move |buf: &mut [u8]| {
            for b in buf.iter_mut() {
                s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                *b = (z ^ (z >> 31)) as u8;
            }
        }
    }

    struct Round {
        stations: Vec<StationSecrets>,
        publics: BTreeMap<u32, [u8; 32]>,
        commitments: BTreeMap<u32, [u8; 32]>,
        /// held[to][from]
        held: BTreeMap<u32, BTreeMap<u32, ShareBundle>>,
        updates: BTreeMap<u32, Vec<f32>>,
    }

    fn setup(n: u32, threshold: usize) -> Round {
        let mut fill = rng(7);
        let ids: Vec<u32> = (0..n).collect();
        let stations: Vec<StationSecrets> = ids
            .iter()
            .map(|&i| StationSecrets::new(i, &mut fill))
            .collect();
        let publics = stations.iter().map(|s| (s.id, s.mask_public())).collect();
        let commitments = stations
            .iter()
            .map(|s| (s.id, s.self_commitment(ROUND)))
            .collect();
        let mut held: BTreeMap<u32, BTreeMap<u32, ShareBundle>> = BTreeMap::new();
        for s in &stations {
            for b in s.shares(&ids, threshold, &mut fill).unwrap() {
                held.entry(b.to).or_default().insert(b.from, b);
            }
        }
        let updates = ids
            .iter()
            .map(|&i| {
                (
                    i,
                    (0..50)
                        .map(|k| ((i as f32 + 1.0) * 0.01 * (k as f32 - 25.0)).sin())
                        .collect(),
                )
            })
            .collect();
        Round {
            stations,
            publics,
            commitments,
            held,
            updates,
        }
    }

    const ROUND: &[u8] = b"task-1/round-3";

    fn run(r: &Round, arrived: &[u32], threshold: usize) -> Result<Vec<u64>, SecAggError> {
        let round = ROUND;
        let masked: BTreeMap<u32, Vec<u64>> = arrived
            .iter()
            .map(|&i| {
                (
                    i,
                    r.stations[i as usize].mask(round, &encode(&r.updates[&i]), &r.publics),
                )
            })
            .collect();
        let survivors: BTreeSet<u32> = arrived.iter().copied().collect();
        let dropped: BTreeSet<u32> = r
            .publics
            .keys()
            .copied()
            .filter(|i| !survivors.contains(i))
            .collect();
        let mut revealed = Vec::new();
        for &s in &survivors {
            revealed.extend(reveal(&r.held[&s], &survivors, &dropped)?);
        }
        unmask(
            round,
            &masked,
            &r.publics,
            &r.commitments,
            &revealed,
            threshold,
        )
    }

    fn plain_sum(r: &Round, ids: &[u32]) -> Vec<u64> {
        let mut s = vec![0u64; 50];
        for i in ids {
            add_into(&mut s, &encode(&r.updates[i]), false);
        }
        s
    }

    #[test]
    fn the_registry_gets_exactly_the_sum() {
        let r = setup(5, 3);
        let all = [0, 1, 2, 3, 4];
        assert_eq!(run(&r, &all, 3).unwrap(), plain_sum(&r, &all));
        let f = decode(&plain_sum(&r, &all));
        let direct: Vec<f32> = (0..50)
            .map(|k| all.iter().map(|i| r.updates[i][k]).sum())
            .collect();
        for (a, b) in f.iter().zip(&direct) {
            assert!((a - b).abs() < 1e-5);
        }
        // A masked update alone looks nothing like the update.
        let y = r.stations[0].mask(ROUND, &encode(&r.updates[&0]), &r.publics);
        let close = y
            .iter()
            .zip(encode(&r.updates[&0]))
            .filter(|(a, b)| a.abs_diff(*b) < 1 << 40)
            .count();
        assert_eq!(close, 0);
    }

    #[test]
    fn dropouts_after_masking_are_recovered_above_the_threshold() {
        let r = setup(5, 3);
        assert_eq!(run(&r, &[0, 2, 4], 3).unwrap(), plain_sum(&r, &[0, 2, 4]));
        assert_eq!(
            run(&r, &[1, 2, 3, 4], 3).unwrap(),
            plain_sum(&r, &[1, 2, 3, 4])
        );
        assert_eq!(
            run(&r, &[1, 4], 3),
            Err(SecAggError::BelowThreshold {
                survivors: 2,
                threshold: 3
            })
        );
    }

    #[test]
    fn a_station_never_reveals_both_secrets_of_one_station() {
        let r = setup(4, 2);
        let both: BTreeSet<u32> = [1].into();
        assert_eq!(
            reveal(&r.held[&0], &both, &both),
            Err(SecAggError::BothSecrets(1))
        );
    }

    #[test]
    fn bad_shares_are_detected() {
        let r = setup(4, 3);
        let round = ROUND;
        let masked: BTreeMap<u32, Vec<u64>> = [0u32, 1, 2]
            .iter()
            .map(|&i| {
                (
                    i,
                    r.stations[i as usize].mask(round, &encode(&r.updates[&i]), &r.publics),
                )
            })
            .collect();
        let surv: BTreeSet<u32> = [0, 1, 2].into();
        let drop: BTreeSet<u32> = [3].into();
        let mut revealed = Vec::new();
        for s in &surv {
            revealed.extend(reveal(&r.held[s], &surv, &drop).unwrap());
        }
        let good = revealed.clone();
        assert!(unmask(round, &masked, &r.publics, &r.commitments, &good, 3).is_ok());
        for v in revealed.iter_mut() {
            if let Revealed::MaskKey { share, .. } = v {
                // Not byte 0: X25519 ignores its low three bits (clamping).
                share.y[5] ^= 1;
                break;
            }
        }
        assert_eq!(
            unmask(round, &masked, &r.publics, &r.commitments, &revealed, 3),
            Err(SecAggError::BadShares(3))
        );
        // A wrong self-seed share would spoil the sum silently; the commitment catches it.
        let mut revealed = good;
        for v in revealed.iter_mut() {
            if let Revealed::SelfSeed { of: 1, share } = v {
                share.y[0] ^= 1;
                break;
            }
        }
        assert_eq!(
            unmask(round, &masked, &r.publics, &r.commitments, &revealed, 3),
            Err(SecAggError::BadShares(1))
        );
    }

    #[test]
    fn weighted_contributions_sum_to_the_fedavg_mean() {
        let a = encode_weighted(&[1.0, -2.0, 0.5], 30);
        let b = encode_weighted(&[3.0, 2.0, -0.25], 10);
        let mut sum = vec![0u64; 4];
        add_into(&mut sum, &a, false);
        add_into(&mut sum, &b, false);
        let (mean, total) = decode_weighted(&sum).unwrap();
        assert_eq!(total, 40.0);
        let want = [1.5f32, -1.0, 0.3125];
        for (m, w) in mean.iter().zip(want) {
            assert!((m - w).abs() < 1e-6, "{m} vs {w}");
        }
        assert_eq!(decode_weighted(&[0, 0]), Err(SecAggError::NoWeight));
        assert_eq!(decode_weighted(&[]), Err(SecAggError::NoWeight));
    }

    #[test]
    fn bundles_and_masked_vectors_round_trip_and_refuse_other_bytes() {
        let r = setup(3, 2);
        let b = &r.held[&1][&2];
        assert_eq!(&ShareBundle::from_bytes(&b.to_bytes()).unwrap(), b);
        assert_eq!(
            ShareBundle::from_bytes(&b.to_bytes()[1..]),
            Err(SecAggError::BadBundle)
        );
        let y = vec![0, 1, u64::MAX, 42];
        assert_eq!(decode_masked(&encode_masked(&y)).unwrap(), y);
        let mut short = encode_masked(&y);
        short.pop();
        assert_eq!(decode_masked(&short), Err(SecAggError::NotMasked));
        assert_eq!(decode_masked(b"AMUPv1..."), Err(SecAggError::NotMasked));
    }

    proptest! {
        #[test]
        fn any_threshold_shares_reconstruct(secret in proptest::collection::vec(any::<u8>(), 1..40), t in 2usize..6, seed in any::<u64>()) {
            let xs: Vec<u8> = (1..=7).collect();
            let shares = split(&secret, t, &xs, &mut rng(seed));
            prop_assert_eq!(combine(&shares[..t], t).unwrap(), secret.clone());
            let mut rev: Vec<Share> = shares.iter().rev().cloned().collect();
            rev.truncate(t);
            prop_assert_eq!(combine(&rev, t).unwrap(), secret);
        }
    }
}
