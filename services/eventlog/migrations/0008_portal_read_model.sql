-- 0008: the portal read model, fed by the "portal" projection
-- (projections/src/portal.rs): tasks, their message threads, and each
-- tenant's portal settings. Derived data, rebuilt from the log at will; keep
-- everything inside the tables (see 0002 on why).

CREATE TABLE tasks (
    id            UUID        NOT NULL,
    tenant        TEXT        NOT NULL,
    customer_id   TEXT        NOT NULL,
    title         TEXT        NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    last_position BIGINT      NOT NULL,
    CONSTRAINT tasks_pkey PRIMARY KEY (id)
);
CREATE INDEX tasks_customer ON tasks (tenant, customer_id, created_at);

CREATE TABLE task_messages (
    id        UUID        NOT NULL,
    task_id   UUID        NOT NULL,
    tenant    TEXT        NOT NULL,
    author    TEXT        NOT NULL,
    text      TEXT        NOT NULL,
    file_id   UUID,
    at        TIMESTAMPTZ NOT NULL,
    position  BIGINT      NOT NULL,
    CONSTRAINT task_messages_pkey PRIMARY KEY (id)
);
CREATE INDEX task_messages_thread ON task_messages (task_id, position);

-- One row per tenant that ever changed its settings; no row means the defaults.
CREATE TABLE tenant_settings (
    tenant                 TEXT    NOT NULL,
    portal_uploads_enabled BOOLEAN NOT NULL,
    last_position          BIGINT  NOT NULL,
    CONSTRAINT tenant_settings_pkey PRIMARY KEY (tenant)
);

-- A task's attachments are the live files that carry its id.
CREATE INDEX files_task ON files (tenant, task_id) WHERE task_id IS NOT NULL;
