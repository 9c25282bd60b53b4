//! The storage workers: one task per lane carries out, in order, what the
//! executor hands out against the `LogStore` and the `StateMachine`.

use super::driver::*;
use super::*;

/// The log worker: carries out log operations in order, merging runs of
/// appends that queued up meanwhile into one `append` (group commit).
pub(super) async fn log_worker<C: TypeConfig, L: LogStore<C>>(
    mut store: L,
    mut items: mpsc::UnboundedReceiver<LogItem<C>>,
    reports: mpsc::UnboundedSender<Report<C>>,
) {
    let mut batch = Vec::new();
    let mut replies = Vec::new();
    while let Some(item) = items.recv().await {
        let mut next = Some(item);
        while let Some(item) = next.take() {
            match item {
                LogItem::Op(op) => batch.push(op),
                LogItem::Reply(to, msg) => replies.push((to, msg)),
            }
            if batch.len() < BATCH {
                next = items.try_recv().ok();
            }
        }
        // A reply queued here waits for the operations before it; sending
        // every reply of the batch after all of its operations keeps the
        // group commit (later is always allowed).
        let done = match run_log_ops(&mut store, batch.drain(..)).await {
            Ok(done) => done,
            Err(e) => {
                let _ = reports.send(Report::Failed(e));
                return;
            }
        };
        for (to, msg) in replies.drain(..) {
            let _ = to.send(Ok(msg));
        }
        if !done.is_empty() && reports.send(Report::Log(done)).is_err() {
            return;
        }
    }
}

/// Runs `ops` in order, merging runs of appends; says how each ended.
pub(super) async fn run_log_ops<C: TypeConfig, L: LogStore<C>>(
    store: &mut L,
    ops: impl Iterator<Item = LogOp<C>>,
) -> Result<Vec<LogDone<C>>, StorageError> {
    let mut appends: Vec<Entry<C>> = Vec::new();
    let mut done = Vec::new();
    let mut durable = 0;
    for op in ops {
        if let LogOp::Append(entries) = op {
            appends.extend(entries);
            durable += 1;
            continue;
        }
        if !appends.is_empty() {
            store.append(std::mem::take(&mut appends)).await?;
        }
        match op {
            LogOp::SaveHardState(hs) => store.save_hard_state(hs).await?,
            LogOp::Truncate { from } => store.truncate(from).await?,
            LogOp::Purge { upto } => store.purge(upto).await?,
            LogOp::Read { from, to } => {
                let entries = store.read(from, to).await?;
                if durable > 0 {
                    done.push(LogDone::Durable(std::mem::take(&mut durable)));
                }
                done.push(LogDone::Read(entries));
                continue;
            }
            LogOp::Append(_) => unreachable!("appends are merged above"),
        }
        durable += 1;
    }
    if !appends.is_empty() {
        store.append(appends).await?;
    }
    if durable > 0 {
        done.push(LogDone::Durable(durable));
    }
    Ok(done)
}

pub(super) type SmOpOf<C> = SmOp<C, WriteReply<C>>;

/// The state-machine worker: carries out state-machine operations in order,
/// merging runs of applies that queued up meanwhile into one `apply`, and
/// answering each applied write itself.
pub(super) async fn sm_worker<C: TypeConfig, S: StateMachine<C>>(
    id: NodeId,
    chunk_bytes: usize,
    mut sm: S,
    mut ops: mpsc::UnboundedReceiver<SmOpOf<C>>,
    reports: mpsc::UnboundedSender<Report<C>>,
) {
    let mut held = None;
    // A snapshot being finished beside the applies (`begin_snapshot`).
    let mut building: Option<SnapshotBuild<C>> = None;
    loop {
        let next = match (building.as_mut(), held.take()) {
            (None, Some(op)) => Next::Op(op),
            (None, None) => match ops.recv().await {
                Some(op) => Next::Op(op),
                None => break,
            },
            // While a build runs only applies may pass it; anything else
            // (another build, a chunk, an install) waits for it.
            (Some(_), Some(op @ SmOp::Apply { .. })) => Next::Op(op),
            (Some(build), Some(op)) => {
                held = Some(op);
                Next::Built(build.await)
            }
            (Some(build), None) => tokio::select! {
                built = build => Next::Built(built),
                op = ops.recv() => match op {
                    Some(op) => Next::Op(op),
                    None => break,
                },
            },
        };
        let op = match next {
            Next::Op(op) => op,
            Next::Built(built) => {
                building = None;
                let result = match built {
                    Ok(meta) => sm
                        .snapshot_built(&meta)
                        .await
                        .map(|()| Report::SnapshotBuilt(meta)),
                    Err(e) => Err(e),
                };
                if !send_report(&reports, result) {
                    break;
                }
                continue;
            }
        };
        let result = match op {
            SmOp::BuildSnapshot => {
                let begun = sm
                    .begin_snapshot()
                    .instrument(info_span!("begin_snapshot"))
                    .await;
                match begun {
                    Ok(build) => {
                        let span = info_span!("build_snapshot");
                        building = Some(Box::pin(build.instrument(span)));
                        continue;
                    }
                    Err(e) => Err(e),
                }
            }
            SmOp::Apply {
                mut entries,
                mut writes,
            } => {
                let mut counts = vec![entries.len()];
                while counts.len() < BATCH {
                    match ops.try_recv() {
                        Ok(SmOp::Apply {
                            entries: more,
                            writes: w,
                        }) => {
                            counts.push(more.len());
                            entries.extend(more);
                            writes.extend(w);
                        }
                        Ok(other) => {
                            held = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                apply_and_answer(&mut sm, entries, writes)
                    .await
                    .map(|()| Report::Applied(counts))
            }
            SmOp::ReadSnapshotChunk {
                to,
                term,
                meta,
                offset,
            } => sm
                .read_snapshot_chunk(meta.id, offset, chunk_bytes)
                .await
                .map(|chunk| {
                    let msg = chunk.map(|chunk| {
                        Message::InstallSnapshot(InstallSnapshotRequest::chunk(
                            term, id, meta, offset, chunk.data, chunk.done,
                        ))
                    });
                    Report::ChunkRead(to, msg)
                }),
            SmOp::WriteSnapshotChunk { meta, offset, data } => sm
                .write_snapshot_chunk(&meta, offset, data)
                .await
                .map(|()| Report::ChunkWritten),
            SmOp::InstallSnapshot { meta } => {
                let span = info_span!("install_snapshot", snapshot = %meta.last_log_id);
                sm.install_snapshot(&meta)
                    .instrument(span)
                    .await
                    .map(|()| Report::Installed(meta))
            }
        };
        if !send_report(&reports, result) {
            break;
        }
    }
    // A build in flight is finished, never dropped, when the worker stops:
    // a storage engine's build can go on holding the store (RocksDB's
    // writes its file on a blocking thread) after its future is dropped,
    // and whoever reopens the store once `Raft::shutdown` returns must
    // find it released.
    if let Some(build) = building
        && let Err(e) = build.await
    {
        warn!(node = %id, error = %e, "snapshot build in flight at shutdown failed");
    }
}

/// What the state-machine worker does next.
pub(super) enum Next<C: TypeConfig> {
    Op(SmOpOf<C>),
    Built(Result<SnapshotMeta<C>, StorageError>),
}

/// Reports `result` to the driver; false when the worker must stop (the
/// operation failed, or the driver is gone).
pub(super) fn send_report<C: TypeConfig>(
    reports: &mpsc::UnboundedSender<Report<C>>,
    result: Result<Report<C>, StorageError>,
) -> bool {
    let report = result.unwrap_or_else(Report::Failed);
    let failed = matches!(report, Report::Failed(_));
    reports.send(report).is_ok() && !failed
}

/// Applies `entries` and answers each write at its entry's position. A state
/// machine that gives the wrong number of responses has broken its
/// contract: nobody is answered and the node stops.
pub(super) async fn apply_and_answer<C: TypeConfig, S: StateMachine<C>>(
    sm: &mut S,
    entries: Vec<Entry<C>>,
    writes: Vec<Option<WriteReply<C>>>,
) -> Result<(), StorageError> {
    let ids: Vec<LogId> = entries.iter().map(|e| e.log_id).collect();
    let responses = sm.apply(entries).await?;
    if responses.len() != ids.len() {
        return Err(StorageError::Corrupt {
            location: "state machine".into(),
            detail: format!("{} responses for {} entries", responses.len(), ids.len()),
        });
    }
    for ((id, response), write) in ids.into_iter().zip(responses).zip(writes) {
        if let Some(write) = write {
            let _ = write.send(Ok((id, response)));
        }
    }
    Ok(())
}
