//! Typed configuration: one [`Settings`] value, built from the defaults of the
//! contract ("Configuration") overlaid by the environment, with a `.env` file in
//! the working directory read first.
//!
//! Every value is parsed here, once, into the type the rest of the code wants
//! (a [`SocketAddr`], a [`BlobStoreLocation`], a [`Roles`] set, ...), so a bad value
//! stops the process at start-up with a [`ConfigError`] that names the variable,
//! instead of failing later on some request path. Secrets are wrapped in
//! [`Secret`] so that neither `Debug` nor `Display` (and so no log line) can print
//! them, and the `Debug` of [`Settings`] hides passwords inside connection URLs.
//!
//! Parsing takes a lookup function rather than reading the process environment
//! ([`Settings::from_lookup`]), so it is unit-tested with a `HashMap`;
//! [`Settings::from_env`] is the thin wrapper the binary calls.
//!
//! An empty value counts as unset: `FOO=` in a `.env` file or `${FOO:-}` in a
//! compose file then means "use the default", which is what people who write those
//! expect.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Names of the environment variables [`Settings`] reads, for tests and tools
/// that start the binary with an explicit environment.
pub mod vars {
    /// Where the HTTP API listens (`IP:port`).
    pub const HTTP_ADDR: &str = "DOSSIER_HTTP_ADDR";
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
    /// Comma list of process roles, or `all`.
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

    /// Every variable above, in the order of the contract.
    pub const ALL: [&str; 13] = [
        HTTP_ADDR,
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
    ];
}

/// Default of `DOSSIER_HTTP_ADDR`.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8080";
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
/// Default of `DOSSIER_BUNDLE_MAX_BYTES`: 10 GiB.
pub const DEFAULT_BUNDLE_MAX_BYTES: u64 = 10 * 1024 * 1024 * 1024;

/// The fixed development JWT secret used when `DOSSIER_JWT_SECRET` is unset.
///
/// It is public on purpose: anyone can mint tokens for a deployment that runs with
/// it, which is why [`Settings::warnings`] reports it loudly.
pub const DEV_JWT_SECRET: &str = "dossier-development-jwt-secret-do-not-use-in-production";
/// The fixed development checkpoint key used when `DOSSIER_CHECKPOINT_KEY` is unset.
pub const DEV_CHECKPOINT_KEY: &str = "dossier-development-checkpoint-key-do-not-use-in-production";

/// HMAC-SHA256 keys shorter than this are legal but guessable; we warn, not fail,
/// so short secrets in tests and demos keep working.
const MIN_RECOMMENDED_SECRET_BYTES: usize = 32;

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

/// One job a `dossier serve` process can run (`--role` / `DOSSIER_ROLES`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The HTTP API.
    Api,
    /// The AMQP command intake.
    Intake,
    /// The outbox relay that publishes the log to `dossier.events`.
    Relay,
    /// Background workers (blob deletion, bundles).
    Workers,
    /// The read-model projections.
    Projections,
}

impl Role {
    /// Every role, in a fixed order.
    pub const ALL: [Role; 5] = [
        Role::Api,
        Role::Intake,
        Role::Relay,
        Role::Workers,
        Role::Projections,
    ];

    /// The name used in `DOSSIER_ROLES` and `--role`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Api => "api",
            Role::Intake => "intake",
            Role::Relay => "relay",
            Role::Workers => "workers",
            Role::Projections => "projections",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = ParseRolesError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim();
        Role::ALL
            .into_iter()
            .find(|role| role.as_str().eq_ignore_ascii_case(name))
            .ok_or_else(|| ParseRolesError::Unknown(name.to_owned()))
    }
}

/// Why a role list did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseRolesError {
    /// A name that is not one of the roles.
    #[error("unknown role {0:?}: expected api, intake, relay, workers, projections or all")]
    Unknown(String),
    /// Nothing was listed; a process without a role would do nothing.
    #[error(
        "no role given: expected a comma list of api, intake, relay, workers, projections, or all"
    )]
    Empty,
}

/// The set of [`Role`]s this process runs. Parses from `all` or a comma list
/// such as `api,projections` (whitespace around names is ignored, repeats are
/// harmless, `all` anywhere in the list means all).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Roles(u8);

impl Roles {
    /// Every role: what `all` means, and the default.
    pub fn all() -> Self {
        Role::ALL.into_iter().collect()
    }

    /// No role at all; only useful as a starting point for building a set.
    pub fn none() -> Self {
        Self(0)
    }

    /// Whether `role` is in the set.
    pub fn contains(self, role: Role) -> bool {
        self.0 & role.bit() != 0
    }

    /// This set plus `role`.
    #[must_use]
    pub fn with(self, role: Role) -> Self {
        Self(self.0 | role.bit())
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether every role is in the set.
    pub fn is_all(self) -> bool {
        self == Self::all()
    }

    /// The roles in the set, in the order of [`Role::ALL`].
    pub fn iter(self) -> impl Iterator<Item = Role> {
        Role::ALL
            .into_iter()
            .filter(move |role| self.contains(*role))
    }
}

impl Default for Roles {
    fn default() -> Self {
        Self::all()
    }
}

impl FromIterator<Role> for Roles {
    fn from_iter<I: IntoIterator<Item = Role>>(iter: I) -> Self {
        iter.into_iter().fold(Roles::none(), Roles::with)
    }
}

impl FromStr for Roles {
    type Err = ParseRolesError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut roles = Roles::none();
        for name in s.split(',').map(str::trim).filter(|name| !name.is_empty()) {
            if name.eq_ignore_ascii_case("all") {
                return Ok(Roles::all());
            }
            roles = roles.with(name.parse()?);
        }
        if roles.is_empty() {
            return Err(ParseRolesError::Empty);
        }
        Ok(roles)
    }
}

impl fmt::Display for Roles {
    /// `all`, or the comma list: the form [`FromStr`] reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_all() {
            return f.write_str("all");
        }
        let names: Vec<&str> = self.iter().map(Role::as_str).collect();
        f.write_str(&names.join(","))
    }
}

impl fmt::Debug for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Roles({self})")
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
}

impl ConfigError {
    /// The variable the error is about, if it is about one.
    pub fn var(&self) -> Option<&'static str> {
        match self {
            Self::Invalid { var, .. } | Self::NotUnicode { var } => Some(var),
            Self::DotEnvIo(_) | Self::DotEnvSyntax => None,
        }
    }
}

/// Everything a Dossier process is configured with. Build it with
/// [`Settings::from_env`] in the binary, [`Settings::from_lookup`] in tests of the
/// parsing, or [`Settings::for_tests`] plus struct-update syntax in other tests.
///
/// Its `Debug` output is safe to log: secrets print as `***` and passwords in the
/// connection URLs are hidden.
#[derive(Clone)]
pub struct Settings {
    /// Where the HTTP API listens (`DOSSIER_HTTP_ADDR`).
    pub http_addr: SocketAddr,
    /// Postgres URL for the event log and read models (`DOSSIER_DATABASE_URL`).
    pub database_url: String,
    /// RabbitMQ URL (`DOSSIER_AMQP_URL`).
    pub amqp_url: String,
    /// Where blobs live (`DOSSIER_BLOB_STORE`).
    pub blob_store: BlobStoreLocation,
    /// An S3-compatible endpoint; `None` means AWS (`DOSSIER_S3_ENDPOINT`).
    /// When set, path-style addressing is used.
    pub s3_endpoint: Option<String>,
    /// The S3 region (`DOSSIER_S3_REGION`).
    pub s3_region: String,
    /// HS256 secret for bearer tokens (`DOSSIER_JWT_SECRET`).
    pub jwt_secret: Secret,
    /// True when `DOSSIER_JWT_SECRET` was unset and [`DEV_JWT_SECRET`] is in use.
    pub jwt_secret_is_default: bool,
    /// Per-file size limit in bytes (`DOSSIER_MAX_FILE_BYTES`); a file of exactly
    /// this size is accepted.
    pub max_file_bytes: u64,
    /// The roles this process runs (`DOSSIER_ROLES`).
    pub roles: Roles,
    /// How long a finished bundle is kept before it is removed
    /// (`DOSSIER_BUNDLE_TTL_SECS`).
    pub bundle_ttl: Duration,
    /// Largest total size of one bundle in bytes (`DOSSIER_BUNDLE_MAX_BYTES`).
    pub bundle_max_bytes: u64,
    /// Key for sealing audit checkpoints (`DOSSIER_CHECKPOINT_KEY`).
    pub checkpoint_key: Secret,
    /// True when `DOSSIER_CHECKPOINT_KEY` was unset and [`DEV_CHECKPOINT_KEY`] is in use.
    pub checkpoint_key_is_default: bool,
    /// How long an answer waits for the read models to show its own change
    /// (`DOSSIER_FRESHNESS_TIMEOUT_MS`); past it, the answer says the lists lag.
    pub freshness_timeout: Duration,
}

impl Settings {
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
        for var in vars::ALL {
            if let Some(value) = std::env::var_os(var)
                && value.to_str().is_none()
            {
                return Err(ConfigError::NotUnicode { var });
            }
        }
        Self::from_lookup(|var| std::env::var(var).ok())
    }

    /// Parses settings from `lookup`, which returns a variable's value or `None`
    /// when it is unset. Pure: this is what the tests exercise.
    pub fn from_lookup<F>(lookup: F) -> Result<Self, ConfigError>
    where
        F: Fn(&str) -> Option<String>,
    {
        // Empty counts as unset (see the module docs).
        let get = |var: &str| lookup(var).filter(|value| !value.trim().is_empty());

        let http_addr = parse_with(
            vars::HTTP_ADDR,
            get(vars::HTTP_ADDR),
            DEFAULT_HTTP_ADDR,
            |s| {
                s.trim()
                    .parse::<SocketAddr>()
                    .map_err(|_| "expected IP:port, e.g. 127.0.0.1:8080 or [::]:8080".to_owned())
            },
        )?;

        let database_url = parse_url(
            vars::DATABASE_URL,
            get(vars::DATABASE_URL),
            DEFAULT_DATABASE_URL,
            &["postgres", "postgresql"],
        )?;
        let amqp_url = parse_url(
            vars::AMQP_URL,
            get(vars::AMQP_URL),
            DEFAULT_AMQP_URL,
            &["amqp", "amqps"],
        )?;

        let blob_store = parse_with(
            vars::BLOB_STORE,
            get(vars::BLOB_STORE),
            DEFAULT_BLOB_STORE,
            |s| s.trim().parse::<BlobStoreLocation>(),
        )?;

        let s3_endpoint = match get(vars::S3_ENDPOINT) {
            None => None,
            Some(raw) => Some(check_url(
                vars::S3_ENDPOINT,
                raw.trim(),
                &["http", "https"],
            )?),
        };
        let s3_region = match get(vars::S3_REGION) {
            None => DEFAULT_S3_REGION.to_owned(),
            Some(raw) => {
                let region = raw.trim();
                if !region
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    return Err(invalid(
                        vars::S3_REGION,
                        region,
                        "expected a region name such as us-east-1 or garage",
                    ));
                }
                region.to_owned()
            }
        };

        // Secrets are taken verbatim (no trimming): a space may be part of one.
        let (jwt_secret, jwt_secret_is_default) = match lookup(vars::JWT_SECRET) {
            Some(value) if !value.is_empty() => (Secret::new(value), false),
            _ => (Secret::new(DEV_JWT_SECRET), true),
        };
        let (checkpoint_key, checkpoint_key_is_default) = match lookup(vars::CHECKPOINT_KEY) {
            Some(value) if !value.is_empty() => (Secret::new(value), false),
            _ => (Secret::new(DEV_CHECKPOINT_KEY), true),
        };

        let max_file_bytes = parse_positive(
            vars::MAX_FILE_BYTES,
            get(vars::MAX_FILE_BYTES),
            DEFAULT_MAX_FILE_BYTES,
        )?;
        let roles = parse_with(vars::ROLES, get(vars::ROLES), "all", |s| {
            s.parse::<Roles>().map_err(|err| err.to_string())
        })?;
        let bundle_ttl = Duration::from_secs(parse_positive(
            vars::BUNDLE_TTL_SECS,
            get(vars::BUNDLE_TTL_SECS),
            DEFAULT_BUNDLE_TTL_SECS,
        )?);
        let bundle_max_bytes = parse_positive(
            vars::BUNDLE_MAX_BYTES,
            get(vars::BUNDLE_MAX_BYTES),
            DEFAULT_BUNDLE_MAX_BYTES,
        )?;
        let freshness_timeout = Duration::from_millis(parse_positive(
            vars::FRESHNESS_TIMEOUT_MS,
            get(vars::FRESHNESS_TIMEOUT_MS),
            DEFAULT_FRESHNESS_TIMEOUT_MS,
        )?);

        Ok(Settings {
            http_addr,
            database_url,
            amqp_url,
            blob_store,
            s3_endpoint,
            s3_region,
            jwt_secret,
            jwt_secret_is_default,
            max_file_bytes,
            roles,
            bundle_ttl,
            bundle_max_bytes,
            checkpoint_key,
            checkpoint_key_is_default,
            freshness_timeout,
        })
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

    /// Things an operator should be told at start-up, one sentence each: the
    /// development secrets in use, or secrets too short to be safe. The binary
    /// logs each as a warning.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.jwt_secret_is_default {
            warnings.push(format!(
                "{} is not set: using the public development secret, so anyone can mint \
                 valid tokens; set it before exposing this deployment",
                vars::JWT_SECRET
            ));
        } else if self.jwt_secret.expose_bytes().len() < MIN_RECOMMENDED_SECRET_BYTES {
            warnings.push(format!(
                "{} is shorter than {MIN_RECOMMENDED_SECRET_BYTES} bytes: tokens are easier \
                 to forge; use a longer random secret",
                vars::JWT_SECRET
            ));
        }
        if self.checkpoint_key_is_default {
            warnings.push(format!(
                "{} is not set: audit checkpoints are sealed with the public development key \
                 and prove nothing; set it in production",
                vars::CHECKPOINT_KEY
            ));
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
            .field("database_url", &redact_url(&self.database_url))
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("blob_store", &self.blob_store)
            .field("s3_endpoint", &self.s3_endpoint)
            .field("s3_region", &self.s3_region)
            .field("jwt_secret", &self.jwt_secret)
            .field("jwt_secret_is_default", &self.jwt_secret_is_default)
            .field("max_file_bytes", &self.max_file_bytes)
            .field("roles", &self.roles)
            .field("bundle_ttl", &self.bundle_ttl)
            .field("bundle_max_bytes", &self.bundle_max_bytes)
            .field("checkpoint_key", &self.checkpoint_key)
            .field("checkpoint_key_is_default", &self.checkpoint_key_is_default)
            .field("freshness_timeout", &self.freshness_timeout)
            .finish()
    }
}

/// Replaces the password in `scheme://user:password@host/...` with `***`, so a
/// URL can be logged or shown in an error. Anything else is returned unchanged.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let authority_start = scheme_end + 3;
    let authority_end = url[authority_start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| authority_start + i);
    let authority = &url[authority_start..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let Some(colon) = authority[..at].find(':') else {
        return url.to_owned();
    };
    let password_start = authority_start + colon + 1;
    let password_end = authority_start + at;
    format!("{}***{}", &url[..password_start], &url[password_end..])
}

fn invalid(var: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        var,
        value: redact_url(value),
        reason: reason.into(),
    }
}

/// Parses `raw` (or `default` when unset) with `parse`, naming `var` on failure.
fn parse_with<T>(
    var: &'static str,
    raw: Option<String>,
    default: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<T, ConfigError> {
    let value = raw.as_deref().unwrap_or(default);
    parse(value).map_err(|reason| invalid(var, value, reason))
}

/// A URL with one of `schemes` and something after `://`. A full URL parser
/// would be a new dependency; the drivers parse the rest and report it then.
fn check_url(var: &'static str, value: &str, schemes: &[&str]) -> Result<String, ConfigError> {
    let expected = || {
        let forms: Vec<String> = schemes.iter().map(|s| format!("{s}://...")).collect();
        format!("expected a URL of the form {}", forms.join(" or "))
    };
    let Some((scheme, rest)) = value.split_once("://") else {
        return Err(invalid(var, value, expected()));
    };
    if !schemes.iter().any(|s| s.eq_ignore_ascii_case(scheme)) || rest.is_empty() {
        return Err(invalid(var, value, expected()));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            var,
            value,
            "a URL cannot contain spaces or control characters",
        ));
    }
    Ok(value.to_owned())
}

fn parse_url(
    var: &'static str,
    raw: Option<String>,
    default: &str,
    schemes: &[&str],
) -> Result<String, ConfigError> {
    check_url(var, raw.as_deref().map_or(default, str::trim), schemes)
}

/// A whole number above zero: a limit or TTL of zero would make the feature
/// unusable, which is never what an operator meant.
fn parse_positive(
    var: &'static str,
    raw: Option<String>,
    default: u64,
) -> Result<u64, ConfigError> {
    let Some(raw) = raw else {
        return Ok(default);
    };
    match raw.trim().parse::<u64>() {
        Ok(0) => Err(invalid(var, &raw, "must be greater than 0")),
        Ok(n) => Ok(n),
        Err(_) => Err(invalid(var, &raw, "expected a whole number, e.g. 26214400")),
    }
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
        assert_eq!(s.database_url, "postgres://postgres@127.0.0.1:5432/dossier");
        assert_eq!(s.amqp_url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(
            s.blob_store,
            BlobStoreLocation::Dir(PathBuf::from("./data/blobs"))
        );
        assert_eq!(s.s3_endpoint, None);
        assert_eq!(s.s3_region, "us-east-1");
        assert_eq!(s.jwt_secret.expose(), DEV_JWT_SECRET);
        assert!(s.jwt_secret_is_default);
        assert_eq!(s.max_file_bytes, 26_214_400);
        assert!(s.roles.is_all());
        assert_eq!(s.bundle_ttl, Duration::from_secs(86_400));
        assert_eq!(s.freshness_timeout, Duration::from_secs(10));
        assert_eq!(s.bundle_max_bytes, 10_737_418_240);
        assert_eq!(s.checkpoint_key.expose(), DEV_CHECKPOINT_KEY);
        assert!(s.checkpoint_key_is_default);
    }

    #[test]
    fn every_variable_is_read() {
        let s = parse(&[
            (vars::HTTP_ADDR, "0.0.0.0:9000"),
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
        ])
        .unwrap();
        assert_eq!(s.http_addr, "0.0.0.0:9000".parse().unwrap());
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
        assert!(!s.jwt_secret_is_default);
        assert_eq!(s.max_file_bytes, 1024);
        assert_eq!(
            s.roles,
            Roles::none().with(Role::Api).with(Role::Projections)
        );
        assert_eq!(s.bundle_ttl, Duration::from_secs(60));
        assert_eq!(s.bundle_max_bytes, 2048);
        assert_eq!(s.checkpoint_key.expose(), "k");
        assert!(!s.checkpoint_key_is_default);
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
        assert!(s.jwt_secret_is_default);
        assert!(s.roles.is_all());
    }

    #[test]
    fn bad_values_name_their_variable() {
        let cases: &[(&str, &str)] = &[
            (vars::HTTP_ADDR, "localhost:8080"),
            (vars::HTTP_ADDR, "127.0.0.1"),
            (vars::DATABASE_URL, "mysql://root@localhost/x"),
            (vars::DATABASE_URL, "postgres://"),
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
        ];
        for (var, value) in cases {
            assert_eq!(error_var(&[(var, value)]), *var, "{var}={value:?}");
            let message = parse(&[(var, value)]).unwrap_err().to_string();
            assert!(message.contains(var), "{message}");
        }
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
    fn roles_parse_and_print() {
        assert!("all".parse::<Roles>().unwrap().is_all());
        assert!("api,all".parse::<Roles>().unwrap().is_all());
        assert!(" ALL ".parse::<Roles>().unwrap().is_all());
        let roles: Roles = "relay, workers,relay".parse().unwrap();
        assert!(roles.contains(Role::Relay));
        assert!(roles.contains(Role::Workers));
        assert!(!roles.contains(Role::Api));
        assert_eq!(roles.to_string(), "relay,workers");
        assert_eq!(
            roles.iter().collect::<Vec<_>>(),
            [Role::Relay, Role::Workers]
        );
        assert_eq!(Roles::all().to_string(), "all");
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
            assert!(Roles::all().contains(role));
            assert!(!Roles::none().contains(role));
        }
        assert_eq!(
            "api,web".parse::<Roles>(),
            Err(ParseRolesError::Unknown("web".into()))
        );
        assert_eq!(" , ".parse::<Roles>(), Err(ParseRolesError::Empty));
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
    fn warnings_flag_development_and_short_secrets() {
        let defaults = Settings::defaults();
        assert_eq!(defaults.warnings().len(), 2);
        let short = parse(&[(vars::JWT_SECRET, "short"), (vars::CHECKPOINT_KEY, "k")]).unwrap();
        let warnings = short.warnings();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains(vars::JWT_SECRET));
        let long_secret = "x".repeat(32);
        let good = parse(&[
            (vars::JWT_SECRET, long_secret.as_str()),
            (vars::CHECKPOINT_KEY, "k"),
        ])
        .unwrap();
        assert!(good.warnings().is_empty());
    }

    #[test]
    fn for_tests_uses_an_ephemeral_port() {
        let s = Settings::for_tests();
        assert_eq!(s.http_addr.port(), 0);
        assert!(s.http_addr.ip().is_loopback());
        assert_eq!(s.max_file_bytes, DEFAULT_MAX_FILE_BYTES);
    }
}
