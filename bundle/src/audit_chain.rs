//! A station audit log's format and its verification: how a line is signed and chained,
//! the signed head, key hand-overs, and the check of a log or a registry's copy of one against
//! a station's public key. The station (`amicus-runtime`'s `audit`) writes logs in this format;
//! the registry checks every line a station uploads with [`check_line`]; auditors run
//! [`verify_lines`].
//!
//! No I/O and no engine: a registry that verifies stations' logs needs this module, not the
//! station runtime. Must not decide what is logged or what leaves a station.

use crate::{Digest, PublicKey, sha256};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

const DOMAIN: &[u8] = b"amicus-audit-v1\n";
const HEAD_DOMAIN: &[u8] = b"amicus-audit-head-v1\n";
const PUBLIC_DOMAIN: &[u8] = b"amicus-audit-public-v1\n";
const PUBLIC_HEAD_DOMAIN: &[u8] = b"amicus-audit-public-head-v1\n";
const REKEY_DOMAIN: &[u8] = b"amicus-station-rekey-v1\n";
/// The tag of a station-key hand-over entry (`station-key-rotated`, local and public).
pub const HANDOVER_EVENT: &str = "station-key-rotated";

pub const LOG_FILE: &str = "audit.log";
pub const HEAD_FILE: &str = "audit.head";
pub const PUBLIC_LOG_FILE: &str = "audit-public.log";
pub const PUBLIC_HEAD_FILE: &str = "audit-public.head";

/// One of the two hash chains: its files and signing domains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain {
    pub log: &'static str,
    pub head: &'static str,
    /// What an entry's signature is over: this domain, then the entry's bytes.
    pub domain: &'static [u8],
    /// What the head's signature is over: this domain, seq, hash ([`head_message`]).
    pub head_domain: &'static [u8],
}

/// The station's full log (stays at the station).
pub const LOCAL: Chain = Chain {
    log: LOG_FILE,
    head: HEAD_FILE,
    domain: DOMAIN,
    head_domain: HEAD_DOMAIN,
};

/// The copy that leaves the station.
pub const PUBLIC: Chain = Chain {
    log: PUBLIC_LOG_FILE,
    head: PUBLIC_HEAD_FILE,
    domain: PUBLIC_DOMAIN,
    head_domain: PUBLIC_HEAD_DOMAIN,
};

/// A line as read: the entry's exact bytes and the signature over them.
#[derive(Deserialize)]
pub struct LineIn<'a> {
    #[serde(borrow)]
    pub entry: &'a RawValue,
    pub sig: String,
}

/// The fields every entry has.
#[derive(Deserialize)]
pub struct EntryHeader {
    pub seq: u64,
    pub prev: Digest,
    /// Public entries: the local entry they project.
    #[serde(default)]
    pub local_seq: Option<u64>,
}

/// A chain's signed head: its last entry's seq and hash.
#[derive(Serialize, Deserialize)]
pub struct Head {
    pub seq: u64,
    pub hash: Digest,
    pub sig: String,
}

/// The hash `prev` of the first entry points to.
pub const GENESIS: Digest = Digest([0u8; 32]);

/// What a chain's head signature is over.
pub fn head_message(chain: Chain, seq: u64, hash: &Digest) -> Vec<u8> {
    let mut m = chain.head_domain.to_vec();
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash.as_bytes());
    m
}

/// The outcome of verifying a log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Entries whose chain and signature verified.
    pub valid_entries: u64,
    /// The first problem, naming the entry (1-based line number and sequence number).
    pub problem: Option<String>,
    /// A torn last line (crash mid-append): its length in bytes. Not a failure by itself.
    pub torn_tail_bytes: Option<u64>,
    /// The head file lags one entry behind (crash between append and head update).
    pub head_lags: bool,
    /// Entries of the public chain (the copy that leaves the station) that verified.
    pub public_entries: u64,
    /// Projections the public chain does not have yet at its end (a crash between the two
    /// appends, or a log from before the public chain); the next append writes them.
    pub public_lags: u64,
    /// The keys that signed the log, in order: more than one after a station key rotation.
    pub keys: Vec<KeySpan>,
}

/// A key that signed a log from entry `from_seq` on (until the next span's `from_seq`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeySpan {
    pub from_seq: u64,
    pub keyid: String,
}

/// What the new key signs when it takes over a log from the old one.
pub fn rekey_message(old: &PublicKey, new: &PublicKey) -> Vec<u8> {
    let mut m = REKEY_DOMAIN.to_vec();
    m.extend_from_slice(old.id().to_string().as_bytes());
    m.push(b'\n');
    m.extend_from_slice(new.id().to_string().as_bytes());
    m
}

/// The fields of an entry that matter if it is a hand-over (any entry parses).
#[derive(Deserialize)]
pub struct HandOverFields {
    #[serde(default)]
    pub event: String,
    #[serde(default)]
    pub old_key: String,
    #[serde(default)]
    pub new_key: String,
    #[serde(default)]
    pub proof: String,
}

/// A verified entry's hand-over, checked against the key that signed it: the key that signs
/// the entries after it (`None`: not a hand-over).
fn checked_handover(raw: &[u8], signer: &PublicKey) -> Result<Option<PublicKey>, String> {
    let Ok(h) = serde_json::from_slice::<HandOverFields>(raw) else {
        return Ok(None);
    };
    if h.event != HANDOVER_EVENT {
        return Ok(None);
    }
    let old = PublicKey::from_pem(&h.old_key, "old_key")
        .map_err(|_| "a key hand-over without a readable old key".to_string())?;
    let new = PublicKey::from_pem(&h.new_key, "new_key")
        .map_err(|_| "a key hand-over without a readable new key".to_string())?;
    if old != *signer {
        return Err(format!(
            "a key hand-over from key {} signed by key {}",
            old.id(),
            signer.id()
        ));
    }
    if new == old {
        return Err("a key hand-over to the same key".into());
    }
    let proven = B64
        .decode(&h.proof)
        .map(|p| new.verify(&rekey_message(&old, &new), &p))
        .unwrap_or(false);
    if !proven {
        return Err(format!(
            "a key hand-over to key {} without that key's proof",
            new.id()
        ));
    }
    Ok(Some(new))
}

/// The keys a log's hand-overs claim, in order (unverified): empty when it has none.
fn claimed_keys(lines: &[&[u8]]) -> Vec<PublicKey> {
    let mut keys: Vec<PublicKey> = Vec::new();
    for line in lines {
        let Ok(parsed) = serde_json::from_slice::<LineIn>(line) else {
            continue;
        };
        let Ok(h) = serde_json::from_str::<HandOverFields>(parsed.entry.get()) else {
            continue;
        };
        if h.event != HANDOVER_EVENT {
            continue;
        }
        if let (Ok(old), Ok(new)) = (
            PublicKey::from_pem(&h.old_key, "old_key"),
            PublicKey::from_pem(&h.new_key, "new_key"),
        ) {
            if keys.is_empty() {
                keys.push(old);
            }
            keys.push(new);
        }
    }
    keys
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problem.is_none()
    }
}

/// A station's signed head, as the verifier found it.
pub enum HeadFile {
    Bytes(Vec<u8>),
    Missing,
    Unreadable(String),
}

/// A line that verified.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The entry's hash (the next entry's `prev`).
    pub hash: Digest,
    /// A key hand-over (checked): the key that signs the entries after this one.
    pub next_key: Option<PublicKey>,
}

/// Check one complete log line: its signature by `key`, that it is entry `expect_seq`, that it
/// chains to `prev`, and if it hands the log to a new key, that the hand-over is from `key`
/// and carries the new key's proof. The registry runs this on every line a station uploads.
pub fn check_line(
    line: &[u8],
    key: &PublicKey,
    expect_seq: u64,
    prev: &Digest,
    chain: Chain,
) -> Result<Checked, String> {
    let Ok(parsed) = serde_json::from_slice::<LineIn>(line) else {
        return Err("not an audit entry (edited or corrupted)".into());
    };
    let raw = parsed.entry.get().as_bytes();
    let mut signed = chain.domain.to_vec();
    signed.extend_from_slice(raw);
    let sig_ok = B64
        .decode(&parsed.sig)
        .map(|s| key.verify(&signed, &s))
        .unwrap_or(false);
    if !sig_ok {
        return Err("signature does not verify (entry edited)".into());
    }
    let Ok(header) = serde_json::from_slice::<EntryHeader>(raw) else {
        return Err("entry has no sequence number".into());
    };
    if header.seq != expect_seq {
        return Err(format!(
            "sequence number is {} (entries deleted or reordered)",
            header.seq
        ));
    }
    if header.prev != *prev {
        return Err(
            "does not chain to the previous entry (entries deleted, inserted or reordered)".into(),
        );
    }
    Ok(Checked {
        hash: sha256(raw),
        next_key: checked_handover(raw, key)?,
    })
}

/// Verify complete log lines (from the station's file or from the registry's copy) and the
/// station's signed head against the station's public key `key`, following key hand-overs
/// (`amicus station rekey`). `key` may be any key the log was signed with: the first (each
/// hand-over is signed by the key before it) or a later one (its signatures cover the hash
/// chain back to the first entry); a key that signed no entry and not the head is refused.
pub fn verify_lines(
    lines: &[&[u8]],
    head: HeadFile,
    key: &PublicKey,
    chain: Chain,
) -> VerifyReport {
    // A log that was handed over starts with the first hand-over's old key; which keys
    // signed what is checked line by line below.
    let claimed = claimed_keys(lines);
    let mut current = match claimed.first() {
        Some(first) if claimed.contains(key) => *first,
        _ => *key,
    };
    let mut report = VerifyReport {
        valid_entries: 0,
        problem: None,
        torn_tail_bytes: None,
        head_lags: false,
        public_entries: 0,
        public_lags: 0,
        keys: vec![KeySpan {
            from_seq: 0,
            keyid: current.id().to_string(),
        }],
    };
    let mut prev = GENESIS;
    let mut expect_seq = 0u64;
    let mut pinned_signed = false;
    let mut handover: Option<(u64, PublicKey)> = None;
    for (i, line) in lines.iter().enumerate() {
        match check_line(line, &current, expect_seq, &prev, chain) {
            Ok(checked) => {
                pinned_signed |= current == *key;
                prev = checked.hash;
                if let Some(next) = checked.next_key {
                    handover = Some((expect_seq, current));
                    current = next;
                    report.keys.push(KeySpan {
                        from_seq: expect_seq + 1,
                        keyid: current.id().to_string(),
                    });
                }
                expect_seq += 1;
                report.valid_entries += 1;
            }
            Err(what) => {
                report.problem = Some(format!(
                    "line {} (expected seq {expect_seq}): {what}",
                    i + 1
                ));
                return report;
            }
        }
    }
    let (mut report, head_signer) = finish_head(
        head,
        &current,
        handover.as_ref().map(|(s, k)| (*s, k)),
        report,
        expect_seq,
        prev,
        chain,
    );
    pinned_signed |= head_signer == Some(*key);
    if report.problem.is_none() && expect_seq > 0 && !pinned_signed {
        let ids: Vec<&str> = report.keys.iter().map(|k| k.keyid.as_str()).collect();
        report.problem = Some(format!(
            "key {} signed none of this log (it is signed by key {})",
            key.id(),
            ids.join(", then ")
        ));
    }
    report
}

/// Compare the verified chain with the signed head to detect truncation. The head is signed
/// by `key` (the key of the next entry), or, up to the last hand-over `before` (its seq and
/// old key), by the key before it (a crash before the rotation re-signed the head). Returns
/// the key that signed the head.
fn finish_head(
    head: HeadFile,
    key: &PublicKey,
    before: Option<(u64, &PublicKey)>,
    report: VerifyReport,
    next_seq: u64,
    last_hash: Digest,
    chain: Chain,
) -> (VerifyReport, Option<PublicKey>) {
    let mut signer = None;
    let report = check_head(
        head,
        key,
        before,
        report,
        next_seq,
        last_hash,
        chain,
        &mut signer,
    );
    (report, signer)
}

#[allow(clippy::too_many_arguments)]
fn check_head(
    head: HeadFile,
    key: &PublicKey,
    before: Option<(u64, &PublicKey)>,
    mut report: VerifyReport,
    next_seq: u64,
    last_hash: Digest,
    chain: Chain,
    signer: &mut Option<PublicKey>,
) -> VerifyReport {
    let head_file = chain.head;
    if report.problem.is_some() {
        return report;
    }
    let head: Head = match head {
        HeadFile::Bytes(bytes) => match serde_json::from_slice(&bytes) {
            Ok(h) => h,
            Err(_) => {
                report.problem = Some(format!("{head_file} is not valid (edited or corrupted)"));
                return report;
            }
        },
        HeadFile::Missing if next_seq == 0 => return report,
        HeadFile::Missing => {
            report.problem = Some(format!("{head_file} is missing"));
            return report;
        }
        HeadFile::Unreadable(e) => {
            report.problem = Some(format!("{head_file}: {e}"));
            return report;
        }
    };
    let signed_by = |k: &PublicKey| {
        B64.decode(&head.sig)
            .map(|s| k.verify(&head_message(chain, head.seq, &head.hash), &s))
            .unwrap_or(false)
    };
    let head_key = match before {
        Some((seq, old)) if head.seq <= seq && !signed_by(key) => old,
        _ => key,
    };
    if !signed_by(head_key) {
        report.problem = Some(format!("{head_file} signature does not verify"));
        return report;
    }
    *signer = Some(*head_key);
    let last_seq = next_seq.checked_sub(1);
    match last_seq {
        Some(last) if head.seq == last => {
            if head.hash != last_hash {
                report.problem = Some(format!(
                    "entry seq {last} differs from the one {head_file} recorded (last entry replaced)"
                ));
            }
        }
        // A crash after the append but before the head update: the log is one entry ahead.
        Some(last) if head.seq + 1 == last => report.head_lags = true,
        Some(last) if head.seq + 1 < last => {
            report.problem = Some(format!(
                "{head_file} records entry seq {} but the log goes on to seq {last}: the head was replaced by an old copy",
                head.seq
            ));
        }
        _ => {
            report.problem = Some(format!(
                "log truncated: {head_file} records entry seq {} but the log's last valid entry is {}",
                head.seq,
                last_seq.map_or("none".to_string(), |s| format!("seq {s}"))
            ));
        }
    }
    report
}
