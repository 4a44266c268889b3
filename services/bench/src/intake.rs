//! `amqp_intake`: `file.upload` commands of 1 KiB sent over RabbitMQ, from the
//! first publish until every reply is back, against publishing the same
//! messages with confirms into a durable quorum queue and nothing else.
//!
//! Ours is the contract's whole path: the intake consumes (prefetch 16),
//! checks the receipt, stores the blob in S3, runs the command (events and
//! receipt in one transaction), waits for the read models, publishes the
//! reply with a confirm and acks. Publishing keeps 256 confirms outstanding.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use dossier_broker::{COMMANDS_EXCHANGE, PERSISTENT};
use futures::StreamExt as _;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use super::Ctx;

use super::env::{App, Stage};
use super::report::{Figure, Goal};

const SCENARIO: &str = "amqp_intake";
const TENANT: &str = "bench-intake";
const WINDOW: usize = 256;

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Figure>> {
    Stage::run(ctx, 4, "intake", measure).await
}

async fn measure(ctx: &Ctx, stage: &Stage) -> anyhow::Result<Vec<Figure>> {
    let Stage { s3, db, vhost, .. } = stage;
    let count = ctx.size(3000, 100);
    let body = crate::env::text_bytes(1024, 7);

    let connection = Connection::connect(vhost.url(), ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ")?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;

    // Baseline: the same messages into a quorum queue, confirmed, nothing else.
    let queue = "bench.confirms";
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await?;
    publish_all(&channel, "", queue, count / 10, &body, None).await?;
    let started = Instant::now();
    publish_all(&channel, "", queue, count, &body, None).await?;
    let baseline = started.elapsed();

    // Ours.
    let blobs = s3.store("bench-intake").await?;
    let app = App::spawn(&db.url, blobs, &[("DOSSIER_AMQP_URL", vhost.url())]).await?;
    let result = async {
        let replies = format!("bench.replies.{}", uuid::Uuid::new_v4().simple());
        channel
            .queue_declare(
                replies.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consumer = channel
            .basic_consume(
                replies.as_str().into(),
                "bench".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let mut consumer = Box::pin(consumer);
        let mut take = async |n: usize| -> anyhow::Result<()> {
            for _ in 0..n {
                let delivery = tokio::time::timeout(Duration::from_secs(60), consumer.next())
                    .await
                    .context("no reply from the intake for 60 s")?
                    .context("the reply consumer ended")??;
                let reply: serde_json::Value = serde_json::from_slice(&delivery.data)?;
                anyhow::ensure!(reply["status"] == "accepted", "the intake answered {reply}");
            }
            Ok(())
        };
        let warmup = (count / 10).max(10);
        publish_all(
            &channel,
            COMMANDS_EXCHANGE,
            "file.upload",
            warmup,
            &body,
            Some(&replies),
        )
        .await?;
        take(warmup).await?;
        let started = Instant::now();
        let (published, taken) = tokio::join!(
            publish_all(
                &channel,
                COMMANDS_EXCHANGE,
                "file.upload",
                count,
                &body,
                Some(&replies)
            ),
            take(count)
        );
        published?;
        taken?;
        anyhow::Ok(started.elapsed())
    }
    .await;
    app.stop().await;
    let _ = connection.close(200, "bench done".into()).await;
    let ours = result?;

    Ok(vec![
        Figure::new(SCENARIO, format!("{count} uploads of 1 KiB"), "cmd/s")
            .ours(count as f64 / ours.as_secs_f64())
            .baseline(
                count as f64 / baseline.as_secs_f64(),
                "publish of the same messages with confirms into a quorum queue",
            )
            .goal(Goal::Report),
    ])
}

/// Publishes `count` upload messages, keeping [`WINDOW`] confirms outstanding,
/// and waits for every confirm.
async fn publish_all(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    count: usize,
    body: &[u8],
    reply_to: Option<&str>,
) -> anyhow::Result<()> {
    let mut pending = VecDeque::with_capacity(WINDOW);
    for i in 0..count {
        let mut headers = FieldTable::default();
        for (name, value) in [
            ("tenant", TENANT.to_owned()),
            ("customer_id", format!("cust-{}", i % 100)),
            ("name", format!("Upstream document {i}")),
            ("file_name", format!("document-{i}.txt")),
            ("content_type", "text/plain".to_owned()),
        ] {
            headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
        }
        let mut properties = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_message_id(ShortString::from(uuid::Uuid::now_v7().to_string()))
            .with_headers(headers);
        if let Some(reply_to) = reply_to {
            properties = properties.with_reply_to(ShortString::from(reply_to));
        }
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await?;
        pending.push_back(confirm);
        if pending.len() >= WINDOW
            && let Some(confirm) = pending.pop_front()
        {
            anyhow::ensure!(confirm.await?.is_ack(), "the broker refused a message");
        }
    }
    for confirm in pending {
        anyhow::ensure!(confirm.await?.is_ack(), "the broker refused a message");
    }
    Ok(())
}
