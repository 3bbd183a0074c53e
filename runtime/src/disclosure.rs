//! What of a station's records leaves it.
//!
//! A run can influence text (a query, an error message, a series UID, a panic), numbers (fuel,
//! time, memory, rows, how often it called something) and the order of its capability calls.
//! Any of these in a copy that leaves the station is a channel out of the sandbox: a hostile
//! train once put patients' pseudonyms, sex and age into its error string, and the daemon
//! uploaded it. So the copy that leaves — the public audit chain the daemon uploads to the
//! registry, the PROV-O export, the run state a researcher sees — is a projection decided here:
//!
//! - capability calls do not leave at all (their detail, outcome, rows and count, and their
//!   order; the data owner's local log keeps them);
//! - a run's outcome leaves as a class, `succeeded`, `limit`, `refused`, `trapped` or
//!   `failed`, with a fixed station phrase; never the train's text;
//! - a run's fuel and peak memory leave rounded up to a power of two, its time to whole
//!   seconds (entry times too): a few bits per run, where the exact figures would be dozens;
//! - the archive's counts, paths and the owner's query outcomes stay; what the registry needs
//!   for the job (the update's samples, values, bytes, clipping, noise, privacy spent) and
//!   what the bundle fixes before any data is read (its names, the refusal stages and reasons,
//!   the declared outputs, their sizes) leave as they are.
//!
//! What still leaves and is influenced by the data: the outcome class, the coarse figures and
//! the time a run took; which outputs a run released and their sizes (their sealed ciphertext
//! shows the size anyway); a federated update's sample count. `docs/registry.md` states this.

use crate::audit::Event;
use amicus_bundle::Digest;
use serde::{Deserialize, Serialize};

/// An audit event as it leaves the station.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum PublicEvent {
    StationInitialised {
        station_key: String,
    },
    SignerTrusted {
        name: String,
        keyid: String,
    },
    ResearcherTrusted {
        name: String,
        keyid: String,
    },
    RequestVerified {
        registry_run: String,
        task: String,
        job: Option<String>,
        round: Option<u32>,
        researcher: String,
        keyid: String,
        statement_sha256: Digest,
    },
    GlobalWeightsReceived {
        job: String,
        round: u32,
        bytes: u64,
        sha256: Digest,
    },
    DigestApproved {
        digest: Digest,
        train: Option<String>,
        scope: Option<String>,
    },
    TrainReceived {
        digest: Digest,
        train: String,
        version: String,
        bundle_sha256: Digest,
        bundle_bytes: u64,
        signers: Vec<String>,
    },
    TrainRefused {
        digest: Option<Digest>,
        bundle_sha256: Digest,
        stage: String,
        reason: String,
    },
    RunStarted {
        run_id: String,
        digest: Digest,
        params_sha256: Digest,
        fuel: u64,
        memory_bytes: u64,
        wall_ms: u64,
        approval: Option<String>,
    },
    WorkerStarted {
        run_id: String,
        landlock: String,
        seccomp: String,
        cpu_limit_seconds: u64,
        capabilities_dropped: bool,
        gaps: Vec<String>,
    },
    OutputReleased {
        run_id: String,
        name: String,
        bytes: u64,
    },
    OutputHeld {
        run_id: String,
        name: String,
        bytes: u64,
    },
    /// The data owner's decision; their reason stays at the station.
    HeldOutputsDecided {
        run_id: String,
        decision: String,
        outputs: u64,
    },
    UpdateSubmitted {
        run_id: String,
        job: String,
        round: u32,
        samples: u64,
        values: u64,
        bytes: u64,
        clip_norm: Option<f64>,
        noise_multiplier: Option<f64>,
        epsilon: Option<f64>,
        delta: Option<f64>,
    },
    UpdateMasked {
        run_id: String,
        job: String,
        round: u32,
        sharers: u32,
        threshold: u32,
        bytes: u64,
        sha256: Digest,
    },
    SharesRevealed {
        job: String,
        round: u32,
        survivors: u32,
        dropped: u32,
    },
    RunFinished {
        run_id: String,
        /// `succeeded`, `limit`, `refused`, `trapped` or `failed`.
        outcome: String,
        reason: Option<String>,
        /// Rounded up to a power of two.
        fuel_used: u64,
        /// Rounded up to a power of two.
        peak_memory_bytes: u64,
        /// Rounded up to whole seconds.
        wall_seconds: u64,
        outputs_released: u64,
    },
    TornTailRecovered {
        bytes: u64,
    },
    ArchiveIndexed {
        graph_sha256: String,
    },
    CatalogPublished {
        sha256: Digest,
        bytes: u64,
    },
    IndexQueried {
        query_sha256: Digest,
        /// `ok` or `refused`.
        outcome: String,
    },
    /// Leaves as it is: a verifier of the public chain follows the hand-over with it.
    StationKeyRotated {
        old_key: String,
        new_key: String,
        proof: String,
    },
}

/// The class of a run's outcome, as a researcher and an auditor see it.
pub fn outcome_class(label: &str) -> &'static str {
    match label {
        "succeeded" => "succeeded",
        "out-of-fuel"
        | "wall-clock-exceeded"
        | "memory-limit"
        | "cpu-time-exceeded"
        | "limit-exceeded" => "limit",
        "policy-violation" | "not-a-train" | "refused" => "refused",
        "trapped" => "trapped",
        "interrupted" => "interrupted",
        _ => "failed",
    }
}

/// The station's fixed phrase for an outcome class (`None` for success).
pub fn class_reason(class: &str) -> Option<String> {
    let text = match class {
        "succeeded" => return None,
        "limit" => "the run reached one of the station's limits",
        "refused" => "the station refused what the run produced",
        "trapped" => "the train stopped with a trap",
        "interrupted" => "the station shut down during the run, which was not run again",
        _ => "the run failed",
    };
    Some(format!("{text}; the station's data owner has the details"))
}

/// `x` rounded up to a power of two (0 stays 0).
pub fn power_of_two(x: u64) -> u64 {
    if x == 0 {
        0
    } else {
        x.checked_next_power_of_two().unwrap_or(u64::MAX)
    }
}

/// The projection of a local audit event onto the copy that leaves (`None`: it stays).
pub fn public(event: &Event) -> Option<PublicEvent> {
    Some(match event.clone() {
        Event::StationInitialised { station_key, .. } => {
            PublicEvent::StationInitialised { station_key }
        }
        Event::SignerTrusted { name, keyid } => PublicEvent::SignerTrusted { name, keyid },
        Event::ResearcherTrusted { name, keyid } => PublicEvent::ResearcherTrusted { name, keyid },
        // Fixed by the researcher's request and the registry before any data is read.
        Event::RequestVerified {
            registry_run,
            task,
            job,
            round,
            researcher,
            keyid,
            statement_sha256,
        } => PublicEvent::RequestVerified {
            registry_run,
            task,
            job,
            round,
            researcher,
            keyid,
            statement_sha256,
        },
        Event::GlobalWeightsReceived {
            job,
            round,
            bytes,
            sha256,
        } => PublicEvent::GlobalWeightsReceived {
            job,
            round,
            bytes,
            sha256,
        },
        Event::DigestApproved {
            digest,
            train,
            scope,
            ..
        } => PublicEvent::DigestApproved {
            digest,
            train,
            scope,
        },
        Event::TrainReceived {
            digest,
            train,
            version,
            bundle_sha256,
            bundle_bytes,
            signers,
        } => PublicEvent::TrainReceived {
            digest,
            train,
            version,
            bundle_sha256,
            bundle_bytes,
            signers,
        },
        Event::TrainRefused {
            digest,
            bundle_sha256,
            stage,
            reason,
        } => PublicEvent::TrainRefused {
            digest,
            bundle_sha256,
            stage,
            reason,
        },
        Event::RunStarted {
            run_id,
            digest,
            params_sha256,
            fuel,
            memory_bytes,
            wall_ms,
            approval,
            ..
        } => PublicEvent::RunStarted {
            run_id,
            digest,
            params_sha256,
            fuel,
            memory_bytes,
            wall_ms,
            approval,
        },
        Event::WorkerStarted {
            run_id,
            landlock,
            seccomp,
            cpu_limit_seconds,
            capabilities_dropped,
            gaps,
            ..
        } => PublicEvent::WorkerStarted {
            run_id,
            landlock,
            seccomp,
            cpu_limit_seconds,
            capabilities_dropped,
            gaps,
        },
        // What a run asked and how often stays at the station (its count is train-controlled).
        Event::CapabilityCall { .. } | Event::CohortQueriesCounted { .. } => return None,
        Event::OutputReleased {
            run_id,
            name,
            bytes,
            ..
        } => PublicEvent::OutputReleased {
            run_id,
            name,
            bytes,
        },
        Event::OutputHeld {
            run_id,
            name,
            bytes,
            ..
        } => PublicEvent::OutputHeld {
            run_id,
            name,
            bytes,
        },
        Event::HeldOutputsDecided {
            run_id,
            decision,
            outputs,
            ..
        } => PublicEvent::HeldOutputsDecided {
            run_id,
            decision,
            outputs,
        },
        Event::UpdateSubmitted {
            run_id,
            job,
            round,
            samples,
            values,
            bytes,
            clip_norm,
            noise_multiplier,
            epsilon,
            delta,
        } => PublicEvent::UpdateSubmitted {
            run_id,
            job,
            round,
            samples,
            values,
            bytes,
            clip_norm,
            noise_multiplier,
            epsilon,
            delta,
        },
        Event::UpdateMasked {
            run_id,
            job,
            round,
            sharers,
            threshold,
            bytes,
            sha256,
        } => PublicEvent::UpdateMasked {
            run_id,
            job,
            round,
            sharers,
            threshold,
            bytes,
            sha256,
        },
        Event::SharesRevealed {
            job,
            round,
            survivors,
            dropped,
        } => PublicEvent::SharesRevealed {
            job,
            round,
            survivors,
            dropped,
        },
        Event::RunFinished {
            run_id,
            outcome,
            fuel_used,
            peak_memory_bytes,
            wall_us,
            outputs_released,
            ..
        } => {
            let class = outcome_class(&outcome);
            PublicEvent::RunFinished {
                run_id,
                outcome: class.to_string(),
                reason: class_reason(class),
                fuel_used: power_of_two(fuel_used),
                peak_memory_bytes: power_of_two(peak_memory_bytes),
                wall_seconds: wall_us.div_ceil(1_000_000),
                outputs_released,
            }
        }
        Event::TornTailRecovered { bytes, .. } => PublicEvent::TornTailRecovered { bytes },
        Event::ArchiveIndexed { graph_sha256, .. } => PublicEvent::ArchiveIndexed { graph_sha256 },
        Event::CatalogPublished { sha256, bytes } => {
            PublicEvent::CatalogPublished { sha256, bytes }
        }
        Event::IndexQueried {
            query_sha256,
            outcome,
        } => PublicEvent::IndexQueried {
            query_sha256,
            outcome: if outcome.starts_with("ok") {
                "ok".into()
            } else {
                "refused".into()
            },
        },
        Event::StationKeyRotated {
            old_key,
            new_key,
            proof,
        } => PublicEvent::StationKeyRotated {
            old_key,
            new_key,
            proof,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_and_buckets() {
        for (label, class) in [
            ("succeeded", "succeeded"),
            ("out-of-fuel", "limit"),
            ("wall-clock-exceeded", "limit"),
            ("memory-limit", "limit"),
            ("cpu-time-exceeded", "limit"),
            ("limit-exceeded", "limit"),
            ("policy-violation", "refused"),
            ("not-a-train", "refused"),
            ("trapped", "trapped"),
            ("failed", "failed"),
            ("interrupted", "interrupted"),
            ("something new", "failed"),
        ] {
            assert_eq!(outcome_class(label), class, "{label}");
        }
        assert_eq!(power_of_two(0), 0);
        assert_eq!(power_of_two(1), 1);
        assert_eq!(power_of_two(1000), 1024);
        assert_eq!(power_of_two(u64::MAX), u64::MAX);
    }

    #[test]
    fn run_text_and_calls_never_leave() {
        let secret = "patient 4f2a… sex F age 63";
        let call = Event::CapabilityCall {
            run_id: "r".into(),
            capability: "cohort".into(),
            call: "select".into(),
            detail: secret.into(),
            rows: Some(12),
            outcome: format!("failed: {secret}"),
            count: Some(3),
        };
        assert!(public(&call).is_none());
        let finished = Event::RunFinished {
            run_id: "r".into(),
            outcome: "failed".into(),
            reason: Some(format!("train returned an error: {secret}")),
            fuel_used: 123_456,
            peak_memory_bytes: 20_000_000,
            wall_us: 1_500_001,
            outputs_released: 0,
        };
        let p = public(&finished).unwrap();
        let text = serde_json::to_string(&p).unwrap();
        assert!(!text.contains("patient"), "{text}");
        assert!(text.contains("\"fuel_used\":131072"), "{text}");
        assert!(text.contains("\"wall_seconds\":2"), "{text}");
        assert!(text.contains("\"outcome\":\"failed\""), "{text}");
    }
}
