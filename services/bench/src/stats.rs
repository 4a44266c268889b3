//! Timing: percentiles of latency samples, and a closed-loop load driver (N
//! clients, each starting its next operation as soon as the last one ended),
//! with a warm-up whose operations are not counted.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// Latency samples; percentiles by nearest rank.
#[derive(Debug, Clone, Default)]
pub struct Samples(Vec<Duration>);

impl Samples {
    pub fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Self(samples)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The `p`-th percentile (0 < p <= 100), nearest rank; zero when empty.
    pub fn percentile(&self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }

    pub fn p50_ms(&self) -> f64 {
        ms(self.percentile(50.0))
    }

    pub fn p99_ms(&self) -> f64 {
        ms(self.percentile(99.0))
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Megabytes (10^6 bytes) per second.
pub fn mb_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64().max(1e-9)
}

/// What a [`closed_loop`] run measured.
#[derive(Debug)]
pub struct Load {
    /// Operations that started and ended inside the measuring window.
    pub ops: u64,
    pub window: Duration,
    pub latencies: Samples,
}

impl Load {
    pub fn per_second(&self) -> f64 {
        self.ops as f64 / self.window.as_secs_f64()
    }
}

/// Runs `clients` loops of `op(client, iteration)` for `warmup + window`;
/// counts the operations that started after the warm-up and ended inside the
/// window. The first failing operation stops the run and is its error.
pub async fn closed_loop<F, Fut>(
    clients: usize,
    warmup: Duration,
    window: Duration,
    op: F,
) -> anyhow::Result<Load>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + window;
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..clients {
        let op = op.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut iteration = 0u64;
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                op(client, iteration).await?;
                iteration += 1;
                let ended = Instant::now();
                if began >= measure_from && ended <= end {
                    latencies.push(ended - began);
                }
            }
            Ok::<_, anyhow::Error>(latencies)
        });
    }
    let mut all = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined? {
            Ok(mut latencies) => all.append(&mut latencies),
            Err(error) => {
                tasks.abort_all();
                return Err(error);
            }
        }
    }
    Ok(Load {
        ops: all.len() as u64,
        window,
        latencies: Samples::new(all),
    })
}

/// Runs `a` and `b` `rounds` times each, alternating which goes first, and
/// gives what each run of either measured: a shared machine's load drifts,
/// and alternating spreads it evenly over both sides.
pub async fn interleaved<T>(
    rounds: usize,
    mut a: impl AsyncFnMut() -> anyhow::Result<T>,
    mut b: impl AsyncFnMut() -> anyhow::Result<T>,
) -> anyhow::Result<(Vec<T>, Vec<T>)> {
    let (mut of_a, mut of_b) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for round in 0..rounds {
        if round % 2 == 0 {
            of_a.push(a().await?);
            of_b.push(b().await?);
        } else {
            of_b.push(b().await?);
            of_a.push(a().await?);
        }
    }
    Ok((of_a, of_b))
}

/// Runs `count` operations with at most `parallel` in flight; answers the
/// wall time of the whole batch.
pub async fn batch<F, Fut>(count: usize, parallel: usize, op: F) -> anyhow::Result<Duration>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let op = Arc::new(op);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..parallel.min(count).max(1) {
        let (op, next) = (op.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, anyhow::Error>(());
                }
                op(i).await?;
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        if let Err(error) = joined? {
            tasks.abort_all();
            return Err(error);
        }
    }
    Ok(started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let samples = Samples::new((1..=100).rev().map(Duration::from_millis).collect());
        assert_eq!(samples.percentile(50.0), Duration::from_millis(50));
        assert_eq!(samples.percentile(99.0), Duration::from_millis(99));
        assert_eq!(samples.percentile(100.0), Duration::from_millis(100));
        assert_eq!(samples.percentile(0.1), Duration::from_millis(1));
        assert_eq!(Samples::default().percentile(99.0), Duration::ZERO);
        let one = Samples::new(vec![Duration::from_millis(7)]);
        assert_eq!(one.percentile(99.0), Duration::from_millis(7));
    }

    #[tokio::test]
    async fn closed_loop_counts_only_the_window() {
        let load = closed_loop(
            2,
            Duration::from_millis(20),
            Duration::from_millis(100),
            |_, _| async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                Ok(())
            },
        )
        .await
        .unwrap();
        assert!(load.ops >= 10 && load.ops <= 22, "{}", load.ops);
        assert_eq!(load.latencies.len() as u64, load.ops);
    }
}
