//! The key table: every data key, wrapped under a master key, one live key per
//! owner (a file, a bundle archive, a customer).
//!
//! The table lives in the main database by default, or in a database of its
//! own (`DOSSIER_KEYS_DATABASE_URL`) so that a deployment can give it a short
//! backup retention: a destroyed key must not survive for years in a backup.
//! [`KeyStore::open`] creates the table where it is (it is not one of the
//! event log's migrations, because it may not live beside them).
//!
//! Destroying a key sets its wrapped bytes to NULL and stamps `destroyed_at`;
//! the row stays, so readers can tell "erased" from "never encrypted".

use std::collections::HashMap;
use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::master::MasterKeys;
use crate::{DataKey, KEY_LEN, KeyError, MasterKey, random_bytes};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS data_keys (
    id            UUID PRIMARY KEY,
    tenant        TEXT NOT NULL,
    owner_kind    TEXT NOT NULL CHECK (owner_kind IN ('file', 'bundle', 'customer')),
    owner_id      TEXT NOT NULL,
    master_key_id TEXT,
    wrapped       BYTEA,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    destroyed_at  TIMESTAMPTZ,
    CHECK ((wrapped IS NULL) = (destroyed_at IS NOT NULL)),
    CHECK ((wrapped IS NULL) = (master_key_id IS NULL))
);
CREATE UNIQUE INDEX IF NOT EXISTS data_keys_live_owner
    ON data_keys (tenant, owner_kind, owner_id) WHERE destroyed_at IS NULL;
CREATE INDEX IF NOT EXISTS data_keys_master ON data_keys (master_key_id)
    WHERE master_key_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS data_keys_owner ON data_keys (tenant, owner_kind, owner_id);
";

/// Advisory lock key serialising concurrent schema set-ups ("dkeys").
const SCHEMA_LOCK: i64 = 0x0064_6b65_7973;

/// What a data key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner<'a> {
    /// A file: its bytes and its personal event fields.
    File(Uuid),
    /// A bundle archive (a ZIP of files), destroyed when the bundle expires.
    Bundle(Uuid),
    /// A customer: task titles and message texts.
    Customer(&'a str),
}

impl Owner<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Self::File(_) => "file",
            Self::Bundle(_) => "bundle",
            Self::Customer(_) => "customer",
        }
    }

    fn id(&self) -> String {
        match self {
            Self::File(id) | Self::Bundle(id) => id.to_string(),
            Self::Customer(id) => (*id).to_owned(),
        }
    }
}

/// What the table says of a key id.
#[derive(Debug, Clone)]
pub enum KeyLookup {
    /// The key, unwrapped.
    Live(DataKey),
    /// The key existed and was destroyed: what it sealed is gone.
    Destroyed,
    /// No such key: sealed under a key this table never held.
    Unknown,
}

/// The data keys of one deployment.
#[derive(Clone)]
pub struct KeyStore {
    pool: Pool,
    masters: Arc<MasterKeys>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("master", &self.masters.current().id())
            .finish_non_exhaustive()
    }
}

impl KeyStore {
    /// The key table in the database behind `pool`, created if missing.
    pub async fn open(pool: Pool, masters: MasterKeys) -> Result<Self, KeyError> {
        let mut client = pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
            .await?;
        tx.batch_execute(SCHEMA).await?;
        tx.commit().await?;
        Ok(Self {
            pool,
            masters: Arc::new(masters),
        })
    }

    /// The pool the table is in (to destroy keys inside a caller's
    /// transaction when it is the events' own database).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The current master key's id.
    pub fn master_key_id(&self) -> &str {
        self.masters.current().id()
    }

    /// A new key for `owner`. Fails if `owner` already has a live key (a file
    /// or bundle gets exactly one).
    pub async fn create(&self, tenant: &str, owner: Owner<'_>) -> Result<DataKey, KeyError> {
        let id = Uuid::now_v7();
        let bytes: [u8; KEY_LEN] = random_bytes();
        let master = self.masters.current();
        let wrapped = master.wrap(id, &bytes);
        self.pool
            .get()
            .await?
            .execute(
                "INSERT INTO data_keys (id, tenant, owner_kind, owner_id, master_key_id, wrapped) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &id,
                    &tenant,
                    &owner.kind(),
                    &owner.id(),
                    &master.id(),
                    &wrapped,
                ],
            )
            .await?;
        Ok(DataKey::from_bytes(id, &bytes))
    }

    /// A new key for each of `owners` (of one tenant), in one statement per
    /// thousand: for tools that give many files keys at once (`dossier blobs
    /// encrypt`, the benchmark's seeding). Fails like [`Self::create`] if one
    /// already has a live key; then none of that thousand is created.
    pub async fn create_many(
        &self,
        tenant: &str,
        owners: &[Owner<'_>],
    ) -> Result<Vec<DataKey>, KeyError> {
        let master = self.masters.current();
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO data_keys (id, tenant, owner_kind, owner_id, master_key_id, wrapped) \
                 SELECT id, $2, kind, owner, $3, wrapped \
                 FROM unnest($1::uuid[], $4::text[], $5::text[], $6::bytea[]) \
                      AS k(id, kind, owner, wrapped)",
            )
            .await?;
        let mut keys = Vec::with_capacity(owners.len());
        for chunk in owners.chunks(1000) {
            let mut ids = Vec::with_capacity(chunk.len());
            let mut kinds = Vec::with_capacity(chunk.len());
            let mut owner_ids = Vec::with_capacity(chunk.len());
            let mut wrapped = Vec::with_capacity(chunk.len());
            for owner in chunk {
                let id = Uuid::now_v7();
                let bytes: [u8; KEY_LEN] = random_bytes();
                ids.push(id);
                kinds.push(owner.kind());
                owner_ids.push(owner.id());
                wrapped.push(master.wrap(id, &bytes));
                keys.push(DataKey::from_bytes(id, &bytes));
            }
            client
                .execute(
                    &statement,
                    &[&ids, &tenant, &master.id(), &kinds, &owner_ids, &wrapped],
                )
                .await?;
        }
        Ok(keys)
    }

    /// The live key of `owner`, created if it has none (a customer's key
    /// comes into being with its first task; after an erasure a new one does).
    pub async fn live_or_create(
        &self,
        tenant: &str,
        owner: Owner<'_>,
    ) -> Result<DataKey, KeyError> {
        loop {
            if let Some(key) = self.live(tenant, owner).await? {
                return Ok(key);
            }
            match self.create(tenant, owner).await {
                Ok(key) => return Ok(key),
                // Another process created it first: take theirs.
                Err(KeyError::Store(message)) if message.contains("data_keys_live_owner") => {}
                Err(err) => return Err(err),
            }
        }
    }

    /// The live key of `owner`, if it has one ([`Self::of_owner`], without
    /// telling a destroyed key from none).
    pub async fn live(&self, tenant: &str, owner: Owner<'_>) -> Result<Option<DataKey>, KeyError> {
        Ok(match self.of_owner(tenant, owner).await? {
            KeyLookup::Live(key) => Some(key),
            KeyLookup::Destroyed | KeyLookup::Unknown => None,
        })
    }

    /// What the table says of `owner`'s key: its live key, [`KeyLookup::Destroyed`]
    /// when every key it had was destroyed, [`KeyLookup::Unknown`] when it never
    /// had one (a blob stored before encryption).
    pub async fn of_owner(&self, tenant: &str, owner: Owner<'_>) -> Result<KeyLookup, KeyError> {
        let row = self
            .pool
            .get()
            .await?
            .query_opt(
                "SELECT id, master_key_id, wrapped FROM data_keys \
                 WHERE tenant = $1 AND owner_kind = $2 AND owner_id = $3 \
                 ORDER BY destroyed_at IS NULL DESC LIMIT 1",
                &[&tenant, &owner.kind(), &owner.id()],
            )
            .await?;
        let Some(row) = row else {
            return Ok(KeyLookup::Unknown);
        };
        Ok(match self.unwrap_row(row.get(0), row.get(1), row.get(2))? {
            Some(key) => KeyLookup::Live(key),
            None => KeyLookup::Destroyed,
        })
    }

    /// What the table says of each of `ids`, in one query.
    pub async fn lookup(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, KeyLookup>, KeyError> {
        let mut found: HashMap<Uuid, KeyLookup> =
            ids.iter().map(|id| (*id, KeyLookup::Unknown)).collect();
        if ids.is_empty() {
            return Ok(found);
        }
        let rows = self
            .pool
            .get()
            .await?
            .query(
                "SELECT id, master_key_id, wrapped FROM data_keys WHERE id = ANY($1)",
                &[&ids],
            )
            .await?;
        for row in rows {
            let id: Uuid = row.get(0);
            let lookup = match self.unwrap_row(id, row.get(1), row.get(2))? {
                Some(key) => KeyLookup::Live(key),
                None => KeyLookup::Destroyed,
            };
            found.insert(id, lookup);
        }
        Ok(found)
    }

    /// One key id's [`KeyLookup`].
    pub async fn lookup_one(&self, id: Uuid) -> Result<KeyLookup, KeyError> {
        Ok(self
            .lookup(&[id])
            .await?
            .remove(&id)
            .unwrap_or(KeyLookup::Unknown))
    }

    fn unwrap_row(
        &self,
        id: Uuid,
        master_key_id: Option<String>,
        wrapped: Option<Vec<u8>>,
    ) -> Result<Option<DataKey>, KeyError> {
        let (Some(master_key_id), Some(wrapped)) = (master_key_id, wrapped) else {
            return Ok(None);
        };
        let master = self
            .masters
            .by_id(&master_key_id)
            .ok_or(KeyError::UnknownMasterKey {
                key_id: id,
                master_key_id: master_key_id.clone(),
            })?;
        let bytes = master.unwrap(id, &wrapped)?;
        Ok(Some(DataKey::from_bytes(id, &bytes)))
    }

    /// Destroys the live key of each owner, through `client` (a transaction
    /// of the caller's, so that the destruction commits with its event, or
    /// this store's own pool). Answers how many keys were destroyed.
    pub async fn destroy<C: GenericClient>(
        client: &C,
        tenant: &str,
        owners: &[Owner<'_>],
    ) -> Result<u64, KeyError> {
        let mut destroyed = 0;
        for owner in owners {
            destroyed += client
                .execute(
                    "UPDATE data_keys SET wrapped = NULL, master_key_id = NULL, destroyed_at = now() \
                     WHERE tenant = $1 AND owner_kind = $2 AND owner_id = $3 AND destroyed_at IS NULL",
                    &[&tenant, &owner.kind(), &owner.id()],
                )
                .await?;
        }
        Ok(destroyed)
    }

    /// [`Self::destroy`] in a transaction of this store's own.
    pub async fn destroy_now(&self, tenant: &str, owners: &[Owner<'_>]) -> Result<u64, KeyError> {
        let client = self.pool.get().await?;
        Self::destroy(&**client, tenant, owners).await
    }

    /// Re-wraps every live key that is not under the current master key, a
    /// thousand per transaction, without touching a blob or an event. Keys
    /// under a master key this process does not hold are an error (nothing of
    /// that batch is changed). Answers how many keys were re-wrapped.
    pub async fn rotate(&self) -> Result<u64, KeyError> {
        let current: &MasterKey = self.masters.current();
        let mut rewrapped = 0;
        loop {
            let mut client = self.pool.get().await?;
            let tx = client.transaction().await?;
            let rows = tx
                .query(
                    "SELECT id, master_key_id, wrapped FROM data_keys \
                     WHERE master_key_id IS NOT NULL AND master_key_id <> $1 \
                     ORDER BY id LIMIT 1000 FOR UPDATE",
                    &[&current.id()],
                )
                .await?;
            if rows.is_empty() {
                return Ok(rewrapped);
            }
            for row in &rows {
                let id: Uuid = row.get(0);
                let master_key_id: String = row.get(1);
                let wrapped: Vec<u8> = row.get(2);
                let old = self
                    .masters
                    .by_id(&master_key_id)
                    .ok_or(KeyError::UnknownMasterKey {
                        key_id: id,
                        master_key_id: master_key_id.clone(),
                    })?;
                let bytes = old.unwrap(id, &wrapped)?;
                tx.execute(
                    "UPDATE data_keys SET master_key_id = $2, wrapped = $3 WHERE id = $1",
                    &[&id, &current.id(), &current.wrap(id, &bytes)],
                )
                .await?;
            }
            tx.commit().await?;
            rewrapped += rows.len() as u64;
        }
    }

    /// How many live keys each master key wraps (for `dossier keys status`).
    pub async fn count_by_master(&self) -> Result<Vec<(String, i64)>, KeyError> {
        let rows = self
            .pool
            .get()
            .await?
            .query(
                "SELECT master_key_id, count(*) FROM data_keys WHERE master_key_id IS NOT NULL \
                 GROUP BY master_key_id ORDER BY master_key_id",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
    }
}
