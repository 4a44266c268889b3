//! Typed configuration: one [`Settings`] value, built from the defaults of the
//! contract ("Configuration") overlaid by the environment, with a `.env` file in
//! the working directory read first.
//!
//! [`Settings`] is a clap parser: each field declares its variable (`env`), its
//! default and its value parser once, and clap applies them, so a bad value stops
//! the process at start-up with a [`ConfigError`] that names the variable instead
//! of failing later on some request path. Secrets are wrapped in [`Secret`] so
//! that neither `Debug` nor `Display` (and so no log line) can print them, and the
//! `Debug` of [`Settings`] hides passwords inside connection URLs.
//!
//! The values reach clap through a lookup function ([`Settings::from_lookup`]):
//! each variable that is set is handed to clap as its flag. clap's own reading of
//! the environment is switched off for two reasons: an empty value must count as
//! unset (`FOO=` in a `.env` file or `${FOO:-}` in a compose file means "use the
//! default", while clap would parse `""`), and the tests of the parsing must not
//! depend on the process environment. [`Settings::from_env`] is the same parser
//! fed from the real environment, so the tests run the code production runs.
//!
//! Why clap rather than figment: clap (with its `env` feature) is already the
//! CLI's parser, so it brings no new dependency, and it reports a bad value
//! with the value parser's own reason; figment would be one more crate whose
//! environment provider also reads the process environment directly. (The
//! clap command also renders a help listing every variable with its default.)

use std::ffi::OsStr;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::error::{ContextKind, ContextValue};
use clap::{Args, FromArgMatches, ValueEnum};

/// Names of the environment variables [`Settings`] reads, for tests and tools
/// that start the binary with an explicit environment.
pub mod vars {
    /// Where the HTTP API listens (`IP:port`).
    pub const HTTP_ADDR: &str = "DOSSIER_HTTP_ADDR";
    /// How long a client may take to send a request's headers, in seconds.
    pub const HTTP_HEADER_TIMEOUT_SECS: &str = "DOSSIER_HTTP_HEADER_TIMEOUT_SECS";
    /// How long a request body may send nothing before it is cut off, in seconds.
    pub const HTTP_BODY_IDLE_TIMEOUT_SECS: &str = "DOSSIER_HTTP_BODY_IDLE_TIMEOUT_SECS";
    /// How many HTTP connections are served at once.
    pub const HTTP_MAX_CONNECTIONS: &str = "DOSSIER_HTTP_MAX_CONNECTIONS";
    /// Postgres connection URL.
    pub const DATABASE_URL: &str = "DOSSIER_DATABASE_URL";
    /// RabbitMQ connection URL.
    pub const AMQP_URL: &str = "DOSSIER_AMQP_URL";
    /// `file://<dir>` or `s3://<bucket>[/<prefix>]`.
    pub const BLOB_STORE: &str = "DOSSIER_BLOB_STORE";
    /// S3-compatible endpoint URL; unset means AWS.
    pub const S3_ENDPOINT: &str = "DOSSIER_S3_ENDPOINT";
    /// S3 region.
    pub const S3_REGION: &str = "DOSSIER_S3_REGION";
    /// HS256 secret for bearer tokens.
    pub const JWT_SECRET: &str = "DOSSIER_JWT_SECRET";
    /// Per-file size limit in bytes.
    pub const MAX_FILE_BYTES: &str = "DOSSIER_MAX_FILE_BYTES";
    /// Comma list of the components this process runs, or `all`.
    pub const ROLES: &str = "DOSSIER_ROLES";
    /// How long a finished bundle is kept, in seconds.
    pub const BUNDLE_TTL_SECS: &str = "DOSSIER_BUNDLE_TTL_SECS";
    /// Largest total size of one bundle, in bytes.
    pub const BUNDLE_MAX_BYTES: &str = "DOSSIER_BUNDLE_MAX_BYTES";
    /// Key for sealing audit checkpoints.
    pub const CHECKPOINT_KEY: &str = "DOSSIER_CHECKPOINT_KEY";
    /// How long an answer waits for the read models to show its own change, in
    /// milliseconds (read your writes).
    pub const FRESHNESS_TIMEOUT_MS: &str = "DOSSIER_FRESHNESS_TIMEOUT_MS";
    /// Most bundles one tenant may have pending at once.
    pub const MAX_PENDING_BUNDLES_PER_TENANT: &str = "DOSSIER_MAX_PENDING_BUNDLES_PER_TENANT";
    /// The key-encryption key that wraps every data key (32 bytes, base64).
    pub const MASTER_KEY: &str = "DOSSIER_MASTER_KEY";
    /// During a rotation: the master key being replaced, which still unwraps.
    pub const MASTER_KEY_PREVIOUS: &str = "DOSSIER_MASTER_KEY_PREVIOUS";
    /// Where the data key table lives, when not in the main database.
    pub const KEYS_DATABASE_URL: &str = "DOSSIER_KEYS_DATABASE_URL";

    /// Every variable above, in the order of the contract (the HTTP edge's
    /// limits next to its address).
    pub const ALL: &[&str] = &[
        HTTP_ADDR,
        HTTP_HEADER_TIMEOUT_SECS,
        HTTP_BODY_IDLE_TIMEOUT_SECS,
        HTTP_MAX_CONNECTIONS,
        DATABASE_URL,
        AMQP_URL,
        BLOB_STORE,
        S3_ENDPOINT,
        S3_REGION,
        JWT_SECRET,
        MAX_FILE_BYTES,
        ROLES,
        BUNDLE_TTL_SECS,
        BUNDLE_MAX_BYTES,
        CHECKPOINT_KEY,
        FRESHNESS_TIMEOUT_MS,
        MAX_PENDING_BUNDLES_PER_TENANT,
        MASTER_KEY,
        MASTER_KEY_PREVIOUS,
        KEYS_DATABASE_URL,
    ];
}

/// Default of `DOSSIER_HTTP_ADDR`.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8080";
/// Default of `DOSSIER_HTTP_HEADER_TIMEOUT_SECS` (contract rule 14).
pub const DEFAULT_HTTP_HEADER_TIMEOUT_SECS: u64 = 30;
/// Default of `DOSSIER_HTTP_BODY_IDLE_TIMEOUT_SECS` (contract rule 14).
pub const DEFAULT_HTTP_BODY_IDLE_TIMEOUT_SECS: u64 = 60;
/// Default of `DOSSIER_HTTP_MAX_CONNECTIONS`.
pub const DEFAULT_HTTP_MAX_CONNECTIONS: usize = 1024;
/// Default of `DOSSIER_DATABASE_URL`.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/dossier";
/// Default of `DOSSIER_AMQP_URL`.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Default of `DOSSIER_BLOB_STORE`.
pub const DEFAULT_BLOB_STORE: &str = "file://./data/blobs";
/// Default of `DOSSIER_S3_REGION`.
pub const DEFAULT_S3_REGION: &str = "us-east-1";
/// Default of `DOSSIER_MAX_FILE_BYTES`: 25 MiB (contract rule 1).
pub const DEFAULT_MAX_FILE_BYTES: u64 = 26_214_400;
/// Default of `DOSSIER_BUNDLE_TTL_SECS`: one day.
pub const DEFAULT_BUNDLE_TTL_SECS: u64 = 86_400;
/// Default of `DOSSIER_FRESHNESS_TIMEOUT_MS`: ten seconds.
pub const DEFAULT_FRESHNESS_TIMEOUT_MS: u64 = 10_000;
/// Default of `DOSSIER_MAX_PENDING_BUNDLES_PER_TENANT`.
pub const DEFAULT_MAX_PENDING_BUNDLES_PER_TENANT: u32 = 3;
/// Default of `DOSSIER_BUNDLE_MAX_BYTES`: 10 GiB.
pub const DEFAULT_BUNDLE_MAX_BYTES: u64 = 10 * 1024 * 1024 * 1024;

/// The fixed development JWT secret used when `DOSSIER_JWT_SECRET` is unset.
///
/// It is public on purpose: anyone can mint tokens for a deployment that runs with
/// it, which is why [`Settings::startup_warnings`] reports it.
pub const DEV_JWT_SECRET: &str = "dossier-development-jwt-secret-do-not-use-in-production";
/// The fixed development checkpoint key used when `DOSSIER_CHECKPOINT_KEY` is unset.
pub const DEV_CHECKPOINT_KEY: &str = "dossier-development-checkpoint-key-do-not-use-in-production";

/// The public development master key used when `DOSSIER_MASTER_KEY` is unset
/// (32 bytes, base64): anyone can unwrap the data keys of a deployment that
/// runs with it, which is why [`Settings::startup_warnings`] reports it.
pub const DEV_MASTER_KEY: &str = "ZG9zc2llci1kZXZlbG9wbWVudC1tYXN0ZXIta2V5ISE=";

/// HMAC-SHA256 keys shorter than this are legal but guessable; we warn, not fail,
/// so short secrets in tests and demos keep working.
const MIN_RECOMMENDED_SECRET_BYTES: usize = 32;

/// Everything a Dossier process is configured with. Build it with
/// [`Settings::from_env`] in the binary, [`Settings::from_lookup`] in tests of the
/// parsing, or [`Settings::for_tests`] plus struct-update syntax in other tests.
///
/// Its `Debug` output is safe to log: secrets print as `***` and passwords in the
/// connection URLs are hidden.
#[derive(Clone, Args)]
pub struct Settings {
    /// Where the HTTP API listens (`DOSSIER_HTTP_ADDR`).
    #[arg(long, env = vars::HTTP_ADDR, default_value = DEFAULT_HTTP_ADDR, value_parser = socket_addr)]
    pub http_addr: SocketAddr,
    /// How long a client may take to send a request's headers, from the moment
    /// the server waits for them (a new connection, or a kept-alive one between
    /// requests); past it the connection is closed
    /// (`DOSSIER_HTTP_HEADER_TIMEOUT_SECS`).
    #[arg(long = "http-header-timeout-secs", env = vars::HTTP_HEADER_TIMEOUT_SECS, default_value = "30", value_parser = seconds)]
    pub http_header_timeout: Duration,
    /// How long a request body may send nothing while the server reads it;
    /// past it the request is cut off and nothing of it is stored
    /// (`DOSSIER_HTTP_BODY_IDLE_TIMEOUT_SECS`).
    #[arg(long = "http-body-idle-timeout-secs", env = vars::HTTP_BODY_IDLE_TIMEOUT_SECS, default_value = "60", value_parser = seconds)]
    pub http_body_idle_timeout: Duration,
    /// How many HTTP connections are served at once; further clients wait
    /// in the listen backlog until one closes (`DOSSIER_HTTP_MAX_CONNECTIONS`).
    #[arg(long, env = vars::HTTP_MAX_CONNECTIONS, default_value_t = DEFAULT_HTTP_MAX_CONNECTIONS, value_parser = connection_count)]
    pub http_max_connections: usize,
    /// Postgres URL for the event log and read models (`DOSSIER_DATABASE_URL`).
    /// `sslmode` and `sslrootcert` choose TLS (see [`PostgresUrl`]).
    #[arg(long, env = vars::DATABASE_URL, default_value = DEFAULT_DATABASE_URL, value_parser = postgres_url)]
    pub database_url: String,
    /// RabbitMQ URL (`DOSSIER_AMQP_URL`).
    #[arg(long, env = vars::AMQP_URL, default_value = DEFAULT_AMQP_URL, value_parser = amqp_url)]
    pub amqp_url: String,
    /// Where blobs live (`DOSSIER_BLOB_STORE`).
    #[arg(long, env = vars::BLOB_STORE, default_value = DEFAULT_BLOB_STORE)]
    pub blob_store: BlobStoreLocation,
    /// An S3-compatible endpoint; `None` means AWS (`DOSSIER_S3_ENDPOINT`).
    /// When set, path-style addressing is used.
    #[arg(long, env = vars::S3_ENDPOINT, value_parser = http_url)]
    pub s3_endpoint: Option<String>,
    /// The S3 region (`DOSSIER_S3_REGION`).
    #[arg(long, env = vars::S3_REGION, default_value = DEFAULT_S3_REGION, value_parser = s3_region)]
    pub s3_region: String,
    /// HS256 secret for bearer tokens (`DOSSIER_JWT_SECRET`); [`DEV_JWT_SECRET`]
    /// when unset.
    #[arg(long, env = vars::JWT_SECRET, default_value = DEV_JWT_SECRET, hide_default_value = true, hide_env_values = true)]
    pub jwt_secret: Secret,
    /// Per-file size limit in bytes (`DOSSIER_MAX_FILE_BYTES`); a file of exactly
    /// this size is accepted.
    #[arg(long, env = vars::MAX_FILE_BYTES, default_value_t = DEFAULT_MAX_FILE_BYTES, value_parser = positive)]
    pub max_file_bytes: u64,
    /// The components this process runs (`DOSSIER_ROLES`, `--role`).
    #[arg(long = "role", env = vars::ROLES, default_value = "all")]
    pub components: Components,
    /// How long a finished bundle is kept before it is removed
    /// (`DOSSIER_BUNDLE_TTL_SECS`).
    #[arg(long = "bundle-ttl-secs", env = vars::BUNDLE_TTL_SECS, default_value = "86400", value_parser = seconds)]
    pub bundle_ttl: Duration,
    /// Largest total size of one bundle in bytes (`DOSSIER_BUNDLE_MAX_BYTES`).
    #[arg(long, env = vars::BUNDLE_MAX_BYTES, default_value_t = DEFAULT_BUNDLE_MAX_BYTES, value_parser = positive)]
    pub bundle_max_bytes: u64,
    /// Key for sealing audit checkpoints (`DOSSIER_CHECKPOINT_KEY`);
    /// [`DEV_CHECKPOINT_KEY`] when unset.
    #[arg(long, env = vars::CHECKPOINT_KEY, default_value = DEV_CHECKPOINT_KEY, hide_default_value = true, hide_env_values = true)]
    pub checkpoint_key: Secret,
    /// How long an answer waits for the read models to show its own change
    /// (`DOSSIER_FRESHNESS_TIMEOUT_MS`); past it, the answer says the lists lag.
    #[arg(long = "freshness-timeout-ms", env = vars::FRESHNESS_TIMEOUT_MS, default_value = "10000", value_parser = millis)]
    pub freshness_timeout: Duration,
    /// Most bundles one tenant may have pending at once
    /// (`DOSSIER_MAX_PENDING_BUNDLES_PER_TENANT`); beyond it a request answers
    /// `429 too_many_pending_bundles`. The zip worker builds one more than this
    /// at once, so one tenant never takes every slot.
    #[arg(long, env = vars::MAX_PENDING_BUNDLES_PER_TENANT, default_value_t = DEFAULT_MAX_PENDING_BUNDLES_PER_TENANT, value_parser = positive_u32)]
    pub max_pending_bundles_per_tenant: u32,
    /// The master key wrapping every data key (`DOSSIER_MASTER_KEY`, 32 bytes
    /// of standard base64); [`DEV_MASTER_KEY`] when unset.
    #[arg(long, env = vars::MASTER_KEY, default_value = DEV_MASTER_KEY, value_parser = master_key, hide_default_value = true, hide_env_values = true)]
    pub master_key: Secret,
    /// During a rotation, the master key being replaced
    /// (`DOSSIER_MASTER_KEY_PREVIOUS`): keys wrapped under it still unwrap
    /// until `dossier keys rotate` has re-wrapped them.
    #[arg(long, env = vars::MASTER_KEY_PREVIOUS, value_parser = master_key, hide_env_values = true)]
    pub master_key_previous: Option<Secret>,
    /// The database of the data key table (`DOSSIER_KEYS_DATABASE_URL`); the
    /// main database when unset. A separate one can have its own, short backup
    /// retention, so that destroyed keys do not live on in old backups.
    #[arg(long, env = vars::KEYS_DATABASE_URL, value_parser = postgres_url)]
    pub keys_database_url: Option<String>,
}

impl Settings {
    /// The clap command of the settings: one flag per variable, no binary name
    /// (and, unlike a derived `Parser`, no way to parse the process's own
    /// arguments by mistake).
    pub fn command() -> clap::Command {
        let command = clap::Command::new("dossier")
            .about("Dossier's configuration: every variable, its flag and its default.")
            .no_binary_name(true)
            .disable_help_flag(true)
            .disable_version_flag(true);
        Self::augment_args(command)
    }

    /// Reads `.env` from the working directory (a missing file is fine; variables
    /// already in the environment win over it), then parses the environment.
    ///
    /// The `.env` values are put into the process environment, so that libraries
    /// which read it themselves (the AWS SDK's `AWS_ACCESS_KEY_ID`, ...) see them
    /// too. Call this first thing in `main`, before other threads read the
    /// environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        // Only the working directory, as the contract says: `dotenvy::dotenv()`
        // would also search parent directories and might pick up a stranger's file.
        match dotenvy::from_path(".env") {
            Ok(()) => {}
            Err(err) if err.not_found() => {}
            Err(dotenvy::Error::Io(err)) => return Err(ConfigError::DotEnvIo(err)),
            Err(_) => return Err(ConfigError::DotEnvSyntax),
        }
        for &var in vars::ALL {
            if let Err(std::env::VarError::NotUnicode(_)) = std::env::var(var) {
                return Err(ConfigError::NotUnicode { var });
            }
        }
        Self::from_lookup(|var| std::env::var(var).ok())
    }

    /// Parses settings from `lookup`, which returns a variable's value or `None`
    /// when it is unset. Pure: this is what the tests exercise.
    ///
    /// Empty values count as unset. Values are trimmed, except secrets (whose
    /// `env` values clap hides), where a space may be part of the value.
    pub fn from_lookup<F>(lookup: F) -> Result<Self, ConfigError>
    where
        F: Fn(&str) -> Option<String>,
    {
        let command = Self::command();
        let mut flags = Vec::new();
        for arg in command.get_arguments() {
            let (Some(var), Some(long)) = (arg.get_env().and_then(OsStr::to_str), arg.get_long())
            else {
                continue;
            };
            let Some(value) = lookup(var).filter(|value| !value.trim().is_empty()) else {
                continue;
            };
            let value = if arg.is_hide_env_values_set() {
                value
            } else {
                value.trim().to_owned()
            };
            // `--flag=value` keeps a value that starts with `-` a value.
            flags.push(format!("--{long}={value}"));
        }
        // The process environment must not leak in: only `lookup` speaks.
        let matches = command
            .mut_args(|arg| arg.env(None::<&'static str>))
            .try_get_matches_from(flags)
            .map_err(|error| ConfigError::from_clap(&error))?;
        Self::from_arg_matches(&matches).map_err(|error| ConfigError::from_clap(&error))
    }

    /// The contract's defaults, as if no variable were set.
    pub fn defaults() -> Self {
        // Deliberate panic: the defaults are constants of this module and a unit
        // test parses them, so this cannot fail at run time.
        Self::from_lookup(|_| None).expect("the built-in defaults parse")
    }

    /// Settings for tests: the defaults, but the HTTP API on an ephemeral port
    /// (`127.0.0.1:0`) so parallel tests never collide. Adjust the rest with
    /// struct-update syntax: `Settings { database_url, ..Settings::for_tests() }`.
    pub fn for_tests() -> Self {
        Settings {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..Self::defaults()
        }
    }

    /// Whether bearer tokens are signed with the public [`DEV_JWT_SECRET`].
    pub fn jwt_secret_is_default(&self) -> bool {
        self.jwt_secret.expose() == DEV_JWT_SECRET
    }

    /// Whether data keys are wrapped under the public [`DEV_MASTER_KEY`].
    pub fn master_key_is_default(&self) -> bool {
        self.master_key.expose() == DEV_MASTER_KEY
    }

    /// The database the data key table lives in.
    pub fn keys_database_url(&self) -> &str {
        self.keys_database_url
            .as_deref()
            .unwrap_or(&self.database_url)
    }

    /// Whether checkpoints are sealed with the public [`DEV_CHECKPOINT_KEY`].
    pub fn checkpoint_key_is_default(&self) -> bool {
        self.checkpoint_key.expose() == DEV_CHECKPOINT_KEY
    }

    /// What an operator must be told when this process starts: the public
    /// development secrets, or a secret too short to be safe, each only when a
    /// component of this process uses it (tokens: the API; checkpoints: the
    /// workers, which run the sealer). Start-up logs each as a warning.
    pub fn startup_warnings(&self) -> Vec<StartupWarning> {
        let mut warnings = Vec::new();
        if self.components.contains(Component::Api) {
            if self.jwt_secret_is_default() {
                warnings.push(StartupWarning::DevelopmentJwtSecret);
            } else if self.jwt_secret.expose_bytes().len() < MIN_RECOMMENDED_SECRET_BYTES {
                warnings.push(StartupWarning::ShortJwtSecret);
            }
        }
        if self.components.contains(Component::Workers) && self.checkpoint_key_is_default() {
            warnings.push(StartupWarning::DevelopmentCheckpointKey);
        }
        let seals = [
            Component::Api,
            Component::Projections,
            Component::Intake,
            Component::Workers,
        ];
        if self.master_key_is_default() && seals.iter().any(|c| self.components.contains(*c)) {
            warnings.push(StartupWarning::DevelopmentMasterKey);
        }
        warnings
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self::defaults()
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("http_addr", &self.http_addr)
            .field("http_header_timeout", &self.http_header_timeout)
            .field("http_body_idle_timeout", &self.http_body_idle_timeout)
            .field("http_max_connections", &self.http_max_connections)
            .field("database_url", &redact_url(&self.database_url))
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("blob_store", &self.blob_store)
            .field("s3_endpoint", &self.s3_endpoint)
            .field("s3_region", &self.s3_region)
            .field("jwt_secret", &self.jwt_secret)
            .field("max_file_bytes", &self.max_file_bytes)
            .field("components", &self.components)
            .field("bundle_ttl", &self.bundle_ttl)
            .field("bundle_max_bytes", &self.bundle_max_bytes)
            .field("checkpoint_key", &self.checkpoint_key)
            .field("freshness_timeout", &self.freshness_timeout)
            .field("master_key", &self.master_key)
            .field("master_key_previous", &self.master_key_previous)
            .field(
                "keys_database_url",
                &self.keys_database_url.as_deref().map(redact_url),
            )
            .finish()
    }
}

/// Something about the settings an operator must hear at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartupWarning {
    /// `DOSSIER_JWT_SECRET` is unset: anyone can mint tokens.
    DevelopmentJwtSecret,
    /// `DOSSIER_JWT_SECRET` is shorter than 32 bytes.
    ShortJwtSecret,
    /// `DOSSIER_CHECKPOINT_KEY` is unset: checkpoints prove nothing.
    DevelopmentCheckpointKey,
    /// `DOSSIER_MASTER_KEY` is unset: stored files and names are as good as clear.
    DevelopmentMasterKey,
}

impl fmt::Display for StartupWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DevelopmentJwtSecret => write!(
                f,
                "{} is not set: using the public development secret, so anyone can mint \
                 valid tokens; set it before exposing this deployment",
                vars::JWT_SECRET
            ),
            Self::ShortJwtSecret => write!(
                f,
                "{} is shorter than {MIN_RECOMMENDED_SECRET_BYTES} bytes: tokens are easier \
                 to forge; use a longer random secret",
                vars::JWT_SECRET
            ),
            Self::DevelopmentCheckpointKey => write!(
                f,
                "{} is not set: audit checkpoints are sealed with the public development key \
                 and prove nothing; set it in production",
                vars::CHECKPOINT_KEY
            ),
            Self::DevelopmentMasterKey => write!(
                f,
                "{} is not set: data keys are wrapped under the public development master \
                 key, so stored files and personal fields are as good as unencrypted; set it \
                 (32 random bytes, base64: `dossier keys generate`) before storing real data",
                vars::MASTER_KEY
            ),
        }
    }
}

/// A secret string (a key or password) that never prints.
///
/// `Debug` and `Display` both write `***`, so a secret inside [`Settings`] cannot
/// leak through `{:?}` in a log line. Get the value with [`Secret::expose`] at the
/// one place that needs it.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself. Call this only where the value is used, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The secret as bytes, e.g. an HMAC key.
    pub fn expose_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A configuration value that cannot be used. Each variant names the variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The variable is set to a value that does not parse.
    #[error("{var}={value:?} is not valid: {reason}")]
    Invalid {
        /// The variable's name.
        var: &'static str,
        /// The value as given, with any password in a URL replaced by `***`.
        value: String,
        /// What was expected.
        reason: String,
    },
    /// The variable is set, but not to valid UTF-8.
    #[error("{var} is set but is not valid UTF-8")]
    NotUnicode {
        /// The variable's name.
        var: &'static str,
    },
    /// The `.env` file exists but could not be read.
    #[error("could not read the .env file in the working directory: {0}")]
    DotEnvIo(#[source] std::io::Error),
    /// The `.env` file has a line that does not parse. Its content is not
    /// repeated because it may hold a secret.
    #[error(
        "the .env file in the working directory has a line that cannot be parsed \
         (not shown: it may hold a secret)"
    )]
    DotEnvSyntax,
    /// clap refused the settings in a way that names no variable; a bug of
    /// this module, reported rather than hidden.
    #[error("the configuration could not be read: {0}")]
    Unexpected(String),
}

impl ConfigError {
    /// The variable the error is about, if it is about one.
    pub fn var(&self) -> Option<&'static str> {
        match self {
            Self::Invalid { var, .. } | Self::NotUnicode { var } => Some(var),
            Self::DotEnvIo(_) | Self::DotEnvSyntax | Self::Unexpected(_) => None,
        }
    }

    /// The variable behind a value clap refused, with the value parser's reason.
    fn from_clap(error: &clap::Error) -> Self {
        let text = |kind| match error.get(kind) {
            Some(ContextValue::String(text)) => Some(text.as_str()),
            _ => None,
        };
        // Built, so that each argument prints as in clap's message.
        let mut command = Settings::command();
        command.build();
        let var = text(ContextKind::InvalidArg).and_then(|shown| {
            command
                .get_arguments()
                .find(|arg| arg.to_string() == shown)
                .and_then(|arg| arg.get_env().and_then(OsStr::to_str))
                .and_then(|env| vars::ALL.iter().copied().find(|&var| var == env))
        });
        match (var, text(ContextKind::InvalidValue)) {
            (Some(var), Some(value)) => {
                let reason = std::error::Error::source(error)
                    .map_or_else(|| error.kind().to_string(), ToString::to_string);
                ConfigError::Invalid {
                    var,
                    value: redact_url(value),
                    reason,
                }
            }
            _ => ConfigError::Unexpected(error.kind().to_string()),
        }
    }
}

/// Where file contents (blobs) are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlobStoreLocation {
    /// A directory on the local file system (`file://<dir>`); relative paths are
    /// relative to the working directory.
    Dir(PathBuf),
    /// An S3 bucket (`s3://<bucket>[/<prefix>]`); objects are stored under
    /// `<prefix>/` when a prefix is given. The prefix has no leading or trailing `/`.
    S3 {
        /// The bucket name.
        bucket: String,
        /// Key prefix inside the bucket, without surrounding slashes.
        prefix: Option<String>,
    },
}

impl FromStr for BlobStoreLocation {
    type Err = String;

    /// Parses `file://<dir>` or `s3://<bucket>[/<prefix>]`; the error says why.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(dir) = s.strip_prefix("file://") {
            if dir.is_empty() {
                return Err("file:// needs a directory, e.g. file://./data/blobs".into());
            }
            if dir.chars().any(char::is_control) {
                return Err("the directory contains control characters".into());
            }
            return Ok(Self::Dir(PathBuf::from(dir)));
        }
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = match rest.split_once('/') {
                Some((bucket, prefix)) => (bucket, prefix.trim_matches('/')),
                None => (rest, ""),
            };
            check_bucket_name(bucket)?;
            if prefix.chars().any(char::is_control) {
                return Err("the key prefix contains control characters".into());
            }
            let prefix = (!prefix.is_empty()).then(|| prefix.to_owned());
            return Ok(Self::S3 {
                bucket: bucket.to_owned(),
                prefix,
            });
        }
        Err("expected file://<dir> or s3://<bucket>[/<prefix>]".into())
    }
}

impl fmt::Display for BlobStoreLocation {
    /// Writes the location back in the form [`FromStr`] reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dir(dir) => write!(f, "file://{}", dir.display()),
            Self::S3 {
                bucket,
                prefix: None,
            } => write!(f, "s3://{bucket}"),
            Self::S3 {
                bucket,
                prefix: Some(prefix),
            } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// The S3 bucket naming rules (3–63 characters of `a-z 0-9 . -`, starting and
/// ending with a letter or digit). AWS, Garage and the test server all enforce
/// them, so checking here turns a confusing runtime error into a start-up one.
fn check_bucket_name(bucket: &str) -> Result<(), String> {
    let valid_chars = bucket
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    let valid_ends = bucket
        .bytes()
        .next()
        .zip(bucket.bytes().last())
        .is_some_and(|(first, last)| first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric());
    if (3..=63).contains(&bucket.len()) && valid_chars && valid_ends {
        Ok(())
    } else {
        Err(format!(
            "bucket name {bucket:?} is not valid: 3-63 characters of a-z, 0-9, '.' and '-', \
             starting and ending with a letter or digit"
        ))
    }
}

/// One part of Dossier a `dossier serve` process can run (`--role` /
/// `DOSSIER_ROLES`; the contract calls them roles). Not to be confused with a
/// caller's role in a bearer token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum)]
pub enum Component {
    /// The HTTP API.
    Api,
    /// The AMQP command intake.
    Intake,
    /// The outbox relay that publishes the log to `dossier.events`.
    Relay,
    /// Background workers (blob deletion, bundles, the audit trail and sealer).
    Workers,
    /// The read-model projections.
    Projections,
}

impl Component {
    /// Every component, in a fixed order.
    pub const ALL: [Component; 5] = [
        Component::Api,
        Component::Intake,
        Component::Relay,
        Component::Workers,
        Component::Projections,
    ];

    /// The name used in `DOSSIER_ROLES` and `--role`.
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Api => "api",
            Component::Intake => "intake",
            Component::Relay => "relay",
            Component::Workers => "workers",
            Component::Projections => "projections",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Component {
    type Err = ParseComponentsError;

    /// A name of [`Component::as_str`], in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim();
        <Component as ValueEnum>::from_str(name, true)
            .map_err(|_| ParseComponentsError::Unknown(name.to_owned()))
    }
}

/// Why a component list did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseComponentsError {
    /// A name that is not one of the components.
    #[error("unknown role {0:?}: expected api, intake, relay, workers, projections or all")]
    Unknown(String),
    /// Nothing was listed; a process without a component would do nothing.
    #[error(
        "no role given: expected a comma list of api, intake, relay, workers, projections, or all"
    )]
    Empty,
}

/// The set of [`Component`]s this process runs. Parses from `all` or a comma
/// list such as `api,projections` (whitespace around names is ignored, repeats
/// are harmless, `all` anywhere in the list means all).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Components(u8);

impl Components {
    /// Every component: what `all` means, and the default.
    pub fn all() -> Self {
        Component::ALL.into_iter().collect()
    }

    /// No component at all; only useful as a starting point for building a set.
    pub fn none() -> Self {
        Self(0)
    }

    /// Whether `component` is in the set.
    pub fn contains(self, component: Component) -> bool {
        self.0 & component.bit() != 0
    }

    /// This set plus `component`.
    #[must_use]
    pub fn with(self, component: Component) -> Self {
        Self(self.0 | component.bit())
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether every component is in the set.
    pub fn is_all(self) -> bool {
        self == Self::all()
    }

    /// The components in the set, in the order of [`Component::ALL`].
    pub fn iter(self) -> impl Iterator<Item = Component> {
        Component::ALL
            .into_iter()
            .filter(move |component| self.contains(*component))
    }
}

impl Default for Components {
    fn default() -> Self {
        Self::all()
    }
}

impl FromIterator<Component> for Components {
    fn from_iter<I: IntoIterator<Item = Component>>(iter: I) -> Self {
        iter.into_iter().fold(Components::none(), Components::with)
    }
}

impl FromStr for Components {
    type Err = ParseComponentsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut components = Components::none();
        for name in s.split(',').map(str::trim).filter(|name| !name.is_empty()) {
            if name.eq_ignore_ascii_case("all") {
                return Ok(Components::all());
            }
            components = components.with(name.parse()?);
        }
        if components.is_empty() {
            return Err(ParseComponentsError::Empty);
        }
        Ok(components)
    }
}

impl fmt::Display for Components {
    /// `all`, or the comma list: the form [`FromStr`] reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_all() {
            return f.write_str("all");
        }
        let names: Vec<&str> = self.iter().map(Component::as_str).collect();
        f.write_str(&names.join(","))
    }
}

impl fmt::Debug for Components {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Components({self})")
    }
}

/// A Postgres URL as Dossier reads it: what the driver takes, plus the TLS
/// choices of libpq's `sslmode` and `sslrootcert` parameters.
///
/// - `sslmode` absent or `disable`: no TLS.
/// - `sslmode=prefer`: TLS when the server offers it, plain otherwise.
/// - `sslmode=require`: TLS or no connection.
///
/// Whenever TLS is used the server's certificate is verified, chain and host
/// name (what libpq calls `verify-full`): against the certificates in the PEM
/// file `sslrootcert=<path>` names, or else the system's trusted roots.
#[derive(Clone, Debug)]
pub struct PostgresUrl {
    /// What the driver connects with; `sslrootcert` is not part of it.
    pub config: tokio_postgres::Config,
    /// The PEM file of the certificate authorities to trust (`sslrootcert`).
    pub root_cert: Option<PathBuf>,
}

impl PostgresUrl {
    /// Parses `postgres[ql]://user[:password]@host[:port]/database[?params]`.
    /// The error says what is wrong, and never repeats the password.
    pub fn parse(url: &str) -> Result<Self, String> {
        let expected = "expected postgres://user[:password]@host[:port]/database";
        let parsed = url::Url::parse(url).map_err(|error| format!("{error}; {expected}"))?;
        if !matches!(parsed.scheme(), "postgres" | "postgresql") {
            return Err(expected.into());
        }
        let mut root_cert = None;
        let mut ssl_mode = None;
        for (key, value) in parsed.query_pairs() {
            match &*key {
                "sslrootcert" if !value.is_empty() => root_cert = Some(PathBuf::from(&*value)),
                "sslrootcert" => return Err("sslrootcert needs the path of a PEM file".into()),
                "sslmode" => ssl_mode = Some(value.into_owned()),
                _ => {}
            }
        }
        let ssl_mode = match ssl_mode.as_deref() {
            None | Some("disable") => tokio_postgres::config::SslMode::Disable,
            Some("prefer") => tokio_postgres::config::SslMode::Prefer,
            Some("require") => tokio_postgres::config::SslMode::Require,
            Some(_) => {
                return Err(
                    "sslmode must be disable, prefer or require (require verifies \
                            the server's certificate and host name, like libpq's verify-full)"
                        .into(),
                );
            }
        };
        if root_cert.is_some() && ssl_mode == tokio_postgres::config::SslMode::Disable {
            return Err("sslrootcert is given but TLS is off: add sslmode=require".into());
        }
        // The driver refuses parameters it does not know, so `sslrootcert` is
        // taken out of the query, which is otherwise passed on as written.
        let for_driver = match (root_cert.is_some(), parsed.query()) {
            (true, Some(query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|pair| {
                        url::form_urlencoded::parse(pair.as_bytes())
                            .next()
                            .is_none_or(|(key, _)| key != "sslrootcert")
                    })
                    .collect();
                let base = &url[..url.find('?').unwrap_or(url.len())];
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
            _ => url.to_owned(),
        };
        let mut config = tokio_postgres::Config::from_str(&for_driver).map_err(|error| {
            let detail = std::error::Error::source(&error)
                .map_or_else(|| error.to_string(), |cause| format!("{error}: {cause}"));
            format!("{detail}; {expected}")
        })?;
        if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
            return Err(format!("the URL names no host; {expected}"));
        }
        config.ssl_mode(ssl_mode);
        Ok(Self { config, root_cert })
    }
}

/// Replaces the password in `scheme://user:password@host/...` with `***`, so a
/// URL can be logged or shown in an error. Anything else is returned unchanged.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => match parsed.set_password(Some("***")) {
            Ok(()) => parsed.to_string(),
            // A URL that cannot hold a password cannot have had one.
            Err(()) => url.to_owned(),
        },
        _ => url.to_owned(),
    }
}

fn socket_addr(value: &str) -> Result<SocketAddr, String> {
    value
        .parse()
        .map_err(|_| "expected IP:port, e.g. 127.0.0.1:8080 or [::]:8080".to_owned())
}

fn postgres_url(value: &str) -> Result<String, String> {
    PostgresUrl::parse(value).map(|_| value.to_owned())
}

fn amqp_url(value: &str) -> Result<String, String> {
    url_with_scheme(value, &["amqp", "amqps"])
}

fn http_url(value: &str) -> Result<String, String> {
    url_with_scheme(value, &["http", "https"])
}

/// A URL with one of `schemes` and a host; the drivers check the rest.
fn url_with_scheme(value: &str, schemes: &[&str]) -> Result<String, String> {
    let expected = || {
        let forms: Vec<String> = schemes.iter().map(|s| format!("{s}://...")).collect();
        format!("expected a URL of the form {}", forms.join(" or "))
    };
    let parsed = url::Url::parse(value).map_err(|error| format!("{error}; {}", expected()))?;
    if !schemes.contains(&parsed.scheme()) || parsed.host_str().is_none_or(str::is_empty) {
        return Err(expected());
    }
    Ok(value.to_owned())
}

fn s3_region(value: &str) -> Result<String, String> {
    if value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(value.to_owned())
    } else {
        Err("expected a region name such as us-east-1 or garage".into())
    }
}

/// A whole number above zero: a limit or TTL of zero would make the feature
/// unusable, which is never what an operator meant.
fn positive(value: &str) -> Result<u64, String> {
    match value.parse::<u64>() {
        Ok(0) => Err("must be greater than 0".into()),
        Ok(n) => Ok(n),
        Err(_) => Err("expected a whole number, e.g. 26214400".into()),
    }
}

/// 32 bytes of standard base64, checked here so that a bad master key stops
/// the process at start-up, naming the variable.
fn master_key(value: &str) -> Result<Secret, String> {
    let bytes = base64_decoded_len(value.trim())
        .ok_or_else(|| "expected 32 bytes in standard base64".to_owned())?;
    if bytes != 32 {
        return Err(format!("expected 32 bytes in standard base64, got {bytes}"));
    }
    Ok(Secret::new(value.trim()))
}

/// How many bytes a standard, padded base64 string decodes to; `None` if it
/// is not one.
fn base64_decoded_len(text: &str) -> Option<usize> {
    let valid = |c: char| c.is_ascii_alphanumeric() || c == '+' || c == '/';
    let body = text.trim_end_matches('=');
    let padding = text.len() - body.len();
    (text.len().is_multiple_of(4) && padding <= 2 && body.chars().all(valid))
        .then(|| text.len() / 4 * 3 - padding)
}

fn positive_u32(value: &str) -> Result<u32, String> {
    positive(value)
        .and_then(|n| u32::try_from(n).map_err(|_| format!("must be at most {}", u32::MAX)))
}

fn connection_count(value: &str) -> Result<usize, String> {
    positive(value).and_then(|n| {
        // A semaphore holds at most `usize::MAX >> 3` permits.
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= tokio::sync::Semaphore::MAX_PERMITS)
            .ok_or_else(|| "is far beyond any number of connections one process can hold".into())
    })
}

fn seconds(value: &str) -> Result<Duration, String> {
    positive(value).map(Duration::from_secs)
}

fn millis(value: &str) -> Result<Duration, String> {
    positive(value).map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let env: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::from_lookup(|var| env.get(var).cloned())
    }

    fn error_var(pairs: &[(&str, &str)]) -> &'static str {
        parse(pairs)
            .expect_err("should be rejected")
            .var()
            .expect("names a variable")
    }

    #[test]
    fn defaults_match_the_contract() {
        let s = parse(&[]).unwrap();
        assert_eq!(s.http_addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(s.http_header_timeout, Duration::from_secs(30));
        assert_eq!(
            s.http_header_timeout.as_secs(),
            DEFAULT_HTTP_HEADER_TIMEOUT_SECS
        );
        assert_eq!(s.http_body_idle_timeout, Duration::from_secs(60));
        assert_eq!(
            s.http_body_idle_timeout.as_secs(),
            DEFAULT_HTTP_BODY_IDLE_TIMEOUT_SECS
        );
        assert_eq!(s.http_max_connections, 1024);
        assert_eq!(s.database_url, "postgres://postgres@127.0.0.1:5432/dossier");
        assert_eq!(s.amqp_url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(
            s.blob_store,
            BlobStoreLocation::Dir(PathBuf::from("./data/blobs"))
        );
        assert_eq!(s.s3_endpoint, None);
        assert_eq!(s.s3_region, "us-east-1");
        assert_eq!(s.jwt_secret.expose(), DEV_JWT_SECRET);
        assert!(s.jwt_secret_is_default());
        assert_eq!(s.max_file_bytes, 26_214_400);
        assert!(s.components.is_all());
        assert_eq!(s.bundle_ttl, Duration::from_secs(86_400));
        assert_eq!(s.bundle_ttl.as_secs(), DEFAULT_BUNDLE_TTL_SECS);
        assert_eq!(s.bundle_max_bytes, 10_737_418_240);
        assert_eq!(s.freshness_timeout, Duration::from_secs(10));
        assert_eq!(s.max_pending_bundles_per_tenant, 3);
        assert_eq!(s.checkpoint_key.expose(), DEV_CHECKPOINT_KEY);
        assert!(s.checkpoint_key_is_default());
    }

    #[test]
    fn the_variable_list_is_the_parsers() {
        let declared: Vec<String> = Settings::command()
            .get_arguments()
            .filter_map(|arg| arg.get_env())
            .map(|env| env.to_string_lossy().into_owned())
            .collect();
        assert_eq!(declared, vars::ALL);
    }

    #[test]
    fn every_variable_is_read() {
        let s = parse(&[
            (vars::HTTP_ADDR, "0.0.0.0:9000"),
            (vars::HTTP_HEADER_TIMEOUT_SECS, "5"),
            (vars::HTTP_BODY_IDLE_TIMEOUT_SECS, "7"),
            (vars::HTTP_MAX_CONNECTIONS, "3"),
            (vars::DATABASE_URL, "postgresql://u:p@db:5433/x"),
            (vars::AMQP_URL, "amqps://mq/vh"),
            (vars::BLOB_STORE, "s3://dossier/tenant-files/"),
            (vars::S3_ENDPOINT, "http://garage:3900"),
            (vars::S3_REGION, "garage"),
            (vars::JWT_SECRET, "a secret with spaces "),
            (vars::MAX_FILE_BYTES, "1024"),
            (vars::ROLES, "api, projections"),
            (vars::BUNDLE_TTL_SECS, "60"),
            (vars::BUNDLE_MAX_BYTES, "2048"),
            (vars::CHECKPOINT_KEY, "k"),
            (vars::MAX_PENDING_BUNDLES_PER_TENANT, "7"),
        ])
        .unwrap();
        assert_eq!(s.max_pending_bundles_per_tenant, 7);
        assert_eq!(s.http_addr, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(s.http_header_timeout, Duration::from_secs(5));
        assert_eq!(s.http_body_idle_timeout, Duration::from_secs(7));
        assert_eq!(s.http_max_connections, 3);
        assert_eq!(s.database_url, "postgresql://u:p@db:5433/x");
        assert_eq!(s.amqp_url, "amqps://mq/vh");
        assert_eq!(
            s.blob_store,
            BlobStoreLocation::S3 {
                bucket: "dossier".into(),
                prefix: Some("tenant-files".into())
            }
        );
        assert_eq!(s.s3_endpoint.as_deref(), Some("http://garage:3900"));
        assert_eq!(s.s3_region, "garage");
        assert_eq!(s.jwt_secret.expose(), "a secret with spaces ");
        assert!(!s.jwt_secret_is_default());
        assert_eq!(s.max_file_bytes, 1024);
        assert_eq!(
            s.components,
            Components::none()
                .with(Component::Api)
                .with(Component::Projections)
        );
        assert_eq!(s.bundle_ttl, Duration::from_secs(60));
        assert_eq!(s.bundle_max_bytes, 2048);
        assert_eq!(s.checkpoint_key.expose(), "k");
        assert!(!s.checkpoint_key_is_default());
    }

    #[test]
    fn empty_values_mean_unset() {
        let s = parse(&[
            (vars::HTTP_ADDR, ""),
            (vars::S3_ENDPOINT, "  "),
            (vars::JWT_SECRET, ""),
            (vars::ROLES, ""),
        ])
        .unwrap();
        assert_eq!(s.http_addr, DEFAULT_HTTP_ADDR.parse().unwrap());
        assert_eq!(s.s3_endpoint, None);
        assert!(s.jwt_secret_is_default());
        assert!(s.components.is_all());
    }

    #[test]
    fn values_are_trimmed_but_secrets_are_not() {
        let s = parse(&[
            (vars::HTTP_ADDR, " 127.0.0.1:9 "),
            (vars::ROLES, " ALL "),
            (vars::JWT_SECRET, " padded "),
        ])
        .unwrap();
        assert_eq!(s.http_addr, "127.0.0.1:9".parse().unwrap());
        assert!(s.components.is_all());
        assert_eq!(s.jwt_secret.expose(), " padded ");
    }

    #[test]
    fn values_that_look_like_flags_are_values() {
        let s = parse(&[(vars::JWT_SECRET, "--role=api")]).unwrap();
        assert_eq!(s.jwt_secret.expose(), "--role=api");
        assert!(s.components.is_all());
    }

    #[test]
    fn bad_values_name_their_variable() {
        let cases: &[(&str, &str)] = &[
            (vars::HTTP_ADDR, "localhost:8080"),
            (vars::HTTP_ADDR, "127.0.0.1"),
            (vars::HTTP_HEADER_TIMEOUT_SECS, "0"),
            (vars::HTTP_HEADER_TIMEOUT_SECS, "30s"),
            (vars::HTTP_BODY_IDLE_TIMEOUT_SECS, "0"),
            (vars::HTTP_MAX_CONNECTIONS, "0"),
            (vars::HTTP_MAX_CONNECTIONS, "18446744073709551615"),
            (vars::DATABASE_URL, "mysql://root@localhost/x"),
            (vars::DATABASE_URL, "postgres://"),
            (vars::DATABASE_URL, "postgres://h/db?sslmode=verify-full"),
            (vars::DATABASE_URL, "postgres://h/db?nonsense=1"),
            (vars::DATABASE_URL, "postgres://h/db?sslrootcert=/ca.pem"),
            (vars::DATABASE_URL, "host=h dbname=db"),
            (vars::AMQP_URL, "http://guest@localhost"),
            (vars::BLOB_STORE, "./data/blobs"),
            (vars::BLOB_STORE, "file://"),
            (vars::BLOB_STORE, "s3://"),
            (vars::BLOB_STORE, "s3://Upper_Case"),
            (vars::BLOB_STORE, "gs://bucket"),
            (vars::S3_ENDPOINT, "garage:3900"),
            (vars::S3_REGION, "us east"),
            (vars::MAX_FILE_BYTES, "25MiB"),
            (vars::MAX_FILE_BYTES, "-1"),
            (vars::MAX_FILE_BYTES, "0"),
            (vars::ROLES, "api,web"),
            (vars::ROLES, ","),
            (vars::BUNDLE_TTL_SECS, "1h"),
            (vars::BUNDLE_MAX_BYTES, "18446744073709551616"),
            (vars::MAX_PENDING_BUNDLES_PER_TENANT, "0"),
            (vars::MAX_PENDING_BUNDLES_PER_TENANT, "4294967296"),
        ];
        for (var, value) in cases {
            assert_eq!(error_var(&[(var, value)]), *var, "{var}={value:?}");
            let message = parse(&[(var, value)]).unwrap_err().to_string();
            assert!(message.contains(var), "{message}");
        }
        // The reason is the value parser's, not clap's generic one.
        let message = parse(&[(vars::ROLES, "api,web")]).unwrap_err().to_string();
        assert!(message.contains("unknown role \"web\""), "{message}");
    }

    #[test]
    fn errors_do_not_show_url_passwords() {
        let err = parse(&[(vars::DATABASE_URL, "mysql://root:hunter2@db/x")]).unwrap_err();
        let message = err.to_string();
        assert!(!message.contains("hunter2"), "{message}");
        assert!(message.contains("root:***@db"), "{message}");
    }

    #[test]
    fn debug_output_hides_secrets_and_passwords() {
        let s = parse(&[
            (vars::JWT_SECRET, "jwt-secret-value"),
            (vars::CHECKPOINT_KEY, "checkpoint-value"),
            (vars::DATABASE_URL, "postgres://app:db-password@db/dossier"),
        ])
        .unwrap();
        let debug = format!("{s:?}");
        for leak in [
            "jwt-secret-value",
            "checkpoint-value",
            "db-password",
            "guest:guest",
        ] {
            assert!(!debug.contains(leak), "{leak} in {debug}");
        }
        assert!(debug.contains("postgres://app:***@db/dossier"), "{debug}");
        assert_eq!(format!("{}", s.jwt_secret), "***");
        assert_eq!(format!("{:?}", s.jwt_secret), "***");
    }

    #[test]
    fn postgres_urls_carry_their_tls_choice() {
        use tokio_postgres::config::SslMode;
        let plain = PostgresUrl::parse("postgres://u:p@db:5433/x").unwrap();
        assert_eq!(plain.config.get_ssl_mode(), SslMode::Disable);
        assert_eq!(plain.config.get_dbname(), Some("x"));
        assert_eq!(plain.config.get_ports(), [5433]);
        assert_eq!(plain.root_cert, None);
        for (mode, expected) in [
            ("disable", SslMode::Disable),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
        ] {
            let url = PostgresUrl::parse(&format!("postgres://db/x?sslmode={mode}")).unwrap();
            assert_eq!(url.config.get_ssl_mode(), expected, "{mode}");
        }
        let with_ca = PostgresUrl::parse(
            "postgres://u@db/x?application_name=a%20b&sslrootcert=%2Fetc%2Fca.pem&sslmode=require",
        )
        .unwrap();
        assert_eq!(with_ca.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(with_ca.config.get_ssl_mode(), SslMode::Require);
        assert_eq!(with_ca.config.get_application_name(), Some("a b"));
    }

    #[test]
    fn blob_store_locations_parse_and_print_back() {
        let cases = [
            (
                "file://./data/blobs",
                BlobStoreLocation::Dir("./data/blobs".into()),
            ),
            (
                "file:///var/lib/dossier",
                BlobStoreLocation::Dir("/var/lib/dossier".into()),
            ),
            (
                "s3://dossier",
                BlobStoreLocation::S3 {
                    bucket: "dossier".into(),
                    prefix: None,
                },
            ),
            (
                "s3://my.bucket-1/a/b",
                BlobStoreLocation::S3 {
                    bucket: "my.bucket-1".into(),
                    prefix: Some("a/b".into()),
                },
            ),
        ];
        for (text, location) in cases {
            assert_eq!(text.parse::<BlobStoreLocation>().unwrap(), location);
            assert_eq!(location.to_string(), text);
        }
        // Surrounding slashes of a prefix are dropped; a bare slash is no prefix.
        assert_eq!(
            "s3://dossier/".parse::<BlobStoreLocation>().unwrap(),
            BlobStoreLocation::S3 {
                bucket: "dossier".into(),
                prefix: None
            }
        );
        assert_eq!(
            "s3://dossier//p/".parse::<BlobStoreLocation>().unwrap(),
            BlobStoreLocation::S3 {
                bucket: "dossier".into(),
                prefix: Some("p".into())
            }
        );
        for bad in [
            "s3://ab",
            "s3://-dossier",
            "s3://dossier-",
            "s3:/dossier",
            "dossier",
        ] {
            assert!(bad.parse::<BlobStoreLocation>().is_err(), "{bad}");
        }
    }

    #[test]
    fn components_parse_and_print() {
        assert!("all".parse::<Components>().unwrap().is_all());
        assert!("api,all".parse::<Components>().unwrap().is_all());
        assert!(" ALL ".parse::<Components>().unwrap().is_all());
        let components: Components = "relay, workers,relay".parse().unwrap();
        assert!(components.contains(Component::Relay));
        assert!(components.contains(Component::Workers));
        assert!(!components.contains(Component::Api));
        assert_eq!(components.to_string(), "relay,workers");
        assert_eq!(
            components.iter().collect::<Vec<_>>(),
            [Component::Relay, Component::Workers]
        );
        assert_eq!(Components::all().to_string(), "all");
        for component in Component::ALL {
            assert_eq!(component.as_str().parse::<Component>().unwrap(), component);
            assert_eq!(
                component.as_str().to_uppercase().parse::<Component>(),
                Ok(component)
            );
            assert!(Components::all().contains(component));
            assert!(!Components::none().contains(component));
        }
        assert_eq!(
            "api,web".parse::<Components>(),
            Err(ParseComponentsError::Unknown("web".into()))
        );
        assert_eq!(
            " , ".parse::<Components>(),
            Err(ParseComponentsError::Empty)
        );
    }

    #[test]
    fn redact_url_only_touches_passwords() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://postgres@h/db"),
            "postgres://postgres@h/db"
        );
        assert_eq!(
            redact_url("postgres://h/db?x=a:b@c"),
            "postgres://h/db?x=a:b@c"
        );
        assert_eq!(redact_url("u:p@h"), "u:p@h");
        // An `@` inside the password: the last `@` of the authority ends it.
        assert_eq!(
            redact_url("postgres://u:p@ss@h/db"),
            "postgres://u:***@h/db"
        );
    }

    #[test]
    fn startup_warns_of_development_and_short_secrets() {
        assert_eq!(
            Settings::defaults().startup_warnings(),
            [
                StartupWarning::DevelopmentJwtSecret,
                StartupWarning::DevelopmentCheckpointKey,
                StartupWarning::DevelopmentMasterKey
            ]
        );
        let master = "bm90IHRoZSBkZXZlbG9wbWVudCBrZXksIDMyIGJ5dGU=";
        let short = parse(&[
            (vars::JWT_SECRET, "short"),
            (vars::CHECKPOINT_KEY, "k"),
            (vars::MASTER_KEY, master),
        ])
        .unwrap();
        assert_eq!(short.startup_warnings(), [StartupWarning::ShortJwtSecret]);
        let long_secret = "x".repeat(32);
        let good = parse(&[
            (vars::JWT_SECRET, long_secret.as_str()),
            (vars::CHECKPOINT_KEY, "k"),
            (vars::MASTER_KEY, master),
        ])
        .unwrap();
        assert!(good.startup_warnings().is_empty());
        // Each warning names its variable.
        assert!(
            StartupWarning::DevelopmentCheckpointKey
                .to_string()
                .contains(vars::CHECKPOINT_KEY)
        );
        assert!(
            StartupWarning::DevelopmentJwtSecret
                .to_string()
                .contains(vars::JWT_SECRET)
        );
        assert!(
            StartupWarning::DevelopmentMasterKey
                .to_string()
                .contains(vars::MASTER_KEY)
        );
    }

    #[test]
    fn a_master_key_must_be_32_bytes_of_base64() {
        let key = "bm90IHRoZSBkZXZlbG9wbWVudCBrZXksIDMyIGJ5dGU=";
        assert_eq!(
            parse(&[(vars::MASTER_KEY, key)])
                .unwrap()
                .master_key
                .expose(),
            key
        );
        for bad in [
            "c2hvcnQ=",
            "not base64 at all!",
            "bm90IHRoZSBkZXZlbG9wbWVudCBrZXksIDMyIGJ5dGUh",
        ] {
            let err = parse(&[(vars::MASTER_KEY, bad)]).unwrap_err();
            assert_eq!(err.var(), Some(vars::MASTER_KEY), "{bad}");
        }
        let s = parse(&[]).unwrap();
        assert!(s.master_key_is_default());
        assert_eq!(s.keys_database_url(), s.database_url);
        let apart = parse(&[(vars::KEYS_DATABASE_URL, "postgres://k@127.0.0.1/keys")]).unwrap();
        assert_eq!(apart.keys_database_url(), "postgres://k@127.0.0.1/keys");
    }

    #[test]
    fn startup_warns_only_of_secrets_this_process_uses() {
        let workers = parse(&[(vars::ROLES, "workers")]).unwrap();
        assert_eq!(
            workers.startup_warnings(),
            [
                StartupWarning::DevelopmentCheckpointKey,
                StartupWarning::DevelopmentMasterKey
            ]
        );
        let api = parse(&[(vars::ROLES, "api,projections")]).unwrap();
        assert_eq!(
            api.startup_warnings(),
            [
                StartupWarning::DevelopmentJwtSecret,
                StartupWarning::DevelopmentMasterKey
            ]
        );
        let relay = parse(&[(vars::ROLES, "relay")]).unwrap();
        assert!(relay.startup_warnings().is_empty());
        let intake = parse(&[(vars::ROLES, "intake")]).unwrap();
        assert_eq!(
            intake.startup_warnings(),
            [StartupWarning::DevelopmentMasterKey]
        );
    }

    #[test]
    fn for_tests_uses_an_ephemeral_port() {
        let s = Settings::for_tests();
        assert_eq!(s.http_addr.port(), 0);
        assert!(s.http_addr.ip().is_loopback());
        assert_eq!(s.max_file_bytes, DEFAULT_MAX_FILE_BYTES);
    }
}
