//! A RabbitMQ virtual host per test, made and removed through the management
//! HTTP API (reqwest), and a way to force-close a virtual host's connections to
//! test reconnects.

use std::time::Duration;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

/// Environment variable with the management API's `host:port`.
pub const MANAGEMENT_ADDR_VAR: &str = "DOSSIER_TEST_RABBITMQ_MANAGEMENT";
/// Default management API address.
pub const DEFAULT_MANAGEMENT_ADDR: &str = "127.0.0.1:15672";
/// Environment variable with the AMQP `host:port` tests connect to.
pub const AMQP_ADDR_VAR: &str = "DOSSIER_TEST_AMQP_ADDR";
/// Default AMQP address.
pub const DEFAULT_AMQP_ADDR: &str = "127.0.0.1:5672";
/// The user tests log in as (management API and AMQP).
pub const USER: &str = "guest";
/// Its password.
pub const PASSWORD: &str = "guest";

/// Generous: a broker busy with many tests creating vhosts with quorum
/// queues at once answers slowly, and a slow answer is not a failure.
const TIMEOUT: Duration = Duration::from_secs(90);

/// Every test vhost's name starts so, then the unix second it was made.
const TEST_VHOST_PREFIX: &str = "dossier-test-";

/// Test vhosts older than this are deleted by the next test process.
const KEEP_FOR_SECS: u64 = 3600;

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// RFC 3986's unreserved characters stay, everything else is encoded.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// What went wrong talking to the management API.
#[derive(Debug, thiserror::Error)]
pub enum ManagementError {
    /// Connecting, sending or reading failed.
    #[error("RabbitMQ management API: {0}")]
    Http(#[from] reqwest::Error),
    /// The API answered with an unexpected status.
    #[error("RabbitMQ management API: {method} {path} answered {status}: {body}")]
    Status {
        /// The request method.
        method: reqwest::Method,
        /// The request path.
        path: String,
        /// The answer's status.
        status: u16,
        /// The answer's body.
        body: String,
    },
}

fn env_or(var: &str, default: &str) -> String {
    std::env::var(var)
        .ok()
        .filter(|value| !value.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// Percent-encodes everything but RFC 3986's unreserved characters, for a
/// path segment of a URL (a vhost name in the management API or an AMQP URL).
pub fn percent_encode(value: &str) -> String {
    utf8_percent_encode(value, SEGMENT).to_string()
}

/// The management API at one address.
#[derive(Debug, Clone)]
struct Management {
    base: String,
    http: reqwest::Client,
}

impl Management {
    fn new(addr: &str) -> Self {
        // A fresh connection per request: the management API closes idle ones
        // on its own schedule, and a request sent down one it is just closing
        // fails with an incomplete message. Its calls are few; reuse buys nothing.
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .pool_max_idle_per_host(0)
            .build()
            .expect("a reqwest client with a timeout builds");
        Self {
            base: format!("http://{addr}"),
            http,
        }
    }

    fn from_env() -> Self {
        Self::new(&env_or(MANAGEMENT_ADDR_VAR, DEFAULT_MANAGEMENT_ADDR))
    }

    /// One request; answers the body of a 2xx answer.
    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<String, ManagementError> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .basic_auth(USER, Some(PASSWORD))
            .header("x-reason", "dossier test");
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        if status.is_success() {
            Ok(text)
        } else {
            Err(ManagementError::Status {
                method,
                path: path.to_owned(),
                status: status.as_u16(),
                body: text,
            })
        }
    }

    async fn connection_names(&self, vhost: &str) -> Result<Vec<String>, ManagementError> {
        let path = format!("/api/vhosts/{}/connections", percent_encode(vhost));
        let body = self.request(reqwest::Method::GET, &path, None).await?;
        let listed: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        Ok(listed
            .as_array()
            .map(|connections| {
                connections
                    .iter()
                    .filter_map(|c| c.get("name")?.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn close_connections(&self, vhost: &str) -> Result<usize, ManagementError> {
        let mut closed = 0;
        for name in self.connection_names(vhost).await? {
            let path = format!("/api/connections/{}", percent_encode(&name));
            match self.request(reqwest::Method::DELETE, &path, None).await {
                Ok(_) => closed += 1,
                // Gone already: it closed on its own between the list and now.
                Err(ManagementError::Status { status: 404, .. }) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(closed)
    }

    /// Deletes `dossier-test-<secs>-…` vhosts older than [`KEEP_FOR_SECS`];
    /// best effort. Names without a time are from before this rule: old.
    async fn delete_old_test_vhosts(&self) {
        let Ok(body) = self
            .request(reqwest::Method::GET, "/api/vhosts", None)
            .await
        else {
            return;
        };
        let listed: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let cutoff = now_secs().saturating_sub(KEEP_FOR_SECS);
        let names = listed
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["name"].as_str());
        for name in names {
            let Some(rest) = name.strip_prefix(TEST_VHOST_PREFIX) else {
                continue;
            };
            let born = rest
                .split('-')
                .next()
                .and_then(|secs| secs.parse::<u64>().ok());
            if born.is_none_or(|secs| secs < cutoff) {
                let _ = self.delete_vhost(name).await;
            }
        }
    }

    async fn delete_vhost(&self, vhost: &str) -> Result<(), ManagementError> {
        let path = format!("/api/vhosts/{}", percent_encode(vhost));
        one_at_a_time(self.request(reqwest::Method::DELETE, &path, None))
            .await
            .map(drop)
    }
}

/// Runs a vhost creation or deletion while no other test process on this
/// machine (nor another test of this one) creates or deletes one. RabbitMQ
/// 3.10 was seen here to wedge for good, every later vhost creation hanging at
/// "Making sure data directory", after vhosts were created while others were
/// being created and deleted; one at a time costs a few milliseconds each.
/// The lock across processes is a file lock in the temporary directory; if it
/// cannot be taken, the work runs anyway (the lock only narrows the race).
async fn one_at_a_time<T>(work: impl std::future::Future<Output = T>) -> T {
    static IN_PROCESS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _in_process = IN_PROCESS.lock().await;
    let across_processes = tokio::task::spawn_blocking(|| {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(std::env::temp_dir().join("dossier-test-vhosts.lock"))?;
        file.lock()?;
        Ok::<_, std::io::Error>(file)
    })
    .await;
    let answer = work.await;
    drop(across_processes);
    answer
}

/// A virtual host of its own for one test, with `guest` allowed everything.
/// Deleted (with everything in it) by [`Self::cleanup`] or on drop.
#[derive(Debug)]
pub struct TestVhost {
    name: String,
    url: String,
    management: Management,
    deleted: bool,
}

impl TestVhost {
    /// Creates `dossier-test-<unix seconds>-<uuid>` and grants `guest` full
    /// permissions on it. The first call of a test process deletes the test
    /// vhosts of runs older than an hour, which a killed run leaves behind: a
    /// broker holding hundreds of vhosts with quorum queues slows to a crawl.
    pub async fn create() -> Result<Self, ManagementError> {
        let management = Management::from_env();
        static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
        SWEPT
            .get_or_init(|| management.delete_old_test_vhosts())
            .await;
        let amqp = env_or(AMQP_ADDR_VAR, DEFAULT_AMQP_ADDR);
        let name = format!("{TEST_VHOST_PREFIX}{}-{}", now_secs(), uuid::Uuid::new_v4());
        let encoded = percent_encode(&name);
        let url = format!("amqp://{USER}:{PASSWORD}@{amqp}/{encoded}");
        one_at_a_time(management.request(
            reqwest::Method::PUT,
            &format!("/api/vhosts/{encoded}"),
            Some(serde_json::json!({})),
        ))
        .await?;
        management
            .request(
                reqwest::Method::PUT,
                &format!("/api/permissions/{encoded}/{USER}"),
                Some(serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"})),
            )
            .await?;
        Ok(Self {
            name,
            url,
            management,
            deleted: false,
        })
    }

    /// The vhost's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// An `amqp://` URL for the vhost (name percent-encoded).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Force-closes every connection of the vhost; answers how many. The
    /// management API lists a new connection only after its next statistics
    /// round (a few seconds), so callers that need at least one closed should
    /// poll.
    pub async fn close_connections(&self) -> Result<usize, ManagementError> {
        self.management.close_connections(&self.name).await
    }

    /// The names of the vhost's connections the management API lists (a new
    /// connection shows up after the next statistics round).
    pub async fn connection_names(&self) -> Result<Vec<String>, ManagementError> {
        self.management.connection_names(&self.name).await
    }

    /// Deletes the vhost now, answering any error (drop ignores them).
    pub async fn cleanup(mut self) -> Result<(), ManagementError> {
        self.deleted = true;
        self.management.delete_vhost(&self.name).await
    }
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        // Drop cannot await, and may run inside a runtime: delete from a thread
        // with a small runtime of its own.
        let (management, name) = (self.management.clone(), self.name.clone());
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|error| error.to_string())?;
            runtime
                .block_on(management.delete_vhost(&name))
                .map_err(|error| error.to_string())
        })
        .join();
        if let Ok(Err(error)) = deleted {
            eprintln!("could not delete test vhost {}: {error}", self.name);
        }
    }
}

/// Force-closes every connection of `vhost` through the management API (on
/// the default address); answers how many were closed.
pub async fn close_vhost_connections(vhost: &str) -> Result<usize, ManagementError> {
    Management::from_env().close_connections(vhost).await
}

/// The quick pauses tests retry with: 50 ms growing to 500 ms.
pub fn fast_backoff() -> dossier_runtime::retry::Backoff {
    dossier_runtime::retry::Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(500),
    }
}

/// A [`dossier_broker::Broker`] on `vhost` with test-sized timeouts and
/// [`fast_backoff`], named `connection_name`, connected once so that the
/// topology (exchanges, queues and their dead-letter queues) is declared
/// before a test binds or consumes anything.
pub async fn test_broker(vhost: &TestVhost, connection_name: &str) -> dossier_broker::Broker {
    let broker = dossier_broker::Broker::with_options(
        vhost.url(),
        dossier_broker::BrokerOptions {
            connection_name: connection_name.to_owned(),
            connect_timeout: Duration::from_secs(5),
            backoff: fast_backoff(),
            confirm_timeout: Duration::from_secs(10),
            ..dossier_broker::BrokerOptions::default()
        },
    )
    .expect("broker options for a test vhost");
    broker
        .connect(&tokio::sync::watch::channel(false).1)
        .await
        .expect("the test broker connects and declares the topology");
    broker
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhost_names_are_percent_encoded() {
        assert_eq!(percent_encode("/"), "%2F");
        assert_eq!(percent_encode("dossier-test-1"), "dossier-test-1");
        assert_eq!(
            percent_encode("127.0.0.1:5 -> 1"),
            "127.0.0.1%3A5%20-%3E%201"
        );
    }
}
