//! The customers projection against a real Postgres: random histories of file,
//! download, task and erasure events (two tenants, cross-tenant events, times
//! out of order, replays) through the SQL projection, held to a plain model of
//! what the module documents; and a log written for real, followed by the runner,
//! rebuilt and replayed to the same rows, listed page by page.

mod common;

use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use common::{Row, Upload, append, at, catch_up_to, customer, payload, tenant};
use dossier_domain::{
    Actor, BlobKey, CustomerEvent, CustomerIdPrefix, DownloadChannel, DownloadEvent, FileEvent,
    FileId, MessageText, TaskEvent, TaskTitle, Visibility, codec,
};
use dossier_eventlog::db::Pool;
use dossier_eventlog::log::LoggedEvent;
use dossier_projections::cursor::ActivityCursor;
use dossier_projections::customers::{self, CustomerFilter, CustomerView};
use dossier_projections::{
    ApplyTx, CustomersProjection, Projection, Runner, RunnerConfig, rebuild,
};
use dossier_test_support::db::fresh_database;
use dossier_test_support::property;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use serde_json::Value;
use uuid::Uuid;

const TENANTS: [&str; 2] = ["acme", "globex"];
const CUSTOMERS: [&str; 3] = ["cust-1", "cust-2", "a_b"];
/// Few files and tasks per history, so that events meet the same one often.
const FILES: usize = 4;
const TASKS: usize = 2;
const SEED: u64 = 0xc057_0e25;

#[derive(Debug, Clone)]
enum Change {
    Upload { customer: usize },
    Rename,
    Visibility,
    Viewed,
    Signed,
    Deleted,
    Purged,
    Downloaded,
    TaskCreated { customer: usize },
    Message,
    Erased { customer: usize },
}

#[derive(Debug, Clone)]
enum Step {
    /// An event of file or task `target` (by the change's kind), logged under
    /// the other tenant when `cross`, recorded at minute `minute`.
    Event {
        target: usize,
        cross: bool,
        minute: i64,
        change: Change,
    },
    /// An earlier event applied again.
    Replay { back: usize },
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        4 => (0..CUSTOMERS.len()).prop_map(|customer| Change::Upload { customer }),
        1 => Just(Change::Rename),
        1 => Just(Change::Visibility),
        1 => Just(Change::Viewed),
        1 => Just(Change::Signed),
        2 => Just(Change::Deleted),
        1 => Just(Change::Purged),
        1 => Just(Change::Downloaded),
        2 => (0..CUSTOMERS.len()).prop_map(|customer| Change::TaskCreated { customer }),
        2 => Just(Change::Message),
        1 => (0..CUSTOMERS.len()).prop_map(|customer| Change::Erased { customer }),
    ]
}

/// Up to 40 steps; times jump back and forth (a log's `at` need not follow its
/// positions), some events are logged under the other tenant, some replayed.
fn history() -> impl Strategy<Value = Vec<Step>> {
    let event = (0..FILES, prop::bool::weighted(0.15), 0i64..30, change()).prop_map(
        |(target, cross, minute, change)| Step::Event {
            target,
            cross,
            minute,
            change,
        },
    );
    let step = prop_oneof![
        6 => event,
        1 => (0usize..40).prop_map(|back| Step::Replay { back }),
    ];
    prop::collection::vec(step, 1..=40)
}

fn file_id(target: usize) -> Uuid {
    Uuid::from_u128(0xf11e_0000 + target as u128)
}

fn task_id(target: usize) -> Uuid {
    Uuid::from_u128(0x7a5c_0000 + (target % TASKS) as u128)
}

/// The tenant a target's events are logged under (files and tasks alternate).
fn tenant_of(target: usize, cross: bool) -> &'static str {
    TENANTS[(target % 2) ^ usize::from(cross)]
}

/// Where and when an event of a history is logged.
#[derive(Clone, Copy)]
struct Slot<'a> {
    position: i64,
    tenant: &'a str,
    at: DateTime<Utc>,
}

fn logged(
    slot: Slot<'_>,
    aggregate_type: &str,
    id: Uuid,
    event_type: &str,
    version: &str,
    payload: Value,
) -> LoggedEvent {
    let Slot {
        position,
        tenant,
        at,
    } = slot;
    LoggedEvent {
        id: Uuid::now_v7(),
        position,
        tenant: tenant.to_owned(),
        aggregate_type: aggregate_type.to_owned(),
        aggregate_id: id.to_string(),
        sequence: position,
        event_type: event_type.to_owned(),
        event_version: version.to_owned(),
        at,
        actor: "tester".to_owned(),
        payload,
        metadata: Value::Null,
        erased: Vec::new(),
    }
}

fn tagless(kind: &str, event: &impl serde::Serialize) -> Value {
    codec::unwrap_payload(kind, serde_json::to_value(event).unwrap())
}

/// The log rows of a history, as the runner would hand them to `apply`. A
/// replay repeats an event since the last erasure only: an erasure removes the
/// rows that make an older event's second application change nothing (the
/// module header says why the checkpoint covers that).
fn logged_events(history: &[Step]) -> Vec<LoggedEvent> {
    let mut events: Vec<LoggedEvent> = Vec::new();
    let mut since_erasure = 0;
    let mut position = 0;
    for step in history {
        let (target, cross, minute, change) = match step {
            Step::Replay { back } => {
                let replayable = events.len() - since_erasure;
                if replayable > 0 {
                    let earlier = events[events.len() - 1 - back % replayable].clone();
                    events.push(earlier);
                }
                continue;
            }
            Step::Event {
                target,
                cross,
                minute,
                change,
            } => (*target, *cross, *minute, change),
        };
        position += 1;
        let tenant_name = tenant_of(target, cross);
        let when = at(minute);
        let slot = Slot {
            position,
            tenant: tenant_name,
            at: when,
        };
        let file = |event: FileEvent| {
            logged(
                slot,
                "file",
                file_id(target),
                common::event_type(&event),
                common::event_version(&event),
                payload(&event),
            )
        };
        let task = |event: TaskEvent| {
            let kind = match &event {
                TaskEvent::TaskCreated { .. } => TaskEvent::CREATED,
                TaskEvent::TaskMessagePosted { .. } => TaskEvent::MESSAGE_POSTED,
            };
            logged(
                slot,
                "task",
                task_id(target),
                kind,
                "1",
                tagless(kind, &event),
            )
        };
        let gone = || BlobKey::from_recorded("gone");
        events.push(match change {
            Change::Upload { customer: c } => {
                let mut upload = Upload::new("Invoice", when);
                upload.tenant = tenant_name;
                upload.customer = CUSTOMERS[*c];
                file(upload.event(FileId(file_id(target))))
            }
            Change::Rename => file(FileEvent::FileRenamed {
                from: dossier_domain::DisplayName::parse("a").unwrap(),
                name: dossier_domain::DisplayName::parse("b").unwrap(),
            }),
            Change::Visibility => file(FileEvent::FileVisibilityChanged {
                from: Visibility::Internal,
                visibility: Visibility::Portal,
            }),
            Change::Viewed => file(FileEvent::FileViewed {
                viewer: customer(CUSTOMERS[0]),
                viewed_at: when,
            }),
            Change::Signed => file(FileEvent::FileSigned {
                signed_at: at(-100_000),
            }),
            Change::Deleted => file(FileEvent::FileDeleted {
                customer_id: customer(CUSTOMERS[0]),
                blob_key: gone(),
                deleted_at: when,
            }),
            Change::Purged => file(FileEvent::BlobPurged { blob_key: gone() }),
            Change::Downloaded => {
                let event = DownloadEvent::FileDownloaded {
                    tenant: tenant(tenant_name),
                    file_id: FileId(file_id(target)),
                    customer_id: customer(CUSTOMERS[0]),
                    channel: DownloadChannel::Staff,
                    bundle_id: None,
                    at: when,
                };
                logged(
                    slot,
                    "download",
                    Uuid::now_v7(),
                    DownloadEvent::FILE_DOWNLOADED,
                    "1",
                    tagless(DownloadEvent::FILE_DOWNLOADED, &event),
                )
            }
            Change::TaskCreated { customer: c } => task(TaskEvent::TaskCreated {
                tenant: tenant(tenant_name),
                customer_id: customer(CUSTOMERS[*c]),
                title: TaskTitle::parse("Send it").unwrap(),
                created_at: when,
            }),
            Change::Message => task(TaskEvent::TaskMessagePosted {
                message_id: Uuid::now_v7(),
                author: Actor::new("bob"),
                text: MessageText::parse("hi").unwrap(),
                file_id: None,
                at: when,
            }),
            Change::Erased { customer: c } => {
                since_erasure = events.len() + 1;
                let event = CustomerEvent::CustomerErased {
                    tenant: tenant(tenant_name),
                    customer_id: customer(CUSTOMERS[*c]),
                    erased_files: vec![],
                    kept_protected_files: 0,
                    erased_at: when,
                };
                let mut erased = logged(
                    slot,
                    "customer",
                    Uuid::nil(),
                    CustomerEvent::ERASED,
                    "1",
                    tagless(CustomerEvent::ERASED, &event),
                );
                erased.aggregate_id = format!("{tenant_name}/{}", CUSTOMERS[*c]);
                erased
            }
        });
    }
    events
}

/// A customers row: tenant, customer id, files, open tasks, last activity, last
/// position.
type Customer = (String, String, i64, i64, DateTime<Utc>, i64);

/// Files, open tasks, last activity, last position.
type Counts = (i64, i64, DateTime<Utc>, i64);

/// What the module documents, plainly: each distinct event (by position) once,
/// in position order; an upload concerns (and, the first time its id is seen,
/// counts for) the customer it names; a task's creation likewise; every other
/// event of a file or task concerns the customer it was created for, when logged
/// under the same tenant; a delete uncounts a live file; a purge concerns no one;
/// an erasure forgets the customer's tasks and deleted files, and keeps its row
/// (no tasks, the erasure its last activity) only while it has live files.
fn model(events: &[LoggedEvent]) -> Vec<Customer> {
    let mut seen = HashSet::new();
    // id -> (tenant, customer, live)
    let mut files: BTreeMap<String, (String, String, bool)> = BTreeMap::new();
    let mut tasks: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut rows: BTreeMap<(String, String), Counts> = BTreeMap::new();
    fn touch_row(
        rows: &mut BTreeMap<(String, String), Counts>,
        (tenant, customer): (&str, &str),
        files: i64,
        tasks: i64,
        event: &LoggedEvent,
    ) {
        let row = rows
            .entry((tenant.to_owned(), customer.to_owned()))
            .or_insert((0, 0, event.at, event.position));
        row.0 += files;
        row.1 += tasks;
        row.2 = row.2.max(event.at);
        row.3 = event.position;
    }
    for event in events {
        if !seen.insert(event.position) {
            continue;
        }
        let tenant = event.tenant.as_str();
        let mine = |owner: Option<&(String, String)>| {
            owner.filter(|(t, _)| t == tenant).map(|(_, c)| c.clone())
        };
        match (event.aggregate_type.as_str(), event.event_type.as_str()) {
            ("file", "FileUploaded") => {
                let named = event.payload["customer_id"].as_str().unwrap().to_owned();
                let new = !files.contains_key(&event.aggregate_id);
                if new {
                    files.insert(
                        event.aggregate_id.clone(),
                        (tenant.to_owned(), named.clone(), true),
                    );
                }
                touch_row(&mut rows, (tenant, &named), i64::from(new), 0, event);
            }
            ("file", "BlobPurged") => {}
            ("file", "FileDeleted") => {
                if let Some((t, c, live)) = files.get_mut(&event.aggregate_id)
                    && t == tenant
                    && *live
                {
                    *live = false;
                    let c = c.clone();
                    touch_row(&mut rows, (tenant, &c), -1, 0, event);
                }
            }
            ("file", _) | ("download", _) => {
                let id = if event.aggregate_type == "file" {
                    event.aggregate_id.clone()
                } else {
                    event.payload["file_id"].as_str().unwrap().to_owned()
                };
                let owner = files.get(&id).map(|(t, c, _)| (t.clone(), c.clone()));
                if let Some(c) = mine(owner.as_ref()) {
                    touch_row(&mut rows, (tenant, &c), 0, 0, event);
                }
            }
            ("task", "TaskCreated") => {
                let named = event.payload["customer_id"].as_str().unwrap().to_owned();
                let new = !tasks.contains_key(&event.aggregate_id);
                if new {
                    tasks.insert(
                        event.aggregate_id.clone(),
                        (tenant.to_owned(), named.clone()),
                    );
                }
                touch_row(&mut rows, (tenant, &named), 0, i64::from(new), event);
            }
            ("task", _) => {
                if let Some(c) = mine(tasks.get(&event.aggregate_id)) {
                    touch_row(&mut rows, (tenant, &c), 0, 0, event);
                }
            }
            ("customer", "CustomerErased") => {
                let named = event.payload["customer_id"].as_str().unwrap().to_owned();
                let theirs = |t: &String, c: &String| t == tenant && *c == named;
                tasks.retain(|_, (t, c)| !theirs(t, c));
                files.retain(|_, (t, c, live)| *live || !theirs(t, c));
                let kept = files.values().filter(|(t, c, _)| theirs(t, c)).count() as i64;
                let key = (tenant.to_owned(), named.clone());
                if kept == 0 {
                    rows.remove(&key);
                } else if rows.contains_key(&key) {
                    touch_row(&mut rows, (tenant, &named), 0, 0, event);
                    let row = rows.get_mut(&key).unwrap();
                    (row.0, row.1) = (kept, 0);
                }
            }
            other => panic!("no such event in these histories: {other:?}"),
        }
    }
    rows.into_iter()
        .map(|((t, c), (f, k, a, p))| (t, c, f, k, a, p))
        .collect()
}

async fn customer_rows(pool: &Pool) -> Vec<Customer> {
    pool.get()
        .await
        .unwrap()
        .query(
            "SELECT tenant, customer_id, files, open_tasks, last_activity_at, last_position \
             FROM customers ORDER BY tenant, customer_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect()
}

/// `events` through the projection's `apply`, into tables emptied first.
async fn through_sql(pool: &Pool, events: &[LoggedEvent]) -> Vec<Customer> {
    let mut client = pool.get().await.unwrap();
    client
        .batch_execute("TRUNCATE customers, customer_files, customer_tasks")
        .await
        .unwrap();
    let tx = client.transaction().await.unwrap();
    // As the live runner does: the writes queued, then sent together.
    let pipelined = ApplyTx::pipelined(&tx);
    for event in events {
        CustomersProjection.apply(&pipelined, event).await.unwrap();
    }
    pipelined.flush().await.unwrap();
    drop(pipelined);
    tx.commit().await.unwrap();
    drop(client);
    customer_rows(pool).await
}

#[test]
fn the_projection_counts_and_dates_what_the_module_documents() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (pool, _) = rt.block_on(fresh_database()).unwrap();
    // What the histories reached, so that a generator gone blind does not pass.
    let (rows, deleted, tasks, other_tenant, erasures) = (
        Cell::new(0),
        Cell::new(0),
        Cell::new(0),
        Cell::new(0),
        Cell::new(0),
    );
    let mut runner = TestRunner::new(property::config(32, SEED));
    let result = runner.run(&history(), |history| {
        let events = logged_events(&history);
        let sql = rt.block_on(through_sql(&pool, &events));
        let expected = model(&events);
        prop_assert_eq!(&sql, &expected);
        rows.set(rows.get() + sql.len());
        deleted.set(deleted.get() + sql.iter().filter(|r| r.2 == 0).count());
        tasks.set(tasks.get() + sql.iter().filter(|r| r.3 > 0).count());
        other_tenant.set(other_tenant.get() + sql.iter().filter(|r| r.0 == "globex").count());
        erasures.set(
            erasures.get()
                + events
                    .iter()
                    .filter(|e| e.aggregate_type == "customer")
                    .count(),
        );
        Ok(())
    });
    if let Err(error) = result {
        panic!("{error}");
    }
    assert!(rows.get() > 0, "some customers");
    assert!(deleted.get() > 0, "some customers without files");
    assert!(tasks.get() > 0, "some customers with tasks");
    assert!(other_tenant.get() > 0, "customers of both tenants");
    assert!(erasures.get() > 0, "some erasures");
}

// ------------------------------------------ the log, the runner, a rebuild

/// A history written to the log the way the event store writes it: 30
/// customers of acme (ids with `_` and `.` among them) and one of globex, with
/// uploads, a rename, deletes, tasks and a message.
async fn write_history(pool: &Pool) -> i64 {
    let mut rows = Vec::new();
    let mut ids = Vec::new();
    for n in 0..30 {
        let name: &'static str = Box::leak(format!("c{n:02}_x.{}", n % 3).into_boxed_str());
        let id = FileId::new();
        let mut upload = Upload::new(format!("File {n}"), at(n));
        upload.customer = name;
        rows.push(Row::file("acme", id.0, &upload.event(id)));
        ids.push((id, name));
    }
    let mut other = Upload::new("Theirs", at(0));
    other.tenant = "globex";
    other.customer = "c00_x.0";
    let theirs = FileId::new();
    rows.push(Row::file("globex", theirs.0, &other.event(theirs)));
    let rename = FileEvent::FileRenamed {
        from: dossier_domain::DisplayName::parse("File 0").unwrap(),
        name: dossier_domain::DisplayName::parse("Renamed").unwrap(),
    };
    rows.push(Row::file("acme", ids[0].0.0, &rename));
    for (id, name) in &ids[10..12] {
        let deleted = FileEvent::FileDeleted {
            customer_id: customer(name),
            blob_key: BlobKey::from_recorded("k"),
            deleted_at: at(99),
        };
        rows.push(Row::file("acme", id.0, &deleted));
    }
    let task = Uuid::now_v7();
    let created = TaskEvent::TaskCreated {
        tenant: tenant("acme"),
        customer_id: customer(ids[5].1),
        title: TaskTitle::parse("Sign").unwrap(),
        created_at: at(0),
    };
    let posted = TaskEvent::TaskMessagePosted {
        message_id: Uuid::now_v7(),
        author: Actor::new("alice"),
        text: MessageText::parse("Please").unwrap(),
        file_id: None,
        at: at(0),
    };
    for (kind, payload) in [
        (TaskEvent::CREATED, tagless(TaskEvent::CREATED, &created)),
        (
            TaskEvent::MESSAGE_POSTED,
            tagless(TaskEvent::MESSAGE_POSTED, &posted),
        ),
    ] {
        rows.push(Row::raw("acme", "task", &task.to_string(), kind, payload));
    }
    // One transaction each, so that the log's times differ between them.
    let mut last = 0;
    for row in rows {
        last = append(pool, &[row]).await;
    }
    last
}

async fn snapshot(pool: &Pool) -> Vec<Vec<Value>> {
    let client = pool.get().await.unwrap();
    let mut tables = Vec::new();
    for sql in [
        "SELECT to_jsonb(c) FROM customers c ORDER BY tenant, customer_id",
        "SELECT to_jsonb(f) FROM customer_files f ORDER BY id",
        "SELECT to_jsonb(t) FROM customer_tasks t ORDER BY id",
    ] {
        let rows = client.query(sql, &[]).await.unwrap();
        tables.push(rows.iter().map(|row| row.get(0)).collect());
    }
    tables
}

async fn list_all(pool: &Pool, prefix: Option<&str>, limit: u32) -> Vec<CustomerView> {
    let mut filter = CustomerFilter {
        prefix: prefix.map(|p| CustomerIdPrefix::parse(p).unwrap()),
        limit,
        cursor: None,
    };
    let mut all = Vec::new();
    loop {
        let page = customers::list(pool, &tenant("acme"), &filter)
            .await
            .unwrap();
        assert!(page.items.len() <= limit as usize);
        all.extend(page.items);
        match page.next_cursor {
            Some(next) => filter.cursor = Some(ActivityCursor::decode(&next).unwrap()),
            None => break,
        }
    }
    all
}

#[tokio::test]
async fn a_rebuild_and_a_replay_give_the_rows_the_runner_gave_and_pages_cover_the_list() {
    let (pool, _) = fresh_database().await.unwrap();
    let last = write_history(&pool).await;
    let mut runner = Runner::new(pool.clone(), CustomersProjection, RunnerConfig::default());
    catch_up_to(&mut runner, last).await;
    let live = snapshot(&pool).await;
    assert_eq!(live[0].len(), 31, "30 customers of acme, one of globex");

    // The whole list, most recently active first, ties by id, every customer
    // once whatever the page size.
    let all = list_all(&pool, None, 500).await;
    assert_eq!(all.len(), 30);
    for pair in all.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(
            (
                a.last_activity_at,
                std::cmp::Reverse(a.customer_id.as_str())
            ) > (
                b.last_activity_at,
                std::cmp::Reverse(b.customer_id.as_str())
            ),
            "{a:?} before {b:?}"
        );
    }
    for limit in [1, 7, 29, 30] {
        assert_eq!(list_all(&pool, None, limit).await, all, "pages of {limit}");
    }
    // The renamed file's customer was active last but for the deletes and the
    // task; those who lost their only file are still there, with 0 files.
    let ids: Vec<&str> = all.iter().map(|c| c.customer_id.as_str()).collect();
    assert_eq!(&ids[..4], ["c05_x.2", "c11_x.2", "c10_x.1", "c00_x.0"]);
    assert_eq!((all[0].files, all[0].open_tasks), (1, 1));
    assert_eq!((all[1].files, all[2].files, all[3].files), (0, 0, 1));

    // A prefix is literal: `c1` is ten customers, `c1_` none (`_` is no wildcard).
    let c1 = list_all(&pool, Some("c1"), 3).await;
    assert_eq!(c1.len(), 10);
    assert!(c1.iter().all(|c| c.customer_id.as_str().starts_with("c1")));
    let expected: Vec<&CustomerView> = all
        .iter()
        .filter(|c| c.customer_id.as_str().starts_with("c1"))
        .collect();
    assert_eq!(
        c1.iter().collect::<Vec<_>>(),
        expected,
        "in the list's order"
    );
    assert!(list_all(&pool, Some("c1_"), 50).await.is_empty());
    assert_eq!(list_all(&pool, Some("c12_x.0"), 50).await.len(), 1);

    rebuild(&pool, &CustomersProjection).await.unwrap();
    assert_eq!(snapshot(&pool).await, live, "a rebuild gives the same rows");
    pool.get()
        .await
        .unwrap()
        .execute(
            "UPDATE checkpoints SET position = 0 WHERE name = $1",
            &[&CustomersProjection::NAME],
        )
        .await
        .unwrap();
    let mut again = Runner::new(pool.clone(), CustomersProjection, RunnerConfig::default());
    catch_up_to(&mut again, last).await;
    assert_eq!(snapshot(&pool).await, live, "every event applied twice");
}
