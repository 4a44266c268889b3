//! `dossier replay`: the event log for auditors, streamed.
//!
//! - [`replay`] writes the log as JSON lines, one contract Event per line,
//!   exactly as stored (no upcasting: auditors see what was written, and can
//!   recompute the hash chain from it), in position order, filtered by tenant,
//!   customer, file and time.
//! - [`files_as_of`] rebuilds a customer's file list as it stood at a moment,
//!   from events alone (no read model), in the list's order (newest first), by
//!   the read model's own rules ([`crate::files::fold`]).
//!
//! Both read through [`LogReader`] in pages, so memory stays the same for any
//! log size (the customer filter remembers only that customer's file ids), and
//! both stop at the log's safe watermark as it was when they started: a replay
//! is a snapshot of the log, not a tail, and never misses a late commit below it.

use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use dossier_domain::FileEvent;
use dossier_domain::codec::{self, DecodeError};
use dossier_domain::personal::{ERASED_PLACEHOLDER, personal_fields};
use dossier_eventlog::db::Pool;
use dossier_eventlog::log::{LogError, LogFilter, LogReader, LoggedEvent};
use dossier_eventlog::personal::{self, Erased, FieldCipher, OpenTextsError};
use serde_json::Value;
use tokio_postgres::types::Type;

use crate::error::ProjectionError;
use crate::files::fold::Files;
use crate::files::{FILE_AGGREGATE_TYPE, FileView, FilesProjection};
use crate::projection::{RawEvent, decode_raw};

/// Events per page read from the log.
const PAGE: i64 = 1000;

/// Files whose histories [`files_as_of`] reads in one statement.
const HISTORIES: usize = 1000;

/// How long a replay waits at its start for the log's safe watermark to settle
/// (an append in flight holds it back for a moment).
const START_WAIT: Duration = Duration::from_secs(10);

/// Which events [`replay`] writes; the default is every event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayFilter {
    /// Only this tenant's events.
    pub tenant: Option<String>,
    /// Only events about this customer: events that name it, and every event of
    /// a file uploaded for it. Customer ids are chosen per tenant: combine with
    /// `tenant`.
    pub customer: Option<String>,
    /// Only events about this file: its own events and its downloads.
    pub file: Option<String>,
    /// Only events at or after this time.
    pub from: Option<DateTime<Utc>>,
    /// Only events at or before this time.
    pub to: Option<DateTime<Utc>>,
}

/// How far a replay has got, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayProgress {
    /// The position read up to.
    pub position: i64,
    /// The position the replay stops at.
    pub end: i64,
    /// Events read so far.
    pub read: u64,
    /// Events written (or applied) so far.
    pub written: u64,
}

/// What a replay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayReport {
    /// Events read from the log.
    pub read: u64,
    /// Events that matched the filter and were written.
    pub written: u64,
    /// The log position the replay covered up to.
    pub end: i64,
}

/// Why a replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Reading the log failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// Writing the output failed (a closed pipe, a full disk).
    #[error("writing the replay failed: {0}")]
    Io(#[from] std::io::Error),
    /// An event could not be written as JSON.
    #[error("an event could not be written as JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A file event does not decode, so the file list cannot be rebuilt past it.
    #[error("the event at position {position} cannot be decoded: {source}")]
    Undecodable {
        /// Its log position.
        position: i64,
        /// Why.
        #[source]
        source: Box<DecodeError>,
    },
    /// A file event breaks an assumption (an aggregate id that is not a UUID).
    #[error("the event at position {position} is malformed: {reason}")]
    Malformed {
        /// Its log position.
        position: i64,
        /// What is wrong.
        reason: String,
    },
    /// The keys that open personal fields could not be read.
    #[error("opening personal fields: {0}")]
    Keys(#[from] dossier_keys::KeyError),
}

/// Reads a time bound as the HTTP API does: RFC 3339, or a plain `YYYY-MM-DD`
/// date meaning the start of that day (UTC), or its end when `end_of_day`.
pub fn parse_time(raw: &str, end_of_day: bool) -> Result<DateTime<Utc>, String> {
    if let Ok(at) = DateTime::parse_from_rfc3339(raw) {
        return Ok(at.with_timezone(&Utc));
    }
    let time = if end_of_day {
        NaiveTime::from_hms_micro_opt(23, 59, 59, 999_999).unwrap_or(NaiveTime::MIN)
    } else {
        NaiveTime::MIN
    };
    NaiveDate::parse_from_str(raw, "%Y-%m-%d")
        .map(|day| day.and_time(time).and_utc())
        .map_err(|_| format!("{raw:?} is neither an RFC 3339 time nor a YYYY-MM-DD date"))
}

/// The payload as the log documents it (without a cqrs-es type tag).
fn payload(event: &LoggedEvent) -> Value {
    codec::unwrap_payload(&event.event_type, event.payload.clone())
}

fn text<'a>(payload: &'a Value, key: &str) -> Option<&'a str> {
    payload.get(key).and_then(Value::as_str)
}

/// The file an event is about: a file event's own id, or a `file_id` it names.
fn file_of(event: &LoggedEvent, payload: &Value) -> Option<String> {
    if event.aggregate_type == FILE_AGGREGATE_TYPE {
        Some(event.aggregate_id.clone())
    } else {
        text(payload, "file_id").map(str::to_owned)
    }
}

/// Decides event by event; remembers the files of the wanted customer (only
/// those), since most file events do not repeat their customer.
struct Matcher<'a> {
    filter: &'a ReplayFilter,
    customer_files: HashSet<String>,
}

impl<'a> Matcher<'a> {
    fn new(filter: &'a ReplayFilter) -> Self {
        Self {
            filter,
            customer_files: HashSet::new(),
        }
    }

    fn matches(&mut self, event: &LoggedEvent) -> bool {
        let payload = payload(event);
        let file = file_of(event, &payload);
        let mut customer_matches = true;
        if let Some(customer) = &self.filter.customer {
            let named = text(&payload, "customer_id") == Some(customer.as_str());
            if named
                && event.aggregate_type == FILE_AGGREGATE_TYPE
                && event.event_type == FileEvent::UPLOADED
            {
                // Remembered whatever the time filter says: a rename inside the
                // window belongs to an upload before it.
                self.customer_files.insert(event.aggregate_id.clone());
            }
            customer_matches = named
                || file
                    .as_ref()
                    .is_some_and(|f| self.customer_files.contains(f));
        }
        customer_matches
            && self
                .filter
                .file
                .as_ref()
                .is_none_or(|wanted| file.as_deref() == Some(wanted.as_str()))
            && self.filter.from.is_none_or(|from| event.at >= from)
            && self.filter.to.is_none_or(|to| event.at <= to)
    }
}

/// Reads the log (one tenant's, or all of it) page by page up to the safe
/// watermark at the start, handing every event to `each`.
async fn for_each_event(
    pool: &Pool,
    tenant: Option<&str>,
    opening: Option<&FieldCipher>,
    progress: &dyn Fn(ReplayProgress),
    mut each: impl FnMut(&LoggedEvent) -> Result<bool, ReplayError>,
) -> Result<ReplayReport, ReplayError> {
    let mut reader = LogReader::new(pool.clone()).with_max_wait(START_WAIT);
    let end = reader.safe_position().await?;
    let filter = LogFilter {
        tenant: tenant.map(str::to_owned),
        ..LogFilter::default()
    };
    let mut report = ReplayReport {
        read: 0,
        written: 0,
        end,
    };
    let mut after = 0;
    'pages: loop {
        let mut page = reader.read(after, PAGE, &filter).await?;
        let full = page.len() as i64 >= PAGE;
        if let Some(cipher) = opening {
            cipher.open(&mut page, Erased::Null).await?;
        }
        for event in &page {
            if event.position > end {
                break 'pages;
            }
            after = event.position;
            report.read += 1;
            if each(event)? {
                report.written += 1;
            }
        }
        progress(ReplayProgress {
            position: after,
            end,
            read: report.read,
            written: report.written,
        });
        // The reader's watermark is at least `end`: a short page means done.
        if !full {
            break;
        }
    }
    progress(ReplayProgress {
        position: end,
        end,
        read: report.read,
        written: report.written,
    });
    Ok(report)
}

/// Writes every event matching `filter` to `out` as one JSON line (the
/// contract's Event), in position order, up to the log's safe watermark at the
/// start. Flushes `out` at the end. Events are printed as stored (sealed
/// fields as `enc:v1:` strings, which is what the hash chain covers) unless
/// `decrypt` opens them: then a field whose key is destroyed is `null` and
/// named in the event's `erased`.
pub async fn replay(
    pool: &Pool,
    filter: &ReplayFilter,
    decrypt: Option<&FieldCipher>,
    out: &mut dyn Write,
    progress: &dyn Fn(ReplayProgress),
) -> Result<ReplayReport, ReplayError> {
    let mut matcher = Matcher::new(filter);
    let report = for_each_event(pool, filter.tenant.as_deref(), decrypt, progress, |event| {
        if !matcher.matches(event) {
            return Ok(false);
        }
        serde_json::to_writer(&mut *out, event)?;
        out.write_all(b"\n")?;
        Ok(true)
    })
    .await?;
    out.flush()?;
    Ok(report)
}

/// `customer`'s file list (of `tenant`) exactly as it stood at `at`, rebuilt
/// from the events recorded at or before `at` alone, newest first like
/// `GET /v1/customers/{customer_id}/files`.
///
/// The list is what the files projection would have held: the events are folded by
/// its rules ([`crate::files::fold`]), times cut as Postgres keeps them. Two reads:
///
/// 1. The tenant's log, page by page, for the files that may be the customer's:
///    those with an upload in the tenant naming the customer.
/// 2. Those files' whole histories, in position order, *every tenant's* events
///    included: an upload or a delete of the same id logged under another tenant
///    decides whether the file has a row at all (the first upload wins, a tombstone
///    keeps it out), exactly as in the read model. Folded, the rows of this tenant
///    and customer are the list.
///
/// Memory: the customer's file ids, and the histories of [`HISTORIES`] of them at
/// a time.
pub async fn files_as_of(
    pool: &Pool,
    cipher: Option<&FieldCipher>,
    tenant: &str,
    customer: &str,
    at: DateTime<Utc>,
    progress: &dyn Fn(ReplayProgress),
) -> Result<Vec<FileView>, ReplayError> {
    let mut candidates: BTreeSet<String> = BTreeSet::new();
    let report = for_each_event(pool, Some(tenant), None, progress, |event| {
        if event.at > at || event.aggregate_type != FILE_AGGREGATE_TYPE {
            return Ok(false);
        }
        if event.event_type == FileEvent::UPLOADED
            && text(&payload(event), "customer_id") == Some(customer)
        {
            candidates.insert(event.aggregate_id.clone());
            return Ok(true);
        }
        Ok(candidates.contains(&event.aggregate_id))
    })
    .await?;

    let candidates: Vec<String> = candidates.into_iter().collect();
    let mut list = Vec::new();
    for ids in candidates.chunks(HISTORIES) {
        let files = fold_histories(pool, cipher, ids, report.end, at).await?;
        list.extend(
            files
                .into_rows()
                .filter(|(_, row)| row.tenant == tenant && row.customer_id.as_str() == customer)
                .map(|(id, row)| row.into_view(id)),
        );
    }
    list.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
    Ok(list)
}

/// A file of [`files_as_of`] as `dossier replay --as-of` prints it: the file
/// resource, with each personal field whose key was destroyed since (a file
/// deleted later) as `null` and named under `"erased"`, as replayed events
/// show them (CONTRACT.md, "Data protection"). Such a field reads as
/// [`ERASED_PLACEHOLDER`], which no real value of these fields is.
pub fn as_of_line(file: &FileView) -> Value {
    let mut line = serde_json::to_value(file).unwrap_or(Value::Null);
    let Some(object) = line.as_object_mut() else {
        return line;
    };
    let personal = personal_fields(FILE_AGGREGATE_TYPE, FileEvent::UPLOADED)
        .map(|personal| personal.fields)
        .unwrap_or_default();
    let mut erased = Vec::new();
    for &field in personal {
        if let Some(value) = object.get_mut(field)
            && value.as_str() == Some(ERASED_PLACEHOLDER)
        {
            *value = Value::Null;
            erased.push(Value::from(field));
        }
    }
    if !erased.is_empty() {
        object.insert("erased".to_owned(), Value::Array(erased));
    }
    line
}

/// The files `ids` as the read model holds them after every event of theirs, of
/// any tenant, up to position `end` and recorded at or before `at`.
async fn fold_histories(
    pool: &Pool,
    cipher: Option<&FieldCipher>,
    ids: &[String],
    end: i64,
    at: DateTime<Utc>,
) -> Result<Files<String>, ReplayError> {
    // `events_aggregate_sequence_key` finds them; the payload as JSON text, for the
    // decoder of the bulk build.
    const SQL: &str = "\
        SELECT position, tenant, aggregate_id, event_type, event_version, payload::text, \
               recorded_at \
        FROM events \
        WHERE aggregate_type = $1 AND aggregate_id = ANY($2) AND position <= $3 \
        ORDER BY position";
    let client = pool.get().await.map_err(LogError::from)?;
    let rows = client
        .query_typed(
            SQL,
            &[
                (&FILE_AGGREGATE_TYPE, Type::TEXT),
                (&ids, Type::TEXT_ARRAY),
                (&end, Type::INT8),
            ],
        )
        .await
        .map_err(LogError::from)?;
    let mut files = Files::new();
    // The histories, their personal fields opened with one look-up of their
    // keys (a field whose key is gone reads as the placeholder; the delete
    // that destroyed it removes the file from the list).
    let mut kept = Vec::with_capacity(rows.len());
    let mut payloads = Vec::with_capacity(rows.len());
    for row in &rows {
        let recorded_at: DateTime<Utc> = row.try_get(6).map_err(LogError::from)?;
        // The same comparison as the first read's.
        if recorded_at > at {
            continue;
        }
        payloads.push(row.try_get::<_, String>(5).map_err(LogError::from)?);
        kept.push(row);
    }
    personal::open_texts(cipher, &mut payloads)
        .await
        .map_err(|error| match error {
            OpenTextsError::Keys(error) => ReplayError::Keys(error),
            OpenTextsError::SealedWithoutKeys { index } => ReplayError::Malformed {
                position: kept[index].try_get(0).unwrap_or_default(),
                reason: "sealed personal fields and no keys to open them".to_owned(),
            },
        })?;
    for (row, payload) in kept.into_iter().zip(&payloads) {
        let event = RawEvent {
            position: row.try_get(0).map_err(LogError::from)?,
            tenant: row.try_get(1).map_err(LogError::from)?,
            aggregate_type: FILE_AGGREGATE_TYPE,
            aggregate_id: row.try_get(2).map_err(LogError::from)?,
            event_type: row.try_get(3).map_err(LogError::from)?,
            event_version: row.try_get(4).map_err(LogError::from)?,
            payload,
        };
        let position = event.position;
        let (id, decoded) = decode_raw::<FileEvent>(FilesProjection::NAME, &event)
            .map_err(|error| refused(position, error))?;
        files
            .fold(id, event.tenant.to_owned(), position, decoded)
            .map_err(|error| ReplayError::Malformed {
                position,
                reason: error.to_string(),
            })?;
    }
    Ok(files)
}

/// A decoder's refusal as a replay's.
fn refused(position: i64, error: ProjectionError) -> ReplayError {
    match error {
        ProjectionError::Undecodable {
            position, source, ..
        } => ReplayError::Undecodable { position, source },
        ProjectionError::Malformed {
            position, reason, ..
        } => ReplayError::Malformed { position, reason },
        other => ReplayError::Malformed {
            position,
            reason: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use uuid::Uuid;

    fn event(
        aggregate_type: &str,
        aggregate_id: &str,
        event_type: &str,
        payload: Value,
    ) -> LoggedEvent {
        LoggedEvent {
            id: Uuid::now_v7(),
            position: 1,
            tenant: "acme".into(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            sequence: 1,
            event_type: event_type.into(),
            event_version: "1".into(),
            at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            actor: "alice".into(),
            payload,
            metadata: Value::Null,
            erased: Vec::new(),
        }
    }

    #[test]
    fn times_read_like_the_api_reads_them() {
        assert_eq!(
            parse_time("2026-11-22", false).unwrap().to_rfc3339(),
            "2026-11-22T00:00:00+00:00"
        );
        assert_eq!(
            parse_time("2026-11-22", true).unwrap().to_rfc3339(),
            "2026-11-22T23:59:59.999999+00:00"
        );
        assert_eq!(
            parse_time("2026-11-22T10:15:00+01:00", true)
                .unwrap()
                .to_rfc3339(),
            "2026-11-22T09:15:00+00:00"
        );
        assert!(parse_time("22.11.2026", false).is_err());
    }

    #[test]
    fn a_customer_filter_follows_its_files_through_events_that_do_not_name_it() {
        let filter = ReplayFilter {
            customer: Some("cust-1".into()),
            ..ReplayFilter::default()
        };
        let mut matcher = Matcher::new(&filter);
        let upload = event(
            "file",
            "f1",
            "FileUploaded",
            json!({"customer_id": "cust-1"}),
        );
        let other = event(
            "file",
            "f2",
            "FileUploaded",
            json!({"customer_id": "cust-2"}),
        );
        let rename = event(
            "file",
            "f1",
            "FileRenamed",
            json!({"from": "a", "name": "b"}),
        );
        let other_rename = event(
            "file",
            "f2",
            "FileRenamed",
            json!({"from": "a", "name": "b"}),
        );
        let download = event(
            "download",
            "d1",
            "FileDownloaded",
            json!({"file_id": "f1", "customer_id": "cust-1"}),
        );
        assert!(matcher.matches(&upload));
        assert!(!matcher.matches(&other));
        assert!(matcher.matches(&rename));
        assert!(!matcher.matches(&other_rename));
        assert!(matcher.matches(&download));
    }

    #[test]
    fn a_file_filter_takes_the_files_events_and_its_downloads() {
        let filter = ReplayFilter {
            file: Some("f1".into()),
            from: Some(DateTime::from_timestamp(1_600_000_000, 0).unwrap()),
            to: Some(DateTime::from_timestamp(1_800_000_000, 0).unwrap()),
            ..ReplayFilter::default()
        };
        let mut matcher = Matcher::new(&filter);
        assert!(matcher.matches(&event("file", "f1", "FileRenamed", json!({}))));
        assert!(matcher.matches(&event(
            "download",
            "d",
            "FileDownloaded",
            json!({"file_id": "f1"})
        )));
        assert!(!matcher.matches(&event("file", "f2", "FileRenamed", json!({}))));
        let late = ReplayFilter {
            from: Some(DateTime::from_timestamp(1_800_000_000, 0).unwrap()),
            ..ReplayFilter::default()
        };
        assert!(!Matcher::new(&late).matches(&event("file", "f1", "FileRenamed", json!({}))));
    }
}
