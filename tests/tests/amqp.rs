//! RabbitMQ end to end: upstream commands in, events out, blobs purged, and
//! nothing lost when the broker drops every connection. Each test has a vhost
//! of its own on the real broker.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use dossier_broker::INTAKE_QUEUE;
use dossier_test_support::TestApp;
use dossier_test_support::upstream::{Command, Upstream};
use dossier_test_support::wait::eventually;
use reqwest::Method;
use serde_json::{Value, json};

fn upload(tenant: &str, customer: &str, name: &str, bytes: Vec<u8>) -> Command {
    Command::new("file.upload", tenant, bytes)
        .header("customer_id", customer)
        .header("name", name)
        .header("file_name", "statement.pdf")
        .header("content_type", "application/pdf")
}

async fn reply_to(upstream: &Upstream, command: &Command) -> Value {
    upstream.send(command).await;
    let replies = upstream.replies(1).await;
    let correlation = command.correlation_id.clone().unwrap();
    replies[&correlation][0].clone()
}

async fn event_count(app: &TestApp) -> i64 {
    let client = app.pool.get().await.unwrap();
    client
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn an_upstream_upload_is_listed_with_its_metadata_and_bytes_and_answered_on_reply_to() {
    let app = TestApp::spawn().await;
    let upstream = Upstream::connect(app.vhost.url()).await;
    let bytes = b"%PDF-1.7 bank statement".to_vec();
    let command = upload("acme", "cust-9", "Bank statement", bytes.clone())
        .header("visibility", "portal")
        .header("origin", "contract")
        .header("contract_id", "k-12")
        .header("actor", "crm");
    let reply = reply_to(&upstream, &command).await;
    assert_eq!(reply["status"], "accepted", "{reply}");
    assert!(reply["position"].as_i64().unwrap() > 0);
    let file_id = reply["file_id"].as_str().unwrap();

    let staff = app.api(&app.staff("acme"));
    let file = staff.file(file_id).await;
    assert_eq!(file.customer_id, "cust-9");
    assert_eq!(file.name, "Bank statement");
    assert_eq!(file.file_name, "statement.pdf");
    assert_eq!(file.content_type, "application/pdf");
    assert_eq!(file.visibility, "portal");
    assert_eq!(file.origin, "contract");
    assert_eq!(file.contract_id.as_deref(), Some("k-12"));
    assert_eq!(file.size, bytes.len() as u64);
    let content = staff.download(file_id).await;
    assert_eq!(content.bytes, bytes);

    let client = app.pool.get().await.unwrap();
    let actor: String = client
        .query_one(
            "SELECT actor FROM events WHERE aggregate_id = $1",
            &[&file_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(actor, "crm", "the actor header is recorded");
}

#[tokio::test]
async fn the_same_message_id_twice_gives_one_file_and_two_identical_replies() {
    let app = TestApp::spawn().await;
    let upstream = Upstream::connect(app.vhost.url()).await;
    let command = upload("acme", "cust-1", "Once", b"once".to_vec());
    upstream.send(&command).await;
    upstream.send(&command).await;
    let replies = upstream.replies(2).await;
    let answers = &replies[command.correlation_id.as_ref().unwrap()];
    assert_eq!(answers.len(), 2);
    assert_eq!(
        answers[0], answers[1],
        "the second answer repeats the first"
    );
    assert_eq!(answers[0]["status"], "accepted");

    let staff = app.staff("acme");
    let list: Value = app
        .get(&staff, "/v1/customers/cust-1/files")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "one file");
    assert_eq!(app.blob_keys().await.len(), 1, "one blob");
    assert_eq!(event_count(&app).await, 1, "one event");

    // A rename sent twice is one event too, and a refused command repeats its refusal.
    let file_id = answers[0]["file_id"].as_str().unwrap();
    let rename = Command::json(
        "file.rename",
        "acme",
        json!({"file_id": file_id, "name": "Renamed"}),
    );
    upstream.send(&rename).await;
    upstream.send(&rename).await;
    let refused = Command::json("file.delete", "acme", json!({"file_id": file_id}));
    upstream.send(&refused).await;
    upstream.send(&refused).await;
    let replies = upstream.replies(4).await;
    let renamed = &replies[rename.correlation_id.as_ref().unwrap()];
    assert_eq!(renamed[0], renamed[1]);
    let denied = &replies[refused.correlation_id.as_ref().unwrap()];
    assert_eq!(denied[0], denied[1]);
    assert_eq!(denied[0]["status"], "rejected");
    assert_eq!(denied[0]["error"]["code"], "confirmation_required");
    assert_eq!(event_count(&app).await, 2, "upload and one rename");
}

#[tokio::test]
async fn an_oversized_upload_is_rejected_with_file_too_large_and_nothing_stored() {
    let app = TestApp::spawn_with(&[("DOSSIER_MAX_FILE_BYTES", "1000")]).await;
    let upstream = Upstream::connect(app.vhost.url()).await;
    let exact = reply_to(&upstream, &upload("acme", "cust-1", "Exact", vec![7; 1000])).await;
    assert_eq!(exact["status"], "accepted");
    let over = reply_to(&upstream, &upload("acme", "cust-1", "Over", vec![7; 1001])).await;
    assert_eq!(over["status"], "rejected");
    assert_eq!(over["error"]["code"], "file_too_large");
    assert!(over["error"]["message"].as_str().unwrap().contains("1000"));
    assert_eq!(app.blob_keys().await.len(), 1);
    assert_eq!(event_count(&app).await, 1);
}

#[tokio::test]
async fn a_command_naming_another_tenants_file_is_rejected_not_found() {
    let app = TestApp::spawn().await;
    let file = app
        .upload_ok(&app.staff("acme"), "cust-1", "Acme's", b"a".to_vec())
        .await;
    let file_id = file["id"].as_str().unwrap();
    let upstream = Upstream::connect(app.vhost.url()).await;
    for command in [
        Command::json(
            "file.rename",
            "globex",
            json!({"file_id": file_id, "name": "Mine"}),
        ),
        Command::json(
            "file.delete",
            "globex",
            json!({"file_id": file_id, "confirm": true}),
        ),
        Command::json(
            "file.change_visibility",
            "globex",
            json!({"file_id": file_id, "visibility": "portal"}),
        ),
    ] {
        let reply = reply_to(&upstream, &command).await;
        assert_eq!(reply["status"], "rejected");
        assert_eq!(reply["error"]["code"], "not_found");
    }
    let still: Value = app
        .get(&app.staff("acme"), &format!("/v1/files/{file_id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(still["name"], "Acme's");
    assert_eq!(still["visibility"], "internal");
}

#[tokio::test]
async fn three_kinds_of_poison_land_in_the_dead_letter_queue_exactly_once_each() {
    let app = TestApp::spawn().await;
    let upstream = Upstream::connect(app.vhost.url()).await;
    let mut no_message_id =
        Command::json("file.rename", "acme", json!({"file_id": "x", "name": "y"}));
    no_message_id.message_id = None;
    let mut no_tenant = Command::json("file.rename", "acme", json!({"file_id": "x", "name": "y"}));
    no_tenant.tenant = None;
    let not_json = Command::new("file.rename", "acme", b"{this is not json".to_vec());
    for command in [&no_message_id, &no_tenant, &not_json] {
        upstream.send(command).await;
    }
    let dead = upstream
        .take("dossier.commands.dead", 3, Duration::from_secs(30))
        .await;
    let reasons: Vec<String> = dead
        .iter()
        .map(|m| m.header("x-dossier-reason").unwrap())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("message_id")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("tenant")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("JSON")), "{reasons:?}");
    // Exactly once: nothing more arrives, and nothing is redelivered. Once
    // Dossier has stopped, every delivery its intake took is settled (handled,
    // or back in the intake's queue), so what is in both queues now is final.
    let mut app = app;
    app.shutdown().await.expect("a graceful stop");
    let more = upstream.take_available("dossier.commands.dead").await;
    assert!(more.is_empty(), "dead-lettered more than once: {more:?}");
    assert_eq!(
        upstream.queue_depth(INTAKE_QUEUE).await.0,
        0,
        "nothing waits to be delivered again"
    );
    assert_eq!(event_count(&app).await, 0);
}

#[tokio::test]
async fn a_downstream_queue_receives_every_event_of_a_file_in_order_with_the_tenant_header() {
    let app = TestApp::spawn().await;
    let downstream = Upstream::connect(app.vhost.url()).await;
    let queue = downstream.bind_events("file.#").await;
    let staff = app.staff("acme");
    let file = app.upload_ok(&staff, "cust-1", "Doc", b"d".to_vec()).await;
    let id = file["id"].as_str().unwrap();
    app.send_json(
        Method::PATCH,
        &staff,
        &format!("/v1/files/{id}"),
        json!({"name": "Doc v2", "visibility": "portal"}),
    )
    .await;
    app.delete(&staff, &format!("/v1/files/{id}?confirm=true"))
        .await;

    let events = downstream.take(&queue, 5, Duration::from_secs(30)).await;
    let keys: Vec<&str> = events.iter().map(|e| e.routing_key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "file.uploaded",
            "file.renamed",
            "file.visibility_changed",
            "file.deleted",
            "file.blob_purged"
        ]
    );
    let mut last_position = 0;
    for (sequence, event) in events.iter().enumerate() {
        let body = event.json();
        assert_eq!(event.header("tenant").as_deref(), Some("acme"));
        assert_eq!(event.message_id().as_deref(), body["id"].as_str());
        assert_eq!(body["aggregate_id"], id);
        assert_eq!(body["sequence"], sequence as i64 + 1);
        assert!(body["position"].as_i64().unwrap() > last_position);
        last_position = body["position"].as_i64().unwrap();
    }
}

#[tokio::test]
async fn after_a_delete_the_blob_is_gone_from_the_store() {
    let app = TestApp::spawn().await;
    let staff = app.staff("acme");
    let file = app
        .upload_ok(&staff, "cust-1", "Doc", b"bytes to purge".to_vec())
        .await;
    let id = file["id"].as_str().unwrap();
    assert_eq!(app.blob_keys().await.len(), 1);
    app.delete(&staff, &format!("/v1/files/{id}?confirm=true"))
        .await;
    eventually("the blob purged from the store", async || {
        let keys = app.blob_keys().await;
        if keys.is_empty() { Ok(()) } else { Err(keys) }
    })
    .await;
    // And the purge is recorded in the log, once.
    eventually("one BlobPurged event", async || {
        let client = app.pool.get().await.unwrap();
        let purged: i64 = client
            .query_one(
                "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = 'BlobPurged'",
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        if purged == 1 { Ok(()) } else { Err(purged) }
    })
    .await;
}

#[tokio::test]
async fn nothing_is_lost_or_doubled_when_the_broker_drops_every_connection_mid_way() {
    let app = TestApp::spawn().await;
    let upstream = Upstream::connect(app.vhost.url()).await;
    let downstream = Upstream::connect(app.vhost.url()).await;
    let events_queue = downstream.bind_events("#").await;

    let mut sent = Vec::new();
    for i in 0..200 {
        let mut command = upload(
            "acme",
            "cust-1",
            &format!("Upload {i}"),
            format!("content {i}").into_bytes(),
        );
        command.reply = false;
        sent.push(command);
    }
    for (i, command) in sent.iter().enumerate() {
        if i == 100 {
            // Every connection of the vhost, Dossier's and ours alike.
            app.vhost
                .close_connections()
                .await
                .expect("connections closed");
            break;
        }
        upstream.send(command).await;
    }
    // Our own connection was closed too: reconnect and send the rest.
    let upstream = Upstream::connect(app.vhost.url()).await;
    for command in &sent[100..] {
        upstream.send(command).await;
    }
    let downstream = Upstream::connect(app.vhost.url()).await;

    // Every upload lands exactly once in the read model.
    let staff = app.api(&app.staff("acme"));
    let page = staff
        .list_until("cust-1", "limit=500", "every upload listed", |page| {
            page.items.len() >= 200
        })
        .await;
    let names: Vec<String> = page.items.into_iter().map(|f| f.name).collect();
    let unique: HashSet<&String> = names.iter().collect();
    assert_eq!(names.len(), 200, "every upload listed once");
    assert_eq!(unique.len(), 200);

    // Every event of the log reached dossier.events (duplicates allowed, none missing).
    let client = app.pool.get().await.unwrap();
    let ids: HashSet<String> = client
        .query("SELECT id::text FROM events", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(ids.len(), 200);
    // The downstream queue is not exclusive, so it outlived the dropped connections.
    let mut published: HashMap<String, usize> = HashMap::new();
    eventually("every event of the log on dossier.events", async || {
        for message in downstream.take_available(&events_queue).await {
            *published.entry(message.message_id().unwrap()).or_default() += 1;
        }
        let arrived = ids.iter().filter(|id| published.contains_key(*id)).count();
        if arrived == ids.len() {
            Ok(())
        } else {
            Err(format!(
                "only {arrived} of {} events reached dossier.events",
                ids.len()
            ))
        }
    })
    .await;
    assert!(
        published.keys().all(|id| ids.contains(id)),
        "only the log's events are published"
    );
}

#[tokio::test]
async fn http_commands_keep_working_while_the_broker_is_down_and_readyz_says_so() {
    // Nothing listens on port 1: the broker is "down" for this whole test.
    let app =
        TestApp::spawn_unready(&[("DOSSIER_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")]).await;
    let staff = app.staff("acme");
    let file = app
        .upload_ok(
            &staff,
            "cust-1",
            "Uploaded while the broker is down",
            b"x".to_vec(),
        )
        .await;
    let id = file["id"].as_str().unwrap();
    let renamed = app
        .send_json(
            Method::PATCH,
            &staff,
            &format!("/v1/files/{id}"),
            json!({"name": "Still works"}),
        )
        .await;
    assert_eq!(renamed.status(), 200);
    assert_eq!(
        event_count(&app).await,
        2,
        "the events wait in the log for the relay"
    );

    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    let rabbit = body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "rabbitmq")
        .unwrap();
    assert_eq!(rabbit["ok"], false);
    assert!(
        app.client
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    app.stop()
        .await
        .expect("a graceful stop while the broker is down");
}
