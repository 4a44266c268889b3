//! Postgres plumbing every Dossier process shares: the connection pool, the
//! create-if-missing start-up, and the numbered schema migrations.
//!
//! Schema changes are numbered SQL files under `services/eventlog/migrations/`,
//! embedded into the binary and listed in [`MIGRATIONS`]. [`migrate`] applies the
//! ones a database has not seen yet, each in its own transaction, and records them in
//! `schema_migrations`. It is run by `dossier migrate` and at every start-up, so it
//! must be idempotent and safe when several processes start at once: an advisory lock
//! serialises concurrent runs (see [`migrate`]).
//!
//! `dossier_test_support::db::fresh_database` gives every test its own migrated database.
//!
//! TLS to Postgres follows the URL's `sslmode` and `sslrootcert` (see
//! [`PostgresUrl`]), on rustls with `ring`, the project's one TLS stack.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod, Runtime};
use dossier_runtime::config::PostgresUrl;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The connection pool every adapter takes.
pub type Pool = deadpool_postgres::Pool;

/// One numbered schema migration, embedded in the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// Strictly increasing across [`MIGRATIONS`]; the file name's number.
    pub version: i64,
    /// A short name, recorded next to the version. A database that recorded a
    /// different name for the same version is refused (someone renumbered a file).
    pub name: &'static str,
    /// The SQL, run with the simple query protocol inside one transaction (so no
    /// `CREATE INDEX CONCURRENTLY` or other statements that refuse transactions).
    pub sql: &'static str,
}

impl Migration {
    /// A migration; `const` so that [`MIGRATIONS`] stays a plain list.
    pub const fn new(version: i64, name: &'static str, sql: &'static str) -> Self {
        Self { version, name, sql }
    }
}

/// Every migration, in the order they apply. To add one, put
/// `migrations/NNNN_name.sql` next to the others and append one line here. Never edit
/// or renumber a migration that has shipped: write a new one.
pub const MIGRATIONS: &[Migration] = &[
    Migration::new(
        1,
        "event_log",
        include_str!("../migrations/0001_event_log.sql"),
    ),
    Migration::new(
        2,
        "files_read_model",
        include_str!("../migrations/0002_files_read_model.sql"),
    ),
    Migration::new(
        4,
        "command_receipts",
        include_str!("../migrations/0004_command_receipts.sql"),
    ),
    Migration::new(
        5,
        "bundles_read_model",
        include_str!("../migrations/0005_bundles_read_model.sql"),
    ),
    Migration::new(
        6,
        "audit_trail",
        include_str!("../migrations/0006_audit_trail.sql"),
    ),
    Migration::new(
        7,
        "event_chain",
        include_str!("../migrations/0007_event_chain.sql"),
    ),
    Migration::new(
        8,
        "portal_read_model",
        include_str!("../migrations/0008_portal_read_model.sql"),
    ),
    Migration::new(
        9,
        "customers_read_model",
        include_str!("../migrations/0009_customers_read_model.sql"),
    ),
    Migration::new(
        10,
        "http_idempotency",
        include_str!("../migrations/0010_http_idempotency.sql"),
    ),
];

/// Key of the advisory lock that serialises concurrent [`migrate`] runs on one
/// database ("dossier" in ASCII, so it is recognisable in `pg_locks`).
const MIGRATION_LOCK_KEY: i64 = 0x0064_6f73_7369_6572;

/// How long a request may wait for a free pooled connection before it fails with
/// [`deadpool_postgres::PoolError::Timeout`] instead of hanging.
const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long opening one new connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong while connecting to or migrating Postgres.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database URL could not be parsed; the reason never repeats the password.
    #[error("invalid database URL: {0}")]
    InvalidUrl(String),
    /// TLS was asked for, but cannot be set up: the `sslrootcert` file cannot be
    /// read or holds no certificate, or the system has no trusted roots.
    #[error("cannot set up TLS to Postgres: {0}")]
    TlsSetup(String),
    /// The server could not be reached, refused the login, or creating the database failed.
    #[error("cannot connect to Postgres at {target}: {}", pg_detail(.source))]
    Connect {
        /// Host, port and database, never the password.
        target: String,
        /// The driver's error.
        source: tokio_postgres::Error,
    },
    /// The pool could not be built.
    #[error("cannot build the Postgres connection pool: {0}")]
    PoolBuild(#[from] deadpool_postgres::BuildError),
    /// No pooled connection could be had (server down, pool exhausted for too long).
    #[error("no Postgres connection available: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A statement failed outside of a migration's own SQL.
    #[error("Postgres query failed: {}", pg_detail(.0))]
    Query(#[from] tokio_postgres::Error),
    /// A migration's SQL failed; its transaction was rolled back.
    #[error("migration {version} ({name}) failed: {}", pg_detail(.source))]
    Migration {
        /// The migration's number.
        version: i64,
        /// The migration's name.
        name: &'static str,
        /// The driver's error.
        source: tokio_postgres::Error,
    },
    /// The migration list or the database's record of it is inconsistent.
    #[error("migration {version}: {reason}")]
    MigrationHistory {
        /// The migration's number.
        version: i64,
        /// What is inconsistent.
        reason: String,
    },
}

/// The text of a driver error that an operator can act on, for log lines and error
/// messages: `tokio_postgres::Error` displays as just "db error" and keeps the
/// server's message (and SQLSTATE) in its source, which `{}` would otherwise lose.
/// Not for HTTP answers: those never carry database messages.
pub fn pg_detail(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({}): {}", error, db.code().code(), db.message()),
        None => match std::error::Error::source(error) {
            Some(cause) => format!("{error}: {cause}"),
            None => error.to_string(),
        },
    }
}

/// Whether a failed statement may work when tried again: the connection is gone
/// or was never made, the server is short of resources (53), an operator
/// intervened (57P), or a serialization failure or deadlock (40). Everything else
/// (a constraint, a type, a syntax error) fails the same way every time. The one
/// rule for every follower and worker.
pub fn is_transient(error: &tokio_postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    match error.code() {
        Some(code) => {
            let code = code.code();
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code.starts_with("40")
        }
        // No SQLSTATE: an IO error or a timeout talking to the server.
        None => true,
    }
}

/// Connects to the database named in `url` (creating it first if it does not
/// exist) and returns a pool of at most `max_size` connections (at least one).
///
/// Creating a missing database needs a connection to the server's `postgres`
/// maintenance database and the right to `CREATE DATABASE`; a database that exists
/// needs neither. Two processes creating the same database at once is fine.
pub async fn connect(url: &str, max_size: usize) -> Result<Pool, DbError> {
    let url = PostgresUrl::parse(url).map_err(DbError::InvalidUrl)?;
    let tls = tls_connector(&url)?;
    ensure_database_exists(&url.config, &tls).await?;

    let manager = Manager::from_config(
        url.config,
        tls,
        ManagerConfig {
            // Fast recycling still drops connections the server has closed.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(max_size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(POOL_WAIT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()?;
    Ok(pool)
}

/// The TLS side of connections to `url`: rustls on `ring`, trusting the
/// certificates of the `sslrootcert` file, or else the system's roots. The
/// driver uses it only when `sslmode` is `prefer` or `require`; with TLS off
/// no certificate is loaded.
fn tls_connector(url: &PostgresUrl) -> Result<MakeRustlsConnect, DbError> {
    let mut roots = rustls::RootCertStore::empty();
    if url.config.get_ssl_mode() != SslMode::Disable {
        match &url.root_cert {
            Some(path) => {
                let (added, _) = roots.add_parsable_certificates(read_certificates(path)?);
                if added == 0 {
                    return Err(DbError::TlsSetup(format!(
                        "sslrootcert {} holds no usable CA certificate",
                        path.display()
                    )));
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                for error in &native.errors {
                    tracing::warn!(%error, "could not load some of the system's trusted certificates");
                }
                roots.add_parsable_certificates(native.certs);
                if roots.is_empty() {
                    return Err(DbError::TlsSetup(
                        "the system has no trusted root certificates; name the CA of the \
                         server's certificate with sslrootcert=<PEM file>"
                            .into(),
                    ));
                }
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| DbError::TlsSetup(error.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// Every certificate of a PEM file.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, DbError> {
    let unreadable = |error: rustls::pki_types::pem::Error| {
        DbError::TlsSetup(format!("sslrootcert {}: {error}", path.display()))
    };
    CertificateDer::pem_file_iter(path)
        .map_err(unreadable)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(unreadable)
}

/// The database a configuration connects to: the explicit name, else (like libpq)
/// the user name.
fn database_name(config: &tokio_postgres::Config) -> Option<String> {
    config.get_dbname().or(config.get_user()).map(str::to_owned)
}

/// `host:port/dbname` for error messages; never includes the password.
fn describe_target(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(other) => format!("{other:?}"),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = database_name(config).unwrap_or_default();
    format!("{host}:{port}/{db}")
}

/// Opens one connection with `config`, driving it on a background task.
async fn open(
    config: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
) -> Result<tokio_postgres::Client, DbError> {
    let mut config = config.clone();
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    let (client, connection) =
        config
            .connect(tls.clone())
            .await
            .map_err(|source| DbError::Connect {
                target: describe_target(&config),
                source,
            })?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(error = %pg_detail(&error), "maintenance connection ended with an error");
        }
    });
    Ok(client)
}

/// Connects to the target database once; if the server says it does not exist,
/// creates it through the `postgres` maintenance database.
async fn ensure_database_exists(
    config: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
) -> Result<(), DbError> {
    let source = match open(config, tls).await {
        Ok(_client) => return Ok(()),
        Err(DbError::Connect { source, .. })
            if source.code() == Some(&SqlState::INVALID_CATALOG_NAME) =>
        {
            source
        }
        Err(other) => return Err(other),
    };
    let Some(name) = database_name(config) else {
        return Err(DbError::Connect {
            target: describe_target(config),
            source,
        });
    };

    let mut maintenance = config.clone();
    maintenance.dbname("postgres");
    let client = open(&maintenance, tls).await?;
    let statement = format!("CREATE DATABASE {}", quote_identifier(&name));
    match client.batch_execute(&statement).await {
        Ok(()) => {
            tracing::info!(database = %name, "created the database, which did not exist");
            Ok(())
        }
        // Another process created it between our check and our CREATE: fine.
        // (A concurrent CREATE DATABASE can also surface as a unique violation on
        // pg_database's name index.)
        Err(error)
            if error.code() == Some(&SqlState::DUPLICATE_DATABASE)
                || error.code() == Some(&SqlState::UNIQUE_VIOLATION) =>
        {
            Ok(())
        }
        Err(source) => Err(DbError::Connect {
            target: describe_target(config),
            source,
        }),
    }
}

/// Quotes an SQL identifier (database names cannot be bound as parameters).
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Applies every migration of [`MIGRATIONS`] the database has not recorded yet.
///
/// Each migration runs in its own transaction together with its row in
/// `schema_migrations`, so a failed migration leaves nothing half-applied and is
/// retried on the next run. Every transaction first takes a transaction-scoped
/// advisory lock and only then checks `schema_migrations`: a second process
/// starting at the same moment waits for the first one's transaction and then sees
/// the migration as applied. Running it again is a no-op.
#[tracing::instrument(skip(pool))]
pub async fn migrate(pool: &Pool) -> Result<(), DbError> {
    check_migration_list(MIGRATIONS)?;
    let mut client = pool.get().await?;

    {
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    BIGINT      PRIMARY KEY,
                 name       TEXT        NOT NULL,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             )",
        )
        .await?;
        let newest: Option<i64> = tx
            .query_one("SELECT max(version) FROM schema_migrations", &[])
            .await?
            .try_get(0)?;
        tx.commit().await?;
        let known = MIGRATIONS.last().map_or(0, |m| m.version);
        if let Some(newest) = newest.filter(|&newest| newest > known) {
            // An older binary against a newer schema: keep going (migrations are
            // additive), but make it visible.
            tracing::warn!(
                newest_applied = newest,
                newest_known = known,
                "the database has migrations this binary does not know; is an older version running?"
            );
        }
    }

    for migration in MIGRATIONS {
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await?;
        let recorded = tx
            .query_opt(
                "SELECT name FROM schema_migrations WHERE version = $1",
                &[&migration.version],
            )
            .await?;
        if let Some(row) = recorded {
            let name: String = row.try_get(0)?;
            if name != migration.name {
                return Err(DbError::MigrationHistory {
                    version: migration.version,
                    reason: format!(
                        "the database recorded it as {name:?} but this binary calls it {:?}",
                        migration.name
                    ),
                });
            }
            tx.commit().await?; // nothing to do; release the lock
            continue;
        }
        tx.batch_execute(migration.sql)
            .await
            .map_err(|source| DbError::Migration {
                version: migration.version,
                name: migration.name,
                source,
            })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&migration.version, &migration.name],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "applied migration"
        );
    }
    Ok(())
}

/// Refuses a migration list whose versions are not positive and strictly increasing
/// (a merge that gave two files the same number, for example).
fn check_migration_list(migrations: &[Migration]) -> Result<(), DbError> {
    let mut previous = 0;
    for migration in migrations {
        if migration.version <= previous {
            return Err(DbError::MigrationHistory {
                version: migration.version,
                reason: format!(
                    "versions must be positive and strictly increasing, but it follows {previous}"
                ),
            });
        }
        previous = migration.version;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_migration_list_is_strictly_increasing() {
        assert!(check_migration_list(MIGRATIONS).is_ok());
        let duplicated = [
            Migration::new(1, "a", ""),
            Migration::new(2, "b", ""),
            Migration::new(2, "c", ""),
        ];
        assert!(matches!(
            check_migration_list(&duplicated),
            Err(DbError::MigrationHistory { version: 2, .. })
        ));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
    }
}
