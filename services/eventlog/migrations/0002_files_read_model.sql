-- 0002: the files read model, fed from the event log by the "files" projection
-- (projections/src/files.rs). It is derived data: `dossier projections rebuild`
-- drops and rebuilds it from the log at any time, so nothing here is the truth.
--
-- The rebuild builds these tables aside with CREATE TABLE ... (LIKE files INCLUDING
-- ALL) and swaps them in, then gives the copied indexes the names used here again.
-- Keep everything about these tables inside the tables themselves (columns,
-- constraints, indexes): no views, foreign keys or triggers that point at them,
-- because those would not follow the swap.

-- One row per live file. A deleted file's row is removed by the same event that
-- deletes it, so it leaves every list at once (CONTRACT.md rule 7).
CREATE TABLE files (
    -- The file id (the aggregate id). UUIDs are unique across tenants, so the id
    -- alone is the key; every query still filters by tenant (rule 6).
    id            UUID        NOT NULL,
    tenant        TEXT        NOT NULL,
    customer_id   TEXT        NOT NULL,
    name          TEXT        NOT NULL,
    file_name     TEXT        NOT NULL,
    content_type  TEXT        NOT NULL,
    size          BIGINT      NOT NULL,
    sha256        TEXT        NOT NULL,
    -- When the upload was recorded (FileUploaded.uploaded_at).
    created_at    TIMESTAMPTZ NOT NULL,
    visibility    TEXT        NOT NULL,
    origin        TEXT        NOT NULL,
    viewed_at     TIMESTAMPTZ,
    signed_at     TIMESTAMPTZ,
    contract_id   TEXT,
    task_id       UUID,
    -- Where the bytes are; downloads and bundles read it from here.
    blob_key      TEXT        NOT NULL,
    -- Derived from origin (CONTRACT.md "protected"), so it can never disagree with it.
    protected     BOOLEAN     NOT NULL GENERATED ALWAYS AS (origin IN ('system', 'product')) STORED,
    -- Log position of the last event applied to this row. Updates only apply when
    -- it is lower than the event's position, so an event applied twice changes nothing.
    last_position BIGINT      NOT NULL,

    CONSTRAINT files_pkey PRIMARY KEY (id),
    CONSTRAINT files_size_not_negative CHECK (size >= 0),
    CONSTRAINT files_visibility_known CHECK (visibility IN ('internal', 'portal', 'portal_and_moving')),
    CONSTRAINT files_origin_known CHECK (origin IN ('staff_upload', 'customer_upload', 'contract', 'product', 'system'))
);

-- The list query (GET /v1/customers/{customer_id}/files) is always one tenant's one
-- customer, newest first by (created_at DESC, id DESC), with a keyset cursor. This
-- index serves the equality prefix, the created_from/created_to range, the cursor
-- and the order at once, so a page reads at most `limit` matching rows plus the
-- non-matching ones between them; the other filters (viewed, visibility,
-- contract_id, origin) are checked on those rows. With 1,000,000 files over 10,000
-- customers a customer has about a hundred rows, so no filter needs its own index,
-- and every extra index would slow down every write of the projection.
CREATE INDEX files_customer_newest_first
    ON files (tenant, customer_id, created_at DESC, id DESC);

-- Ids of deleted files. A FileUploaded applied again after its FileDeleted (a replay,
-- a checkpoint moved back by hand) must not bring the file back; this table is how
-- the projection knows, since the row itself is gone.
CREATE TABLE files_tombstones (
    id            UUID        NOT NULL,
    tenant        TEXT        NOT NULL,
    -- Position of the FileDeleted event.
    last_position BIGINT      NOT NULL,

    CONSTRAINT files_tombstones_pkey PRIMARY KEY (id)
);
