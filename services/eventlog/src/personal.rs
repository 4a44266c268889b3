//! Personal fields in the log: sealed as they are appended, opened as they are
//! read, shredded when their key is destroyed (CONTRACT.md, "Data protection";
//! ADR 0014).
//!
//! Which fields are personal and whose key seals them is the domain's rule
//! ([`dossier_domain::personal`]); this module applies it with the
//! [`KeyStore`]. The log stores what [`FieldCipher::seal`] made of an event,
//! and the hash chain covers exactly that, so destroying a key later changes
//! no stored byte and the chain still verifies.
//!
//! Readers choose what an erased field becomes ([`Erased`]): `null`, listed
//! in the event's `erased` (the events API, `dossier replay`, the audit
//! trail), or the domain's placeholder where a value is required (an
//! aggregate or a read model being rebuilt, which the erasure's own events
//! then remove).

use std::collections::HashMap;
use std::sync::Arc;

use dossier_domain::personal::{self, ERASED_PLACEHOLDER, KeyOwner};
use dossier_keys::{DataKey, KeyError, KeyLookup, KeyStore, Owner, SealedField};
use serde_json::Value;
use uuid::Uuid;

use crate::db::Pool;
use crate::log::LoggedEvent;

/// What a field whose key is destroyed reads as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Erased {
    /// `null`, and the field's name in [`LoggedEvent::erased`]: for people
    /// and auditors.
    Null,
    /// [`ERASED_PLACEHOLDER`]: for code that needs a value of the field's
    /// type (aggregates, read models).
    Placeholder,
}

/// Why a field could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum PersonalError {
    /// The key table failed.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// The log could not be asked for a task's customer.
    #[error("finding the customer of task {task}: {detail}")]
    TaskCustomer {
        /// The task's aggregate id.
        task: String,
        /// What failed.
        detail: String,
    },
    /// An event that must be sealed does not say whose it is (a file id that
    /// is not a UUID, a task with no customer).
    #[error("{aggregate_type} event {event_type} of {aggregate_id} has no key owner: {reason}")]
    NoOwner {
        /// The aggregate's type.
        aggregate_type: String,
        /// The aggregate instance.
        aggregate_id: String,
        /// The event's type.
        event_type: String,
        /// What is missing.
        reason: &'static str,
    },
}

/// One event about to be appended, as [`FieldCipher::seal`] needs it.
#[derive(Debug)]
pub struct NewPayload<'a> {
    /// The tenant.
    pub tenant: &'a str,
    /// The aggregate's type.
    pub aggregate_type: &'a str,
    /// The aggregate instance.
    pub aggregate_id: &'a str,
    /// The event's type.
    pub event_type: &'a str,
    /// The payload without cqrs-es's tag, sealed in place.
    pub payload: &'a mut Value,
}

/// A key owner as a value (the `Owner` of the key table borrows).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OwnerId {
    /// A file.
    File(Uuid),
    /// A customer of a tenant.
    Customer(String),
}

impl OwnerId {
    /// The key table's view of it.
    pub fn as_owner(&self) -> Owner<'_> {
        match self {
            Self::File(id) => Owner::File(*id),
            Self::Customer(id) => Owner::Customer(id),
        }
    }

    /// `(owner_kind, owner_id)` as the key table spells them.
    pub fn columns(&self) -> (&'static str, String) {
        match self {
            Self::File(id) => ("file", id.to_string()),
            Self::Customer(id) => ("customer", id.clone()),
        }
    }
}

/// Most keys a [`FieldCipher`] keeps unwrapped; past it the cache starts over.
const CACHED_KEYS: usize = 65_536;

/// Keys this process has unwrapped, for the code paths that only need a value
/// ([`Erased::Placeholder`]: aggregates, read models, sealing): a command
/// or a batch of the runner then costs no look-up for a file it saw before.
/// A key leaves the cache when this process destroys it, and when the runner
/// applies an event that destroyed it elsewhere ([`FieldCipher::forget`]). A
/// stale entry in another process can at most seal or open a field for a
/// file or customer whose delete or erasure the same process is about to
/// apply; readers for people ([`Erased::Null`]) never use the cache, so an
/// erased field reads as erased everywhere from the commit on.
#[derive(Default)]
struct KeyCache {
    by_id: HashMap<Uuid, DataKey>,
    by_owner: HashMap<(String, OwnerId), DataKey>,
}

impl KeyCache {
    fn insert(&mut self, tenant: &str, owner: Option<OwnerId>, key: &DataKey) {
        if self.by_id.len() >= CACHED_KEYS {
            self.by_id.clear();
            self.by_owner.clear();
        }
        self.by_id.insert(key.id(), key.clone());
        if let Some(owner) = owner {
            self.by_owner
                .insert((tenant.to_owned(), owner), key.clone());
        }
    }

    fn forget(&mut self, tenant: &str, owner: &OwnerId) {
        if let Some(key) = self.by_owner.remove(&(tenant.to_owned(), owner.clone())) {
            self.by_id.remove(&key.id());
        }
        // A key opened by id only is not known by owner: drop the lot for a
        // customer erasure, which is rare, rather than keep one of its keys.
        if matches!(owner, OwnerId::Customer(_)) {
            self.by_id.clear();
        }
    }
}

/// Seals and opens personal fields with the deployment's data keys.
#[derive(Clone)]
pub struct FieldCipher {
    cache: Arc<std::sync::Mutex<KeyCache>>,
    keys: KeyStore,
    /// The log's own database, to find a task's customer.
    log: Pool,
    /// Whether the key table is in the log's database, so that an append can
    /// destroy keys in its own transaction.
    keys_beside_log: bool,
}

impl std::fmt::Debug for FieldCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FieldCipher")
            .field("keys_beside_log", &self.keys_beside_log)
            .finish_non_exhaustive()
    }
}

impl FieldCipher {
    /// A cipher over `keys`, for the log in `log`. `keys_beside_log` says the
    /// key table is in the log's database (the default deployment).
    pub fn new(keys: KeyStore, log: Pool, keys_beside_log: bool) -> Arc<Self> {
        Arc::new(Self {
            cache: Arc::default(),
            keys,
            log,
            keys_beside_log,
        })
    }

    /// The key table.
    pub fn keys(&self) -> &KeyStore {
        &self.keys
    }

    /// Whether an append can destroy keys in its own transaction.
    pub fn keys_beside_log(&self) -> bool {
        self.keys_beside_log
    }

    /// Seals, in place, the personal fields of events about to be appended,
    /// each under its owner's live key (created on first use: a file's with
    /// its upload, a customer's with its first task). A field that is already
    /// sealed, or not a string, is left as it is.
    pub async fn seal(&self, events: &mut [NewPayload<'_>]) -> Result<(), PersonalError> {
        let mut keys: HashMap<(String, OwnerId), DataKey> = HashMap::new();
        // A task created in this same append names its customer itself.
        let mut task_customers: HashMap<String, String> = HashMap::new();
        for event in events.iter() {
            if let Some(customer) = event.payload.get("customer_id").and_then(Value::as_str)
                && event.aggregate_type == "task"
            {
                task_customers.insert(event.aggregate_id.to_owned(), customer.to_owned());
            }
        }
        for event in events.iter_mut() {
            let Some(rule) = personal::personal_fields(event.aggregate_type, event.event_type)
            else {
                continue;
            };
            let owner = match self
                .owner_of(event, rule.owner, &mut task_customers)
                .await?
            {
                Some(owner) => owner,
                None => continue,
            };
            let cache_key = (event.tenant.to_owned(), owner.clone());
            let key = match keys.get(&cache_key) {
                Some(key) => key.clone(),
                None => {
                    let Some(key) = self.key_for(event, &owner).await? else {
                        continue;
                    };
                    keys.insert(cache_key, key.clone());
                    key
                }
            };
            let Value::Object(map) = &mut *event.payload else {
                continue;
            };
            for field in rule.fields {
                if let Some(Value::String(text)) = map.get_mut(*field)
                    && !dossier_keys::is_sealed(text)
                {
                    *text = key.seal_field(text);
                }
            }
        }
        Ok(())
    }

    /// The key that seals `event`'s fields: the owner's live key, created if
    /// need be: a file's comes with its upload (the blob store made it for
    /// the bytes), a customer's with its first task. A later event of a file
    /// stored before encryption finds no key and stays clear until `dossier
    /// blobs encrypt` gives the file one: a key of a file says its blob is
    /// sealed, and a plain blob under a keyed file is refused as tampered.
    async fn key_for(
        &self,
        event: &NewPayload<'_>,
        owner: &OwnerId,
    ) -> Result<Option<DataKey>, PersonalError> {
        let cached = self
            .cache()
            .by_owner
            .get(&(event.tenant.to_owned(), owner.clone()))
            .cloned();
        if let Some(key) = cached {
            return Ok(Some(key));
        }
        let creates = !matches!(owner, OwnerId::File(_)) || event.event_type == "FileUploaded";
        let key = if creates {
            Some(
                self.keys
                    .live_or_create(event.tenant, owner.as_owner())
                    .await?,
            )
        } else {
            self.keys.live(event.tenant, owner.as_owner()).await?
        };
        if let Some(key) = &key {
            self.cache().insert(event.tenant, Some(owner.clone()), key);
        }
        if key.is_none() {
            tracing::debug!(
                aggregate_id = event.aggregate_id,
                event_type = event.event_type,
                "a file stored before encryption: its event stays clear"
            );
        }
        Ok(key)
    }

    async fn owner_of(
        &self,
        event: &NewPayload<'_>,
        owner: KeyOwner,
        task_customers: &mut HashMap<String, String>,
    ) -> Result<Option<OwnerId>, PersonalError> {
        let no_owner = |reason| PersonalError::NoOwner {
            aggregate_type: event.aggregate_type.to_owned(),
            aggregate_id: event.aggregate_id.to_owned(),
            event_type: event.event_type.to_owned(),
            reason,
        };
        match owner {
            KeyOwner::File => Uuid::try_parse(event.aggregate_id)
                .map(|id| Some(OwnerId::File(id)))
                .map_err(|_| no_owner("a file id is not a UUID")),
            KeyOwner::Customer => {
                if let Some(customer) = event.payload.get("customer_id").and_then(Value::as_str) {
                    return Ok(Some(OwnerId::Customer(customer.to_owned())));
                }
                if let Some(customer) = task_customers.get(event.aggregate_id) {
                    return Ok(Some(OwnerId::Customer(customer.clone())));
                }
                let customer = self.task_customer(event.aggregate_id).await?;
                let customer = customer.ok_or_else(|| no_owner("no TaskCreated in the log"))?;
                task_customers.insert(event.aggregate_id.to_owned(), customer.clone());
                Ok(Some(OwnerId::Customer(customer)))
            }
        }
    }

    async fn task_customer(&self, task: &str) -> Result<Option<String>, PersonalError> {
        let failed = |detail: String| PersonalError::TaskCustomer {
            task: task.to_owned(),
            detail,
        };
        let client = self.log.get().await.map_err(|e| failed(e.to_string()))?;
        let row = client
            .query_opt(
                "SELECT payload->>'customer_id' FROM events \
                 WHERE aggregate_type = 'task' AND aggregate_id = $1 AND sequence = 1",
                &[&task],
            )
            .await
            .map_err(|e| failed(crate::db::pg_detail(&e)))?;
        Ok(row.and_then(|row| row.get(0)))
    }

    /// The owners whose keys `event` destroys when appended (a delete, an
    /// erasure).
    pub fn destroyed_by(
        aggregate_type: &str,
        aggregate_id: &str,
        event_type: &str,
        payload: &Value,
    ) -> Option<OwnerId> {
        match personal::destroys_key(aggregate_type, event_type)? {
            KeyOwner::File => Uuid::try_parse(aggregate_id).ok().map(OwnerId::File),
            KeyOwner::Customer => payload
                .get("customer_id")
                .and_then(Value::as_str)
                .map(|customer| OwnerId::Customer(customer.to_owned())),
        }
    }

    /// Opens, in place, every sealed personal field of `events` (payloads
    /// without cqrs-es's tag), with one look-up of all the keys they name. A
    /// field under a destroyed key (or one this table never held, or one that
    /// fails to open) becomes what `erased` says and is listed in the event's
    /// [`LoggedEvent::erased`]. Fields written before encryption are plain
    /// and stay as they are.
    pub async fn open(&self, events: &mut [LoggedEvent], erased: Erased) -> Result<(), KeyError> {
        let mut ids: Vec<Uuid> = Vec::new();
        for event in events.iter() {
            for_each_sealed(event, |field| ids.push(field.key_id));
        }
        if ids.is_empty() {
            return Ok(());
        }
        let found = self.keys_of(ids, erased).await?;
        for event in events.iter_mut() {
            open_event(event, &found, erased);
        }
        Ok(())
    }

    /// What the key table says of `ids`; from the cache first for code that
    /// only needs a value ([`Erased::Placeholder`]), never for people.
    async fn keys_of(
        &self,
        mut ids: Vec<Uuid>,
        erased: Erased,
    ) -> Result<HashMap<Uuid, KeyLookup>, KeyError> {
        ids.sort_unstable();
        ids.dedup();
        let mut found: HashMap<Uuid, KeyLookup> = HashMap::new();
        if erased == Erased::Placeholder {
            let cache = self.cache();
            ids.retain(|id| match cache.by_id.get(id) {
                Some(key) => {
                    found.insert(*id, KeyLookup::Live(key.clone()));
                    false
                }
                None => true,
            });
        }
        if !ids.is_empty() {
            let looked_up = self.keys.lookup(&ids).await?;
            if erased == Erased::Placeholder {
                let mut cache = self.cache();
                for lookup in looked_up.values() {
                    if let KeyLookup::Live(key) = lookup {
                        cache.insert("", None, key);
                    }
                }
            }
            found.extend(looked_up);
        }
        Ok(found)
    }

    /// Opens, in place, every sealed string of the JSON texts of a bulk read
    /// (payloads as the log stores them), with one look-up of all the keys
    /// they name, as [`Self::open`] with [`Erased::Placeholder`] does for
    /// events, but on the text: a sealed string is base64 between quotes, so
    /// it is replaced by its plain text, JSON-quoted, without parsing the rest.
    /// Texts without a sealed string are not touched.
    pub async fn open_texts(&self, texts: &mut [String]) -> Result<(), KeyError> {
        let mut ids = Vec::new();
        for text in texts.iter() {
            for (start, end) in sealed_spans(text) {
                if let Ok(Some(field)) = SealedField::parse(&text[start + 1..end - 1]) {
                    ids.push(field.key_id);
                }
            }
        }
        if ids.is_empty() {
            return Ok(());
        }
        let found = self.keys_of(ids, Erased::Placeholder).await?;
        for text in texts.iter_mut() {
            let spans: Vec<(usize, usize)> = sealed_spans(text).collect();
            if spans.is_empty() {
                continue;
            }
            let mut opened = String::with_capacity(text.len());
            let mut at = 0;
            for (start, end) in spans {
                opened.push_str(&text[at..start]);
                let plain = SealedField::parse(&text[start + 1..end - 1])
                    .ok()
                    .flatten()
                    .and_then(|field| match found.get(&field.key_id) {
                        Some(KeyLookup::Live(key)) => key.open_field(&field).ok(),
                        _ => None,
                    })
                    .unwrap_or_else(|| ERASED_PLACEHOLDER.to_owned());
                opened.push_str(&Value::String(plain).to_string());
                at = end;
            }
            opened.push_str(&text[at..]);
            *text = opened;
        }
        Ok(())
    }

    /// Drops the cached key of `owner` of `tenant`: it was destroyed (by this
    /// process's append, or by an event the runner is applying).
    pub fn forget(&self, tenant: &str, owner: &OwnerId) {
        self.cache().forget(tenant, owner);
    }

    /// [`Self::forget`] for every key `events` destroyed.
    pub fn forget_destroyed_by(&self, events: &[LoggedEvent]) {
        for event in events {
            if let Some(owner) = Self::destroyed_by(
                &event.aggregate_type,
                &event.aggregate_id,
                &event.event_type,
                &event.payload,
            ) {
                self.forget(&event.tenant, &owner);
            }
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, KeyCache> {
        // A panic while the lock was held cannot leave the maps inconsistent
        // (each change is one insert or remove): keep using them.
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// [`Self::open`] for one payload of an aggregate being loaded, which
    /// needs a value in every field ([`Erased::Placeholder`]).
    pub async fn open_one(&self, event: &mut LoggedEvent) -> Result<(), KeyError> {
        self.open(std::slice::from_mut(event), Erased::Placeholder)
            .await
    }
}

/// Why [`open_texts`] could not open payload texts.
#[derive(Debug, thiserror::Error)]
pub enum OpenTextsError {
    /// The key table failed.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// A text holds a sealed field and no keys were given to open it.
    #[error("payload {index} has sealed personal fields and no keys were given to open them")]
    SealedWithoutKeys {
        /// Its index among the texts.
        index: usize,
    },
}

/// Opens the payload texts of a bulk read with `cipher`
/// ([`FieldCipher::open_texts`]); without one, refuses the first text that
/// holds a sealed field, so that no reader takes ciphertext for a name.
pub async fn open_texts(
    cipher: Option<&FieldCipher>,
    texts: &mut [String],
) -> Result<(), OpenTextsError> {
    match cipher {
        Some(cipher) => Ok(cipher.open_texts(texts).await?),
        None => match texts.iter().position(|text| may_hold_sealed_fields(text)) {
            Some(index) => Err(OpenTextsError::SealedWithoutKeys { index }),
            None => Ok(()),
        },
    }
}

/// The byte ranges, quotes included, of the sealed strings in a JSON text.
/// A sealed string holds no character JSON escapes (`enc:v1:`, a UUID,
/// base64), so it ends at the next quote.
fn sealed_spans(text: &str) -> impl Iterator<Item = (usize, usize)> + '_ {
    const OPEN: &str = "\"enc:v1:";
    let mut from = 0;
    std::iter::from_fn(move || {
        let start = from + text.get(from..)?.find(OPEN)?;
        let body = start + OPEN.len();
        let end = body + text[body..].find('"')? + 1;
        from = end;
        Some((start, end))
    })
}

/// Whether `event` has a personal field that is sealed (to refuse it where no
/// keys are at hand, instead of taking ciphertext for a name).
pub fn has_sealed_fields(event: &LoggedEvent) -> bool {
    let mut found = false;
    for_each_sealed(event, |_| found = true);
    found
}

/// Whether a payload's JSON text may hold a sealed field: a cheap test that
/// lets the plain events of a bulk read skip parsing.
pub fn may_hold_sealed_fields(payload: &str) -> bool {
    payload.contains("\"enc:v1:")
}

fn for_each_sealed(event: &LoggedEvent, mut visit: impl FnMut(SealedField<'_>)) {
    let Some(rule) = personal::personal_fields(&event.aggregate_type, &event.event_type) else {
        return;
    };
    for field in rule.fields {
        if let Some(Value::String(text)) = event.payload.get(*field)
            && let Ok(Some(sealed)) = SealedField::parse(text)
        {
            visit(sealed);
        }
    }
}

fn open_event(event: &mut LoggedEvent, keys: &HashMap<Uuid, KeyLookup>, erased: Erased) {
    let Some(rule) = personal::personal_fields(&event.aggregate_type, &event.event_type) else {
        return;
    };
    let position = event.position;
    let Value::Object(map) = &mut event.payload else {
        return;
    };
    for field in rule.fields {
        let Some(Value::String(text)) = map.get(*field) else {
            continue;
        };
        if !dossier_keys::is_sealed(text) {
            continue;
        }
        let opened = match SealedField::parse(text) {
            Ok(Some(sealed)) => match keys.get(&sealed.key_id) {
                Some(KeyLookup::Live(key)) => key.open_field(&sealed).map_err(|err| {
                    tracing::warn!(position, field, %err, "a sealed field does not open");
                }),
                Some(KeyLookup::Destroyed) => Err(()),
                Some(KeyLookup::Unknown) | None => {
                    tracing::warn!(position, field, key_id = %sealed.key_id, "a field is sealed under a key this deployment never held");
                    Err(())
                }
            },
            _ => {
                tracing::warn!(position, field, "a sealed field is malformed");
                Err(())
            }
        };
        let value = match (opened, erased) {
            (Ok(text), _) => Value::String(text),
            (Err(()), Erased::Null) => {
                event.erased.push((*field).to_owned());
                Value::Null
            }
            (Err(()), Erased::Placeholder) => Value::String(ERASED_PLACEHOLDER.to_owned()),
        };
        map.insert((*field).to_owned(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_spans_are_the_quoted_enc_strings_and_nothing_else() {
        let text = r#"{"name":"enc:v1:0193-x:QUJD","size":3,"note":"enc:v1 is not it","from":"enc:v1:0193-y:REVG"}"#;
        let spans: Vec<&str> = sealed_spans(text).map(|(s, e)| &text[s..e]).collect();
        assert_eq!(
            spans,
            [r#""enc:v1:0193-x:QUJD""#, r#""enc:v1:0193-y:REVG""#]
        );
        assert_eq!(sealed_spans(r#"{"name":"plain"}"#).count(), 0);
        // A cut text ends the spans instead of panicking.
        assert_eq!(sealed_spans(r#"{"name":"enc:v1:abc"#).count(), 0);
    }
}
