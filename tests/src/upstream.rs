//! An upstream system and a downstream consumer, as RabbitMQ clients of their
//! own: they publish commands to `dossier.commands`, read replies from their
//! own queue, and read what Dossier publishes to `dossier.events`.

use std::collections::HashMap;
use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;

use crate::wait::Wait;

/// A connection to the test's vhost with one channel in confirm mode.
pub struct Upstream {
    _connection: Connection,
    pub channel: Channel,
    /// This client's reply queue.
    pub reply_queue: String,
}

/// One message read back.
#[derive(Debug, Clone)]
pub struct Received {
    pub routing_key: String,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    pub fn header(&self, name: &str) -> Option<String> {
        match self.properties.headers().as_ref()?.inner().get(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            _ => None,
        }
    }

    pub fn message_id(&self) -> Option<String> {
        self.properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned())
    }

    pub fn correlation_id(&self) -> Option<String> {
        self.properties
            .correlation_id()
            .as_ref()
            .map(|m| m.as_str().to_owned())
    }
}

/// A command message to publish.
#[derive(Debug, Clone, Default)]
pub struct Command {
    pub routing_key: String,
    pub message_id: Option<String>,
    pub tenant: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub correlation_id: Option<String>,
    pub reply: bool,
}

impl Command {
    /// A command with a fresh message id for `tenant`, answered on the reply queue.
    pub fn new(routing_key: &str, tenant: &str, body: Vec<u8>) -> Self {
        Self {
            routing_key: routing_key.to_owned(),
            message_id: Some(uuid::Uuid::now_v7().to_string()),
            tenant: Some(tenant.to_owned()),
            headers: Vec::new(),
            body,
            correlation_id: Some(uuid::Uuid::now_v7().to_string()),
            reply: true,
        }
    }

    pub fn json(routing_key: &str, tenant: &str, body: Value) -> Self {
        Self::new(
            routing_key,
            tenant,
            serde_json::to_vec(&body).expect("JSON"),
        )
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
}

impl Upstream {
    pub async fn connect(url: &str) -> Self {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("the test connects to RabbitMQ");
        let channel = connection.create_channel().await.expect("a channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let reply_queue = format!("test.replies.{}", uuid::Uuid::new_v4().simple());
        channel
            .queue_declare(
                reply_queue.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("a reply queue");
        Self {
            _connection: connection,
            channel,
            reply_queue,
        }
    }

    /// A queue of our own bound to `dossier.events` (a downstream consumer).
    pub async fn bind_events(&self, binding: &str) -> String {
        let queue = format!("test.events.{}", uuid::Uuid::new_v4().simple());
        self.channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("a downstream queue");
        self.channel
            .queue_bind(
                queue.as_str().into(),
                "dossier.events".into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bound to dossier.events");
        queue
    }

    /// Publishes a command (confirmed by the broker).
    pub async fn send(&self, command: &Command) {
        let mut headers = FieldTable::default();
        if let Some(tenant) = &command.tenant {
            headers.insert(
                "tenant".into(),
                AMQPValue::LongString(LongString::from(tenant.clone())),
            );
        }
        for (name, value) in &command.headers {
            headers.insert(
                name.as_str().into(),
                AMQPValue::LongString(LongString::from(value.clone())),
            );
        }
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers);
        if let Some(id) = &command.message_id {
            properties = properties.with_message_id(ShortString::from(id.as_str()));
        }
        if let Some(correlation_id) = &command.correlation_id {
            properties = properties.with_correlation_id(ShortString::from(correlation_id.as_str()));
        }
        if command.reply {
            properties = properties.with_reply_to(ShortString::from(self.reply_queue.as_str()));
        }
        self.channel
            .basic_publish(
                "dossier.commands".into(),
                command.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &command.body,
                properties,
            )
            .await
            .expect("published")
            .await
            .expect("confirmed");
    }

    /// One message from `queue` (acked), if one is there now.
    async fn get_one(&self, queue: &str) -> Option<Received> {
        let message = self
            .channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .expect("basic.get")?;
        let delivery = message.delivery;
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
        Some(Received {
            routing_key: delivery.routing_key.as_str().to_owned(),
            properties: delivery.properties.clone(),
            body: delivery.data.clone(),
        })
    }

    /// Waits for `count` messages on `queue` (acking them), or panics after `timeout`.
    pub async fn take(&self, queue: &str, count: usize, timeout: Duration) -> Vec<Received> {
        let mut received = Vec::new();
        Wait::new(format!("{count} messages on {queue}"))
            .timeout(timeout)
            .interval(Duration::from_millis(20))
            .expect(async || {
                while received.len() < count {
                    match self.get_one(queue).await {
                        Some(message) => received.push(message),
                        None => break,
                    }
                }
                if received.len() >= count {
                    Ok(())
                } else {
                    Err(format!("{} arrived", received.len()))
                }
            })
            .await;
        received
    }

    /// Everything on `queue` now (acked). That nothing more will arrive is for
    /// the caller to establish first, by a condition (a consumer stopped, a
    /// checkpoint reached), never by waiting a while.
    pub async fn take_available(&self, queue: &str) -> Vec<Received> {
        let mut received = Vec::new();
        while let Some(message) = self.get_one(queue).await {
            received.push(message);
        }
        received
    }

    /// Messages ready on `queue` now and its consumers, as the broker answers a
    /// passive declare (unacknowledged deliveries are not counted).
    pub async fn queue_depth(&self, queue: &str) -> (u32, u32) {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let declared = self
            .channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .expect("the queue exists");
        (declared.message_count(), declared.consumer_count())
    }

    /// Waits for the replies to `commands`, by correlation id.
    pub async fn replies(&self, count: usize) -> HashMap<String, Vec<Value>> {
        let mut by_correlation: HashMap<String, Vec<Value>> = HashMap::new();
        for reply in self
            .take(&self.reply_queue.clone(), count, Duration::from_secs(30))
            .await
        {
            by_correlation
                .entry(reply.correlation_id().unwrap_or_default())
                .or_default()
                .push(reply.json());
        }
        by_correlation
    }
}
