//! A station's part in a securely aggregated round of a federated job (`amicus station
//! serve`): it sends round keys, seals shares of its secrets to the other stations, masks its
//! update before it leaves, and reveals the shares the registry needs to unmask the sum.
//!
//! Owns the station's round secrets (`amicus_fl::secagg::StationSecrets`, its share key and
//! the shares others sealed to it). They live in memory for the one round and go nowhere but
//! as the protocol says: lost on a restart, the station counts as dropped and the others'
//! shares remove its masks. Must not send an unmasked update; the protocol's arithmetic is
//! `amicus_fl::secagg`'s, the sealing `sealed`'s.

use amicus_fl::secagg::{self, ShareBundle, StationSecrets};
use amicus_registry::client::{ClientError, StationClient};
use amicus_registry::db::now_ms;
use amicus_registry::jobs::{hex32, secagg_label};
use amicus_registry::sealed::{ShareKey, seal_share, share_aad};
use amicus_registry::wire::{
    RevealedShare, SealedShare, SecAggMessage, SecAggPhase, SecAggPlan, SecAggView, SecretKind,
};
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
    /// This station's key (it signs the sets it is shown) and the participants' keys (checked
    /// against the researcher's request where it names them).
    station_key: amicus_bundle::SecretKey,
    peers: BTreeMap<u32, amicus_bundle::PublicKey>,
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
/// Who may take part, from the researcher's signed request: station name → key id. Empty when
/// the request named none (or the station does not require signed requests): peers' keys are
/// then the registry's word.
pub type StationKeyIds = BTreeMap<String, String>;

/// Check that every participant's keys are signed by the station key the researcher named.
fn check_advertisements(
    job: &str,
    round: u32,
    participants: &[amicus_registry::wire::SecAggParticipant],
    named: &StationKeyIds,
) -> Result<(), SecAggLeft> {
    let mut seen = BTreeSet::new();
    for p in participants {
        if !seen.insert(p.station.as_str()) {
            return Err(out(format!(
                "the registry announced station {} twice",
                amicus_bundle::text::shown(&p.station, 64)
            )));
        }
        if named.is_empty() {
            continue;
        }
        let who = amicus_bundle::text::shown(&p.station, 64);
        let Some(want) = named.get(&p.station) else {
            return Err(out(format!(
                "the registry announced station {who}, which the researcher did not name"
            )));
        };
        let (Some(pem), Some(sig)) = (&p.keys.station_key, &p.keys.signature) else {
            return Err(out(format!("station {who}'s round keys are not signed")));
        };
        let key = amicus_bundle::PublicKey::from_pem(pem, "station_key")
            .map_err(|_| out(format!("station {who}'s key does not parse")))?;
        if key.id().to_string() != *want {
            return Err(out(format!(
                "station {who}'s round keys are signed by another key than the researcher named"
            )));
        }
        let msg =
            amicus_registry::request::secagg_keys_message(job, round, p.id, &p.station, &p.keys);
        let ok = B64.decode(sig).is_ok_and(|s| key.verify(&msg, &s));
        if !ok {
            return Err(out(format!(
                "station {who}'s round keys do not carry its signature"
            )));
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub async fn join(
    client: &StationClient,
    station_key: &amicus_bundle::SecretKey,
    station: &str,
    named: &StationKeyIds,
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
    let mut keys = amicus_registry::wire::SecAggKeys {
        mask_public: hex::encode(secrets.mask_public()),
        share_public: hex::encode(share_key.public()),
        self_commitment: commitment.clone(),
        station_key: Some(station_key.public().to_pem()),
        signature: None,
    };
    let msg = amicus_registry::request::secagg_keys_message(job, round, me, station, &keys);
    keys.signature = Some(B64.encode(station_key.sign(&msg)));
    client
        .secagg_send(
            job,
            round,
            &SecAggMessage::Keys {
                mask_public: keys.mask_public,
                share_public: keys.share_public,
                self_commitment: keys.self_commitment,
                station_key: keys.station_key,
                signature: keys.signature,
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
    check_advertisements(job, round, &v.participants, named)?;
    let peers: BTreeMap<u32, amicus_bundle::PublicKey> = v
        .participants
        .iter()
        .filter_map(|p| {
            let pem = p.keys.station_key.as_deref()?;
            Some((
                p.id,
                amicus_bundle::PublicKey::from_pem(pem, "station_key").ok()?,
            ))
        })
        .collect();
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
        station_key: station_key.clone(),
        peers,
    })
}

/// The survivors whose signature (by the key this station holds for them) is over exactly
/// `mine`: forged signatures and signatures over other sets do not count.
fn agreeing(
    mine: &[u8],
    survivors: &[u32],
    signatures: &[amicus_registry::wire::ConsistencySignature],
    peers: &BTreeMap<u32, amicus_bundle::PublicKey>,
) -> BTreeSet<u32> {
    signatures
        .iter()
        .filter(|c| survivors.contains(&c.id))
        .filter(|c| {
            let sig = B64.decode(&c.signature).unwrap_or_default();
            peers.get(&c.id).is_some_and(|k| k.verify(mine, &sig))
        })
        .map(|c| c.id)
        .collect()
}

impl SecAggSession {
    /// Sign the sets this station was shown and wait until `threshold` survivors signed the
    /// same sets. A survivor's valid signature over other sets proves the registry showed
    /// stations different sets: nothing is revealed.
    async fn consistent(
        &self,
        client: &StationClient,
        shown: &SecAggView,
        deadline_ms: i64,
    ) -> Result<(), SecAggLeft> {
        let mine = amicus_registry::request::secagg_sets_message(
            &self.job,
            self.round,
            &shown.survivors,
            &shown.dropped,
        );
        client
            .secagg_send(
                &self.job,
                self.round,
                &SecAggMessage::Consistency {
                    signature: B64.encode(self.station_key.sign(&mine)),
                },
            )
            .await?;
        loop {
            let v = wait_for(client, &self.job, self.round, deadline_ms, |v| {
                v.phase == SecAggPhase::Reveal
            })
            .await?;
            if v.phase != SecAggPhase::Reveal {
                return Err(out(
                    "the round ended before enough stations confirmed the survivors: nothing revealed",
                ));
            }
            let agreeing = agreeing(&mine, &shown.survivors, &v.consistency, &self.peers);
            if v.survivors != shown.survivors || v.dropped != shown.dropped {
                return Err(out(
                    "the registry changed the survivors during the reveal: nothing revealed",
                ));
            }
            if agreeing.len() >= self.threshold {
                return Ok(());
            }
            if now_ms() > deadline_ms {
                return Err(out(format!(
                    "only {} station(s) confirmed the survivors this station was shown (threshold {}): nothing revealed",
                    agreeing.len(),
                    self.threshold
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

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
        self.consistent(client, &v, deadline_ms).await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use amicus_bundle::SecretKey;
    use amicus_registry::wire::{SecAggKeys, SecAggParticipant};

    fn advertised(station: &str, id: u32, key: &SecretKey) -> SecAggParticipant {
        let mut keys = SecAggKeys {
            mask_public: hex::encode([id as u8; 32]),
            share_public: hex::encode([id as u8 + 1; 32]),
            self_commitment: hex::encode([7u8; 32]),
            station_key: Some(key.public().to_pem()),
            signature: None,
        };
        let msg = amicus_registry::request::secagg_keys_message("j", 1, id, station, &keys);
        keys.signature = Some(B64.encode(key.sign(&msg)));
        SecAggParticipant {
            id,
            station: station.into(),
            keys,
        }
    }

    #[test]
    fn only_signatures_over_the_same_sets_count() {
        let keys: Vec<SecretKey> = (0..4).map(|_| SecretKey::generate().unwrap()).collect();
        let peers: BTreeMap<u32, amicus_bundle::PublicKey> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (i as u32, k.public()))
            .collect();
        let shown = amicus_registry::request::secagg_sets_message("j", 1, &[0, 1, 2], &[3]);
        // What the registry showed station 2 instead: station 1 dropped.
        let other = amicus_registry::request::secagg_sets_message("j", 1, &[0, 2], &[1, 3]);
        let sig = |i: usize, m: &[u8]| amicus_registry::wire::ConsistencySignature {
            id: i as u32,
            station: format!("s{i}"),
            signature: B64.encode(keys[i].sign(m)),
        };
        let got = agreeing(
            &shown,
            &[0, 1, 2],
            &[
                sig(0, &shown),
                sig(1, &shown),
                sig(2, &other),
                // Station 3 is not a survivor here: its word does not count.
                sig(3, &shown),
                amicus_registry::wire::ConsistencySignature {
                    id: 2,
                    station: "s2".into(),
                    signature: B64.encode(keys[0].sign(&shown)),
                },
            ],
            &peers,
        );
        // 2 signed other sets, 3 is not a survivor, and 0's key does not speak for 2.
        assert_eq!(got, BTreeSet::from([0, 1]));
    }

    #[test]
    fn a_registry_cannot_put_its_own_keys_in_a_round() {
        let (a, b, registry) = (
            SecretKey::generate().unwrap(),
            SecretKey::generate().unwrap(),
            SecretKey::generate().unwrap(),
        );
        let named: StationKeyIds = [("a", &a), ("b", &b)]
            .iter()
            .map(|(n, k)| (n.to_string(), k.public().id().to_string()))
            .collect();
        let honest = vec![advertised("a", 0, &a), advertised("b", 1, &b)];
        check_advertisements("j", 1, &honest, &named).unwrap();
        // b's keys replaced by the registry's, signed with the registry's key.
        let swapped = vec![advertised("a", 0, &a), advertised("b", 1, &registry)];
        assert!(check_advertisements("j", 1, &swapped, &named).is_err());
        // b's mask key changed under b's signature.
        let mut edited = honest.clone();
        edited[1].keys.mask_public = hex::encode([9u8; 32]);
        assert!(check_advertisements("j", 1, &edited, &named).is_err());
        // Signed for another round or under another id.
        let other_round = vec![advertised("a", 0, &a), advertised("b", 1, &b)];
        assert!(check_advertisements("j", 2, &other_round, &named).is_err());
        let mut moved = honest.clone();
        moved[1].id = 5;
        assert!(check_advertisements("j", 1, &moved, &named).is_err());
        // Unsigned, unnamed, or twice.
        let mut unsigned = honest.clone();
        unsigned[1].keys.signature = None;
        assert!(check_advertisements("j", 1, &unsigned, &named).is_err());
        let extra = vec![advertised("a", 0, &a), advertised("c", 2, &registry)];
        assert!(check_advertisements("j", 1, &extra, &named).is_err());
        let twice = vec![advertised("a", 0, &a), advertised("a", 1, &a)];
        assert!(check_advertisements("j", 1, &twice, &named).is_err());
        assert!(check_advertisements("j", 1, &twice, &StationKeyIds::new()).is_err());
        // Without names from the researcher, the registry's word is taken.
        check_advertisements("j", 1, &swapped, &StationKeyIds::new()).unwrap();
    }
}
