//! The rotation of a station's key (`amicus station rekey`): the Ed25519 key that signs its
//! audit log, its results and its requests to a registry.
//!
//! Owns the staging pair `rekey/next.key|pub` and the retired keys in `retired/`:
//! `<keyid>.pub` is kept for good (a request that named the old key, a result it signed);
//! `<keyid>.key`, the old secret, only while a registry has yet to learn of the hand-over (the
//! station daemon announces it with that key and then calls [`forget_retired_secrets`]).
//! Must not talk to a registry: announcing is the daemon's.
//!
//! Steps, all under the audit log's lock so no append can be signed with a key that has just
//! been retired: stage the new pair; keep the old public key (and its secret if asked); append
//! `station-key-rotated`, signed by the old key and carrying the new key's proof; sign both
//! chains' heads with the new key; rename the staged pair over `station.key`/`station.pub`. A
//! crash after the hand-over is finished by the next append ([`finish_staged`]); a crash
//! before it leaves a staged pair that signed nothing, which is dropped.

use crate::audit::{AuditError, AuditLog, Event, rekey_message};
use amicus_bundle::keys::public_key_path;
use amicus_bundle::{KeyError, PublicKey, SecretKey};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use std::path::{Path, PathBuf};

/// Where a rotation stages the new pair.
pub const STAGE_DIR: &str = "rekey";
const STAGED_KEY: &str = "next.key";
/// Keys this station signed with before (see the module comment).
pub const RETIRED_DIR: &str = "retired";

/// A completed rotation.
#[derive(Debug, Clone)]
pub struct Rotated {
    pub old: PublicKey,
    pub new: PublicKey,
    /// The hand-over's sequence number in the local log.
    pub seq: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Rotate the key in `key_file` that signs `log`. `keep_old_secret`: keep the old secret in
/// `retired/` until [`forget_retired_secrets`] (a registry still knows the station by it).
pub fn rotate(
    log: &AuditLog,
    key_file: &Path,
    keep_old_secret: bool,
) -> Result<Rotated, AuditError> {
    let dir = log.dir();
    let lock = log.lock()?;
    finish_staged(log, key_file)?;
    let old = SecretKey::read(key_file)?;
    let new = SecretKey::generate()?;
    let stage = dir.join(STAGE_DIR);
    create_private_dir(&stage)?;
    let staged = stage.join(STAGED_KEY);
    remove_pair(&staged)?;
    new.write_pair(&staged)?;
    retire(dir, &old, keep_old_secret)?;
    let proof = new.sign(&rekey_message(&old.public(), &new.public()));
    let seq = log.append_locked(
        &old,
        Event::StationKeyRotated {
            old_key: old.public().to_pem(),
            new_key: new.public().to_pem(),
            proof: B64.encode(proof),
        },
    )?;
    switch(log, key_file, &new)?;
    drop(lock);
    Ok(Rotated {
        old: old.public(),
        new: new.public(),
        seq,
    })
}

/// Finish a rotation a crash interrupted, if one did, taking the log's lock: what anything
/// that signs as the station (the daemon) runs before reading the key file.
pub fn finish_interrupted(log: &AuditLog, key_file: &Path) -> Result<(), AuditError> {
    if !log.dir().join(STAGE_DIR).join(STAGED_KEY).exists() {
        return Ok(());
    }
    let _lock = log.lock()?;
    finish_staged(log, key_file)
}

/// Finish a rotation a crash interrupted (call with the log's lock held): a staged key the
/// log was handed over to replaces the key file; one it was not is dropped.
pub(crate) fn finish_staged(log: &AuditLog, key_file: &Path) -> Result<(), AuditError> {
    let staged = log.dir().join(STAGE_DIR).join(STAGED_KEY);
    if !staged.exists() {
        return Ok(());
    }
    let next = SecretKey::read(&staged)?;
    if log.handed_to()? == Some(next.public().id()) {
        switch(log, key_file, &next)
    } else {
        remove_pair(&staged)
    }
}

/// The hand-over is in the log: sign the heads with the new key, then make it the station's.
fn switch(log: &AuditLog, key_file: &Path, new: &SecretKey) -> Result<(), AuditError> {
    log.resign_heads(new)?;
    let staged = log.dir().join(STAGE_DIR).join(STAGED_KEY);
    // The public half first: a crash between the renames leaves the staged secret, and the
    // next append finishes the switch.
    for (from, to) in [
        (public_key_path(&staged), public_key_path(key_file)),
        (staged.clone(), key_file.to_path_buf()),
    ] {
        match std::fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&from)(e)),
        }
    }
    if let Some(parent) = key_file.parent()
        && let Ok(d) = std::fs::File::open(parent)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

fn retire(dir: &Path, old: &SecretKey, keep_secret: bool) -> Result<(), AuditError> {
    let retired = dir.join(RETIRED_DIR);
    create_private_dir(&retired)?;
    let id = old.public().id().to_string();
    let key_path = retired.join(format!("{id}.key"));
    let pub_path = public_key_path(&key_path);
    if keep_secret && !key_path.exists() {
        remove_pair(&key_path)?;
        old.write_pair(&key_path)?;
    } else if !pub_path.exists() {
        amicus_bundle::bundle::write_atomic(&pub_path, old.public().to_pem().as_bytes())
            .map_err(io(&pub_path))?;
    }
    Ok(())
}

fn create_private_dir(path: &Path) -> Result<(), AuditError> {
    std::fs::create_dir_all(path).map_err(io(path))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io(path))?;
    }
    Ok(())
}

fn remove_pair(key_path: &Path) -> Result<(), AuditError> {
    for p in [key_path.to_path_buf(), public_key_path(key_path)] {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&p)(e)),
        }
    }
    Ok(())
}

/// A key this station signed with before.
#[derive(Clone)]
pub struct RetiredKey {
    pub public: PublicKey,
    /// Kept until a registry has taken the hand-over.
    pub secret: Option<SecretKey>,
    pub path: PathBuf,
}

/// The station's retired keys (none if it was never rotated). Files that are not keys are
/// skipped.
pub fn retired_keys(station_dir: &Path) -> Result<Vec<RetiredKey>, KeyError> {
    let dir = station_dir.join(RETIRED_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(KeyError::Io { path: dir, source }),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "pub") {
            continue;
        }
        let Ok(public) = PublicKey::read(&path) else {
            continue;
        };
        let secret_path = path.with_extension("key");
        let secret = SecretKey::read(&secret_path)
            .ok()
            .filter(|s| s.public() == public);
        out.push(RetiredKey {
            public,
            secret,
            path,
        });
    }
    out.sort_by_key(|k| k.public.id());
    Ok(out)
}

/// Delete the retired secrets (a registry has the hand-over); the public halves stay.
pub fn forget_retired_secrets(station_dir: &Path) -> Result<usize, AuditError> {
    let mut n = 0;
    for k in retired_keys(station_dir)? {
        let secret_path = k.path.with_extension("key");
        match std::fs::remove_file(&secret_path) {
            Ok(()) => n += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&secret_path)(e)),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{self, LOCAL, PUBLIC};

    fn station_log() -> (tempfile::TempDir, PathBuf, PublicKey) {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("station.key");
        let key = SecretKey::generate().unwrap();
        key.write_pair(&key_file).unwrap();
        let log = AuditLog::for_station(dir.path(), &key_file);
        log.create().unwrap();
        log.append(Event::StationInitialised {
            station_key: key.public().id().to_string(),
            archive: "/a".into(),
        })
        .unwrap();
        (dir, key_file, key.public())
    }

    fn indexed() -> Event {
        Event::CatalogPublished {
            sha256: amicus_bundle::sha256(b"c"),
            bytes: 1,
        }
    }

    #[test]
    fn a_rotated_log_verifies_with_the_old_or_the_new_key_and_not_a_stranger() {
        let (dir, key_file, first) = station_log();
        let log = AuditLog::for_station(dir.path(), &key_file);
        log.append(indexed()).unwrap();
        let r = rotate(&log, &key_file, true).unwrap();
        assert_eq!(r.old, first);
        assert_eq!(PublicKey::read(&public_key_path(&key_file)).unwrap(), r.new);
        log.append(indexed()).unwrap();
        for pinned in [&r.old, &r.new] {
            let report = audit::verify(dir.path(), pinned).unwrap();
            assert!(report.ok(), "{report:?}");
            assert_eq!(report.valid_entries, 4);
            assert_eq!(report.keys.len(), 2);
            assert_eq!(report.keys[1].from_seq, 3);
            assert_eq!(report.keys[1].keyid, r.new.id().to_string());
        }
        let stranger = SecretKey::generate().unwrap().public();
        assert!(!audit::verify(dir.path(), &stranger).unwrap().ok());
        // The old secret is kept until a registry has the hand-over, then forgotten.
        let retired = retired_keys(dir.path()).unwrap();
        assert_eq!(retired.len(), 1);
        assert!(retired[0].secret.is_some());
        assert_eq!(forget_retired_secrets(dir.path()).unwrap(), 1);
        assert!(retired_keys(dir.path()).unwrap()[0].secret.is_none());
        // Twice: a chain of hand-overs.
        let r2 = rotate(&log, &key_file, false).unwrap();
        log.append(indexed()).unwrap();
        for pinned in [&first, &r.new, &r2.new] {
            let report = audit::verify(dir.path(), pinned).unwrap();
            assert!(report.ok(), "{report:?}");
            assert_eq!(report.keys.len(), 3);
        }
    }

    #[test]
    fn an_append_with_the_retired_key_is_refused_and_a_forged_handover_does_not_verify() {
        let (dir, key_file, _) = station_log();
        let old = SecretKey::read(&key_file).unwrap();
        let log = AuditLog::for_station(dir.path(), &key_file);
        rotate(&log, &key_file, false).unwrap();
        // A process that still holds the old key cannot write after the hand-over.
        let stale = AuditLog::new(dir.path(), old.clone());
        let err = stale.append(indexed()).unwrap_err();
        assert!(err.to_string().contains("handed over"), "{err}");

        // Someone holding only the old key hands the log to their own key without the
        // proof: the verifier refuses the hand-over.
        let (dir, key_file, first) = station_log();
        let old = SecretKey::read(&key_file).unwrap();
        let theirs = SecretKey::generate().unwrap();
        let stale = AuditLog::new(dir.path(), old);
        stale
            .append(Event::StationKeyRotated {
                old_key: first.to_pem(),
                new_key: theirs.public().to_pem(),
                proof: B64.encode(theirs.sign(b"something else")),
            })
            .unwrap();
        let report = audit::verify(dir.path(), &first).unwrap();
        assert!(
            report
                .problem
                .as_deref()
                .is_some_and(|p| p.contains("proof")),
            "{report:?}"
        );
    }

    #[test]
    fn a_crash_after_the_handover_is_finished_by_the_next_append() {
        let (dir, key_file, first) = station_log();
        let old = SecretKey::read(&key_file).unwrap();
        let new = SecretKey::generate().unwrap();
        // What `rotate` leaves when the process dies right after the hand-over's append.
        let stage = dir.path().join(STAGE_DIR);
        std::fs::create_dir_all(&stage).unwrap();
        new.write_pair(&stage.join(STAGED_KEY)).unwrap();
        AuditLog::new(dir.path(), old.clone())
            .append(Event::StationKeyRotated {
                old_key: first.to_pem(),
                new_key: new.public().to_pem(),
                proof: B64.encode(new.sign(&rekey_message(&first, &new.public()))),
            })
            .unwrap();
        // The head is still the old key's: the log verifies as it is.
        let report = audit::verify(dir.path(), &first).unwrap();
        assert!(report.ok(), "{report:?}");
        // The daemon finishes the rotation before it signs anything (nothing appended).
        let log = AuditLog::for_station(dir.path(), &key_file);
        finish_interrupted(&log, &key_file).unwrap();
        assert_eq!(SecretKey::read(&key_file).unwrap().public(), new.public());
        log.append(indexed()).unwrap();
        assert_eq!(
            PublicKey::read(&public_key_path(&key_file)).unwrap(),
            new.public()
        );
        assert!(!stage.join(STAGED_KEY).exists());
        let report = audit::verify(dir.path(), &new.public()).unwrap();
        assert!(report.ok(), "{report:?}");

        // A staging that stopped before its hand-over is dropped, and the key stays.
        let other = SecretKey::generate().unwrap();
        other.write_pair(&stage.join(STAGED_KEY)).unwrap();
        log.append(indexed()).unwrap();
        assert!(!stage.join(STAGED_KEY).exists());
        assert_eq!(
            PublicKey::read(&public_key_path(&key_file)).unwrap(),
            new.public()
        );
        assert!(audit::verify(dir.path(), &first).unwrap().ok());
    }

    #[test]
    fn heads_and_chains_name_the_keys_in_order() {
        let (dir, key_file, first) = station_log();
        let log = AuditLog::for_station(dir.path(), &key_file);
        let r = rotate(&log, &key_file, false).unwrap();
        // Both chains carry the hand-over; each verifies on its own with either key.
        for chain in [LOCAL, PUBLIC] {
            let data = std::fs::read(dir.path().join(chain.log)).unwrap();
            let lines: Vec<&[u8]> = data
                .strip_suffix(b"\n")
                .unwrap()
                .split(|&b| b == b'\n')
                .collect();
            let head = std::fs::read(dir.path().join(chain.head)).unwrap();
            for k in [&first, &r.new] {
                let report =
                    audit::verify_lines(&lines, audit::HeadFile::Bytes(head.clone()), k, chain);
                assert!(report.ok(), "{report:?}");
            }
            // The hand-over is the last entry; the head must be the new key's now: an old
            // head signed by the old key for a later seq would not pass.
            let report = audit::verify_lines(
                &lines[..lines.len() - 1],
                audit::HeadFile::Bytes(head.clone()),
                &first,
                chain,
            );
            assert!(!report.ok());
        }
    }
}
