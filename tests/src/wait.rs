//! Waiting on a condition, the one way tests (and the benchmark) do it.
//!
//! A test that needs something to have happened asks for it by name and looks
//! again every few milliseconds until it holds or a deadline passes; it never
//! sleeps a fixed time and hopes. When the deadline passes, the failure says what
//! was awaited and what the last look saw, so a red test explains itself:
//!
//! ```ignore
//! let file = eventually("the upload is listed", async || {
//!     let page = staff.list("cust-1", "").await;
//!     page.items.into_iter().find(|f| f.id == id).ok_or(page.items.len())
//! })
//! .await;
//! ```
//!
//! A look answers a [`Look`]: `true`/`false`, `Some(value)`/`None`, or
//! `Ok(value)`/`Err(what was seen instead)`. The last kind is the most useful one,
//! because what was seen ends up in the failure message.

use std::fmt::Debug;
use std::time::Duration;

/// How long [`eventually`] waits unless told otherwise: long enough for a busy
/// two-core machine running several test binaries at once.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// How often [`eventually`] looks unless told otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(50);

/// What one look at a condition found.
pub trait Look {
    /// What the wait answers once the condition holds.
    type Value;
    /// `Ok` once the condition holds; otherwise what was seen instead.
    fn settled(self) -> Result<Self::Value, String>;
}

impl Look for bool {
    type Value = ();
    fn settled(self) -> Result<(), String> {
        if self { Ok(()) } else { Err("false".into()) }
    }
}

impl<T> Look for Option<T> {
    type Value = T;
    fn settled(self) -> Result<T, String> {
        self.ok_or_else(|| "nothing yet".into())
    }
}

impl<T, O: Debug> Look for Result<T, O> {
    type Value = T;
    fn settled(self) -> Result<T, String> {
        self.map_err(|seen| format!("{seen:?}"))
    }
}

/// A condition did not hold in time.
#[derive(Debug, Clone, thiserror::Error)]
#[error("timed out after {waited:?} waiting for {what}; the last look saw: {last}")]
pub struct TimedOut {
    /// What was awaited.
    pub what: String,
    /// How long it was awaited.
    pub waited: Duration,
    /// What the last look saw instead.
    pub last: String,
}

/// A wait on a named condition: a deadline and a polling interval.
#[derive(Debug, Clone)]
pub struct Wait {
    what: String,
    timeout: Duration,
    interval: Duration,
}

impl Wait {
    /// A wait for `what` with [`DEFAULT_TIMEOUT`] and [`DEFAULT_INTERVAL`].
    pub fn new(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            timeout: DEFAULT_TIMEOUT,
            interval: DEFAULT_INTERVAL,
        }
    }

    /// Gives up after `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Looks every `interval`.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Looks at once and then every interval until `look` holds; answers what it
    /// answered then, or [`TimedOut`] with the last thing it saw. The look always
    /// runs at least once, and once more at the deadline.
    pub async fn until<L: Look>(
        &self,
        mut look: impl AsyncFnMut() -> L,
    ) -> Result<L::Value, TimedOut> {
        let started = tokio::time::Instant::now();
        let deadline = started + self.timeout;
        loop {
            let last = match look().await.settled() {
                Ok(value) => return Ok(value),
                Err(seen) => seen,
            };
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(TimedOut {
                    what: self.what.clone(),
                    waited: now - started,
                    last,
                });
            }
            tokio::time::sleep(self.interval.min(deadline - now)).await;
        }
    }

    /// Like [`Self::until`], failing the test with the [`TimedOut`] message.
    pub async fn expect<L: Look>(&self, look: impl AsyncFnMut() -> L) -> L::Value {
        match self.until(look).await {
            Ok(value) => value,
            Err(timed_out) => panic!("{timed_out}"),
        }
    }
}

/// Waits (up to [`DEFAULT_TIMEOUT`], looking every [`DEFAULT_INTERVAL`]) until
/// `look` holds and answers its value; fails the test, naming `what` and the last
/// look's finding, if it never does. [`Wait`] sets another deadline or interval.
pub async fn eventually<L: Look>(what: &str, look: impl AsyncFnMut() -> L) -> L::Value {
    Wait::new(what).expect(look).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_condition_that_comes_true_answers_its_value() {
        let mut looks = 0;
        let value = eventually("the third look", async || {
            looks += 1;
            if looks == 3 {
                Ok(looks * 10)
            } else {
                Err(looks)
            }
        })
        .await;
        assert_eq!(value, 30);
        assert_eq!(looks, 3);
    }

    #[tokio::test]
    async fn a_condition_that_never_holds_names_what_was_awaited_and_the_last_look() {
        let mut looks = 0;
        let timed_out = Wait::new("the answer to be 42")
            .timeout(Duration::from_millis(30))
            .interval(Duration::from_millis(5))
            .until(async || {
                looks += 1;
                Err::<(), _>(format!("answer {looks}"))
            })
            .await
            .expect_err("it never holds");
        assert_eq!(timed_out.what, "the answer to be 42");
        assert_eq!(timed_out.last, format!("{:?}", format!("answer {looks}")));
        assert!(looks >= 2, "looked again before giving up: {looks}");
        let message = timed_out.to_string();
        assert!(
            message.contains("the answer to be 42") && message.contains(&format!("answer {looks}")),
            "{message}"
        );
    }

    #[tokio::test]
    #[should_panic(expected = "timed out after")]
    async fn eventually_fails_the_test_when_time_runs_out() {
        Wait::new("never")
            .timeout(Duration::from_millis(10))
            .expect(async || false)
            .await;
    }

    #[tokio::test]
    async fn options_and_booleans_are_looks_too() {
        assert_eq!(eventually("some", async || Some(7)).await, 7);
        eventually("true", async || true).await;
        assert_eq!(None::<u8>.settled().unwrap_err(), "nothing yet");
        assert_eq!(false.settled().unwrap_err(), "false");
    }
}
