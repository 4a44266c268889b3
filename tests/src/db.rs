//! Each test gets its own, migrated Postgres database on the server of
//! `DOSSIER_TEST_DATABASE_URL`; databases of earlier runs are dropped. The
//! benchmark makes its databases the same way ([`Database`]), with names of its
//! own, and removes each one again when its scenario ends.
use dossier_eventlog::db::{DbError, Pool, connect, migrate};

/// Environment variable naming the Postgres server tests use; the database
/// name in it is replaced by a fresh one per test.
pub const TEST_DATABASE_URL_VAR: &str = "DOSSIER_TEST_DATABASE_URL";
/// The server tests use when [`TEST_DATABASE_URL_VAR`] is not set.
pub const DEFAULT_TEST_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Pool size of [`fresh_database`]: enough for tests with a dozen concurrent writers.
pub const TEST_POOL_SIZE: usize = 20;

/// Test databases older than this are dropped by the next test run.
pub const KEEP_FOR_SECS: u64 = 3600;

fn test_server() -> String {
    std::env::var(TEST_DATABASE_URL_VAR)
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| DEFAULT_TEST_DATABASE_URL.to_owned())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// A URL for a database that does not exist yet, named
/// `dossier_test_<unix seconds>_<uuid>`, on the test server.
/// [`connect`] creates it.
pub fn unique_database_url() -> String {
    let name = format!(
        "dossier_test_{}_{}",
        now_secs(),
        uuid::Uuid::new_v4().simple()
    );
    with_database_name(&test_server(), &name)
}

/// Creates a new, uniquely named database on the test server, migrates it, and
/// returns its pool and its URL (for a second pool or a spawned binary).
/// Databases are left behind for looking at after a failure, for an hour:
/// the first call of a test process drops older ones, so that repeated runs
/// (CI on one machine) do not fill the disk.
pub async fn fresh_database() -> Result<(Pool, String), DbError> {
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SWEPT.get_or_init(drop_old_test_databases).await;
    let url = unique_database_url();
    let pool = connect(&url, TEST_POOL_SIZE).await?;
    migrate(&pool).await?;
    Ok((pool, url))
}

/// A database of its own on a Postgres server, created and migrated by
/// [`Database::create`], dropped again by [`Database::remove`] (the benchmark's
/// way; tests keep theirs for looking at, see [`fresh_database`]).
pub struct Database {
    /// Its URL, for a second pool or a child process.
    pub url: String,
    /// A pool of the size asked for.
    pub pool: Pool,
    name: String,
    server: String,
}

impl Database {
    /// Creates the database `name` on the server of `server_url` (whatever
    /// database that URL names), migrates it, and opens a pool of `pool_size`.
    pub async fn create(server_url: &str, name: &str, pool_size: usize) -> Result<Self, DbError> {
        let url = with_database_name(server_url, name);
        let pool = connect(&url, pool_size).await?;
        migrate(&pool).await?;
        Ok(Self {
            url,
            pool,
            name: name.to_owned(),
            server: server_url.to_owned(),
        })
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Another pool on the same database, e.g. one connection per client.
    pub async fn pool(&self, size: usize) -> Result<Pool, DbError> {
        connect(&self.url, size).await
    }

    /// Drops the database, whoever is still connected to it.
    pub async fn remove(self) -> Result<(), tokio_postgres::Error> {
        self.pool.close();
        let (client, connection) = tokio_postgres::connect(
            &with_database_name(&self.server, "postgres"),
            tokio_postgres::NoTls,
        )
        .await?;
        let driver = tokio::spawn(connection);
        let dropped = client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .await;
        drop(client);
        let _ = driver.await;
        dropped
    }
}

/// Drops `dossier_test_<secs>_…` databases older than [`KEEP_FOR_SECS`];
/// best effort (a database still in use by another run is kept).
async fn drop_old_test_databases() {
    let Ok((client, connection)) =
        tokio_postgres::connect(&test_server(), tokio_postgres::NoTls).await
    else {
        return;
    };
    tokio::spawn(connection);
    let Ok(rows) = client
        .query(
            "SELECT datname::text FROM pg_database WHERE datname LIKE 'dossier\\_test\\_%'",
            &[],
        )
        .await
    else {
        return;
    };
    let cutoff = now_secs().saturating_sub(KEEP_FOR_SECS);
    for row in rows {
        let name: String = row.get(0);
        let created = name
            .strip_prefix("dossier_test_")
            .and_then(|rest| rest.split('_').next())
            .and_then(|secs| secs.parse::<u64>().ok());
        // Names without a time are from before this rule: old by definition.
        if created.is_none_or(|secs| secs < cutoff) {
            let _ = client
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\""))
                .await;
        }
    }
}

/// Replaces the database name (the path) of a `postgres://` URL, keeping any
/// query string.
pub fn with_database_name(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_urls_get_their_database_name_replaced() {
        assert_eq!(
            with_database_name("postgres://postgres@127.0.0.1:5432/postgres", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database_name("postgres://u:p@h:1/db?sslmode=disable", "x"),
            "postgres://u:p@h:1/x?sslmode=disable"
        );
        assert_eq!(
            with_database_name("postgres://u@h:1", "x"),
            "postgres://u@h:1/x"
        );
    }
}
