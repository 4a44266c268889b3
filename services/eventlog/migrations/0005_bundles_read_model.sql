-- 0005: the bundles read model, fed from the event log by the "bundles"
-- projection (projections/src/bundles.rs). Derived data, rebuilt from the log at
-- will; keep everything inside the table (see 0002 on why).

-- One row per bundle, in every state (GET /v1/bundles/{id}, the content endpoint
-- and the zip worker's expiry all read it).
CREATE TABLE bundles (
    -- The bundle id (the aggregate id); every query still filters by tenant.
    id            UUID        NOT NULL,
    tenant        TEXT        NOT NULL,
    requested_by  TEXT        NOT NULL,
    -- pending, ready, failed or expired.
    status        TEXT        NOT NULL,
    -- The files in entry order, as recorded by BundleRequested:
    -- [{"file_id", "customer_id", "size"}, ...].
    files         JSONB       NOT NULL,
    file_count    INTEGER     NOT NULL,
    files_done    INTEGER     NOT NULL,
    -- Sum of the files' sizes at the request.
    total_size    BIGINT      NOT NULL,
    requested_at  TIMESTAMPTZ NOT NULL,
    -- When it became ready or failed.
    finished_at   TIMESTAMPTZ,
    -- After this the bundle is gone (set by BundleReady and BundleFailed).
    expires_at    TIMESTAMPTZ,
    -- The archive (ready bundles only).
    blob_key      TEXT,
    size          BIGINT,
    sha256        TEXT,
    -- Why there is no archive (failed bundles only).
    error         TEXT,
    -- Log position of the last event applied to this row; updates only apply
    -- when it is lower than the event's, so an event applied twice changes nothing.
    last_position BIGINT      NOT NULL,

    CONSTRAINT bundles_pkey PRIMARY KEY (id),
    CONSTRAINT bundles_status_known CHECK (status IN ('pending', 'ready', 'failed', 'expired')),
    CONSTRAINT bundles_counts_sane CHECK (files_done >= 0 AND files_done <= file_count)
);

-- The expiry sweep: bundles that are not expired yet, oldest deadline first.
CREATE INDEX bundles_expiry ON bundles (expires_at, requested_at) WHERE status <> 'expired';
