//! What can go wrong while projecting the log, sorted by what an operator (and the
//! runner) should do about it: wait and retry, or stop and fix.

use dossier_domain::codec::DecodeError;
use dossier_eventlog::follow::FollowError;
use dossier_eventlog::log::LogError;

/// Why a projection could not apply events, rebuild, or read its checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// A stored event does not decode into the domain event its type names. The
    /// projection stops here instead of skipping it: a skipped event would leave the
    /// read model wrong for good. Fix it with an upcaster (domain/src/upcast.rs) and
    /// restart.
    #[error(
        "projection {projection} stopped at the event at position {position}, which cannot be \
         decoded: {source}"
    )]
    Undecodable {
        /// The projection that met the event.
        projection: &'static str,
        /// The event's log position.
        position: i64,
        /// The decoder's complaint; it names the event type and version.
        #[source]
        source: Box<DecodeError>,
    },
    /// An event decodes, but breaks an assumption the read model is built on (an
    /// aggregate id that is not a UUID, a size beyond BIGINT, ...). Also stops the
    /// projection: retrying cannot help.
    #[error("projection {projection}: the event at position {position} is malformed: {reason}")]
    Malformed {
        /// The projection that met the event.
        projection: &'static str,
        /// The event's log position.
        position: i64,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading the event log failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// No pooled Postgres connection could be had.
    #[error("no Postgres connection for the projections: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A statement failed.
    #[error("projection statement failed: {}", pg_detail(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// Another rebuild of the same projection holds its lock (in this or another
    /// process); nothing was changed.
    #[error("a rebuild of projection {0} is already running")]
    RebuildInProgress(&'static str),
    /// A projection's name or table list cannot be used as SQL identifiers.
    #[error("projection definition is invalid: {0}")]
    InvalidDefinition(String),
    /// The data keys that open personal fields could not be read; waiting
    /// may help when the key table is unreachable, nothing else does.
    #[error("opening personal fields: {0}")]
    Keys(#[from] dossier_keys::KeyError),
    /// The log holds sealed personal fields and no keys were given to open
    /// them: a read model never stores ciphertext.
    #[error(
        "the event at position {position} has sealed personal fields and no keys were given to open them"
    )]
    SealedWithoutKeys {
        /// The event's log position.
        position: i64,
    },
    /// A rebuild's helper task was cancelled: its runtime is shutting down.
    #[error("the rebuild was interrupted: {0}")]
    Interrupted(String),
}

impl ProjectionError {
    /// Whether waiting and trying again may succeed: Postgres unreachable, a pool
    /// timeout, a serialization failure or deadlock. Everything else (an event that
    /// does not decode, a constraint the data breaks) fails the same way every time,
    /// so the runner stops on it instead of looping.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Pool(_) => true,
            Self::Postgres(error) => transient_pg(error),
            Self::Log(LogError::Pool(_)) => true,
            Self::Log(LogError::Query(error)) => transient_pg(error),
            Self::Keys(error) => matches!(error, dossier_keys::KeyError::Store(_)),
            Self::Interrupted(_) => true,
            Self::Log(_)
            | Self::Undecodable { .. }
            | Self::Malformed { .. }
            | Self::RebuildInProgress(_)
            | Self::InvalidDefinition(_)
            | Self::SealedWithoutKeys { .. } => false,
        }
    }

    /// The projection the error is about, when it is about one.
    pub fn projection(&self) -> Option<&'static str> {
        match self {
            Self::Undecodable { projection, .. } | Self::Malformed { projection, .. } => {
                Some(projection)
            }
            Self::RebuildInProgress(projection) => Some(projection),
            _ => None,
        }
    }

    /// A short, stable label for metrics (`kind`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Undecodable { .. } => "undecodable",
            Self::Malformed { .. } => "malformed",
            Self::Log(_) => "log",
            Self::Pool(_) => "pool",
            Self::Postgres(_) => "postgres",
            Self::RebuildInProgress(_) => "rebuild_in_progress",
            Self::InvalidDefinition(_) => "invalid_definition",
            Self::Keys(_) => "keys",
            Self::SealedWithoutKeys { .. } => "sealed_without_keys",
            Self::Interrupted(_) => "interrupted",
        }
    }
}

/// The one rule of what passes: see [`dossier_eventlog::db::is_transient`].
fn transient_pg(error: &tokio_postgres::Error) -> bool {
    dossier_eventlog::db::is_transient(error)
}

/// The runner's own failures (`dossier_eventlog::follow`), in this crate's terms.
impl From<FollowError> for ProjectionError {
    fn from(error: FollowError) -> Self {
        match error {
            FollowError::Pool(error) => Self::Pool(error),
            FollowError::Query(error) => Self::Postgres(error),
            FollowError::Log(error) => Self::Log(error),
        }
    }
}

/// One helper for every crate: see [`dossier_eventlog::db::pg_detail`].
pub(crate) use dossier_eventlog::db::pg_detail;
