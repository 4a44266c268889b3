-- 0009: the customers read model, fed by the "customers" projection
-- (projections/src/customers.rs): one row per customer of a tenant that any event
-- concerns, with its counts and when it was last active, for the staff console's
-- customer list (GET /v1/customers). Derived data, rebuilt from the log at will;
-- keep everything inside the tables (see 0002 on why).
--
-- Customer ids are compared byte by byte (COLLATE "C"): the list's tie-break and
-- its keyset cursor then mean the same in Postgres and in Rust whatever the
-- server's locale, and a prefix search is a plain range of the primary key.

CREATE TABLE customers (
    tenant           TEXT             NOT NULL,
    customer_id      TEXT COLLATE "C" NOT NULL,
    -- Files of the customer not deleted.
    files            BIGINT           NOT NULL,
    -- Tasks of the customer (tasks cannot be closed yet: every task is open).
    open_tasks       BIGINT           NOT NULL,
    -- The newest `at` of the log events that concern the customer.
    last_activity_at TIMESTAMPTZ      NOT NULL,
    -- Log position of the last event applied to this row. Updates only apply when
    -- it is lower than the event's position, so an event applied twice changes nothing.
    last_position    BIGINT           NOT NULL,

    -- Also serves `q` (a customer id prefix) as a range scan.
    CONSTRAINT customers_pkey PRIMARY KEY (tenant, customer_id)
);

-- The list: one tenant, most recently active first, ties by customer id, with a
-- keyset cursor: a page reads `limit` index entries.
CREATE INDEX customers_most_recently_active
    ON customers (tenant, last_activity_at DESC, customer_id);

-- Which customer each file belongs to (the events after its upload do not say),
-- and whether it is still there. A deleted file's row stays, so that its upload
-- applied again does not count it again.
CREATE TABLE customer_files (
    id          UUID             NOT NULL,
    tenant      TEXT             NOT NULL,
    customer_id TEXT COLLATE "C" NOT NULL,
    live        BOOLEAN          NOT NULL,

    CONSTRAINT customer_files_pkey PRIMARY KEY (id)
);

-- Which customer each task belongs to (its messages do not say).
CREATE TABLE customer_tasks (
    id          UUID             NOT NULL,
    tenant      TEXT             NOT NULL,
    customer_id TEXT COLLATE "C" NOT NULL,

    CONSTRAINT customer_tasks_pkey PRIMARY KEY (id)
);
