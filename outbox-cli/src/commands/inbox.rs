//! `outbox inbox`: an inbox table's dead letters.

use super::*;

/// `outbox inbox dead|requeue`.
pub(super) async fn inbox(
    store: &AnyStore,
    inbox_table: String,
    command: InboxCommand,
    json: bool,
) -> Result<u8, Error> {
    let inbox = store.inbox_table(&inbox_table)?;
    match command {
        InboxCommand::Dead { consumer, limit } => {
            let dead = inbox.dead_letters(consumer.as_deref(), limit).await?;
            if json {
                let rows: Vec<_> = dead
                    .iter()
                    .map(|d| {
                        serde_json::json!({
                            "consumer": d.consumer,
                            "id": d.message.id.to_string(),
                            "source": d.message.source,
                            "stream": d.message.stream,
                            "key": d.message.key,
                            "attempts": d.attempts,
                            "error": d.error,
                            "first_seen_at_ms": outbox_core::to_millis(d.first_seen_at),
                        })
                    })
                    .collect();
                println!("{}", serde_json::json!({ "dead_letters": rows }));
                return Ok(exit::OK);
            }
            for d in dead {
                println!(
                    "consumer={} id={} source={} attempts={} error={}",
                    printable(&d.consumer),
                    d.message.id,
                    printable(&d.message.source),
                    d.attempts,
                    printable(&d.error.unwrap_or_default())
                );
            }
            Ok(exit::OK)
        }
        InboxCommand::Requeue { consumer, id } => {
            let id: outbox_core::MessageId = id
                .parse()
                .map_err(|_| Error::config(format!("{:?} is not a message id", printable(&id))))?;
            inbox.requeue(&consumer, id).await?;
            if json {
                println!("{}", serde_json::json!({"requeued": id.to_string()}));
            } else {
                println!("requeued {id} for {}", printable(&consumer));
            }
            Ok(exit::OK)
        }
    }
}
