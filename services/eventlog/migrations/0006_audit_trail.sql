-- 0006: the audit trail (CONTRACT.md "GET /v1/audit", rule 9), written by the audit
-- worker (workers/src/audit.rs) from the events RabbitMQ delivers on
-- dossier.workers.audit. One row per event of the log: every accepted command and
-- every download, with who, when, which tenant, customer and file, and a readable
-- action. Derived data: the log stays the truth, and every row names the position
-- of the event it describes.

CREATE TABLE audit_trail (
    -- The event's id: the worker inserts ON CONFLICT (event_id) DO NOTHING, so a
    -- redelivered message changes nothing.
    event_id    UUID        NOT NULL,
    -- The event's log position; the trail's order and its cursor.
    position    BIGINT      NOT NULL,
    tenant      TEXT        NOT NULL,
    -- When the event was recorded (the log's `at`).
    at          TIMESTAMPTZ NOT NULL,
    actor       TEXT        NOT NULL,
    -- e.g. file.uploaded, file.downloaded, task.created
    action      TEXT        NOT NULL,
    aggregate_type TEXT     NOT NULL,
    aggregate_id   TEXT     NOT NULL,
    event_type  TEXT        NOT NULL,
    -- The file the event is about, if any (text: ids come from payloads too).
    file_id     TEXT,
    customer_id TEXT,
    -- What else the event says (its payload, without internal keys).
    details     JSONB       NOT NULL DEFAULT '{}'::jsonb,
    written_at  TIMESTAMPTZ NOT NULL DEFAULT now(),

    CONSTRAINT audit_trail_pkey PRIMARY KEY (event_id),
    CONSTRAINT audit_trail_position_key UNIQUE (position)
);

-- GET /v1/audit: one tenant, newest first, optionally one customer or one file.
CREATE INDEX audit_trail_tenant_position ON audit_trail (tenant, position DESC);
CREATE INDEX audit_trail_tenant_file ON audit_trail (tenant, file_id, position DESC)
    WHERE file_id IS NOT NULL;
CREATE INDEX audit_trail_tenant_customer ON audit_trail (tenant, customer_id, position DESC)
    WHERE customer_id IS NOT NULL;
