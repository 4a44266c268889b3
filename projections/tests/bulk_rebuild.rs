//! The bulk build of the files projection (`files::bulk`) against the reference it
//! must equal: the same log rebuilt by applying every event one by one
//! (`RebuildOptions { bulk: false, .. }`, the runner's `apply`). Each test gets its
//! own migrated database and writes rows into the real `events` table the way the
//! event store does (xid first, positions from the table's trigger).

mod common;

use common::{Row, Upload, append, at, snapshot};
use dossier_domain::{
    BlobKey, CustomerId, DisplayName, FileEvent, FileId, Origin, TenantId, Visibility,
};
use dossier_eventlog::db::Pool;
use dossier_eventlog::follow::checkpoint;
use dossier_projections::rebuild::{RebuildOptions, rebuild_with_options};
use dossier_projections::{FilesProjection, ProjectionError, RebuildReport};
use dossier_test_support::db::fresh_database;
use serde_json::{Value, json};
use uuid::Uuid;

// ---------------------------------------------------------------- helpers

/// An upload whose attributes vary with `created`.
fn upload(
    tenant: &'static str,
    customer: &'static str,
    id: Uuid,
    name: &str,
    created: i64,
) -> FileEvent {
    Upload {
        tenant,
        customer,
        name: name.to_owned(),
        created: at(created),
        visibility: Visibility::ALL[created as usize % 3],
        origin: if created % 5 == 0 {
            Origin::System
        } else {
            Origin::StaffUpload
        },
        contract: (created % 4 == 0).then_some("k-1"),
        task: (created % 6 == 0).then(Uuid::now_v7),
        size: 1000 + created as u64,
    }
    .event(FileId(id))
}

fn renamed(name: &str) -> FileEvent {
    FileEvent::FileRenamed {
        from: DisplayName::parse("before").unwrap(),
        name: DisplayName::parse(name).unwrap(),
    }
}

fn deleted(id: Uuid) -> FileEvent {
    let tenant = TenantId::parse("acme").unwrap();
    let customer = CustomerId::parse("cust-1").unwrap();
    FileEvent::FileDeleted {
        blob_key: BlobKey::for_file(&tenant, &customer, FileId(id)),
        customer_id: customer,
        deleted_at: at(9000),
    }
}

fn viewed(minutes: i64) -> FileEvent {
    FileEvent::FileViewed {
        viewer: CustomerId::parse("cust-1").unwrap(),
        viewed_at: at(minutes),
    }
}

async fn rebuild(pool: &Pool, bulk: bool, bulk_chunk: u64) -> RebuildReport {
    rebuild_with_options(
        pool,
        &FilesProjection,
        RebuildOptions {
            bulk,
            bulk_chunk,
            ..RebuildOptions::default()
        },
        &|_| {},
    )
    .await
    .unwrap()
}

/// Rebuilds one by one (the reference), then in bulk with one chunk and with
/// several chunk sizes, and checks every bulk result against the reference.
async fn assert_bulk_equals_one_by_one(pool: &Pool) -> (Vec<Value>, Vec<Value>) {
    let reference_report = rebuild(pool, false, 0).await;
    let reference = snapshot(pool).await;
    for chunk in [1_000_000, 1, 2, 3, 7] {
        let report = rebuild(pool, true, chunk).await;
        assert_eq!(
            report, reference_report,
            "same events read, same position (chunk {chunk})"
        );
        assert_eq!(
            snapshot(pool).await,
            reference,
            "bulk build with chunks of {chunk} events differs from applying every event"
        );
    }
    reference
}

/// A small deterministic generator (xorshift), so that a failure repeats.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn bulk_rebuild_gives_the_same_files_tables_as_applying_every_event() {
    let (pool, _) = fresh_database().await.unwrap();
    let (a, b, c, d, e) = (
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    );
    // a: everything, a rename after a view, a second view (the first one stays).
    append(
        &pool,
        &[
            Row::file("acme", a, &upload("acme", "cust-1", a, "a", 1)),
            Row::file("acme", a, &viewed(10)),
            Row::file("acme", a, &renamed("a renamed after the view")),
            Row::file(
                "acme",
                a,
                &FileEvent::FileVisibilityChanged {
                    from: Visibility::Internal,
                    visibility: Visibility::Portal,
                },
            ),
            Row::file("acme", a, &viewed(20)),
            Row::file("acme", a, &FileEvent::FileSigned { signed_at: at(30) }),
            Row::file("acme", a, &FileEvent::FileSigned { signed_at: at(31) }),
        ],
    )
    .await;
    // b: deleted, purged, then uploaded again under the same id and renamed: the
    // tombstone keeps it out, the rename finds no row.
    append(
        &pool,
        &[
            Row::file("acme", b, &upload("acme", "cust-1", b, "b", 2)),
            Row::file("acme", b, &renamed("b before the delete")),
            Row::file("acme", b, &deleted(b)),
            Row::file(
                "acme",
                b,
                &FileEvent::BlobPurged {
                    blob_key: BlobKey::from_recorded("acme/cust-1/b"),
                },
            ),
            Row::file("acme", b, &upload("acme", "cust-1", b, "b again", 3)),
            Row::file("acme", b, &renamed("b after the delete")),
            Row::file("acme", b, &deleted(b)),
        ],
    )
    .await;
    // c: another tenant; a change logged under the wrong tenant does nothing, a
    // delete logged under the wrong tenant leaves the row and a tombstone.
    append(
        &pool,
        &[
            Row::file("globex", c, &upload("globex", "cust-9", c, "c", 4)),
            Row::file("acme", c, &renamed("not globex's")),
            Row::file("globex", c, &renamed("c renamed")),
            Row::file("acme", c, &deleted(c)),
            Row::file("globex", c, &viewed(40)),
        ],
    )
    .await;
    // d: a change before its upload (nothing to change yet), a second upload of a
    // live file (ignored), a v1 upload without contract and task (upcast), the
    // tagged shape cqrs-es alone would write.
    let mut v1 = Row::file("acme", d, &upload("acme", "cust-2", d, "d", 5));
    v1.version = "1".to_owned();
    v1.payload.as_object_mut().unwrap().remove("contract_id");
    v1.payload.as_object_mut().unwrap().remove("task_id");
    let mut tagged = Row::file("acme", d, &renamed("d tagged"));
    tagged.payload = serde_json::to_value(renamed("d tagged")).unwrap();
    append(
        &pool,
        &[
            Row::file("acme", d, &renamed("too early")),
            v1,
            Row::file("acme", d, &upload("acme", "cust-2", d, "d twice", 6)),
            tagged,
        ],
    )
    .await;
    // e: untouched after its upload; other aggregates around it.
    append(
        &pool,
        &[
            Row::raw(
                "acme",
                "task",
                "task-1",
                "TaskCreated",
                json!({"any": "thing"}),
            ),
            Row::file("acme", e, &upload("acme", "cust-1", e, "e", 7)),
            Row::raw("acme", "settings", "acme", "PortalUploadsSet", json!({})),
        ],
    )
    .await;

    let (files, tombstones) = assert_bulk_equals_one_by_one(&pool).await;
    // The reference itself says what the rules say.
    let by_id = |id: Uuid| {
        files
            .iter()
            .find(|row| row["id"] == json!(id))
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(by_id(a)["name"], "a renamed after the view");
    assert_eq!(by_id(a)["viewed_at"], json!("2026-01-01T00:10:00+00:00"));
    assert_eq!(by_id(a)["signed_at"], json!("2026-01-01T00:31:00+00:00"));
    assert_eq!(by_id(b), Value::Null);
    assert_eq!(by_id(c)["name"], "c renamed");
    assert_eq!(by_id(d)["name"], "d tagged");
    assert_eq!(by_id(d)["contract_id"], Value::Null);
    assert_eq!(by_id(e)["name"], "e");
    assert_eq!(files.len(), 4);
    assert_eq!(tombstones.len(), 2, "b once (the first delete) and c");
}

#[tokio::test]
async fn bulk_rebuild_of_random_histories_equals_applying_every_event() {
    let (pool, _) = fresh_database().await.unwrap();
    let mut rng = Rng(0x5eed_f11e);
    // Few ids, many events: re-uploads, deletes, changes before uploads and after
    // deletes, two tenants, all interleaved across transactions.
    let ids: Vec<Uuid> = (0..12).map(|_| Uuid::now_v7()).collect();
    let tenants = ["acme", "globex"];
    for round in 0..40 {
        let mut rows = Vec::new();
        for _ in 0..(1 + rng.below(4)) {
            let id = ids[rng.below(ids.len() as u64) as usize];
            // Mostly the file's "own" tenant, sometimes the other one.
            let own = tenants[(id.as_u128() % 2) as usize];
            let tenant = if rng.below(8) == 0 {
                tenants[(id.as_u128() % 2 + 1) as usize % 2]
            } else {
                own
            };
            let minute = round * 10 + rng.below(10) as i64;
            let event = match rng.below(9) {
                0 | 1 => upload(own, "cust-1", id, &format!("up {round}"), minute),
                2 => renamed(&format!("name {round}")),
                3 => FileEvent::FileVisibilityChanged {
                    from: Visibility::Internal,
                    visibility: Visibility::ALL[rng.below(3) as usize],
                },
                4 => viewed(minute),
                5 => FileEvent::FileSigned {
                    signed_at: at(minute),
                },
                6 => deleted(id),
                7 => FileEvent::BlobPurged {
                    blob_key: BlobKey::from_recorded(format!("{own}/cust-1/{id}")),
                },
                _ => {
                    rows.push(Row::raw(own, "task", "t", "TaskCreated", json!({})));
                    continue;
                }
            };
            rows.push(Row::file(tenant, id, &event));
        }
        append(&pool, &rows).await;
    }
    let (files, tombstones) = assert_bulk_equals_one_by_one(&pool).await;
    assert!(
        !files.is_empty() && !tombstones.is_empty(),
        "a history worth the name"
    );
}

#[tokio::test]
async fn bulk_rebuild_reports_every_event_of_the_log_and_the_head_it_reached() {
    let (pool, _) = fresh_database().await.unwrap();
    let id = Uuid::now_v7();
    append(
        &pool,
        &[
            Row::raw("acme", "task", "t", "TaskCreated", json!({})),
            Row::file("acme", id, &upload("acme", "cust-1", id, "x", 1)),
            Row::raw("acme", "bundle", "b", "BundleRequested", json!({})),
        ],
    )
    .await;
    let last = append(&pool, &[Row::file("acme", id, &renamed("y"))]).await;
    let seen = std::sync::Mutex::new(Vec::new());
    let report = rebuild_with_options(
        &pool,
        &FilesProjection,
        RebuildOptions::default(),
        &|progress| seen.lock().unwrap().push(progress),
    )
    .await
    .unwrap();
    assert_eq!(report.events, 4, "events of every aggregate are counted");
    assert_eq!(report.position, last);
    let seen = seen.into_inner().unwrap();
    assert!(
        seen.iter()
            .any(|p| p.position == last && p.head == last && p.events == 4)
    );
    assert_eq!(
        checkpoint::read(&pool, FilesProjection::NAME)
            .await
            .unwrap(),
        Some(last)
    );
}

#[tokio::test]
async fn an_undecodable_event_stops_a_bulk_rebuild_and_changes_nothing_live() {
    let (pool, _) = fresh_database().await.unwrap();
    let id = Uuid::now_v7();
    let before = append(
        &pool,
        &[Row::file(
            "acme",
            id,
            &upload("acme", "cust-1", id, "good", 1),
        )],
    )
    .await;
    rebuild(&pool, false, 0).await;
    let live = snapshot(&pool).await;
    assert_eq!(live.0.len(), 1);

    let poison = append(
        &pool,
        &[Row::raw(
            "acme",
            "file",
            &id.to_string(),
            FileEvent::RENAMED,
            json!({"nonsense": true}),
        )],
    )
    .await;
    append(
        &pool,
        &[Row::file("acme", id, &renamed("after the poison"))],
    )
    .await;

    for chunk in [1, 1_000_000] {
        let error = rebuild_with_options(
            &pool,
            &FilesProjection,
            RebuildOptions {
                bulk: true,
                bulk_chunk: chunk,
                ..RebuildOptions::default()
            },
            &|_| {},
        )
        .await
        .unwrap_err();
        match error {
            ProjectionError::Undecodable { position, .. } => assert_eq!(position, poison),
            other => panic!("expected Undecodable, got {other:?}"),
        }
        assert_eq!(snapshot(&pool).await, live, "the live tables are untouched");
        assert_eq!(
            checkpoint::read(&pool, FilesProjection::NAME)
                .await
                .unwrap(),
            Some(before)
        );
        let leftovers: i64 = pool
            .get()
            .await
            .unwrap()
            .query_one(
                "SELECT count(*) FROM pg_namespace WHERE nspname = 'rebuild_files'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(leftovers, 0, "the schema built aside is gone");
    }
}

#[tokio::test]
async fn a_file_id_that_is_not_a_uuid_stops_a_bulk_rebuild_as_malformed() {
    let (pool, _) = fresh_database().await.unwrap();
    let bad = append(
        &pool,
        &[Row::raw(
            "acme",
            "file",
            "not-a-uuid",
            FileEvent::SIGNED,
            json!({"signed_at": at(1)}),
        )],
    )
    .await;
    for bulk in [false, true] {
        let error = rebuild_with_options(
            &pool,
            &FilesProjection,
            RebuildOptions {
                bulk,
                ..RebuildOptions::default()
            },
            &|_| {},
        )
        .await
        .unwrap_err();
        match error {
            ProjectionError::Malformed { position, .. } => assert_eq!(position, bad),
            other => panic!("expected Malformed (bulk: {bulk}), got {other:?}"),
        }
    }
}

/// Rebuilds with the personal fields opened by `cipher`, in bulk or one by one.
async fn rebuild_opening(
    pool: &Pool,
    bulk: bool,
    cipher: &std::sync::Arc<dossier_eventlog::personal::FieldCipher>,
) -> RebuildReport {
    rebuild_with_options(
        pool,
        &FilesProjection,
        RebuildOptions {
            bulk,
            ..RebuildOptions::default()
        }
        .opening_with(cipher.clone()),
        &|_| {},
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_sealed_log_of_several_open_chunks_rebuilds_in_bulk_as_applying_every_event() {
    use dossier_keys::Owner;
    let (pool, _) = fresh_database().await.unwrap();
    let keys = dossier_test_support::development_keys(&pool).await.unwrap();
    // Uploads and renames, every personal field sealed under its file's key:
    // 9,000 sealed events, more than two chunks the bulk build opens at once
    // (one on a task of its own while the next is read), with clear events
    // among them and each file's rename chunks after its upload.
    const FILES: usize = 4_500;
    let ids: Vec<Uuid> = (0..FILES).map(|_| Uuid::now_v7()).collect();
    let owners: Vec<Owner<'_>> = ids.iter().map(|id| Owner::File(*id)).collect();
    let data_keys = keys.create_many("acme", &owners).await.unwrap();
    let sealed = |mut row: Row, key: &dossier_keys::DataKey, fields: &[&str]| {
        for field in fields {
            let plain = row.payload[*field].as_str().unwrap().to_owned();
            row.payload[*field] = key.seal_field(&plain).into();
        }
        row
    };
    let mut rows = Vec::new();
    for (i, (id, key)) in ids.iter().zip(&data_keys).enumerate() {
        let event = upload("acme", "cust-1", *id, &format!("file {i}"), i as i64);
        rows.push(sealed(
            Row::file("acme", *id, &event),
            key,
            &["name", "file_name", "content_type", "sha256"],
        ));
        if i % 3 == 0 {
            rows.push(Row::file("acme", *id, &viewed(i as i64 + 1)));
        }
    }
    for (i, (id, key)) in ids.iter().zip(&data_keys).enumerate().rev() {
        let event = renamed(&format!("renamed {i}"));
        rows.push(sealed(
            Row::file("acme", *id, &event),
            key,
            &["from", "name"],
        ));
    }
    append(&pool, &rows).await;
    let cipher = dossier_eventlog::personal::FieldCipher::new(keys, pool.clone(), true);

    let reference_report = rebuild_opening(&pool, false, &cipher).await;
    let reference = snapshot(&pool).await;
    assert_eq!(reference.0.len(), FILES);
    assert!(
        reference.0.iter().all(|row| row["name"]
            .as_str()
            .is_some_and(|name| name.starts_with("renamed "))),
        "every file ends renamed, in clear"
    );
    let report = rebuild_opening(&pool, true, &cipher).await;
    assert_eq!(report, reference_report);
    assert_eq!(
        snapshot(&pool).await,
        reference,
        "the bulk build of a sealed log differs from applying every event"
    );
}
