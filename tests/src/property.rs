//! Property tests against Postgres: each case is a round of statements, so
//! they run few cases, and from a fixed seed.

use proptest::test_runner::{Config, RngSeed};

/// A runner's configuration for `cases` cases from `seed`, unless
/// `PROPTEST_RNG_SEED` picks another seed. A fixed seed because such tests
/// also check that their histories reached every interesting state, which a
/// few dozen random cases reach only most of the time, and a suite must not
/// fail by luck; set `PROPTEST_RNG_SEED` to explore others. No failure
/// persistence (the seed is the record) and a bounded shrink.
pub fn config(cases: u32, seed: u64) -> Config {
    let defaults = Config::default();
    let rng_seed = match std::env::var("PROPTEST_RNG_SEED") {
        Ok(_) => defaults.rng_seed,
        Err(_) => RngSeed::Fixed(seed),
    };
    Config {
        cases,
        max_shrink_iters: 200,
        failure_persistence: None,
        rng_seed,
        ..defaults
    }
}
