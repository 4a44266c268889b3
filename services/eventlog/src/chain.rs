//! Tamper evidence for the event log: a hash chain per tenant, signed
//! checkpoints of its head, and the verification that recomputes both.
//!
//! # The chain
//!
//! Every event of a tenant gets `hash = SHA-256(prev_hash || canonical bytes)`,
//! where `prev_hash` is the hash of the tenant's previous event (32 zero bytes
//! for its first, [`GENESIS`]) and the canonical bytes are the contract's Event
//! JSON (exactly what `GET /v1/events` and `dossier replay` print) with object
//! keys sorted and no whitespace ([`canonical_bytes`]). An auditor can therefore
//! recompute the chain from the raw log alone.
//!
//! # Sealing without serializing writers
//!
//! Appends are not touched: the [`Sealer`] follows the log behind the writers,
//! in position order, as one more follower of the log (`crate::follow`: the
//! runner every follower uses, reading through [`LogReader`], which never skips
//! a late commit). Per batch, in one transaction, it writes one `event_hashes`
//! row per event, moves each tenant's `chain_heads` row and its own checkpoint
//! (`checkpoints.name = 'sealer'`). The checkpoint row is locked for the batch,
//! so sealers in several processes take turns and never fork a chain, and one
//! takes over from where another stopped. Writers of all tenants keep appending
//! in parallel; the cost is that the newest events are unsealed for a moment.
//!
//! # Checkpoints
//!
//! [`write_checkpoints`] signs the head of every chain that moved since its last
//! checkpoint: HMAC-SHA256, keyed with `DOSSIER_CHECKPOINT_KEY` (never the JWT
//! secret), over [`Checkpoint::message`]. A checkpoint proves that the chain had
//! at least `seq` events ending in `hash` at `position`: cutting off the tail, or
//! rewriting events and their seals together, no longer matches it, and nobody
//! without the key can sign a new one. Copies kept outside the database (the
//! audit worker logs each one) also survive an attacker who deletes the
//! checkpoint rows.
//!
//! # Verification
//!
//! [`verify`] streams a tenant's events in position order inside one read-only
//! snapshot, recomputes the chain, and compares it with the stored seals and
//! with the latest signed checkpoint (plus any the caller kept elsewhere). It
//! names the first thing that does not match. What this proves and what it
//! does not is in README.md, "Auditing".

use std::collections::HashMap;
use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use tokio::sync::watch;

use crate::db::{Pool, pg_detail};
use crate::follow::{
    Effects, FollowError, Follower, Halt, Progress, Runner, RunnerConfig, checkpoint,
};
use crate::log::{EVENT_COLUMNS, LogError, LogReader, LoggedEvent};

/// The `prev_hash` of a tenant's first event.
pub const GENESIS: [u8; 32] = [0; 32];

/// The sealer's row in `checkpoints`.
pub const SEALER_CHECKPOINT: &str = "sealer";

/// Events sealed per transaction.
const SEAL_BATCH: i64 = 500;

/// Events read per page while verifying.
const VERIFY_PAGE: i64 = 1000;

/// First key of the advisory lock that keeps two checkpoint writers from
/// signing the same heads twice ("chain" in ASCII).
const CHECKPOINT_LOCK_KEY: i64 = 0x0063_6861_696e;

/// Prefix of the signed message; a new format gets a new prefix.
const CHECKPOINT_FORMAT: &str = "dossier-checkpoint-v1";

type HmacSha256 = Hmac<Sha256>;

/// What went wrong while sealing, signing or verifying.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// No pooled connection could be had.
    #[error("no Postgres connection for the hash chain: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A statement failed.
    #[error("hash chain statement failed: {}", pg_detail(.0))]
    Query(#[from] tokio_postgres::Error),
    /// Reading the log failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A stored value is not what the schema promises (a hash of the wrong
    /// length, ...).
    #[error("hash chain data is malformed: {0}")]
    Malformed(String),
}

impl ChainError {
    /// Whether waiting and trying again may help (Postgres down or busy).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Pool(_) | Self::Log(LogError::Pool(_)) => true,
            Self::Query(error) | Self::Log(LogError::Query(error)) => {
                crate::db::is_transient(error)
            }
            Self::Log(_) | Self::Malformed(_) => false,
        }
    }
}

impl From<FollowError> for ChainError {
    fn from(error: FollowError) -> Self {
        match error {
            FollowError::Pool(error) => Self::Pool(error),
            FollowError::Query(error) => Self::Query(error),
            FollowError::Log(error) => Self::Log(error),
        }
    }
}

/// The canonical bytes of an event: the contract's Event JSON with every
/// object's keys in byte order, no insignificant whitespace, strings escaped as
/// `serde_json` does (only `"`, `\` and control characters). The same bytes
/// come out of any Event JSON an auditor holds, however its keys were ordered.
pub fn canonical_bytes(event: &LoggedEvent) -> Vec<u8> {
    // LoggedEvent serializes to exactly the contract's Event (no metadata).
    let value = serde_json::to_value(event).unwrap_or(Value::Null);
    canonical_json(&value).into_bytes()
}

/// `value` as canonical JSON (see [`canonical_bytes`]).
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(key, out);
                out.push(':');
                write_canonical(value, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::String(s) => write_string(s, out),
        // Null, booleans and numbers print the same whatever the map order.
        other => out.push_str(&other.to_string()),
    }
}

fn write_string(s: &str, out: &mut String) {
    // serde_json's escaping of a lone string is fixed and does not depend on
    // any feature that changes map ordering.
    out.push_str(&Value::String(s.to_owned()).to_string());
}

/// The chain hash of `event` after `prev`: SHA-256(prev || canonical bytes).
pub fn chain_hash(prev: &[u8; 32], event: &LoggedEvent) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update(canonical_bytes(event));
    hasher.finalize().into()
}

fn to_hash(bytes: Vec<u8>, what: &str) -> Result<[u8; 32], ChainError> {
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| ChainError::Malformed(format!("{what} is {} bytes, not 32", bytes.len())))
}

/// The sealer as a log follower: per batch, in the runner's transaction, one
/// `event_hashes` row per event and each tenant's moved `chain_heads` row (see
/// the module docs). Run it through [`Sealer`].
#[derive(Debug, Default)]
pub struct Seal;

impl Follower for Seal {
    type Error = ChainError;
    const EFFECTS: Effects = Effects::InTransaction;

    fn checkpoints(&self) -> Vec<&'static str> {
        vec![SEALER_CHECKPOINT]
    }

    async fn apply(
        &mut self,
        tx: &deadpool_postgres::Transaction<'_>,
        events: &[LoggedEvent],
        _from: &[i64],
    ) -> Result<Vec<i64>, Halt<ChainError>> {
        seal(tx, events).await.map_err(Halt::rollback)?;
        let last = events.last().map_or(0, |event| event.position);
        metrics::counter!("dossier_chain_events_sealed_total").increment(events.len() as u64);
        Ok(vec![last])
    }

    fn is_transient(error: &ChainError) -> bool {
        error.is_transient()
    }

    fn kind(error: &ChainError) -> &'static str {
        match error {
            ChainError::Pool(_) => "pool",
            ChainError::Query(_) => "postgres",
            ChainError::Log(_) => "log",
            ChainError::Malformed(_) => "malformed",
        }
    }
}

/// Writes the seals of `events` and moves their tenants' chain heads, in `tx`.
/// The same three statements every batch: prepared once per pooled connection,
/// so each is one round trip, not a prepare and an execute.
async fn seal(
    tx: &deadpool_postgres::Transaction<'_>,
    events: &[LoggedEvent],
) -> Result<(), ChainError> {
    let mut tenants: Vec<String> = events.iter().map(|e| e.tenant.clone()).collect();
    tenants.sort();
    tenants.dedup();
    let mut heads: HashMap<String, (i64, [u8; 32])> = HashMap::new();
    let heads_of = tx
        .prepare_cached("SELECT tenant, seq, hash FROM chain_heads WHERE tenant = ANY($1)")
        .await?;
    for row in tx.query(&heads_of, &[&tenants]).await? {
        let hash = to_hash(row.try_get("hash")?, "a chain head's hash")?;
        heads.insert(row.try_get("tenant")?, (row.try_get("seq")?, hash));
    }

    let mut positions = Vec::with_capacity(events.len());
    let mut owners = Vec::with_capacity(events.len());
    let mut seqs = Vec::with_capacity(events.len());
    let mut hashes: Vec<Vec<u8>> = Vec::with_capacity(events.len());
    let mut prevs: Vec<Vec<u8>> = Vec::with_capacity(events.len());
    let mut moved: HashMap<String, (i64, i64, [u8; 32])> = HashMap::new();
    for event in events {
        let (seq, prev) = heads.get(&event.tenant).copied().unwrap_or((0, GENESIS));
        let hash = chain_hash(&prev, event);
        positions.push(event.position);
        owners.push(event.tenant.clone());
        seqs.push(seq + 1);
        hashes.push(hash.to_vec());
        prevs.push(prev.to_vec());
        heads.insert(event.tenant.clone(), (seq + 1, hash));
        moved.insert(event.tenant.clone(), (seq + 1, event.position, hash));
    }
    let insert_seals = tx
        .prepare_cached(
            "INSERT INTO event_hashes (position, tenant, seq, hash, prev_hash) \
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bytea[], $5::bytea[])",
        )
        .await?;
    tx.execute(
        &insert_seals,
        &[&positions, &owners, &seqs, &hashes, &prevs],
    )
    .await?;
    let move_head = tx
        .prepare_cached(
            "INSERT INTO chain_heads (tenant, seq, position, hash) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (tenant) DO UPDATE \
             SET seq = EXCLUDED.seq, position = EXCLUDED.position, hash = EXCLUDED.hash, \
                 updated_at = now()",
        )
        .await?;
    for (tenant, (seq, position, hash)) in &moved {
        tx.execute(&move_head, &[tenant, seq, position, &hash.as_slice()])
            .await?;
    }
    tracing::debug!(count = events.len(), "sealed events");
    Ok(())
}

/// Follows the log and seals every event into its tenant's chain: the
/// [`Runner`] of [`Seal`] (checkpoint `sealer`, turns with other processes'
/// sealers through it). Keep one per process.
#[derive(Debug)]
pub struct Sealer {
    runner: Runner<Seal>,
}

impl Sealer {
    /// A sealer on the database of `pool`.
    pub fn new(pool: Pool) -> Self {
        let reader = LogReader::new(pool.clone());
        Self::reading_from(pool, reader)
    }

    /// A sealer that reads the log through `reader`, a clone of the process's
    /// one reader (it shares the safe watermark, see [`LogReader`]).
    pub fn reading_from(pool: Pool, reader: LogReader) -> Self {
        let config = RunnerConfig {
            batch_size: SEAL_BATCH,
            ..RunnerConfig::default()
        };
        Self {
            runner: Runner::new(pool, Seal, config).reading_from(reader),
        }
    }

    /// Paces it by `config` (poll, backoff, batch size).
    pub fn with_config(mut self, config: RunnerConfig) -> Self {
        self.runner = self.runner.with_config(config);
        self
    }

    /// Seals at most one batch of events after the sealer's checkpoint.
    pub async fn step(&mut self) -> Result<Progress, ChainError> {
        self.runner.step().await
    }

    /// Seals everything that is safe to read now; answers the checkpoint.
    pub async fn catch_up(&mut self) -> Result<i64, ChainError> {
        self.runner.catch_up().await
    }

    /// Seals as the log grows until `shutdown` turns `true`; an `Err` only for
    /// a failure retrying cannot fix (see [`Runner::run`]).
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> Result<(), ChainError> {
        self.runner.run(shutdown).await
    }
}

/// How far the sealer has got (0 before it first ran).
pub async fn sealed_position(pool: &Pool) -> Result<i64, ChainError> {
    Ok(checkpoint::read(pool, SEALER_CHECKPOINT)
        .await?
        .unwrap_or(0))
}

/// A signed statement about the head of one tenant's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The tenant whose chain it describes.
    pub tenant: String,
    /// How many events the chain had: the head's number.
    pub seq: i64,
    /// The log position of the head.
    pub position: i64,
    /// The head's chain hash, lower-case hex.
    pub hash: String,
    /// When it was signed (microsecond precision, as stored).
    pub at: DateTime<Utc>,
    /// HMAC-SHA256 of [`Self::message`], lower-case hex.
    pub signature: String,
}

impl Checkpoint {
    /// Signs the head `(tenant, seq, position, hash)` at `at` with `key`.
    pub fn sign(
        key: &[u8],
        tenant: &str,
        seq: i64,
        position: i64,
        hash: &[u8; 32],
        at: DateTime<Utc>,
    ) -> Self {
        // Postgres keeps microseconds: sign what will read back.
        let at = DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap_or(at);
        let mut checkpoint = Self {
            tenant: tenant.to_owned(),
            seq,
            position,
            hash: hex::encode(hash),
            at,
            signature: String::new(),
        };
        checkpoint.signature = hex::encode(mac(key, &checkpoint.message()).finalize().into_bytes());
        checkpoint
    }

    /// The signed text: format, tenant, count, position, hash and time, one per
    /// line. Every field is in it, so none can change without the key.
    pub fn message(&self) -> String {
        let mut message = String::new();
        let _ = write!(
            message,
            "{CHECKPOINT_FORMAT}\ntenant={}\nseq={}\nposition={}\nhash={}\nat={}",
            self.tenant,
            self.seq,
            self.position,
            self.hash,
            self.at.to_rfc3339_opts(SecondsFormat::Micros, true)
        );
        message
    }

    /// Whether the signature is the HMAC of [`Self::message`] under `key`
    /// (compared in constant time).
    pub fn signature_is_valid(&self, key: &[u8]) -> bool {
        let Ok(signature) = hex::decode(&self.signature) else {
            return false;
        };
        mac(key, &self.message()).verify_slice(&signature).is_ok()
    }
}

fn mac(key: &[u8], message: &str) -> HmacSha256 {
    // HMAC takes keys of any length; new_from_slice cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC-SHA256 accepts keys of any length"),
    };
    mac.update(message.as_bytes());
    mac
}

fn checkpoint_from_row(row: &tokio_postgres::Row) -> Result<Checkpoint, ChainError> {
    let hash: Vec<u8> = row.try_get("hash")?;
    let signature: Vec<u8> = row.try_get("signature")?;
    Ok(Checkpoint {
        tenant: row.try_get("tenant")?,
        seq: row.try_get("seq")?,
        position: row.try_get("position")?,
        hash: hex::encode(hash),
        at: row.try_get("at")?,
        signature: hex::encode(signature),
    })
}

/// Signs the head of every chain that moved since its last checkpoint and
/// stores the checkpoints; answers them (for copies kept elsewhere).
pub async fn write_checkpoints(pool: &Pool, key: &[u8]) -> Result<Vec<Checkpoint>, ChainError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CHECKPOINT_LOCK_KEY])
        .await?;
    let heads = tx
        .query(
            "SELECT h.tenant, h.seq, h.position, h.hash FROM chain_heads h \
             WHERE NOT EXISTS (SELECT 1 FROM chain_checkpoints c \
                               WHERE c.tenant = h.tenant AND c.position >= h.position) \
             ORDER BY h.tenant",
            &[],
        )
        .await?;
    let now = Utc::now();
    let mut written = Vec::with_capacity(heads.len());
    for row in heads {
        let tenant: String = row.try_get("tenant")?;
        let hash = to_hash(row.try_get("hash")?, "a chain head's hash")?;
        let checkpoint = Checkpoint::sign(
            key,
            &tenant,
            row.try_get("seq")?,
            row.try_get("position")?,
            &hash,
            now,
        );
        let signature = hex::decode(&checkpoint.signature)
            .map_err(|e| ChainError::Malformed(format!("a fresh signature: {e}")))?;
        tx.execute(
            "INSERT INTO chain_checkpoints (tenant, seq, position, hash, at, signature) \
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &checkpoint.tenant,
                &checkpoint.seq,
                &checkpoint.position,
                &hash.as_slice(),
                &checkpoint.at,
                &signature,
            ],
        )
        .await?;
        written.push(checkpoint);
    }
    tx.commit().await?;
    Ok(written)
}

/// The newest stored checkpoint of `tenant`.
pub async fn latest_checkpoint(
    pool: &Pool,
    tenant: &str,
) -> Result<Option<Checkpoint>, ChainError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            "SELECT tenant, seq, position, hash, at, signature FROM chain_checkpoints \
             WHERE tenant = $1 ORDER BY position DESC, id DESC LIMIT 1",
            &[&tenant],
        )
        .await?;
    row.as_ref().map(checkpoint_from_row).transpose()
}

/// What kind of mismatch [`verify`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// A sealed event's bytes changed after it was sealed.
    Changed,
    /// A sealed event is gone from the log.
    Missing,
    /// An event without a seal stands before sealed ones: it was slipped in, or
    /// its seal was removed.
    Unsealed,
    /// A signed checkpoint names more events than the log still has.
    TailCut,
    /// The chain does not reach a signed checkpoint's hash or count: events and
    /// their seals were rewritten together.
    CheckpointMismatch,
    /// A checkpoint's signature is not valid under the key.
    BadSignature,
}

/// The first thing [`verify`] found wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// What is wrong.
    pub kind: ProblemKind,
    /// The log position it concerns.
    pub position: Option<i64>,
    /// The event there, when it still exists.
    pub event_id: Option<Uuid>,
    /// For people.
    pub message: String,
}

/// The head of a chain as [`verify`] recomputed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Head {
    /// Events in the chain.
    pub seq: i64,
    /// Position of the last one.
    pub position: i64,
    /// Its recomputed hash, hex.
    pub hash: String,
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// The tenant verified.
    pub tenant: String,
    /// Events of the tenant read from the log.
    pub events: u64,
    /// Of those, sealed (and matching, up to the first problem).
    pub sealed: u64,
    /// Of those, not sealed yet (the newest; the sealer runs behind the log).
    pub unsealed: u64,
    /// The recomputed head.
    pub head: Option<Head>,
    /// The checkpoints compared with the chain (the newest stored one and any
    /// the caller passed).
    pub checkpoints: Vec<Checkpoint>,
    /// The first mismatch; `None` when everything matched.
    pub problem: Option<Problem>,
}

impl VerifyReport {
    /// Whether the log matched its seals and checkpoints.
    pub fn is_ok(&self) -> bool {
        self.problem.is_none()
    }
}

/// Recomputes `tenant`'s chain from its events and compares it with the stored
/// seals, the newest stored checkpoint and `external` checkpoints (copies kept
/// elsewhere; those of other tenants are ignored). Stops at the first problem.
/// Reads one consistent snapshot, page by page: memory does not grow with the log.
pub async fn verify(
    pool: &Pool,
    tenant: &str,
    key: &[u8],
    external: &[Checkpoint],
) -> Result<VerifyReport, ChainError> {
    let mut client = pool.get().await?;
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;

    let mut report = VerifyReport {
        tenant: tenant.to_owned(),
        events: 0,
        sealed: 0,
        unsealed: 0,
        head: None,
        checkpoints: Vec::new(),
        problem: None,
    };
    let stored = tx
        .query_opt(
            "SELECT tenant, seq, position, hash, at, signature FROM chain_checkpoints \
             WHERE tenant = $1 ORDER BY position DESC, id DESC LIMIT 1",
            &[&tenant],
        )
        .await?
        .as_ref()
        .map(checkpoint_from_row)
        .transpose()?;
    let mut checks: Vec<Checkpoint> = stored
        .into_iter()
        .chain(external.iter().filter(|c| c.tenant == tenant).cloned())
        .collect();
    checks.sort_by_key(|c| c.position);
    report.checkpoints = checks.clone();
    if let Some(bad) = checks.iter().find(|c| !c.signature_is_valid(key)) {
        report.problem = Some(Problem {
            kind: ProblemKind::BadSignature,
            position: Some(bad.position),
            event_id: None,
            message: format!(
                "the checkpoint of {} at position {} does not carry a valid signature for this \
                 key: it was altered, or signed with another key",
                bad.at, bad.position
            ),
        });
        return Ok(report);
    }
    let mut checks = checks.into_iter().peekable();

    let page = format!(
        "SELECT ev.*, h.seq AS sealed_seq, h.hash AS sealed_hash \
         FROM (SELECT {EVENT_COLUMNS} FROM events WHERE tenant = $1 AND position > $2 \
               ORDER BY position LIMIT $3) ev \
         LEFT JOIN event_hashes h ON h.position = ev.position \
         ORDER BY ev.position"
    );
    let page = tx.prepare(&page).await?;
    let mut prev = GENESIS;
    let mut sealed_seq = 0i64;
    let mut first_unsealed: Option<LoggedEvent> = None;
    let mut after = 0i64;
    loop {
        let rows = tx.query(&page, &[&tenant, &after, &VERIFY_PAGE]).await?;
        let Some(last) = rows.last() else {
            break;
        };
        after = last.try_get("position")?;
        let full = rows.len() as i64 >= VERIFY_PAGE;
        for row in &rows {
            let event = LoggedEvent::from_row(row)?;
            let stored_seq: Option<i64> = row.try_get("sealed_seq")?;
            let stored_hash: Option<Vec<u8>> = row.try_get("sealed_hash")?;
            let computed = chain_hash(&prev, &event);
            report.events += 1;

            // A checkpoint whose position we have passed without meeting it.
            if let Some(check) = checks.next_if(|c| c.position < event.position) {
                report.problem = Some(missing_checkpointed(&check));
                return Ok(report);
            }

            match (stored_seq, stored_hash) {
                (Some(seq), Some(hash)) => {
                    if let Some(unsealed) = &first_unsealed {
                        report.problem = Some(Problem {
                            kind: ProblemKind::Unsealed,
                            position: Some(unsealed.position),
                            event_id: Some(unsealed.id),
                            message: format!(
                                "the event at position {} has no seal, yet later events do: it \
                                 was inserted after sealing, or its seal was removed",
                                unsealed.position
                            ),
                        });
                        return Ok(report);
                    }
                    if seq != sealed_seq + 1 {
                        let gone = tx
                            .query_opt(
                                "SELECT position FROM event_hashes WHERE tenant = $1 AND seq = $2",
                                &[&tenant, &(sealed_seq + 1)],
                            )
                            .await?
                            .map(|row| row.try_get::<_, i64>(0))
                            .transpose()?;
                        report.problem = Some(Problem {
                            kind: ProblemKind::Missing,
                            position: gone,
                            event_id: None,
                            message: format!(
                                "the events sealed as numbers {} to {} of this tenant's chain \
                                 (first at position {}) are missing from the log; the next \
                                 event still there is at position {}",
                                sealed_seq + 1,
                                seq - 1,
                                gone.map_or_else(|| "?".to_owned(), |p| p.to_string()),
                                event.position
                            ),
                        });
                        return Ok(report);
                    }
                    if hash.as_slice() != computed.as_slice() {
                        report.problem = Some(Problem {
                            kind: ProblemKind::Changed,
                            position: Some(event.position),
                            event_id: Some(event.id),
                            message: format!(
                                "the event at position {} ({} {} of {} {}) does not match its \
                                 seal: it was changed after it was sealed",
                                event.position,
                                event.event_type,
                                event.id,
                                event.aggregate_type,
                                event.aggregate_id
                            ),
                        });
                        return Ok(report);
                    }
                    sealed_seq = seq;
                    report.sealed += 1;
                }
                _ => {
                    report.unsealed += 1;
                    if first_unsealed.is_none() {
                        first_unsealed = Some(event.clone());
                    }
                }
            }

            let count = i64::try_from(report.events).unwrap_or(i64::MAX);
            if let Some(check) = checks.next_if(|c| c.position == event.position)
                && (check.hash != hex::encode(computed) || check.seq != count)
            {
                report.problem = Some(Problem {
                    kind: ProblemKind::CheckpointMismatch,
                    position: Some(event.position),
                    event_id: Some(event.id),
                    message: format!(
                        "the signed checkpoint of {} says the chain had {} events ending at \
                         position {} with hash {}, but the log gives {} events and hash {}: \
                         events up to it were rewritten, removed or added together with their \
                         seals",
                        check.at,
                        check.seq,
                        check.position,
                        check.hash,
                        count,
                        hex::encode(computed)
                    ),
                });
                return Ok(report);
            }
            prev = computed;
            report.head = Some(Head {
                seq: count,
                position: event.position,
                hash: hex::encode(computed),
            });
        }
        if !full {
            break;
        }
    }

    // Seals of events that are no longer in the log, after the last one that is.
    if let Some(row) = tx
        .query_opt(
            "SELECT seq, position FROM event_hashes WHERE tenant = $1 AND seq > $2 \
             ORDER BY seq LIMIT 1",
            &[&tenant, &sealed_seq],
        )
        .await?
    {
        let seq: i64 = row.try_get(0)?;
        let position: i64 = row.try_get(1)?;
        report.problem = Some(Problem {
            kind: ProblemKind::Missing,
            position: Some(position),
            event_id: None,
            message: format!(
                "the event sealed as number {seq} of this tenant's chain, at position \
                 {position}, is missing from the log, and so is everything sealed after it"
            ),
        });
        return Ok(report);
    }
    if let Some(check) = checks.next() {
        let end = report.head.as_ref().map_or(0, |head| head.position);
        report.problem = Some(Problem {
            kind: ProblemKind::TailCut,
            position: Some(check.position),
            event_id: None,
            message: format!(
                "the signed checkpoint of {} says the chain had {} events up to position {}, \
                 but the log ends with {} events at position {}: its tail was cut off",
                check.at, check.seq, check.position, report.events, end
            ),
        });
    }
    tx.commit().await?;
    Ok(report)
}

fn missing_checkpointed(check: &Checkpoint) -> Problem {
    Problem {
        kind: ProblemKind::Missing,
        position: Some(check.position),
        event_id: None,
        message: format!(
            "the event at position {}, the head of the signed checkpoint of {} ({} events), is \
             missing from the log",
            check.position, check.at, check.seq
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(payload: Value) -> LoggedEvent {
        LoggedEvent {
            id: Uuid::from_u128(7),
            position: 42,
            tenant: "acme".into(),
            aggregate_type: "file".into(),
            aggregate_id: "f".into(),
            sequence: 1,
            event_type: "FileRenamed".into(),
            event_version: "1".into(),
            at: DateTime::from_timestamp(1_700_000_000, 123_000).unwrap(),
            actor: "alice".into(),
            payload,
            metadata: json!({"ignored": true}),
            erased: Vec::new(),
        }
    }

    #[test]
    fn canonical_bytes_sort_keys_everywhere_and_leave_out_metadata() {
        let bytes = canonical_bytes(&event(
            json!({"name": "b", "from": "a", "x": {"z": 1, "a": [true, null]}}),
        ));
        let text = String::from_utf8(bytes).unwrap();
        assert_eq!(
            text,
            "{\"actor\":\"alice\",\"aggregate_id\":\"f\",\"aggregate_type\":\"file\",\
             \"at\":\"2023-11-14T22:13:20.000123Z\",\"event_type\":\"FileRenamed\",\
             \"event_version\":\"1\",\"id\":\"00000000-0000-0000-0000-000000000007\",\
             \"payload\":{\"from\":\"a\",\"name\":\"b\",\"x\":{\"a\":[true,null],\"z\":1}},\
             \"position\":42,\"sequence\":1,\"tenant\":\"acme\"}"
        );
    }

    #[test]
    fn canonical_json_escapes_strings_and_ignores_key_order() {
        let a = json!({"b": "line\nbreak \"quoted\" é", "a": 1.5});
        let b: Value =
            serde_json::from_str(r#"{"a": 1.5, "b": "line\nbreak \"quoted\" é"}"#).unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(
            canonical_json(&a),
            r#"{"a":1.5,"b":"line\nbreak \"quoted\" é"}"#
        );
    }

    #[test]
    fn every_byte_of_the_event_and_the_previous_hash_count() {
        let original = event(json!({"from": "a", "name": "b"}));
        let base = chain_hash(&GENESIS, &original);
        assert_eq!(base, chain_hash(&GENESIS, &original), "deterministic");
        let mut changed = original.clone();
        changed.payload = json!({"from": "a", "name": "c"});
        assert_ne!(base, chain_hash(&GENESIS, &changed));
        let mut moved = original.clone();
        moved.position = 43;
        assert_ne!(base, chain_hash(&GENESIS, &moved));
        assert_ne!(base, chain_hash(&[1; 32], &original));
        let mut metadata_only = original.clone();
        metadata_only.metadata = json!({});
        assert_eq!(base, chain_hash(&GENESIS, &metadata_only));
    }

    #[test]
    fn checkpoints_verify_with_their_key_only_and_cover_every_field() {
        let at = DateTime::from_timestamp(1_700_000_000, 123_456_789).unwrap();
        let checkpoint = Checkpoint::sign(b"key", "acme", 3, 99, &[7; 32], at);
        assert_eq!(checkpoint.at.timestamp_subsec_nanos(), 123_456_000);
        assert!(checkpoint.signature_is_valid(b"key"));
        assert!(!checkpoint.signature_is_valid(b"other key"));
        let mut shortened = checkpoint.clone();
        shortened.seq = 2;
        assert!(!shortened.signature_is_valid(b"key"));
        let mut moved = checkpoint.clone();
        moved.position = 98;
        assert!(!moved.signature_is_valid(b"key"));
        let mut other_tenant = checkpoint.clone();
        other_tenant.tenant = "globex".into();
        assert!(!other_tenant.signature_is_valid(b"key"));
        let mut garbage = checkpoint;
        garbage.signature = "zz".into();
        assert!(!garbage.signature_is_valid(b"key"));
    }

    #[test]
    fn a_checkpoint_survives_a_json_round_trip() {
        let at = DateTime::from_timestamp(1_700_000_000, 5_000).unwrap();
        let checkpoint = Checkpoint::sign(b"key", "acme", 3, 99, &[7; 32], at);
        let json = serde_json::to_string(&checkpoint).unwrap();
        let back: Checkpoint = serde_json::from_str(&json).unwrap();
        assert!(back.signature_is_valid(b"key"));
        assert_eq!(back, checkpoint);
    }
}
