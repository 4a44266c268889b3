//! The files projection against a real Postgres: each test gets its own migrated
//! database, writes events into the real `events` table, runs the real runner and
//! reads through the real queries.
//!
//! How events get into the log here: see the `common` module ([`common::append`]).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{
    CUSTOMER, OTHER_TENANT, Row, SHA, TENANT, Upload, WAIT, append, at, catch_up_to, customer,
    snapshot, tenant, wait_until,
};
use dossier_domain::{BlobKey, DisplayName, FileEvent, FileId, Origin, Visibility};
use dossier_eventlog::db::Pool;
use dossier_eventlog::follow::checkpoint;
use dossier_eventlog::log::LoggedEvent;
use dossier_projections::files::{self, Cursor, FileFilter, FileView};
use dossier_projections::rebuild::rebuild_with_progress;
use dossier_projections::{
    ApplyTx, BundlesProjection, FilesProjection, FollowerConfig, Freshness, FreshnessError,
    Projection, ProjectionError, Runner, RunnerConfig, rebuild,
};
use dossier_test_support::db::fresh_database;
use dossier_test_support::wait::Wait;
use serde_json::{Value, json};
use tokio::sync::watch;
use uuid::Uuid;

// ---------------------------------------------------------------- helpers

/// Writes events into the log the way `PgEventStore` does.
#[derive(Clone)]
struct Log {
    pool: Pool,
}

impl Log {
    /// Appends `events` of one file in one transaction; returns the last position.
    async fn append(&self, tenant: &str, file: FileId, events: &[FileEvent]) -> i64 {
        let rows: Vec<Row> = events
            .iter()
            .map(|event| Row::file(tenant, file.0, event))
            .collect();
        append(&self.pool, &rows).await
    }

    /// Appends rows of any aggregate with any payload (for poison and foreign events).
    async fn append_raw(
        &self,
        tenant: &str,
        aggregate_type: &str,
        aggregate_id: &str,
        events: &[(String, Value)],
    ) -> i64 {
        let rows: Vec<Row> = events
            .iter()
            .map(|(kind, payload)| {
                Row::raw(tenant, aggregate_type, aggregate_id, kind, payload.clone())
            })
            .collect();
        append(&self.pool, &rows).await
    }

    /// Appends a file event that does not decode; returns its position.
    async fn append_poison(&self) -> i64 {
        self.append_raw(
            TENANT,
            "file",
            &Uuid::now_v7().to_string(),
            &[(FileEvent::RENAMED.to_owned(), json!({"nonsense": true}))],
        )
        .await
    }

    /// Uploads a new file; returns its id and position.
    async fn upload(&self, upload: &Upload) -> (FileId, i64) {
        let id = FileId::new();
        let position = self.append(upload.tenant, id, &[upload.event(id)]).await;
        (id, position)
    }
}

struct Fixture {
    pool: Pool,
    url: String,
    log: Log,
}

async fn fixture() -> Fixture {
    let (pool, url) = fresh_database().await.expect("a fresh test database");
    Fixture {
        log: Log { pool: pool.clone() },
        pool,
        url,
    }
}

fn runner(pool: &Pool) -> Runner {
    Runner::new(pool.clone(), FilesProjection, RunnerConfig::default())
}

/// Steps until the runner answers an error (the poison a test put in the log).
async fn step_until_refused(runner: &mut Runner) -> ProjectionError {
    Wait::new("the runner to reach the poison")
        .timeout(WAIT)
        .interval(Duration::from_millis(5))
        .expect(async || match runner.step().await {
            Ok(progress) => Err(progress),
            Err(error) => Ok(error),
        })
        .await
}

async fn head(pool: &Pool) -> i64 {
    pool.get()
        .await
        .unwrap()
        .query_one("SELECT COALESCE(max(position), 0) FROM events", &[])
        .await
        .unwrap()
        .get(0)
}

async fn list_all(
    pool: &Pool,
    tenant_id: &str,
    customer_id: &str,
    filter: &FileFilter,
) -> Vec<FileView> {
    let mut filter = filter.clone();
    filter.limit = 500;
    let page = files::list(pool, &tenant(tenant_id), &customer(customer_id), &filter)
        .await
        .unwrap();
    assert!(page.next_cursor.is_none(), "test lists fit one page");
    page.items
}

fn ids(views: &[FileView]) -> Vec<FileId> {
    views.iter().map(|view| view.id).collect()
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn an_upload_is_listed_with_every_field_of_the_contract() {
    let fx = fixture().await;
    let task = Uuid::now_v7();
    let mut upload = Upload::new("Contract 2025", at(0));
    upload.visibility = Visibility::PortalAndMoving;
    upload.origin = Origin::Contract;
    upload.contract = Some("contract-7");
    upload.task = Some(task);
    let (id, position) = fx.log.upload(&upload).await;
    let mut runner = runner(&fx.pool);
    catch_up_to(&mut runner, position).await;

    let view = files::get(&fx.pool, &tenant(TENANT), id)
        .await
        .unwrap()
        .expect("the uploaded file is found");
    assert_eq!(
        serde_json::to_value(&view).unwrap(),
        json!({
            "id": id.to_string(),
            "customer_id": CUSTOMER,
            "name": "Contract 2025",
            "file_name": "Contract_2025.pdf",
            "content_type": "application/pdf",
            "size": 48213,
            "sha256": SHA,
            "created_at": "2026-01-01T00:00:00Z",
            "visibility": "portal_and_moving",
            "origin": "contract",
            "viewed_at": null,
            "signed_at": null,
            "contract_id": "contract-7",
            "task_id": task.to_string(),
            "protected": false,
        }),
        "exactly the contract's File resource"
    );
    assert_eq!(
        view.blob_key,
        BlobKey::for_file(&tenant(TENANT), &customer(CUSTOMER), id)
    );
    assert_eq!(view.last_position, position);

    let listed = list_all(&fx.pool, TENANT, CUSTOMER, &FileFilter::default()).await;
    assert_eq!(listed, vec![view], "the list shows the same file");
}

#[tokio::test]
async fn protected_is_derived_from_the_origin() {
    let fx = fixture().await;
    let mut last = 0;
    let mut expected = BTreeMap::new();
    for (i, origin) in [
        Origin::StaffUpload,
        Origin::CustomerUpload,
        Origin::Contract,
        Origin::Product,
        Origin::System,
    ]
    .into_iter()
    .enumerate()
    {
        let mut upload = Upload::new(format!("f{i}"), at(i as i64));
        upload.origin = origin;
        let (id, position) = fx.log.upload(&upload).await;
        expected.insert(id, origin.is_protected());
        last = position;
    }
    catch_up_to(&mut runner(&fx.pool), last).await;
    for view in list_all(&fx.pool, TENANT, CUSTOMER, &FileFilter::default()).await {
        assert_eq!(view.protected, expected[&view.id], "{:?}", view.origin);
    }
}

#[tokio::test]
async fn rename_visibility_viewed_and_signed_update_the_row() {
    let fx = fixture().await;
    let (id, uploaded) = fx.log.upload(&Upload::new("Draft", at(0))).await;
    let mut runner = runner(&fx.pool);
    catch_up_to(&mut runner, uploaded).await;
    let get = || async {
        files::get(&fx.pool, &tenant(TENANT), id)
            .await
            .unwrap()
            .unwrap()
    };

    let renamed = fx
        .log
        .append(
            TENANT,
            id,
            &[FileEvent::FileRenamed {
                from: DisplayName::parse("Draft").unwrap(),
                name: DisplayName::parse("Final").unwrap(),
            }],
        )
        .await;
    catch_up_to(&mut runner, renamed).await;
    let view = get().await;
    assert_eq!(view.name.as_str(), "Final");
    assert_eq!(view.last_position, renamed);

    let published = fx
        .log
        .append(
            TENANT,
            id,
            &[FileEvent::FileVisibilityChanged {
                from: Visibility::Internal,
                visibility: Visibility::Portal,
            }],
        )
        .await;
    catch_up_to(&mut runner, published).await;
    assert_eq!(get().await.visibility, Visibility::Portal);

    let viewed = fx
        .log
        .append(
            TENANT,
            id,
            &[FileEvent::FileViewed {
                viewer: customer(CUSTOMER),
                viewed_at: at(5),
            }],
        )
        .await;
    catch_up_to(&mut runner, viewed).await;
    assert_eq!(get().await.viewed_at, Some(at(5)));

    // A second view event (should one ever be recorded) keeps the first time.
    let viewed_again = fx
        .log
        .append(
            TENANT,
            id,
            &[FileEvent::FileViewed {
                viewer: customer(CUSTOMER),
                viewed_at: at(9),
            }],
        )
        .await;
    catch_up_to(&mut runner, viewed_again).await;
    assert_eq!(get().await.viewed_at, Some(at(5)));

    let signed = fx
        .log
        .append(TENANT, id, &[FileEvent::FileSigned { signed_at: at(7) }])
        .await;
    catch_up_to(&mut runner, signed).await;
    let view = get().await;
    assert_eq!(view.signed_at, Some(at(7)));
    assert_eq!(view.name.as_str(), "Final", "earlier changes stay");
    assert_eq!(view.visibility, Visibility::Portal);
    assert_eq!(view.last_position, signed);
    assert_eq!(view.created_at, at(0), "created_at never moves");
}

#[tokio::test]
async fn a_deleted_file_disappears_from_every_query_at_once() {
    let fx = fixture().await;
    let (kept, _) = fx.log.upload(&Upload::new("kept", at(0))).await;
    let (doomed, uploaded) = fx.log.upload(&Upload::new("doomed", at(1))).await;
    let mut runner = runner(&fx.pool);
    catch_up_to(&mut runner, uploaded).await;
    assert_eq!(
        list_all(&fx.pool, TENANT, CUSTOMER, &FileFilter::default())
            .await
            .len(),
        2
    );

    let tenant_id = tenant(TENANT);
    let customer_id = customer(CUSTOMER);
    let deleted = fx
        .log
        .append(
            TENANT,
            doomed,
            &[FileEvent::FileDeleted {
                customer_id: customer_id.clone(),
                blob_key: BlobKey::for_file(&tenant_id, &customer_id, doomed),
                deleted_at: at(2),
            }],
        )
        .await;
    catch_up_to(&mut runner, deleted).await;

    assert_eq!(
        files::get(&fx.pool, &tenant_id, doomed).await.unwrap(),
        None
    );
    assert_eq!(
        ids(&list_all(&fx.pool, TENANT, CUSTOMER, &FileFilter::default()).await),
        vec![kept]
    );
    assert_eq!(
        ids(&files::get_many(&fx.pool, &tenant_id, &[doomed, kept])
            .await
            .unwrap()),
        vec![kept]
    );

    // The blob worker's follow-up event changes nothing visible.
    let purged = fx
        .log
        .append(
            TENANT,
            doomed,
            &[FileEvent::BlobPurged {
                blob_key: BlobKey::for_file(&tenant_id, &customer_id, doomed),
            }],
        )
        .await;
    catch_up_to(&mut runner, purged).await;
    assert_eq!(
        files::get(&fx.pool, &tenant_id, doomed).await.unwrap(),
        None
    );
}

#[tokio::test]
async fn every_filter_and_their_combinations_match_a_plain_model() {
    let fx = fixture().await;
    let visibilities = Visibility::ALL;
    let origins = [
        Origin::StaffUpload,
        Origin::CustomerUpload,
        Origin::Contract,
        Origin::Product,
        Origin::System,
    ];
    let contracts = [None, Some("c-1"), Some("c-2")];

    // 60 files with every mix of attributes; a third of them viewed.
    let mut model: Vec<(FileId, Upload, bool)> = Vec::new();
    let mut last = 0;
    for i in 0..60usize {
        let mut upload = Upload::new(format!("file {i}"), at(i as i64 * 60));
        upload.visibility = visibilities[i % 3];
        upload.origin = origins[(i / 3) % 5];
        upload.contract = contracts[(i / 2) % 3];
        let (id, position) = fx.log.upload(&upload).await;
        let viewed = i % 3 == 1;
        last = position;
        if viewed {
            last = fx
                .log
                .append(
                    TENANT,
                    id,
                    &[FileEvent::FileViewed {
                        viewer: customer(CUSTOMER),
                        viewed_at: at(10_000),
                    }],
                )
                .await;
        }
        model.push((id, upload, viewed));
    }
    // Noise that no filter of this customer may return.
    let mut other_customer = Upload::new("other customer", at(30));
    other_customer.customer = "cust-43";
    fx.log.upload(&other_customer).await;
    let mut other_tenant = Upload::new("other tenant", at(31));
    other_tenant.tenant = OTHER_TENANT;
    last = last.max(fx.log.upload(&other_tenant).await.1);
    catch_up_to(&mut runner(&fx.pool), last).await;

    let viewed_options = [None, Some(true), Some(false)];
    let visibility_options: Vec<Vec<Visibility>> = vec![
        vec![],
        vec![Visibility::Internal],
        vec![Visibility::Portal, Visibility::PortalAndMoving],
    ];
    let range_options = [
        (None, None),
        (Some(at(600)), None),
        (None, Some(at(1200))),
        // Both ends inclusive: files at exactly 10 and 40 hours are in.
        (Some(at(600)), Some(at(2400))),
    ];
    let contract_options = [None, Some("c-1")];
    let origin_options = [None, Some(Origin::Contract), Some(Origin::System)];

    let mut combinations = 0;
    let mut nonempty = 0;
    for viewed in viewed_options {
        for visibility in &visibility_options {
            for (created_from, created_to) in range_options {
                for contract in contract_options {
                    for origin in origin_options {
                        let filter = FileFilter {
                            viewed,
                            visibility: visibility.clone(),
                            created_from,
                            created_to,
                            contract_id: contract.map(str::to_owned),
                            origin,
                            ..FileFilter::default()
                        };
                        let mut expected: Vec<&(FileId, Upload, bool)> = model
                            .iter()
                            .filter(|(_, upload, was_viewed)| {
                                viewed.is_none_or(|v| v == *was_viewed)
                                    && (visibility.is_empty()
                                        || visibility.contains(&upload.visibility))
                                    && created_from.is_none_or(|from| upload.created >= from)
                                    && created_to.is_none_or(|to| upload.created <= to)
                                    && contract.is_none_or(|c| upload.contract == Some(c))
                                    && origin.is_none_or(|o| upload.origin == o)
                            })
                            .collect();
                        expected.sort_by_key(|(id, upload, _)| {
                            (std::cmp::Reverse(upload.created), std::cmp::Reverse(*id))
                        });
                        let expected: Vec<FileId> = expected.iter().map(|(id, _, _)| *id).collect();
                        let got = ids(&list_all(&fx.pool, TENANT, CUSTOMER, &filter).await);
                        assert_eq!(got, expected, "filter {filter:?}");
                        combinations += 1;
                        nonempty += usize::from(!expected.is_empty());
                    }
                }
            }
        }
    }
    assert_eq!(combinations, 3 * 3 * 4 * 2 * 3);
    assert!(
        nonempty > combinations / 3,
        "the model is not trivially empty"
    );
}

#[tokio::test]
async fn pagination_through_120_files_gives_every_file_once_newest_first() {
    let fx = fixture().await;
    let mut expected = Vec::new();
    let mut last = 0;
    for i in 0..120i64 {
        // Pairs of files share a created_at: the id must break the tie.
        let (id, position) = fx
            .log
            .upload(&Upload::new(format!("f{i}"), at(i / 2)))
            .await;
        expected.push((at(i / 2), id));
        last = position;
    }
    catch_up_to(&mut runner(&fx.pool), last).await;
    expected.sort_by(|a, b| b.cmp(a));
    let expected: Vec<FileId> = expected.into_iter().map(|(_, id)| id).collect();

    let mut seen = Vec::new();
    let mut pages = Vec::new();
    let mut cursor = None;
    loop {
        let filter = FileFilter {
            limit: 50,
            cursor,
            ..FileFilter::default()
        };
        let page = files::list(&fx.pool, &tenant(TENANT), &customer(CUSTOMER), &filter)
            .await
            .unwrap();
        pages.push(page.items.len());
        seen.extend(ids(&page.items));
        match page.next_cursor {
            Some(next) => cursor = Some(Cursor::decode(&next).expect("our own cursor decodes")),
            None => break,
        }
    }
    assert_eq!(pages, vec![50, 50, 20]);
    assert_eq!(seen.len(), 120);
    assert_eq!(
        seen.iter().collect::<HashSet<_>>().len(),
        120,
        "no file twice"
    );
    assert_eq!(seen, expected, "newest first, id breaks ties");

    // A page that ends exactly at the last file says there is no next page.
    let exact = files::list(
        &fx.pool,
        &tenant(TENANT),
        &customer(CUSTOMER),
        &FileFilter {
            limit: 120,
            ..FileFilter::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(exact.items.len(), 120);
    assert_eq!(exact.next_cursor, None);

    // Limits outside 1..=500 are clamped, not an error.
    let one = files::list(
        &fx.pool,
        &tenant(TENANT),
        &customer(CUSTOMER),
        &FileFilter {
            limit: 0,
            ..FileFilter::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(one.items.len(), 1);
    assert!(one.next_cursor.is_some());
}

#[tokio::test]
async fn garbage_cursors_are_refused() {
    assert!(Cursor::decode("garbage!").is_err());
    assert!(Cursor::decode("").is_err());
    assert!(Cursor::decode("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").is_err());
}

#[tokio::test]
async fn another_tenants_file_is_never_found_nor_listed() {
    let fx = fixture().await;
    let (ours, _) = fx.log.upload(&Upload::new("ours", at(0))).await;
    let mut theirs = Upload::new("theirs", at(1));
    theirs.tenant = OTHER_TENANT; // same customer id, other tenant
    let (their_id, position) = fx.log.upload(&theirs).await;
    catch_up_to(&mut runner(&fx.pool), position).await;

    let us = tenant(TENANT);
    let them = tenant(OTHER_TENANT);
    assert_eq!(files::get(&fx.pool, &us, their_id).await.unwrap(), None);
    assert!(
        files::get(&fx.pool, &them, their_id)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(files::get(&fx.pool, &them, ours).await.unwrap(), None);
    assert_eq!(
        ids(&list_all(&fx.pool, TENANT, CUSTOMER, &FileFilter::default()).await),
        vec![ours]
    );
    assert_eq!(
        ids(&list_all(&fx.pool, OTHER_TENANT, CUSTOMER, &FileFilter::default()).await),
        vec![their_id]
    );
    assert_eq!(
        ids(&files::get_many(&fx.pool, &us, &[their_id, ours, ours])
            .await
            .unwrap()),
        vec![ours],
        "get_many leaves out other tenants' ids and repeats nothing"
    );

    // An update event for their file recorded under our tenant changes nothing.
    let forged = fx
        .log
        .append(
            TENANT,
            their_id,
            &[FileEvent::FileRenamed {
                from: DisplayName::parse("theirs").unwrap(),
                name: DisplayName::parse("hijacked").unwrap(),
            }],
        )
        .await;
    catch_up_to(&mut runner(&fx.pool), forged).await;
    let view = files::get(&fx.pool, &them, their_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(view.name.as_str(), "theirs");
}

/// A realistic history: uploads, every kind of change, deletes, another tenant and
/// another aggregate type. Returns the last position.
async fn write_history(log: &Log, files: usize) -> i64 {
    let mut last = 0;
    for i in 0..files {
        let mut upload = Upload::new(format!("doc {i}"), at(i as i64));
        upload.tenant = if i % 4 == 3 { OTHER_TENANT } else { TENANT };
        upload.visibility = Visibility::ALL[i % 3];
        let (id, uploaded) = log.upload(&upload).await;
        last = last.max(uploaded);
        let tenant_id = tenant(upload.tenant);
        let customer_id = customer(upload.customer);
        let mut events = Vec::new();
        if i % 2 == 0 {
            events.push(FileEvent::FileRenamed {
                from: DisplayName::parse(&upload.name).unwrap(),
                name: DisplayName::parse(&format!("renamed {i}")).unwrap(),
            });
        }
        if i % 3 == 1 {
            events.push(FileEvent::FileViewed {
                viewer: customer_id.clone(),
                viewed_at: at(1000 + i as i64),
            });
        }
        if i % 5 == 0 {
            events.push(FileEvent::FileSigned {
                signed_at: at(2000 + i as i64),
            });
        }
        if i % 7 == 0 {
            events.push(FileEvent::FileDeleted {
                customer_id: customer_id.clone(),
                blob_key: BlobKey::for_file(&tenant_id, &customer_id, id),
                deleted_at: at(3000),
            });
            events.push(FileEvent::BlobPurged {
                blob_key: BlobKey::for_file(&tenant_id, &customer_id, id),
            });
        }
        last = log.append(upload.tenant, id, &events).await.max(last);
        if i % 10 == 0 {
            // Another aggregate's events are ignored, but passed.
            last = log
                .append_raw(
                    TENANT,
                    "task",
                    &Uuid::now_v7().to_string(),
                    &[("TaskCreated".to_owned(), json!({"title": "x"}))],
                )
                .await;
        }
    }
    last
}

#[tokio::test]
async fn a_rebuild_from_the_log_gives_the_same_rows() {
    let fx = fixture().await;
    let last = write_history(&fx.log, 40).await;
    let mut runner = runner(&fx.pool);
    catch_up_to(&mut runner, last).await;
    let live = snapshot(&fx.pool).await;
    assert!(!live.0.is_empty() && !live.1.is_empty());

    let report = rebuild(&fx.pool, &FilesProjection).await.unwrap();
    assert_eq!(report.position, last);
    assert_eq!(snapshot(&fx.pool).await, live, "same rows, every column");
    assert_eq!(
        checkpoint::read(&fx.pool, FilesProjection::NAME)
            .await
            .unwrap(),
        Some(last)
    );

    // The swapped-in tables look like migrated ones: same index names.
    let indexes: Vec<String> = fx
        .pool
        .get()
        .await
        .unwrap()
        .query(
            "SELECT indexname::text FROM pg_indexes \
             WHERE tablename IN ('files', 'files_tombstones') ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        indexes,
        [
            "files_customer_newest_first",
            "files_pkey",
            "files_task",
            "files_tombstones_pkey"
        ]
    );

    // The runner carries on after the swap, on the new tables.
    let (id, position) = fx
        .log
        .upload(&Upload::new("after the rebuild", at(99)))
        .await;
    catch_up_to(&mut runner, position).await;
    assert!(
        files::get(&fx.pool, &tenant(TENANT), id)
            .await
            .unwrap()
            .is_some()
    );

    // A read model that was dropped entirely comes back the same, too.
    let before = snapshot(&fx.pool).await;
    fx.pool
        .get()
        .await
        .unwrap()
        .batch_execute("TRUNCATE files, files_tombstones; UPDATE checkpoints SET position = 0")
        .await
        .unwrap();
    assert!(snapshot(&fx.pool).await.0.is_empty());
    rebuild(&fx.pool, &FilesProjection).await.unwrap();
    assert_eq!(snapshot(&fx.pool).await, before);
}

#[tokio::test]
async fn a_rebuild_while_the_runner_and_writers_are_busy_loses_nothing() {
    let fx = fixture().await;
    write_history(&fx.log, 30).await;

    let (stop, stopped) = watch::channel(false);
    let runner = runner(&fx.pool);
    let freshness = runner.freshness();
    let running = tokio::spawn(runner.run(stopped));

    // The writer writes a few files, waits until the rebuild has begun, and writes
    // the rest while it runs.
    let (rebuilding, mut rebuild_began) = watch::channel(false);
    let written = Arc::new(AtomicUsize::new(0));
    let writer = {
        let log = fx.log.clone();
        let written = written.clone();
        tokio::spawn(async move {
            let mut last = 0;
            for i in 0..60 {
                if i == 5 {
                    rebuild_began.wait_for(|began| *began).await.unwrap();
                }
                let (id, _) = log
                    .upload(&Upload::new(format!("busy {i}"), at(500 + i)))
                    .await;
                last = log
                    .append(
                        TENANT,
                        id,
                        &[FileEvent::FileSigned {
                            signed_at: at(600 + i),
                        }],
                    )
                    .await;
                written.fetch_add(1, Ordering::SeqCst);
                // Pacing, not synchronization: spreads the writes over the rebuild.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            last
        })
    };
    wait_until("the writer's first files", || {
        let written = written.clone();
        async move { written.load(Ordering::SeqCst) >= 5 }
    })
    .await;
    rebuild_with_progress(&fx.pool, &FilesProjection, &|_| {
        rebuilding.send_replace(true);
    })
    .await
    .unwrap();
    let last = writer.await.unwrap();
    freshness.wait_until(last, WAIT).await.unwrap();
    let after_busy_rebuild = snapshot(&fx.pool).await;

    stop.send(true).unwrap();
    running.await.unwrap().unwrap();

    // The same log, rebuilt in peace, gives the same tables.
    rebuild(&fx.pool, &FilesProjection).await.unwrap();
    assert_eq!(snapshot(&fx.pool).await, after_busy_rebuild);
    let listed = list_all(&fx.pool, TENANT, CUSTOMER, &FileFilter::default()).await;
    assert_eq!(
        listed
            .iter()
            .filter(|view| view.name.as_str().starts_with("busy "))
            .count(),
        60
    );
}

/// Whether a session of this database waits for a lock. In the test below only the
/// first rebuild can (at its swap, for the checkpoint row the test holds), and it
/// holds the rebuild lock by then.
async fn someone_waits_for_a_lock(pool: &Pool) -> bool {
    pool.get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) > 0 FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn rebuild_schema_exists(pool: &Pool) -> bool {
    pool.get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) > 0 FROM pg_namespace WHERE nspname = 'rebuild_files'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// The contract of `rebuild` (its advisory lock): while one rebuild of a read model
/// runs, another is refused at once with `RebuildInProgress` and changes nothing,
/// neither the live tables nor the first one's tables aside; the first one finishes
/// with the right tables, and lets go of the lock.
#[tokio::test]
async fn a_second_rebuild_while_one_runs_is_refused_and_changes_nothing() {
    let fx = fixture().await;
    let last = write_history(&fx.log, 20).await;
    catch_up_to(&mut runner(&fx.pool), last).await;
    let live = snapshot(&fx.pool).await;

    // Hold the checkpoint row as a live batch in flight does: the first rebuild
    // builds aside, then waits for it at its swap, holding the rebuild lock.
    let mut holder = fx.pool.get().await.unwrap();
    let batch = holder.transaction().await.unwrap();
    checkpoint::lock(&batch, FilesProjection::NAME)
        .await
        .unwrap();
    let first = tokio::spawn({
        let pool = fx.pool.clone();
        async move { rebuild(&pool, &FilesProjection).await }
    });
    wait_until("the first rebuild to wait at its swap", || {
        someone_waits_for_a_lock(&fx.pool)
    })
    .await;
    assert!(rebuild_schema_exists(&fx.pool).await);

    let second = tokio::time::timeout(WAIT, rebuild(&fx.pool, &FilesProjection))
        .await
        .expect("the second rebuild is refused at once, it does not run too");
    assert!(
        matches!(second, Err(ProjectionError::RebuildInProgress("files"))),
        "{second:?}"
    );
    assert_eq!(
        snapshot(&fx.pool).await,
        live,
        "the live tables are untouched"
    );
    assert!(
        rebuild_schema_exists(&fx.pool).await,
        "the first rebuild's tables aside are still there"
    );
    assert!(!first.is_finished(), "the first one is still waiting");

    // Let go of the checkpoint: the first one swaps in the right tables.
    batch.rollback().await.unwrap();
    let report = tokio::time::timeout(WAIT, first)
        .await
        .expect("the first rebuild ends once the checkpoint is free")
        .unwrap()
        .unwrap();
    assert_eq!(report.position, last);
    assert_eq!(snapshot(&fx.pool).await, live);
    assert!(!rebuild_schema_exists(&fx.pool).await);

    // It let go of its lock: the next rebuild runs.
    rebuild(&fx.pool, &FilesProjection).await.unwrap();
    assert_eq!(snapshot(&fx.pool).await, live);
}

#[tokio::test]
async fn replaying_events_twice_changes_nothing() {
    let fx = fixture().await;
    let last = write_history(&fx.log, 30).await;
    let mut runner = runner(&fx.pool);
    catch_up_to(&mut runner, last).await;
    let once = snapshot(&fx.pool).await;

    // Every event offered again, straight to the projection (as a crash between
    // effect and checkpoint would, if they were not in one transaction).
    let events = dossier_eventlog::log::LogReader::new(fx.pool.clone())
        .read(0, 10_000, &Default::default())
        .await
        .unwrap();
    assert!(events.len() > 30);
    let mut client = fx.pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    // As the live runner does: the writes queued, then sent together.
    let pipelined = ApplyTx::pipelined(&tx);
    for event in &events {
        FilesProjection.apply(&pipelined, event).await.unwrap();
    }
    pipelined.flush().await.unwrap();
    drop(pipelined);
    tx.commit().await.unwrap();
    assert_eq!(
        snapshot(&fx.pool).await,
        once,
        "applying everything again is a no-op"
    );

    // The same through the runner, with the checkpoint moved back to the start.
    fx.pool
        .get()
        .await
        .unwrap()
        .execute(
            "UPDATE checkpoints SET position = 0 WHERE name = 'files'",
            &[],
        )
        .await
        .unwrap();
    let mut fresh_runner = Runner::new(fx.pool.clone(), FilesProjection, RunnerConfig::default());
    catch_up_to(&mut fresh_runner, last).await;
    assert_eq!(snapshot(&fx.pool).await, once);
}

#[tokio::test]
async fn the_checkpoint_moves_with_the_effects_in_one_transaction() {
    let fx = fixture().await;
    let last = write_history(&fx.log, 12).await;
    let mut runner = Runner::new(
        fx.pool.clone(),
        FilesProjection,
        RunnerConfig {
            batch_size: 5,
            ..RunnerConfig::default()
        },
    );
    // Small batches: after each step the stored checkpoint is exactly the last event
    // the tables reflect.
    loop {
        let progress = runner.step().await.unwrap();
        let stored = checkpoint::read(&fx.pool, "files").await.unwrap();
        assert_eq!(stored, Some(progress.position));
        let newest_row: Option<i64> = fx
            .pool
            .get()
            .await
            .unwrap()
            .query_one(
                "SELECT max(p) FROM (SELECT last_position AS p FROM files \
                 UNION ALL SELECT last_position FROM files_tombstones) x",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(newest_row.unwrap_or(0) <= progress.position);
        if progress.position >= last {
            break;
        }
        if progress.events == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(runner.handle().checkpoint(), last);
}

#[tokio::test]
async fn waiting_for_a_position_returns_once_the_runner_passed_it() {
    let fx = fixture().await;
    let (stop, stopped) = watch::channel(false);
    let runner = runner(&fx.pool);
    let handle = runner.handle();
    let freshness = runner.freshness();
    let running = tokio::spawn(runner.run(stopped.clone()));

    // In process.
    let (id, position) = fx.log.upload(&Upload::new("fresh", at(0))).await;
    let reached = freshness.wait_until(position, WAIT).await.unwrap();
    assert!(reached >= position);
    assert!(handle.checkpoint() >= position);
    assert!(
        files::get(&fx.pool, &tenant(TENANT), id)
            .await
            .unwrap()
            .is_some(),
        "once the wait returned, the query shows the write"
    );
    assert!(freshness.wait_for(position, WAIT).await);

    // Across processes: an API-only node follows the checkpoints table with its own pool.
    let api_pool = dossier_eventlog::db::connect(&fx.url, 2).await.unwrap();
    let (followed, follower) = Freshness::follow(
        api_pool.clone(),
        FilesProjection::NAME,
        FollowerConfig::default(),
        stopped.clone(),
    );
    let (id, position) = fx.log.upload(&Upload::new("followed", at(1))).await;
    followed.wait_until(position, WAIT).await.unwrap();
    assert!(
        files::get(&api_pool, &tenant(TENANT), id)
            .await
            .unwrap()
            .is_some(),
        "the other pool sees the write once its wait returned"
    );

    // A position nobody will reach soon times out with what was reached.
    let beyond = head(&fx.pool).await + 1_000;
    let error = followed
        .wait_until(beyond, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(
        matches!(error, FreshnessError::Timeout { wanted, reached, .. } if wanted == beyond && reached >= position),
        "{error:?}"
    );

    stop.send(true).unwrap();
    running.await.unwrap().unwrap();
    follower.await.unwrap();

    // With the runner gone, an in-process wait says so instead of hanging.
    let error = freshness.wait_until(beyond, WAIT).await.unwrap_err();
    assert!(matches!(error, FreshnessError::Stopped { .. }), "{error:?}");
}

#[tokio::test]
async fn an_undecodable_event_stops_the_runner_loudly_and_is_never_skipped() {
    let fx = fixture().await;
    let (good, before) = fx.log.upload(&Upload::new("good", at(0))).await;
    let poison = fx.log.append_poison().await;
    let (after_id, after) = fx.log.upload(&Upload::new("after", at(1))).await;
    assert!(before < poison && poison < after);

    let (_stop, stopped) = watch::channel(false);
    let mut runner = runner(&fx.pool);
    let handle = runner.handle();
    let error = step_until_refused(&mut runner).await;
    match error {
        ProjectionError::Undecodable { position, .. } => assert_eq!(position, poison),
        other => panic!("expected Undecodable, got {other:?}"),
    }

    // What came before it is applied and the checkpoint stops right in front of it;
    // nothing at or after it is.
    assert_eq!(
        checkpoint::read(&fx.pool, "files").await.unwrap(),
        Some(before)
    );
    assert_eq!(handle.checkpoint(), before);
    assert!(
        files::get(&fx.pool, &tenant(TENANT), good)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        files::get(&fx.pool, &tenant(TENANT), after_id)
            .await
            .unwrap(),
        None
    );

    // `run` ends with the same error instead of looping or skipping, and stays put.
    let result = tokio::time::timeout(WAIT, runner.run(stopped))
        .await
        .unwrap();
    match result {
        Err(ProjectionError::Undecodable { position, .. }) => assert_eq!(position, poison),
        other => panic!("expected Undecodable, got {other:?}"),
    }
    assert_eq!(
        checkpoint::read(&fx.pool, "files").await.unwrap(),
        Some(before)
    );
}

#[tokio::test]
async fn events_of_other_aggregates_move_the_checkpoint_but_nothing_else() {
    let fx = fixture().await;
    let position = fx
        .log
        .append_raw(
            TENANT,
            "task",
            "task-1",
            &[("TaskCreated".to_owned(), json!({"anything": "goes"}))],
        )
        .await;
    let mut runner = runner(&fx.pool);
    catch_up_to(&mut runner, position).await;
    assert_eq!(snapshot(&fx.pool).await, (vec![], vec![]));
    assert_eq!(
        checkpoint::read(&fx.pool, "files").await.unwrap(),
        Some(position)
    );
}

/// A read model that records every event a runner hands it, in a table with no
/// idempotence at all: an event applied twice is there twice. (The files
/// projection cannot show that: its statements are idempotent by position, so a
/// double apply leaves its rows as they were.)
#[derive(Debug, Clone, Copy)]
struct Applications {
    runner: &'static str,
}

impl Applications {
    const TABLE: &'static str =
        "CREATE TABLE applications (position BIGINT NOT NULL, runner TEXT NOT NULL)";
}

impl Projection for Applications {
    fn name(&self) -> &'static str {
        "applications"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["applications"]
    }

    async fn apply(&self, tx: &ApplyTx<'_>, event: &LoggedEvent) -> Result<(), ProjectionError> {
        tx.write(
            "INSERT INTO applications (position, runner) VALUES ($1, $2)",
            &[
                (&event.position, tokio_postgres::types::Type::INT8),
                (&self.runner, tokio_postgres::types::Type::TEXT),
            ],
        )
        .await?;
        Ok(())
    }
}

#[tokio::test]
async fn two_runners_on_one_database_apply_each_event_once() {
    let fx = fixture().await;
    fx.pool
        .get()
        .await
        .unwrap()
        .batch_execute(Applications::TABLE)
        .await
        .unwrap();
    let last = write_history(&fx.log, 30).await;
    let runner = |name, batch_size| {
        Runner::new(
            fx.pool.clone(),
            FilesProjection,
            RunnerConfig {
                batch_size,
                ..RunnerConfig::default()
            },
        )
        .with(Applications { runner: name })
    };
    // Small batches: the two contend for the checkpoints batch after batch.
    let (mut a, mut b) = (runner("a", 5), runner("b", 7));
    tokio::join!(catch_up_to(&mut a, last), catch_up_to(&mut b, last));

    let client = fx.pool.get().await.unwrap();
    let logged: Vec<i64> = client
        .query("SELECT position FROM events ORDER BY position", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let applied: Vec<(i64, i64, String)> = client
        .query(
            "SELECT position, count(*), string_agg(runner, ',') FROM applications \
             GROUP BY position ORDER BY position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    let twice: Vec<&(i64, i64, String)> = applied.iter().filter(|(_, n, _)| *n != 1).collect();
    assert!(twice.is_empty(), "applied more than once: {twice:?}");
    assert_eq!(
        applied.iter().map(|(p, _, _)| *p).collect::<Vec<_>>(),
        logged,
        "every event of the log, none left out"
    );
    let together = snapshot(&fx.pool).await;

    rebuild(&fx.pool, &FilesProjection).await.unwrap();
    assert_eq!(snapshot(&fx.pool).await, together);
}

#[tokio::test]
async fn payloads_stored_in_the_tagged_shape_of_cqrs_es_read_the_same() {
    let fx = fixture().await;
    let id = FileId::new();
    let upload = Upload::new("tagged", at(0)).event(id);
    let rename = FileEvent::FileRenamed {
        from: DisplayName::parse("tagged").unwrap(),
        name: DisplayName::parse("still tagged").unwrap(),
    };
    // What `serde_json::to_value` of the event enum gives, as cqrs-es serializes it.
    let rows: Vec<(String, Value)> = [upload, rename]
        .iter()
        .map(|event| {
            (
                common::event_type(event).to_owned(),
                serde_json::to_value(event).unwrap(),
            )
        })
        .collect();
    assert!(
        rows[0].1.get(FileEvent::UPLOADED).is_some(),
        "tagged: {}",
        rows[0].1
    );
    let position = fx
        .log
        .append_raw(TENANT, "file", &id.to_string(), &rows)
        .await;
    catch_up_to(&mut runner(&fx.pool), position).await;
    let view = files::get(&fx.pool, &tenant(TENANT), id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(view.name.as_str(), "still tagged");
}

// ------------------------------------------ one runner for every read model

/// A runner of two read models, as a process with the projections role runs all of
/// them in one. (The portal projection is left out: the made-up task events of
/// `write_history` are not real task events, and it would refuse them.)
fn runner_of_all(pool: &Pool, batch_size: i64) -> Runner {
    Runner::new(
        pool.clone(),
        FilesProjection,
        RunnerConfig {
            batch_size,
            ..RunnerConfig::default()
        },
    )
    .with(BundlesProjection)
}

async fn checkpoints(pool: &Pool) -> Vec<Option<i64>> {
    let mut positions = Vec::new();
    for name in ["files", "bundles"] {
        positions.push(checkpoint::read(pool, name).await.unwrap());
    }
    positions
}

#[tokio::test]
async fn one_runner_feeds_every_read_model_and_moves_each_checkpoint() {
    let fx = fixture().await;
    let last = write_history(&fx.log, 24).await;
    let mut all = runner_of_all(&fx.pool, 5);
    catch_up_to(&mut all, last).await;
    assert_eq!(checkpoints(&fx.pool).await, vec![Some(last); 2]);
    for handle in all.handles() {
        assert_eq!(handle.checkpoint(), last, "{}", handle.name());
    }
    let together = snapshot(&fx.pool).await;

    // The same log through a runner of the files projection alone gives the same rows.
    rebuild(&fx.pool, &FilesProjection).await.unwrap();
    assert_eq!(snapshot(&fx.pool).await, together);
}

#[tokio::test]
async fn a_checkpoint_moved_under_a_shared_runner_restarts_only_that_read_model() {
    let fx = fixture().await;
    let first = write_history(&fx.log, 10).await;
    let mut all = runner_of_all(&fx.pool, 500);
    catch_up_to(&mut all, first).await;
    let before = snapshot(&fx.pool).await;

    // What a rebuild's swap or an operator does to one read model: move its
    // checkpoint. The others stay where they are.
    fx.pool
        .get()
        .await
        .unwrap()
        .execute(
            "UPDATE checkpoints SET position = 0 WHERE name = 'files'",
            &[],
        )
        .await
        .unwrap();
    let (id, later) = fx.log.upload(&Upload::new("later", at(500))).await;
    catch_up_to(&mut all, later).await;

    assert_eq!(checkpoints(&fx.pool).await, vec![Some(later); 2]);
    let (rows, tombstones) = snapshot(&fx.pool).await;
    assert_eq!(
        tombstones, before.1,
        "applying the log again changed nothing"
    );
    assert_eq!(rows.len(), before.0.len() + 1);
    assert!(
        files::get(&fx.pool, &tenant(TENANT), id)
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn an_event_one_read_model_refuses_stops_the_shared_runner_right_in_front_of_it() {
    let fx = fixture().await;
    let (good, before) = fx.log.upload(&Upload::new("good", at(0))).await;
    let poison = fx.log.append_poison().await;
    fx.log.upload(&Upload::new("after", at(1))).await;

    let mut all = runner_of_all(&fx.pool, 500);
    let error = step_until_refused(&mut all).await;
    assert!(
        matches!(error, ProjectionError::Undecodable { position, .. } if position == poison),
        "{error:?}"
    );
    // Files (the first, and the one that refused) and the read models after it all
    // stop right before the poison; what came before is applied.
    assert_eq!(checkpoints(&fx.pool).await, vec![Some(before); 2]);
    assert!(
        files::get(&fx.pool, &tenant(TENANT), good)
            .await
            .unwrap()
            .is_some()
    );
}
