//! Auditors end to end: the audit trail, the raw log, replay and point-in-time,
//! tamper evidence, rebuilds and event versions, on the real application with
//! real Postgres, RabbitMQ and S3.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use dossier_api::auth::jwt::Role;
use dossier_eventlog::chain::{self, ProblemKind, Sealer};
use dossier_projections::replay::{self, ReplayFilter};
use dossier_test_support::client::Upload;
use dossier_test_support::wait::eventually;
use dossier_test_support::{TestApp, error_code};
use reqwest::Method;
use serde_json::{Value, json};

const KEY: &str = "checkpoint-key-of-the-audit-tests-not-the-jwt-secret";

/// The contract's Event keys, exactly.
const EVENT_KEYS: [&str; 11] = [
    "actor",
    "aggregate_id",
    "aggregate_type",
    "at",
    "event_type",
    "event_version",
    "id",
    "payload",
    "position",
    "sequence",
    "tenant",
];

async fn spawn() -> TestApp {
    TestApp::spawn_with(&[("DOSSIER_CHECKPOINT_KEY", KEY)]).await
}

async fn audit(app: &TestApp, token: &str, query: &str) -> Value {
    let response = app.get(token, &format!("/v1/audit{query}")).await;
    assert_eq!(response.status(), 200, "GET /v1/audit{query}");
    response.json().await.unwrap()
}

/// Every item of the audit trail for `query`, following the cursor.
async fn audit_all(app: &TestApp, token: &str, query: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let separator = if query.is_empty() { "?" } else { "&" };
        let page_query = match &cursor {
            Some(cursor) => format!("{query}{separator}cursor={cursor}"),
            None => query.to_owned(),
        };
        let page = audit(app, token, &page_query).await;
        items.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return items,
        }
    }
}

async fn positions_of(app: &TestApp, tenant: &str) -> Vec<i64> {
    let client = app.pool.get().await.unwrap();
    client
        .query(
            "SELECT position FROM events WHERE tenant = $1 ORDER BY position",
            &[&tenant],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

async fn upload_as(
    app: &TestApp,
    token: &str,
    customer: &str,
    name: &str,
    visibility: &str,
) -> String {
    let upload = Upload::new(name, name.as_bytes().to_vec()).field("visibility", visibility);
    app.api(token).upload_file(customer, &upload).await.id
}

/// A moment strictly between what happened before and what happens after, on
/// the clock the log's times come from: later than a clock reading taken when
/// everything before had been answered (and so recorded), and passed by the
/// clock before this returns, so that anything after is recorded later.
async fn moment(app: &TestApp) -> DateTime<Utc> {
    let client = app.pool.get().await.unwrap();
    let clock = async || -> DateTime<Utc> {
        client
            .query_one("SELECT clock_timestamp()", &[])
            .await
            .unwrap()
            .get(0)
    };
    let everything_before = clock().await;
    let moment = eventually("the clock to pass what happened before", async || {
        let now = clock().await;
        if now > everything_before {
            Ok(now)
        } else {
            Err(now)
        }
    })
    .await;
    eventually("the clock to pass the moment", async || {
        let now = clock().await;
        if now > moment { Ok(()) } else { Err(now) }
    })
    .await;
    moment
}

async fn replay_lines(app: &TestApp, filter: &ReplayFilter) -> Vec<Value> {
    let mut out = Vec::new();
    let cipher = app.cipher().await;
    replay::replay(&app.pool, filter, Some(&cipher), &mut out, &|_| {})
        .await
        .unwrap();
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

async fn seal(app: &TestApp) {
    Sealer::new(app.pool.clone()).catch_up().await.unwrap();
}

async fn tamper(app: &TestApp, sql: &str) {
    let client = app.pool.get().await.unwrap();
    client
        .batch_execute(&format!(
            "BEGIN; ALTER TABLE events DISABLE TRIGGER events_append_only; {sql}; \
             ALTER TABLE events ENABLE TRIGGER events_append_only; COMMIT;"
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn the_audit_trail_names_who_uploaded_downloaded_renamed_and_deleted() {
    let app = spawn().await;
    let alice = app.token("acme", Role::Staff, "alice", None);
    let bob = app.token("acme", Role::Staff, "bob", None);
    let customer = app.customer("acme", "cust-1");
    let id = upload_as(&app, &alice, "cust-1", "Contract 2025", "portal").await;

    let staff_download = app.get(&bob, &format!("/v1/files/{id}/content")).await;
    assert_eq!(staff_download.status(), 200);
    let portal_download = app
        .get(&customer, &format!("/v1/portal/files/{id}/content"))
        .await;
    assert_eq!(portal_download.status(), 200);
    let renamed = app
        .send_json(
            Method::PATCH,
            &bob,
            &format!("/v1/files/{id}"),
            json!({"name": "Contract 2025 (signed)"}),
        )
        .await;
    assert_eq!(renamed.status(), 200);
    // While the file lives, its trail reads its names.
    let live = audit_all(&app, &app.auditor("acme"), &format!("?file_id={id}")).await;
    assert_eq!(live[0]["details"]["from"], "Contract 2025");
    assert_eq!(live[0]["details"]["name"], "Contract 2025 (signed)");
    assert_eq!(live[4]["details"]["name"], "Contract 2025");
    assert!(live.iter().all(|item| item.get("erased").is_none()));
    let deleted = app
        .delete(&alice, &format!("/v1/files/{id}?confirm=true"))
        .await;
    assert_eq!(deleted.status(), 204);

    let trail = audit_all(&app, &app.auditor("acme"), &format!("?file_id={id}")).await;
    // The blob worker's purge may or may not have happened yet; it is not a person's act.
    let trail: Vec<&Value> = trail
        .iter()
        .filter(|item| item["action"] != "file.content_purged")
        .collect();
    let summary: Vec<(String, String)> = trail
        .iter()
        .map(|item| {
            (
                item["action"].as_str().unwrap().to_owned(),
                item["actor"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected = [
        ("file.deleted", "alice"),
        ("file.renamed", "bob"),
        ("file.downloaded", "user-cust-1"),
        ("file.viewed", "user-cust-1"),
        ("file.downloaded", "bob"),
        ("file.uploaded", "alice"),
    ]
    .map(|(action, actor)| (action.to_owned(), actor.to_owned()));
    assert_eq!(summary, expected, "newest first, with the right actors");
    for item in &trail {
        assert_eq!(item["file_id"], id.as_str());
        assert_eq!(item["customer_id"], "cust-1");
        assert!(item["at"].as_str().is_some() && item["position"].as_i64().is_some());
        let keys: BTreeSet<&str> = item
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .filter(|key| *key != "erased")
            .collect();
        assert_eq!(
            keys,
            BTreeSet::from([
                "action",
                "actor",
                "at",
                "customer_id",
                "details",
                "file_id",
                "position"
            ])
        );
        assert!(
            item["details"].get("blob_key").is_none(),
            "internal keys stay out"
        );
    }
    assert_eq!(trail[2]["details"]["channel"], "portal");
    assert_eq!(trail[4]["details"]["channel"], "staff");
    // The delete destroyed the file's key: the trail keeps who did what and
    // when, and says which names are gone.
    assert_eq!(trail[1]["details"]["from"], Value::Null);
    assert_eq!(trail[1]["details"]["name"], Value::Null);
    assert_eq!(trail[1]["erased"], json!(["from", "name"]));
    assert_eq!(trail[5]["details"]["name"], Value::Null);
    assert_eq!(
        trail[5]["erased"],
        json!(["name", "file_name", "content_type", "sha256"])
    );
    assert_eq!(trail[5]["details"]["visibility"], "portal");

    // Staff read it too; the positions are those of the log.
    let by_staff = audit_all(&app, &alice, &format!("?file_id={id}")).await;
    assert!(by_staff.len() >= trail.len());
    let log = positions_of(&app, "acme").await;
    for item in &trail {
        assert!(log.contains(&item["position"].as_i64().unwrap()));
    }
}

#[tokio::test]
async fn the_audit_trail_is_per_tenant_filters_pages_and_refuses_customers() {
    let app = spawn().await;
    let acme = app.staff("acme");
    let globex = app.staff("globex");
    let mut acme_files = Vec::new();
    for i in 0..3 {
        acme_files.push(
            upload_as(
                &app,
                &acme,
                &format!("cust-{}", i % 2),
                &format!("A{i}"),
                "internal",
            )
            .await,
        );
        upload_as(&app, &globex, "cust-0", &format!("G{i}"), "internal").await;
    }
    let before_rename = moment(&app).await;
    app.send_json(
        Method::PATCH,
        &acme,
        &format!("/v1/files/{}", acme_files[0]),
        json!({"name": "A0 renamed"}),
    )
    .await;

    let auditor = app.auditor("acme");
    let everything = audit_all(&app, &auditor, "").await;
    assert_eq!(
        everything.len(),
        4,
        "three uploads and a rename: {everything:#?}"
    );
    assert!(everything.iter().all(|item| item["actor"] == "staff-1"));
    let globex_positions = positions_of(&app, "globex").await;
    for item in &everything {
        assert!(!globex_positions.contains(&item["position"].as_i64().unwrap()));
    }
    let positions: Vec<i64> = everything
        .iter()
        .map(|i| i["position"].as_i64().unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] > w[1]), "newest first");

    // Paging one by one gives the same, without repeats.
    let paged = audit_all(&app, &auditor, "?limit=1").await;
    assert_eq!(paged, everything);
    let first = audit(&app, &auditor, "?limit=3").await;
    assert_eq!(first["items"].as_array().unwrap().len(), 3);
    assert!(first["next_cursor"].is_string());

    let cust_0 = audit_all(&app, &auditor, "?customer_id=cust-0").await;
    assert_eq!(cust_0.len(), 3, "files 0 and 2, and the rename of 0");
    assert!(cust_0.iter().all(|item| item["customer_id"] == "cust-0"));
    let after = audit_all(
        &app,
        &auditor,
        &format!("?from={}", before_rename.to_rfc3339().replace('+', "%2B")),
    )
    .await;
    assert_eq!(after.len(), 1);
    assert_eq!(after[0]["action"], "file.renamed");
    let until = audit_all(
        &app,
        &auditor,
        &format!("?to={}", before_rename.to_rfc3339().replace('+', "%2B")),
    )
    .await;
    assert_eq!(until.len(), 3);
    assert!(audit_all(&app, &auditor, "?to=2000-01-01").await.is_empty());

    // Globex's auditor sees globex's uploads only.
    let theirs = audit_all(&app, &app.auditor("globex"), "").await;
    assert_eq!(theirs.len(), 3);
    assert!(theirs.iter().all(|item| item["customer_id"] == "cust-0"));

    let customer = app.get(&app.customer("acme", "cust-0"), "/v1/audit").await;
    assert_eq!(customer.status(), 403);
    assert_eq!(error_code(customer).await, "forbidden");
    let bad = app.get(&auditor, "/v1/audit?cursor=nonsense").await;
    assert_eq!(bad.status(), 422);
    let bad = app.get(&auditor, "/v1/audit?limit=501").await;
    assert_eq!(bad.status(), 422);
}

#[tokio::test]
async fn the_raw_log_is_the_tenants_own_in_log_order_paged_by_position() {
    let app = spawn().await;
    let acme = app.staff("acme");
    let globex = app.staff("globex");
    for i in 0..4 {
        let id = upload_as(&app, &acme, "cust-1", &format!("A{i}"), "internal").await;
        upload_as(&app, &globex, "cust-1", &format!("G{i}"), "internal").await;
        if i % 2 == 0 {
            app.send_json(
                Method::PATCH,
                &acme,
                &format!("/v1/files/{id}"),
                json!({"name": format!("A{i}!")}),
            )
            .await;
        }
    }
    let auditor = app.auditor("acme");
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page: Value = app
            .get(&auditor, &format!("/v1/events?after={after}&limit=2"))
            .await
            .json()
            .await
            .unwrap();
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        let next = page["next_after"].as_i64().unwrap();
        if items.is_empty() {
            assert_eq!(next, after, "an empty page keeps the place");
            break;
        }
        assert_eq!(next, items.last().unwrap()["position"].as_i64().unwrap());
        seen.extend(items.iter().cloned());
        after = next;
    }
    let positions: Vec<i64> = seen
        .iter()
        .map(|e| e["position"].as_i64().unwrap())
        .collect();
    assert_eq!(
        positions,
        positions_of(&app, "acme").await,
        "every acme event, in log order"
    );
    assert_eq!(seen.len(), 6);
    for event in &seen {
        assert_eq!(event["tenant"], "acme");
        let keys: BTreeSet<&str> = event
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .filter(|key| *key != "erased")
            .collect();
        assert_eq!(keys, BTreeSet::from(EVENT_KEYS));
    }
    assert_eq!(seen[0]["event_type"], "FileUploaded");
    assert_eq!(seen[0]["event_version"], "2");
    assert_eq!(seen[0]["actor"], "staff-1");

    // Paging from the middle, and the whole page at once.
    let all: Value = app.get(&auditor, "/v1/events").await.json().await.unwrap();
    assert_eq!(all["items"].as_array().unwrap(), &seen);
    let tail: Value = app
        .get(&auditor, &format!("/v1/events?after={}", positions[2]))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(tail["items"].as_array().unwrap(), &seen[3..]);

    for token in [acme.clone(), app.customer("acme", "cust-1")] {
        let refused = app.get(&token, "/v1/events").await;
        assert_eq!(refused.status(), 403);
    }
    assert_eq!(app.get(&auditor, "/v1/events?limit=0").await.status(), 422);
    let document: Value = app
        .get(&auditor, "/openapi.json")
        .await
        .json()
        .await
        .unwrap();
    for path in ["/v1/audit", "/v1/events"] {
        assert!(
            document["paths"][path]["get"].is_object(),
            "{path} is documented"
        );
    }
    assert_eq!(app.get(&auditor, "/v1/events?after=x").await.status(), 422);
}

#[tokio::test]
async fn replay_prints_the_log_and_as_of_shows_the_list_before_and_after_a_rename_and_a_delete() {
    let app = spawn().await;
    let staff = app.staff("acme");
    let before_all = moment(&app).await;
    let a = upload_as(&app, &staff, "cust-1", "Old name", "portal").await;
    let b = upload_as(&app, &staff, "cust-1", "Second", "internal").await;
    let c = upload_as(&app, &staff, "cust-2", "Someone else's", "internal").await;
    upload_as(
        &app,
        &app.staff("globex"),
        "cust-1",
        "Other tenant",
        "internal",
    )
    .await;
    let downloaded = app.get(&staff, &format!("/v1/files/{a}/content")).await;
    assert_eq!(downloaded.status(), 200);
    let before_rename = moment(&app).await;
    app.send_json(
        Method::PATCH,
        &staff,
        &format!("/v1/files/{a}"),
        json!({"name": "New name"}),
    )
    .await;
    let before_delete = moment(&app).await;
    assert_eq!(
        app.delete(&staff, &format!("/v1/files/{b}?confirm=true"))
            .await
            .status(),
        204
    );
    let after_delete = moment(&app).await;

    // The whole log, as the contract's Events, in position order.
    let all = replay_lines(&app, &ReplayFilter::default()).await;
    let client = app.pool.get().await.unwrap();
    let count: i64 = client
        .query_one(
            "SELECT count(*) FROM events WHERE recorded_at <= $1",
            &[&after_delete],
        )
        .await
        .unwrap()
        .get(0);
    assert!(all.len() as i64 >= count);
    let positions: Vec<i64> = all
        .iter()
        .map(|e| e["position"].as_i64().unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]));
    for event in &all {
        let keys: BTreeSet<&str> = event
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .filter(|key| *key != "erased")
            .collect();
        assert_eq!(keys, BTreeSet::from(EVENT_KEYS));
    }

    // One customer: its files' events (rename and delete included) and its downloads.
    let cust_1 = replay_lines(
        &app,
        &ReplayFilter {
            tenant: Some("acme".into()),
            customer: Some("cust-1".into()),
            ..ReplayFilter::default()
        },
    )
    .await;
    let kinds: Vec<&str> = cust_1
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert!(
        kinds.starts_with(&[
            "FileUploaded",
            "FileUploaded",
            "FileDownloaded",
            "FileRenamed",
            "FileDeleted"
        ]),
        "{kinds:?}"
    );
    assert!(cust_1.iter().all(|e| e["tenant"] == "acme"));
    assert!(cust_1.iter().all(|e| e["aggregate_id"] != c.as_str()));

    // One file: its own events and its download.
    let file_a = replay_lines(
        &app,
        &ReplayFilter {
            file: Some(a.clone()),
            ..ReplayFilter::default()
        },
    )
    .await;
    let kinds: Vec<&str> = file_a
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["FileUploaded", "FileDownloaded", "FileRenamed"]);

    // A time window.
    let window = replay_lines(
        &app,
        &ReplayFilter {
            tenant: Some("acme".into()),
            from: Some(before_rename),
            to: Some(before_delete),
            ..ReplayFilter::default()
        },
    )
    .await;
    assert_eq!(window.len(), 1);
    assert_eq!(window[0]["event_type"], "FileRenamed");
    assert_eq!(window[0]["payload"]["name"], "New name");

    // The list as it stood, from events alone.
    let cipher = app.cipher().await;
    let names_at = |at: DateTime<Utc>| {
        let pool = app.pool.clone();
        let cipher = cipher.clone();
        async move {
            replay::files_as_of(&pool, Some(&cipher), "acme", "cust-1", at, &|_| {})
                .await
                .unwrap()
                .into_iter()
                .map(|file| file.name.to_string())
                .collect::<Vec<_>>()
        }
    };
    assert!(names_at(before_all).await.is_empty());
    // "Second" was deleted later: the delete destroyed its key, so even the
    // list as it stood before shows its row without its name.
    assert_eq!(names_at(before_rename).await, ["", "Old name"]);
    assert_eq!(names_at(before_delete).await, ["", "New name"]);
    assert_eq!(names_at(after_delete).await, ["New name"]);
    // As `dossier replay --as-of` prints them: the erased fields are null and
    // named, the others as they stood; a file whose key lives is its resource.
    let lines: Vec<Value> = replay::files_as_of(
        &app.pool,
        Some(&cipher),
        "acme",
        "cust-1",
        before_delete,
        &|_| {},
    )
    .await
    .unwrap()
    .iter()
    .map(replay::as_of_line)
    .collect();
    assert_eq!(lines[0]["id"], b.as_str());
    assert_eq!(lines[0]["name"], Value::Null);
    assert_eq!(lines[0]["file_name"], Value::Null);
    assert_eq!(lines[0]["size"], 6, "sizes stay clear: {}", lines[0]);
    assert_eq!(
        lines[0]["erased"],
        json!(["name", "file_name", "content_type", "sha256"])
    );
    assert_eq!(lines[1]["name"], "New name");
    assert!(lines[1].get("erased").is_none(), "{}", lines[1]);

    // And it is exactly what the read model shows now.
    let listed: Value = app
        .get(&staff, "/v1/customers/cust-1/files")
        .await
        .json()
        .await
        .unwrap();
    let rebuilt = replay::files_as_of(
        &app.pool,
        Some(&cipher),
        "acme",
        "cust-1",
        Utc::now(),
        &|_| {},
    )
    .await
    .unwrap();
    assert_eq!(listed["items"], serde_json::to_value(&rebuilt).unwrap());
}

#[tokio::test]
async fn verify_passes_on_an_untouched_log_and_names_the_row_whose_payload_was_updated() {
    let app = spawn().await;
    let acme = app.staff("acme");
    let id = upload_as(&app, &acme, "cust-1", "Original", "internal").await;
    upload_as(&app, &app.staff("globex"), "cust-1", "Theirs", "internal").await;
    app.send_json(
        Method::PATCH,
        &acme,
        &format!("/v1/files/{id}"),
        json!({"name": "Renamed"}),
    )
    .await;
    upload_as(&app, &acme, "cust-2", "Later", "internal").await;
    seal(&app).await;
    chain::write_checkpoints(&app.pool, KEY.as_bytes())
        .await
        .unwrap();

    let clean = chain::verify(&app.pool, "acme", KEY.as_bytes(), &[])
        .await
        .unwrap();
    assert!(clean.is_ok(), "{clean:#?}");
    assert_eq!(clean.events, positions_of(&app, "acme").await.len() as u64);
    assert_eq!(clean.sealed, clean.events);
    assert_eq!(clean.checkpoints.len(), 1);

    let client = app.pool.get().await.unwrap();
    let renamed: i64 = client
        .query_one(
            "SELECT position FROM events WHERE tenant = 'acme' AND event_type = 'FileRenamed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tamper(
        &app,
        &format!(
            "UPDATE events SET payload = jsonb_set(payload, '{{name}}', '\"Forged\"') \
             WHERE position = {renamed}"
        ),
    )
    .await;
    let report = chain::verify(&app.pool, "acme", KEY.as_bytes(), &[])
        .await
        .unwrap();
    let problem = report.problem.expect("the change is found");
    assert_eq!(problem.kind, ProblemKind::Changed);
    assert_eq!(problem.position, Some(renamed), "{}", problem.message);
    assert!(problem.message.contains(&renamed.to_string()));

    let other = chain::verify(&app.pool, "globex", KEY.as_bytes(), &[])
        .await
        .unwrap();
    assert!(
        other.is_ok(),
        "another tenant's chain is untouched: {other:#?}"
    );
    let wrong_key = chain::verify(&app.pool, "globex", b"another key", &[])
        .await
        .unwrap();
    assert_eq!(wrong_key.problem.unwrap().kind, ProblemKind::BadSignature);
}

#[tokio::test]
async fn a_signed_checkpoint_detects_a_deleted_tail() {
    let app = spawn().await;
    let acme = app.staff("acme");
    for i in 0..4 {
        upload_as(&app, &acme, "cust-1", &format!("Doc {i}"), "internal").await;
    }
    seal(&app).await;
    let signed = chain::write_checkpoints(&app.pool, KEY.as_bytes())
        .await
        .unwrap();
    let kept_elsewhere = signed
        .into_iter()
        .find(|c| c.tenant == "acme")
        .expect("acme's head is signed");
    let log = positions_of(&app, "acme").await;
    assert_eq!(kept_elsewhere.position, *log.last().unwrap());
    assert_eq!(kept_elsewhere.seq, log.len() as i64);
    assert!(
        chain::verify(&app.pool, "acme", KEY.as_bytes(), &[])
            .await
            .unwrap()
            .is_ok()
    );

    // Cut the last two events off. Their seals still name them.
    let cut = &log[log.len() - 2..];
    let cut_list = format!("{}, {}", cut[0], cut[1]);
    tamper(
        &app,
        &format!("DELETE FROM events WHERE position IN ({cut_list})"),
    )
    .await;
    let report = chain::verify(&app.pool, "acme", KEY.as_bytes(), &[])
        .await
        .unwrap();
    let problem = report.problem.unwrap();
    assert_eq!(problem.kind, ProblemKind::Missing, "{}", problem.message);
    assert_eq!(problem.position, Some(cut[0]));

    // A careful attacker removes the seals and moves the chain head back too:
    // the chain is consistent again, but the signed checkpoint is not met.
    let client = app.pool.get().await.unwrap();
    client
        .batch_execute(&format!(
            "DELETE FROM event_hashes WHERE position IN ({cut_list}); \
             UPDATE chain_heads h SET seq = e.seq, position = e.position, hash = e.hash \
             FROM event_hashes e WHERE h.tenant = 'acme' AND e.tenant = 'acme' \
               AND e.position = {}",
            log[log.len() - 3]
        ))
        .await
        .unwrap();
    let report = chain::verify(&app.pool, "acme", KEY.as_bytes(), &[])
        .await
        .unwrap();
    let problem = report.problem.unwrap();
    assert_eq!(problem.kind, ProblemKind::TailCut, "{}", problem.message);
    assert_eq!(problem.position, Some(kept_elsewhere.position));
    assert_eq!(report.events, log.len() as u64 - 2);

    // Even without the checkpoint rows, the copy kept outside the database tells.
    client
        .batch_execute("DELETE FROM chain_checkpoints")
        .await
        .unwrap();
    let inside_only = chain::verify(&app.pool, "acme", KEY.as_bytes(), &[])
        .await
        .unwrap();
    assert!(
        inside_only.is_ok(),
        "nothing inside the database shows it any more"
    );
    let with_copy = chain::verify(&app.pool, "acme", KEY.as_bytes(), &[kept_elsewhere])
        .await
        .unwrap();
    assert_eq!(with_copy.problem.unwrap().kind, ProblemKind::TailCut);
}

#[tokio::test]
async fn the_running_service_seals_the_log_and_signs_its_heads() {
    let app = spawn().await;
    upload_as(&app, &app.staff("acme"), "cust-1", "Doc", "internal").await;
    let head = *positions_of(&app, "acme").await.last().unwrap();
    eventually(
        "the sealer, which runs in the workers role, at the log head",
        async || {
            let sealed = chain::sealed_position(&app.pool).await.unwrap();
            if sealed >= head {
                Ok(())
            } else {
                Err(format!("sealed up to {sealed} of {head}"))
            }
        },
    )
    .await;
    let report = chain::verify(&app.pool, "acme", KEY.as_bytes(), &[])
        .await
        .unwrap();
    assert!(report.is_ok());
    assert_eq!(report.unsealed, 0);
}

#[tokio::test]
async fn rebuilding_every_registered_read_model_gives_identical_rows() {
    let app = spawn().await;
    let staff = app.staff("acme");
    for i in 0..12 {
        let id = upload_as(
            &app,
            &staff,
            &format!("cust-{}", i % 3),
            &format!("Doc {i}"),
            "internal",
        )
        .await;
        if i % 3 == 0 {
            app.send_json(
                Method::PATCH,
                &staff,
                &format!("/v1/files/{id}"),
                json!({"name": format!("Doc {i}b")}),
            )
            .await;
        }
        if i % 4 == 0 {
            app.delete(&staff, &format!("/v1/files/{id}?confirm=true"))
                .await;
        }
    }
    let before = app.read_model_rows().await;
    assert_eq!(app.table_rows("files").await.len(), 12 - 3);
    let seen = std::sync::Mutex::new(Vec::new());
    let progress = |p: dossier_projections::RebuildProgress| seen.lock().unwrap().push(p);
    for (name, events) in app.rebuild_every_read_model(&progress).await {
        assert!(events > 0, "{name} read the log");
    }
    assert_eq!(app.read_model_rows().await, before);
    let seen = seen.into_inner().unwrap();
    assert!(seen.iter().any(|p| p.head > 0 && p.position > 0));
    // The service keeps answering from the swapped-in tables.
    let listed: Value = app
        .get(&staff, "/v1/customers/cust-1/files")
        .await
        .json()
        .await
        .unwrap();
    assert!(!listed["items"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn a_v1_upload_without_contract_id_is_read_through_the_upcaster_everywhere() {
    let app = spawn().await;
    let id = uuid::Uuid::now_v7();
    // As an early build wrote it: version 1, no contract_id, no task_id.
    let payload = json!({
        "tenant": "acme",
        "customer_id": "cust-9",
        "name": "From the old days",
        "file_name": "old.pdf",
        "content_type": "application/pdf",
        "size": 3,
        "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "blob_key": format!("acme/cust-9/{id}"),
        "visibility": "internal",
        "origin": "staff_upload",
        "uploaded_at": "2024-01-02T03:04:05Z"
    });
    let client = app.pool.get().await.unwrap();
    client
        .execute(
            "INSERT INTO events (id, tenant, aggregate_type, aggregate_id, sequence, event_type, \
                                 event_version, payload, metadata, actor) \
             VALUES ($1, 'acme', 'file', $2, 1, 'FileUploaded', '1', $3, \
                     '{\"tenant\": \"acme\", \"actor\": \"old-build\"}', 'old-build')",
            &[&uuid::Uuid::now_v7(), &id.to_string(), &payload],
        )
        .await
        .unwrap();

    // The files projection reads it (it was not written through the command path,
    // so poll until the projector got there).
    let staff = app.staff("acme");
    let listed = eventually("the projection applies a v1 upload", async || {
        let listed: Value = app
            .get(&staff, "/v1/customers/cust-9/files")
            .await
            .json()
            .await
            .unwrap();
        if listed["items"].as_array().unwrap().is_empty() {
            Err(listed)
        } else {
            Ok(listed)
        }
    })
    .await;
    assert_eq!(listed["items"][0]["contract_id"], Value::Null);
    assert_eq!(listed["items"][0]["name"], "From the old days");

    // The aggregate loads it through the upcaster: commands on the file work.
    let renamed = app
        .send_json(
            Method::PATCH,
            &staff,
            &format!("/v1/files/{id}"),
            json!({"name": "Renamed"}),
        )
        .await;
    assert_eq!(renamed.status(), 200);

    // Point-in-time and the audit trail read it too; the audit details show the
    // current version's shape, the raw log what was stored.
    let cipher = app.cipher().await;
    let files = replay::files_as_of(
        &app.pool,
        Some(&cipher),
        "acme",
        "cust-9",
        Utc::now(),
        &|_| {},
    )
    .await
    .unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].name.to_string(), "Renamed");
    let trail = audit_all(&app, &app.auditor("acme"), &format!("?file_id={id}")).await;
    let upload = trail
        .iter()
        .find(|i| i["action"] == "file.uploaded")
        .unwrap();
    assert_eq!(upload["actor"], "old-build");
    assert!(
        upload["details"]
            .as_object()
            .unwrap()
            .contains_key("contract_id")
    );
    let raw: Value = app
        .get(&app.auditor("acme"), "/v1/events")
        .await
        .json()
        .await
        .unwrap();
    let stored = &raw["items"][0];
    assert_eq!(stored["event_version"], "1");
    assert!(
        !stored["payload"]
            .as_object()
            .unwrap()
            .contains_key("contract_id")
    );

    // New uploads are written at version 2.
    let new = upload_as(&app, &staff, "cust-9", "Today", "internal").await;
    let version: String = client
        .query_one(
            "SELECT event_version FROM events WHERE aggregate_id = $1 AND sequence = 1",
            &[&new],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, "2");
}

#[tokio::test]
async fn each_file_of_a_downloaded_bundle_is_in_the_audit_trail() {
    let app = spawn().await;
    let alice = app.token("acme", Role::Staff, "alice", None);
    let bob = app.token("acme", Role::Staff, "bob", None);
    let first = upload_as(&app, &alice, "cust-1", "First", "internal").await;
    let second = upload_as(&app, &alice, "cust-2", "Second", "internal").await;
    let bob_api = app.api(&bob);
    let bundle_id = bob_api.bundle(&[&first, &second]).await.id;
    bob_api.bundle_content(&bundle_id).await;

    let auditor = app.auditor("acme");
    for (file, customer) in [(&first, "cust-1"), (&second, "cust-2")] {
        let trail = audit_all(&app, &auditor, &format!("?file_id={file}")).await;
        let downloads: Vec<&Value> = trail
            .iter()
            .filter(|i| i["action"] == "file.downloaded")
            .collect();
        assert_eq!(downloads.len(), 1, "{trail:#?}");
        assert_eq!(downloads[0]["actor"], "bob");
        assert_eq!(downloads[0]["customer_id"], customer);
        assert_eq!(downloads[0]["details"]["channel"], "bundle");
        assert_eq!(downloads[0]["details"]["bundle_id"], bundle_id.as_str());
    }
    // The bundle's own events are audited too, under a generic action.
    let everything = audit_all(&app, &auditor, "").await;
    assert!(
        everything
            .iter()
            .any(|i| i["action"] == "bundle.requested" && i["actor"] == "bob"),
        "{everything:#?}"
    );
}
