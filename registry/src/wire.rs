//! The registry's JSON bodies, shared by the server and its clients. Plain data only; the
//! OpenAPI document (`registry/openapi.json`) describes the same shapes.

use serde::{Deserialize, Serialize};

/// What a person may do. Stations are not people: they sign requests with their key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Admin,
    Researcher,
    DataOwner,
    Auditor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Researcher => "researcher",
            Role::DataOwner => "data-owner",
            Role::Auditor => "auditor",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "admin" => Role::Admin,
            "researcher" => Role::Researcher,
            "data-owner" => Role::DataOwner,
            "auditor" => Role::Auditor,
            _ => return None,
        })
    }
}

/// A run's state at the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    Pending,
    Delivered,
    Running,
    Done,
    Refused,
    Failed,
    Expired,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Pending => "pending",
            RunState::Delivered => "delivered",
            RunState::Running => "running",
            RunState::Done => "done",
            RunState::Refused => "refused",
            RunState::Failed => "failed",
            RunState::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<RunState> {
        Some(match s {
            "pending" => RunState::Pending,
            "delivered" => RunState::Delivered,
            "running" => RunState::Running,
            "done" => RunState::Done,
            "refused" => RunState::Refused,
            "failed" => RunState::Failed,
            "expired" => RunState::Expired,
            _ => return None,
        })
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            RunState::Done | RunState::Refused | RunState::Failed | RunState::Expired
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    pub name: String,
    pub role: Role,
    /// The station a data owner owns.
    #[serde(default)]
    pub station: Option<String>,
    /// A researcher's X25519 public key (PEM): results are sealed to it.
    #[serde(default)]
    pub enc_public_key: Option<String>,
    /// The token stops working this long after it is made (default: never; rotate it with
    /// `POST /v1/users/{name}/token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expires_in_s: Option<u64>,
}

/// A new token for a user (`POST /v1/users/{name}/token`): the old one stops working.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// The new token expires this long after it is made (default: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_s: Option<u64>,
}

/// A new token, shown once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenResponse {
    pub user: String,
    pub token: String,
    /// When it stops working (milliseconds since the epoch), if ever.
    #[serde(default)]
    pub expires_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserInfo {
    pub name: String,
    pub role: Role,
    pub station: Option<String>,
    pub has_enc_key: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewUserResponse {
    pub user: UserInfo,
    /// Shown once; the registry keeps only its SHA-256.
    pub token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewStation {
    pub name: String,
    /// The station's Ed25519 public key (SubjectPublicKeyInfo PEM).
    pub public_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StationInfo {
    pub name: String,
    pub key_id: String,
    pub public_key: String,
    pub last_seen_ms: Option<i64>,
    /// Keys the station signed with before `public_key` (`amicus station rekey`), oldest
    /// first: results signed before a rotation verify against them.
    #[serde(default)]
    pub retired_keys: Vec<RetiredKey>,
}

/// A station key that a rotation retired.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetiredKey {
    pub key_id: String,
    pub public_key: String,
    pub retired_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignerInfo {
    pub keyid: String,
    pub role: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainInfo {
    pub digest: String,
    pub name: String,
    pub version: String,
    pub bytes: i64,
    pub capabilities: Vec<String>,
    pub signers: Vec<SignerInfo>,
    pub uploaded_by: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTask {
    /// The train's bundle digest (64 hex digits).
    pub train: String,
    pub stations: Vec<String>,
    #[serde(default)]
    pub params: Option<serde_json::Value>,
    /// Runs not finished by then expire. Default one day.
    #[serde(default)]
    pub expires_in_s: Option<u64>,
    /// The researcher's signed request (`request::sign_request`), relayed to the stations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    pub id: String,
    pub task: String,
    pub station: String,
    pub state: RunState,
    pub reason: Option<String>,
    pub updated_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskInfo {
    pub id: String,
    pub researcher: String,
    pub train: String,
    pub params: serde_json::Value,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub runs: Vec<RunInfo>,
}

/// A run handed to a station.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkItem {
    pub run: String,
    pub task: String,
    pub station: String,
    pub train: String,
    /// The task's parameters as JSON text.
    pub params: String,
    /// The requesting researcher's X25519 public key (PEM).
    pub recipient_key: String,
    pub state: RunState,
    pub expires_ms: i64,
    /// Set when the run is one round of a federated job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<RoundWork>,
    /// The researcher's signed request for this task or job, as they sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement: Option<String>,
}

/// What a station needs to run one round of a federated job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundWork {
    pub job: String,
    /// 1-based; `rounds + 1` is the evaluation round (no update expected).
    pub round: u32,
    pub rounds: u32,
    pub proximal_mu: f32,
    pub encoding: Encoding,
    pub dp: Option<DpPlan>,
    /// Set for the training rounds of a job with secure aggregation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_aggregation: Option<SecAggPlan>,
    /// The whole plan, so that a station can check it against the researcher's signed
    /// request (the fields above are derived from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<Plan>,
}

impl RoundWork {
    /// Round `round` of job `job` under `plan`: every field derived from the plan, so that a
    /// station that verified the plan against the researcher's signed request can rebuild
    /// what the registry should have sent.
    pub fn from_plan(job: String, round: u32, plan: Plan) -> RoundWork {
        RoundWork {
            job,
            round,
            rounds: plan.rounds,
            proximal_mu: plan.proximal_mu,
            encoding: plan.encoding,
            dp: plan.dp,
            // The evaluation round sends no update, so it has nothing to mask.
            secure_aggregation: plan.secure_aggregation.filter(|_| round <= plan.rounds),
            plan: Some(plan),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkResponse {
    pub items: Vec<WorkItem>,
}

/// A station's report of a state change.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunUpdate {
    pub state: RunState,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedOutput {
    pub name: String,
    /// base64 of `enc || ciphertext` (see `sealed`).
    pub sealed: String,
    /// The station's signature over it (`request::sign_output`), base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultUpload {
    pub outputs: Vec<SealedOutput>,
    /// A federated round's update (base64 of the `amicus_fl::wire` update bytes): for the
    /// registry to aggregate, so not sealed to the researcher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    pub run: String,
    pub station: String,
    pub state: RunState,
    pub reason: Option<String>,
    pub outputs: Vec<SealedOutput>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskResults {
    pub task: String,
    pub runs: Vec<RunResult>,
}

/// Audit lines a station uploads: complete lines of its `audit.log`, in order, continuing
/// where the registry's copy ends, and its signed `audit.head`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditUpload {
    pub lines: Vec<String>,
    pub head: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditAck {
    /// The sequence number of the next entry the registry expects.
    pub next_seq: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StationAudit {
    pub station: String,
    pub public_key: String,
    pub lines: Vec<String>,
    pub head: Option<String>,
}

/// One entry of the registry's own hash-chained trail.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegistryAuditEntry {
    pub seq: i64,
    pub time_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub prev: String,
    pub hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable, machine-readable: see `server::ErrorCode`.
    pub code: String,
    pub message: String,
}

// ---- federated jobs -----------------------------------------------------------------------

pub use amicus_fl::aggregate::ServerOptimizer;
pub use amicus_fl::wire::Encoding;

/// How the registry combines a round's updates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Strategy {
    /// Mean weighted by samples.
    FedAvg,
    /// Coordinate-wise median (robust to a minority of arbitrary updates).
    Median,
    /// Drop the `trim` largest and smallest values of each coordinate, average the rest.
    TrimmedMean { trim: usize },
}

/// Differential privacy the stations apply to their updates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpPlan {
    /// L2 bound of an update (the mechanism's sensitivity).
    pub clip_norm: f64,
    /// Noise standard deviation over `clip_norm`.
    pub noise_multiplier: f64,
}

/// Secure aggregation of a job's training rounds (see `amicus_fl::secagg` and
/// `docs/federated.md` for the protocol and its threat model).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecAggPlan {
    /// Shares that reconstruct a station's secret; also the fewest stations a round may sum
    /// (fewer, and the round fails with nothing revealed).
    pub threshold: u32,
    /// How long each exchange (keys, shares, unmasking) waits for stations that are slow.
    #[serde(default = "default_exchange_seconds")]
    pub exchange_seconds: u64,
}

fn default_exchange_seconds() -> u64 {
    60
}

/// Where a securely aggregated round stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecAggPhase {
    /// Stations send their round keys.
    Keys,
    /// Stations send each other (through the registry) sealed shares of their secrets.
    Shares,
    /// Stations train and send masked updates.
    Masked,
    /// Surviving stations reveal the shares that unmask the sum.
    Reveal,
    /// The round is over (aggregated, or failed with nothing revealed).
    Ended,
}

impl SecAggPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            SecAggPhase::Keys => "keys",
            SecAggPhase::Shares => "shares",
            SecAggPhase::Masked => "masked",
            SecAggPhase::Reveal => "reveal",
            SecAggPhase::Ended => "ended",
        }
    }

    pub fn parse(s: &str) -> Option<SecAggPhase> {
        Some(match s {
            "keys" => SecAggPhase::Keys,
            "shares" => SecAggPhase::Shares,
            "masked" => SecAggPhase::Masked,
            "reveal" => SecAggPhase::Reveal,
            "ended" => SecAggPhase::Ended,
            _ => return None,
        })
    }
}

/// A station's round keys: X25519 public keys, hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecAggKeys {
    /// Its pairwise-mask key.
    pub mask_public: String,
    /// The key the others seal its shares to.
    pub share_public: String,
    /// A commitment to its self-mask seed (`amicus_fl::secagg`), so a wrongly reconstructed
    /// seed is detected.
    pub self_commitment: String,
    /// The station's Ed25519 public key (PEM) and its signature over these keys
    /// (`request::secagg_keys_message`): peers check both against the key ids the
    /// researcher's signed request names, so the registry cannot put its own keys in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub station_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// A participant as the registry announces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecAggParticipant {
    /// The protocol id: the station's position in the job's station list.
    pub id: u32,
    pub station: String,
    #[serde(flatten)]
    pub keys: SecAggKeys,
}

/// One station's shares for another, sealed to the recipient's share key (HPKE).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedShare {
    pub from: u32,
    pub to: u32,
    /// base64 of `enc || ciphertext`.
    pub sealed: String,
}

/// Which secret a revealed share belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecretKind {
    /// A survivor's self-mask seed.
    SelfSeed,
    /// A dropped station's pairwise-mask key.
    MaskKey,
}

/// A share a surviving station reveals for unmasking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevealedShare {
    /// Whose secret.
    pub of: u32,
    pub secret: SecretKind,
    pub x: u8,
    /// hex
    pub y: String,
}

/// What a station sends in a securely aggregated round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SecAggMessage {
    Keys {
        mask_public: String,
        share_public: String,
        self_commitment: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        station_key: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signature: Option<String>,
    },
    Shares {
        shares: Vec<SealedShare>,
    },
    Reveal {
        shares: Vec<RevealedShare>,
    },
    /// In the reveal phase, before revealing: the station's signature over the survivors and
    /// dropped it was shown (`request::secagg_sets_message`). Each station reveals only once
    /// `threshold` survivors signed the same sets, so a registry cannot show different
    /// stations different sets and collect both secrets of one station.
    Consistency {
        signature: String,
    },
}

/// A survivor's signature over the sets it was shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsistencySignature {
    pub id: u32,
    pub station: String,
    pub signature: String,
}

/// A securely aggregated round as one of its stations sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecAggView {
    pub phase: SecAggPhase,
    pub threshold: u32,
    /// The asking station's protocol id.
    pub me: u32,
    /// Stations whose keys arrived before the share exchange began.
    pub participants: Vec<SecAggParticipant>,
    /// Participants whose shares arrived before training began: the masks are among these.
    pub sharers: Vec<u32>,
    /// Shares sealed to the asking station, from the sharers.
    pub shares: Vec<SealedShare>,
    /// Sharers whose masked update arrived (set when unmasking begins).
    pub survivors: Vec<u32>,
    /// Sharers whose masked update did not arrive.
    pub dropped: Vec<u32>,
    /// In the reveal phase: the survivors' signatures over the sets they were shown.
    #[serde(default)]
    pub consistency: Vec<ConsistencySignature>,
}

fn default_min_stations() -> u32 {
    1
}
fn default_round_seconds() -> u64 {
    600
}
fn default_strategy() -> Strategy {
    Strategy::FedAvg
}
fn default_server() -> ServerOptimizer {
    ServerOptimizer::Sgd { lr: 1.0 }
}
fn default_encoding() -> Encoding {
    Encoding::Fp32
}

/// The plan of a federated job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub rounds: u32,
    /// Updates a round needs (its quorum); stations that fail or miss the deadline are
    /// recorded and the round goes on without them.
    #[serde(default = "default_min_stations")]
    pub min_stations: u32,
    /// Each round's deadline, from when it starts.
    #[serde(default = "default_round_seconds")]
    pub round_seconds: u64,
    #[serde(default = "default_strategy")]
    pub strategy: Strategy,
    /// Applies the combined update to the global weights (SGD with lr 1 is plain FedAvg).
    #[serde(default = "default_server")]
    pub server: ServerOptimizer,
    /// The registry scales each update down to this L2 norm before combining.
    #[serde(default)]
    pub clip_update_norm: Option<f64>,
    /// FedProx's μ, applied in the stations' optimizers.
    #[serde(default)]
    pub proximal_mu: f32,
    #[serde(default = "default_encoding")]
    pub encoding: Encoding,
    #[serde(default)]
    pub dp: Option<DpPlan>,
    /// After the last round, one more round in which every station evaluates the final
    /// weights (the train sees `round > rounds` and submits no update).
    #[serde(default)]
    pub evaluate_final: bool,
    /// Pairwise masking so the registry learns only the sum of each round's updates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_aggregation: Option<SecAggPlan>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewJob {
    pub train: String,
    pub stations: Vec<String>,
    #[serde(default)]
    pub params: Option<serde_json::Value>,
    pub plan: Plan,
    /// base64 of the initial global weights (`amicus_fl::wire` weight set).
    pub weights: String,
    /// The researcher's signed request (`request::sign_request`), relayed to the stations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    Running,
    Done,
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        [JobState::Running, JobState::Done, JobState::Failed]
            .into_iter()
            .find(|j| j.as_str() == s)
    }
}

/// One station's part in a completed round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundStation {
    pub station: String,
    /// used | rejected | missing
    pub status: String,
    pub samples: u64,
    pub bytes: u64,
    /// L2 norm of the update as received.
    pub norm: Option<f64>,
    pub reason: Option<String>,
}

/// What a round's aggregation did (stored with its checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundSummary {
    pub round: u32,
    pub stations: Vec<RoundStation>,
    pub used: u32,
    /// L2 norm of the combined update applied to the global weights.
    pub delta_norm: f64,
    pub created_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRoundInfo {
    pub round: u32,
    pub task: String,
    pub runs: Vec<RunInfo>,
    /// Present once the round was aggregated.
    pub summary: Option<RoundSummary>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobInfo {
    pub id: String,
    pub researcher: String,
    pub train: String,
    pub params: serde_json::Value,
    pub plan: Plan,
    pub stations: Vec<String>,
    pub state: JobState,
    pub round: u32,
    pub reason: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub rounds: Vec<JobRoundInfo>,
}
