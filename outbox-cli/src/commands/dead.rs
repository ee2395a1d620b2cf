//! `outbox dead list|requeue|purge`: dead letters, in bounded batches.

use super::*;

/// `outbox dead list|requeue|purge`.
pub(super) async fn dead(store: &AnyStore, command: DeadCommand, json: bool) -> Result<u8, Error> {
    store.require_table().await?;
    let s = store.store();
    match command {
        DeadCommand::List {
            stream,
            limit,
            before,
        } => {
            // Newest first, a page at a time, as the console lists them.
            let filter = outbox_core::MessageFilter {
                stream,
                status: Some(outbox_core::Status::Dead),
                before,
                limit,
                ..Default::default()
            };
            filter.validate()?;
            let dead = s.messages(&filter).await?;
            if json {
                println!("{}", json::messages(&dead, limit, false));
                return Ok(exit::OK);
            }
            for m in dead {
                println!(
                    "seq={} id={} stream={} destination={} attempts={} error={}",
                    m.seq,
                    m.envelope.id,
                    printable(&m.envelope.message.stream),
                    printable(&m.envelope.message.destination),
                    m.attempts,
                    printable(&m.last_error.unwrap_or_default())
                );
            }
            Ok(exit::OK)
        }
        DeadCommand::Requeue(sel) => bulk_dead(s, &sel, true, json).await,
        DeadCommand::Purge(sel) => bulk_dead(s, &sel, false, json).await,
    }
}

/// Requeue (or purge) dead letters. `--seq` rows in one statement; `--all` and `--stream` in
/// batches of [`BULK_BATCH`] with progress, each batch its own statement, so Ctrl-C stops
/// between two batches with every row either changed or not.
async fn bulk_dead(
    s: Arc<dyn StoreAdmin>,
    sel: &SelectArgs,
    requeue: bool,
    json: bool,
) -> Result<u8, Error> {
    let verb = if requeue { "requeued" } else { "purged" };
    let apply = |selector: Selector| {
        let s = s.clone();
        async move {
            if requeue {
                s.requeue(&selector).await
            } else {
                s.purge_dead(&selector).await
            }
        }
    };
    let (n, finished) = if !sel.seqs.is_empty() {
        (apply(sel.selector()).await?, true)
    } else {
        let interrupt = report::Interrupt::catch();
        let mut progress = report::Progress::new(if requeue { "requeue" } else { "purge" });
        let mut n = 0;
        let finished = loop {
            let batch: Vec<i64> = s
                .dead_letters(sel.stream.as_deref(), BULK_BATCH)
                .await?
                .iter()
                .map(|m| m.seq)
                .collect();
            if batch.is_empty() {
                break true;
            }
            let changed = apply(Selector::Seqs(batch)).await?;
            if changed == 0 {
                // Rows listed but not changed (another operator got there first): done.
                break true;
            }
            n += changed;
            progress.update(n);
            if interrupt.asked() {
                break false;
            }
        };
        progress.finish();
        (n, finished)
    };
    if json {
        println!("{}", serde_json::json!({ verb: n, "finished": finished }));
    } else if finished {
        println!("{verb} {n}");
    } else {
        println!("{verb} {n}, then stopped (interrupted); run it again to go on");
    }
    Ok(if finished {
        exit::OK
    } else {
        exit::INTERRUPTED
    })
}

/// Rows per statement of `dead requeue --all` / `dead purge --all`.
const BULK_BATCH: usize = 500;
