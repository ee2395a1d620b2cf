//! `outbox clean`: sent rows (and inbox marks) past their retention deleted, in batches.

use super::*;

/// `outbox clean`: sent rows (and inbox marks) past their retention deleted, in batches.
pub(super) async fn clean(
    store: &AnyStore,
    args: CleanArgs,
    file: &FileConfig,
    json: bool,
) -> Result<u8, Error> {
    store.require_table().await?;
    let older_than = args
        .older_than
        .or(duration("clean.older_than", file.clean.older_than.clone())?);
    let mut cleaner = Cleaner::new(store.store()).include_dead(args.include_dead);
    for inbox in &args.inboxes {
        cleaner = cleaner.inbox(
            store.inbox_table(inbox)?,
            args.inbox_older_than.unwrap_or(DEFAULT_INBOX_RETENTION),
        );
    }
    if let Some(r) = older_than {
        cleaner = cleaner.retention(r);
    }
    if let Some(b) = args.batch.or(file.clean.batch) {
        cleaner = cleaner.batch_size(b)?;
    }
    let interrupt = report::Interrupt::catch();
    let mut progress = report::Progress::new("clean");
    let (n, finished) = cleaner
        .run_once_with(|done| {
            progress.update(done);
            !interrupt.asked()
        })
        .await?;
    progress.finish();
    if json {
        println!(
            "{}",
            serde_json::json!({"deleted": n, "finished": finished})
        );
    } else if finished {
        println!("deleted {n} rows");
    } else {
        println!("deleted {n} rows, then stopped (interrupted); run it again to go on");
    }
    Ok(if finished {
        exit::OK
    } else {
        exit::INTERRUPTED
    })
}
