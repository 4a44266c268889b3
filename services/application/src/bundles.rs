//! How many bundles a tenant has pending: the [`PendingBundles`] port of the
//! bundle aggregate, counted from the log.
//!
//! The `bundles` read model knows the pending bundles up to its checkpoint; the
//! events after it are read from the log itself, so a read model that lags (a
//! projections role that is down or rebuilding) cannot make a tenant look idle.
//! A bundle counts until its `BundleReady`, `BundleFailed` or `BundleExpired`
//! is in the log.
//!
//! The count is taken before the request is appended, without a lock: two
//! requests of one tenant that arrive together may both pass the bound (each
//! sees the other only once it is appended). The bound is kept in the sense
//! that matters: a tenant cannot pile up bundles one request after another.

use std::future::Future;
use std::pin::Pin;

use dossier_domain::{PendingBundles, TenantId};
use dossier_eventlog::db::Pool;
use dossier_projections::BundlesProjection;

/// Pending bundles: the read model's up to its checkpoint, and the log's after.
const PENDING_QUERY: &str = "\
    WITH seen AS ( \
        SELECT coalesce((SELECT position FROM checkpoints WHERE name = $2), 0) AS position) \
    SELECT count(*) FROM ( \
        SELECT b.id::text AS id FROM bundles b \
        WHERE b.tenant = $1 AND b.status = 'pending' \
        UNION \
        SELECT e.aggregate_id FROM events e, seen \
        WHERE e.tenant = $1 AND e.position > seen.position \
          AND e.aggregate_type = 'bundle' AND e.event_type = 'BundleRequested' \
    ) AS pending \
    WHERE NOT EXISTS ( \
        SELECT 1 FROM events t \
        WHERE t.aggregate_type = 'bundle' AND t.aggregate_id = pending.id \
          AND t.event_type IN ('BundleReady', 'BundleFailed', 'BundleExpired'))";

/// [`PendingBundles`] on the log and the bundles read model.
#[derive(Clone)]
pub struct PendingInLog {
    pool: Pool,
}

impl PendingInLog {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    async fn count(&self, tenant: &TenantId) -> Result<u32, String> {
        let client = self.pool.get().await.map_err(|e| e.to_string())?;
        let row = client
            .query_one(PENDING_QUERY, &[&tenant.as_str(), &BundlesProjection::NAME])
            .await
            .map_err(|e| dossier_eventlog::db::pg_detail(&e))?;
        let count: i64 = row.try_get(0).map_err(|e| e.to_string())?;
        Ok(u32::try_from(count).unwrap_or(u32::MAX))
    }
}

impl PendingBundles for PendingInLog {
    fn pending<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> Pin<Box<dyn Future<Output = Result<u32, String>> + Send + 'a>> {
        Box::pin(self.count(tenant))
    }
}
