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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultUpload {
    pub outputs: Vec<SealedOutput>,
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
