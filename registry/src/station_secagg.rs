//! A station's part in a securely aggregated round of a federated job (`amicus station
//! serve`): it sends round keys, seals shares of its secrets to the other stations, masks its
//! update before it leaves, and reveals the shares the registry needs to unmask the sum.
//!
//! Owns the station's round secrets (`amicus_fl::secagg::StationSecrets`, its share key and
//! the shares others sealed to it). They live in memory for the one round and go nowhere but
//! as the protocol says: lost on a restart, the station counts as dropped and the others'
//! shares remove its masks. Must not send an unmasked update; the protocol's arithmetic is
//! `amicus_fl::secagg`'s, the sealing `sealed`'s.

use crate::client::{ClientError, StationClient};
use crate::db::now_ms;
use crate::jobs::{hex32, secagg_label};
use crate::sealed::{ShareKey, seal_share, share_aad};
use crate::wire::{
    RevealedShare, SealedShare, SecAggMessage, SecAggPhase, SecAggPlan, SecAggView, SecretKind,
};
use amicus_fl::secagg::{self, ShareBundle, StationSecrets};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// How often a station asks where the round stands while it waits.
const POLL: Duration = Duration::from_millis(500);

/// Why a station leaves a securely aggregated round (its run is then reported failed, or,
/// after masking, it simply does not reveal).
#[derive(Debug, thiserror::Error)]
pub enum SecAggLeft {
    #[error("secure aggregation: {0}")]
    Out(String),
    #[error("secure aggregation: {0}")]
    Client(#[from] ClientError),
}

fn out(s: impl Into<String>) -> SecAggLeft {
    SecAggLeft::Out(s.into())
}

fn operating_system_randomness(buf: &mut [u8]) {
    getrandom::fill(buf).expect("operating-system randomness");
}

/// The station's state in one securely aggregated round, from the share exchange on.
pub struct SecAggSession {
    job: String,
    round: u32,
    me: u32,
    threshold: usize,
    secrets: StationSecrets,
    /// Mask public keys of the sharers (the stations whose masks are in every update).
    publics: BTreeMap<u32, [u8; 32]>,
    /// Shares the sharers gave this station, by sender.
    held: BTreeMap<u32, ShareBundle>,
}

/// Ask until `done` holds, the round ends, or `deadline_ms` passes; transient registry
/// errors are waited out.
async fn wait_for(
    client: &StationClient,
    job: &str,
    round: u32,
    deadline_ms: i64,
    done: impl Fn(&SecAggView) -> bool,
) -> Result<SecAggView, SecAggLeft> {
    loop {
        match client.secagg_view(job, round).await {
            Ok(v) if done(&v) || v.phase == SecAggPhase::Ended => return Ok(v),
            Ok(_) => {}
            Err(e) if e.is_transient() => {}
            Err(e) => return Err(e.into()),
        }
        if now_ms() > deadline_ms {
            return Err(out(
                "the round's deadline passed while waiting for the others",
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Join round `round` of `job`: keys, then shares; returns once training may begin (the
/// registry has fixed who shared). `deadline_ms` is the round's deadline.
pub async fn join(
    client: &StationClient,
    job: &str,
    round: u32,
    plan: SecAggPlan,
    deadline_ms: i64,
) -> Result<SecAggSession, SecAggLeft> {
    let first = client.secagg_view(job, round).await?;
    if first.phase != SecAggPhase::Keys {
        return Err(out(format!(
            "the key exchange had closed ({} phase) when this station joined",
            first.phase.as_str()
        )));
    }
    let me = first.me;
    // Protocol ids are share x-coordinates minus one: at most 254 of them.
    if me >= 255 {
        return Err(out(format!(
            "the registry gave this station protocol id {me}"
        )));
    }
    let threshold = plan.threshold as usize;
    let secrets = StationSecrets::new(me, &mut operating_system_randomness);
    let share_key = ShareKey::generate();
    let commitment = hex::encode(secrets.self_commitment(&secagg_label(job, round)));
    client
        .secagg_send(
            job,
            round,
            &SecAggMessage::Keys {
                mask_public: hex::encode(secrets.mask_public()),
                share_public: hex::encode(share_key.public()),
                self_commitment: commitment.clone(),
            },
        )
        .await?;

    let v = wait_for(client, job, round, deadline_ms, |v| {
        v.phase != SecAggPhase::Keys
    })
    .await?;
    if v.phase == SecAggPhase::Ended {
        return Err(out("the round ended during the key exchange"));
    }
    if !v.participants.iter().any(|p| p.id == me) {
        return Err(out(
            "this station's keys came after the key exchange closed",
        ));
    }
    if v.participants.len() < threshold {
        return Err(out(format!(
            "the registry named {} participants, below the threshold {threshold}",
            v.participants.len()
        )));
    }
    if let Some(p) = v.participants.iter().find(|p| p.id >= 255) {
        return Err(out(format!("the registry named participant id {}", p.id)));
    }
    let mut share_keys = BTreeMap::new();
    let mut mask_keys = BTreeMap::new();
    if !v
        .participants
        .iter()
        .any(|p| p.id == me && p.keys.self_commitment == commitment)
    {
        return Err(out(
            "the registry announced another commitment for this station",
        ));
    }
    for p in &v.participants {
        let (Some(m), Some(s)) = (hex32(&p.keys.mask_public), hex32(&p.keys.share_public)) else {
            return Err(out(format!("station {}'s keys do not parse", p.station)));
        };
        mask_keys.insert(p.id, m);
        share_keys.insert(p.id, s);
    }
    if mask_keys.get(&me) != Some(&secrets.mask_public())
        || share_keys.get(&me) != Some(&share_key.public())
    {
        return Err(out("the registry announced other keys for this station"));
    }
    let ids: Vec<u32> = share_keys.keys().copied().collect();
    let bundles = secrets
        .shares(&ids, threshold, &mut operating_system_randomness)
        .map_err(|e| out(e.to_string()))?;
    let mut sealed = Vec::new();
    for b in bundles {
        let ct = seal_share(
            &share_keys[&b.to],
            &share_aad(job, round, me, b.to),
            &b.to_bytes(),
        )
        .map_err(|e| out(e.to_string()))?;
        sealed.push(SealedShare {
            from: me,
            to: b.to,
            sealed: B64.encode(ct),
        });
    }
    client
        .secagg_send(job, round, &SecAggMessage::Shares { shares: sealed })
        .await?;

    let v = wait_for(client, job, round, deadline_ms, |v| {
        !matches!(v.phase, SecAggPhase::Keys | SecAggPhase::Shares)
    })
    .await?;
    if v.phase == SecAggPhase::Ended {
        return Err(out("the round ended during the share exchange"));
    }
    if !v.sharers.contains(&me) {
        return Err(out(
            "this station's shares came after the share exchange closed",
        ));
    }
    if v.sharers.len() < threshold {
        return Err(out(format!(
            "the registry named {} sharers, below the threshold {threshold}",
            v.sharers.len()
        )));
    }
    let mut held = BTreeMap::new();
    for s in &v.shares {
        if s.to != me || !v.sharers.contains(&s.from) {
            continue;
        }
        let opened = B64
            .decode(&s.sealed)
            .ok()
            .and_then(|ct| share_key.open(&share_aad(job, round, s.from, me), &ct).ok())
            .and_then(|pt| ShareBundle::from_bytes(&pt).ok())
            .filter(|b| b.from == s.from && b.to == me);
        match opened {
            Some(b) => {
                held.insert(s.from, b);
            }
            None => {
                return Err(out(format!(
                    "the share from participant {} does not open for this station",
                    s.from
                )));
            }
        }
    }
    if let Some(missing) = v.sharers.iter().find(|i| !held.contains_key(i)) {
        return Err(out(format!(
            "no share from participant {missing} reached this station"
        )));
    }
    let publics = v
        .sharers
        .iter()
        .filter_map(|i| mask_keys.get(i).map(|k| (*i, *k)))
        .collect();
    Ok(SecAggSession {
        job: job.to_string(),
        round,
        me,
        threshold,
        secrets,
        publics,
        held,
    })
}

impl SecAggSession {
    /// The masked form of a station's update (`amicus_fl::wire` bytes): weighted by its
    /// samples, fixed point, masked with its self mask and its pairwise masks with every sharer.
    pub fn mask(&self, update: &[u8]) -> Result<Vec<u8>, SecAggLeft> {
        let (u, _) = amicus_fl::wire::Update::decode(update)
            .map_err(|e| out(format!("the train's update does not decode: {e}")))?;
        let x = secagg::encode_weighted(&u.delta, u.samples);
        let y = self
            .secrets
            .mask(&secagg_label(&self.job, self.round), &x, &self.publics);
        Ok(secagg::encode_masked(&y))
    }

    pub fn job(&self) -> &str {
        &self.job
    }

    pub fn round(&self) -> u32 {
        self.round
    }

    /// Stations whose pairwise masks are in this station's masked update (itself included).
    pub fn sharers(&self) -> usize {
        self.publics.len()
    }

    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// Wait for the registry to name survivors and dropped, then reveal this station's
    /// shares of the survivors' self-mask seeds and the dropped stations' mask keys (never
    /// both secrets of one station). Returns (survivors, dropped) whose shares were revealed,
    /// or `None` when the round ended without unmasking or this station's update was not
    /// among the survivors.
    pub async fn reveal(
        self,
        client: &StationClient,
        deadline_ms: i64,
    ) -> Result<Option<(usize, usize)>, SecAggLeft> {
        let v = wait_for(client, &self.job, self.round, deadline_ms, |v| {
            v.phase == SecAggPhase::Reveal
        })
        .await?;
        if v.phase != SecAggPhase::Reveal || !v.survivors.contains(&self.me) {
            return Ok(None);
        }
        let survivors: BTreeSet<u32> = v.survivors.iter().copied().collect();
        let dropped: BTreeSet<u32> = v.dropped.iter().copied().collect();
        let sharers: BTreeSet<u32> = self.publics.keys().copied().collect();
        // The registry must partition this round's sharers and keep the threshold; anything
        // else could make this station help reveal an individual update.
        if survivors.len() < self.threshold
            || !survivors.is_disjoint(&dropped)
            || survivors.union(&dropped).copied().collect::<BTreeSet<_>>() != sharers
        {
            return Err(out(
                "the registry's survivors and dropped do not partition the round's sharers at or above the threshold: nothing revealed",
            ));
        }
        let revealed =
            secagg::reveal(&self.held, &survivors, &dropped).map_err(|e| out(e.to_string()))?;
        let shares: Vec<RevealedShare> = revealed
            .into_iter()
            .map(|r| {
                let (of, secret, share) = match r {
                    secagg::Revealed::SelfSeed { of, share } => (of, SecretKind::SelfSeed, share),
                    secagg::Revealed::MaskKey { of, share } => (of, SecretKind::MaskKey, share),
                };
                RevealedShare {
                    of,
                    secret,
                    x: share.x,
                    y: hex::encode(share.y),
                }
            })
            .collect();
        client
            .secagg_send(&self.job, self.round, &SecAggMessage::Reveal { shares })
            .await?;
        Ok(Some((survivors.len(), dropped.len())))
    }
}
