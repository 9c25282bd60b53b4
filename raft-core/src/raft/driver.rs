//! The driver's loop: one task that owns the executor, steps what arrives
//! (inputs, storage reports, peers' answers), and hands out what the
//! executor has ready.

use super::workers::*;
use super::*;

pub(super) fn metrics_of<C: TypeConfig>(
    e: &Engine<C>,
    applied: LogIndex,
    fatal: Option<String>,
    clock_origin: std::time::SystemTime,
) -> RaftMetrics<C::Node> {
    RaftMetrics {
        id: e.id(),
        uuid: e.uuid(),
        recognized: e.recognized(),
        unrecognized: e.unrecognized_peers(),
        role: e.role(),
        term: e.term(),
        leader_id: e.leader_id(),
        commit_index: e.commit_index(),
        applied_index: applied,
        leader_commit_index: e.leader_commit_index(),
        last_log_index: e.last_log_id().index,
        snapshot: e.snapshot_meta().map(|s| s.last_log_id),
        membership: e.membership().clone(),
        membership_log_id: e.membership_log_id(),
        replication: e.matched(),
        fatal,
        elections: e.elections(),
        leader_changes: u64::from(e.leader_id().is_some()),
        snapshots_sent: e.snapshots_sent(),
        snapshots_installed: e.snapshots_installed(),
        snapshot_bytes_delivered: e.snapshot_deliveries().0,
        snapshot_delivery_millis: e.snapshot_deliveries().1,
        progress: e.each_progress().collect(),
        leadership: e.leadership_changes().copied().collect(),
        leaderless_since: e.leaderless_since(),
        clock_origin,
    }
}

/// Sets `m` to what `e` and `applied` say now; whether anything changed.
/// The pattern names every field, so a new one cannot be left stale.
pub(super) fn update_metrics<C: TypeConfig>(
    m: &mut RaftMetrics<C::Node>,
    e: &Engine<C>,
    applied: LogIndex,
    fatal: Option<String>,
) -> bool {
    let RaftMetrics {
        id: _,
        uuid: _,
        recognized,
        unrecognized,
        role,
        term,
        leader_id,
        commit_index,
        applied_index,
        leader_commit_index,
        last_log_index,
        snapshot,
        membership,
        membership_log_id,
        replication,
        fatal: stopped,
        elections,
        leader_changes,
        snapshots_sent,
        snapshots_installed,
        snapshot_bytes_delivered,
        snapshot_delivery_millis,
        progress,
        leadership,
        leaderless_since,
        clock_origin: _,
    } = m;
    let mut changed = false;
    macro_rules! set {
        ($field:ident, $value:expr) => {{
            let value = $value;
            if *$field != value {
                *$field = value;
                changed = true;
            }
        }};
    }
    set!(role, e.role());
    set!(term, e.term());
    set!(recognized, e.recognized());
    set!(unrecognized, e.unrecognized_peers());
    // Before `leader_id` takes the new value. Counted as published: a
    // leader that came and went within one driver turn is not seen.
    if e.leader_id().is_some() && *leader_id != e.leader_id() {
        *leader_changes += 1;
    }
    set!(leader_id, e.leader_id());
    set!(commit_index, e.commit_index());
    set!(applied_index, applied);
    set!(leader_commit_index, e.leader_commit_index());
    set!(last_log_index, e.last_log_id().index);
    set!(snapshot, e.snapshot_meta().map(|s| s.last_log_id));
    set!(membership_log_id, e.membership_log_id());
    set!(stopped, fatal);
    set!(elections, e.elections());
    set!(snapshots_sent, e.snapshots_sent());
    set!(snapshots_installed, e.snapshots_installed());
    set!(snapshot_bytes_delivered, e.snapshot_deliveries().0);
    set!(snapshot_delivery_millis, e.snapshot_deliveries().1);
    set!(leaderless_since, e.leaderless_since());
    if !leadership.iter().eq(e.leadership_changes()) {
        *leadership = e.leadership_changes().copied().collect();
        changed = true;
    }
    if !progress
        .iter()
        .map(|(id, p)| (*id, *p))
        .eq(e.each_progress())
    {
        *progress = e.each_progress().collect();
        changed = true;
    }
    if *membership != *e.membership() {
        *membership = e.membership().clone();
        changed = true;
    }
    if replication
        .keys()
        .copied()
        .eq(e.each_matched().map(|(id, _)| id))
    {
        for ((_, now), was) in e.each_matched().zip(replication.values_mut()) {
            changed |= *was != now;
            *was = now;
        }
    } else {
        *replication = e.each_matched().collect();
        changed = true;
    }
    changed
}

/// The driver's callers: one-shot reply channels.
pub(super) struct DriverCallers<C>(std::marker::PhantomData<C>);

impl<C: TypeConfig> Callers for DriverCallers<C> {
    type Write = WriteReply<C>;
    type Read = Reply<LogIndex, C::Node>;
    type Rpc = RpcReply<C>;
}

/// How a run of log operations ended.
pub(super) enum LogDone<C: TypeConfig> {
    /// This many operations are durable.
    Durable(usize),
    /// The next operation, a read, read these entries.
    Read(Vec<Entry<C>>),
}

/// What the log worker is handed, in order: operations on the `LogStore`,
/// and replies to send once the operations before them are durable.
pub(super) enum LogItem<C: TypeConfig> {
    Op(LogOp<C>),
    Reply(RpcReply<C>, Message<C>),
}

pub(super) type RpcReply<C> = Reply<Message<C>, <C as TypeConfig>::Node>;

/// What the storage workers report back to the driver's loop.
pub(super) enum Report<C: TypeConfig> {
    /// The oldest log operations in flight are done, in order.
    Log(Vec<LogDone<C>>),
    /// The oldest applies in flight are done: the number of entries of
    /// each (their writes are answered).
    Applied(Vec<usize>),
    SnapshotBuilt(SnapshotMeta<C>),
    ChunkRead(NodeId, Option<Message<C>>),
    ChunkWritten,
    Installed(SnapshotMeta<C>),
    Failed(StorageError),
}

/// What one step of the driver's loop takes in.
pub(super) enum Event<C: TypeConfig> {
    Input(Input<C>),
    Report(Report<C>),
    /// A peer's response to an RPC of ours.
    Answer(NodeId, Message<C>),
}

/// One RPC in flight: the peer's response, if it gave one.
pub(super) type RpcCall<C> = Pin<Box<dyn Future<Output = Option<(NodeId, Message<C>)>> + Send>>;

pub(super) struct Driver<C: TypeConfig, F: NetworkFactory<C>> {
    pub(super) x: Executor<C, DriverCallers<C>>,
    pub(super) network: F,
    pub(super) peers: HashMap<NodeId, (C::Node, Arc<F::Network>)>,
    /// RPCs in flight, polled by the driver's own task.
    pub(super) rpcs: FuturesUnordered<RpcCall<C>>,
    /// Responses collected while starting new RPCs, handled next batch.
    pub(super) answered: VecDeque<(NodeId, Message<C>)>,
    pub(super) rx: mpsc::UnboundedReceiver<Input<C>>,
    pub(super) reports: mpsc::UnboundedReceiver<Report<C>>,
    pub(super) log_tx: mpsc::UnboundedSender<LogItem<C>>,
    pub(super) sm_tx: mpsc::UnboundedSender<SmOpOf<C>>,
    pub(super) workers: Vec<JoinHandle<()>>,
    /// The storage workers that run inside this task (those whose store
    /// [never blocks](LogStore::never_blocks)): polled beside the loop's
    /// other waits, never awaited alone.
    pub(super) lanes: FuturesUnordered<Lane>,
    pub(super) start: Instant,
    pub(super) initialize_reply: Option<Reply<(), C::Node>>,
    pub(super) metrics: watch::Sender<RaftMetrics<C::Node>>,
}

pub(super) const BATCH: usize = 1024;

/// A storage worker run inside the driver's task.
pub(super) type Lane = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A driver turn this long, or a wake-up this late, is logged: every timer
/// of the node (heartbeats, elections) waits on it, so a node whose
/// runtime is starved or whose turn blocks looks dead to its peers.
pub(super) const SLOW_TURN: Duration = Duration::from_millis(50);

impl<C, F> Driver<C, F>
where
    C: TypeConfig,
    F: NetworkFactory<C>,
{
    pub(super) fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    pub(super) async fn run(mut self) {
        // When a slow turn or late wake-up was last logged: once a second.
        let mut warned: Option<Instant> = None;
        loop {
            let deadline = self.start + Duration::from_millis(self.x.engine().next_deadline());
            // Storage reports first: they unblock replies and commits; then
            // peers' answers, then new inputs.
            let first = match self.answered.pop_front() {
                Some((from, msg)) => Some(Event::Answer(from, msg)),
                None => tokio::select! {
                    biased;
                    // First, so that the storage work the last turn
                    // handed out starts (and, in memory, finishes) before
                    // anything else is looked at. A lane ends only when its
                    // store failed (the report is queued) or at shutdown.
                    Some(()) = self.lanes.next(), if !self.lanes.is_empty() => None,
                    report = self.reports.recv() => match report {
                        Some(r) => Some(Event::Report(r)),
                        None => break,
                    },
                    // A failed call (`Some(None)`) still ends the wait: a
                    // refuted pattern would stop this select polling the
                    // other calls.
                    answer = self.rpcs.next(), if !self.rpcs.is_empty() => {
                        answer.flatten().map(|(from, msg)| Event::Answer(from, msg))
                    }
                    input = self.rx.recv() => match input {
                        Some(i) => Some(Event::Input(i)),
                        None => break,
                    },
                    _ = tokio::time::sleep_until(deadline) => None,
                },
            };
            let woke = Instant::now();
            // Time moves first, timers fire last: what queued up while this
            // task waited (a pause, a busy runtime) counts before a timer
            // judges its absence.
            let now = self.now_ms();
            self.x.engine_mut().advance_clock(now);
            let mut stop = false;
            let mut next = first;
            let mut n = 0;
            while let Some(event) = next.take() {
                n += 1;
                match event {
                    Event::Input(Input::Shutdown) => {
                        stop = true;
                        break;
                    }
                    Event::Input(input) => self.handle(input),
                    Event::Answer(from, msg) => self.answer(from, msg),
                    Event::Report(report) => {
                        if let Err(e) = self.report(report) {
                            self.fail_stop(e);
                            return self.stop_workers().await;
                        }
                    }
                }
                if n >= BATCH {
                    break;
                }
                next = match self.reports.try_recv() {
                    Ok(r) => Some(Event::Report(r)),
                    Err(_) => match self.answered.pop_front() {
                        Some((from, msg)) => Some(Event::Answer(from, msg)),
                        None => self.rx.try_recv().ok().map(Event::Input),
                    },
                };
            }
            // Answers that came in while this task waited or worked count
            // before check-quorum judges their absence: a turn that was late
            // would otherwise see one answer and miss the rest, and step down
            // with its followers' answers unread.
            if !stop {
                self.start_rpcs().await;
                while let Some((from, msg)) = self.answered.pop_front() {
                    self.answer(from, msg);
                }
            }
            self.x.tick(now);
            self.pump();
            self.start_rpcs().await;
            self.publish(None);
            let (late, took) = (woke.saturating_duration_since(deadline), woke.elapsed());
            if (late >= SLOW_TURN || took >= SLOW_TURN)
                && warned.is_none_or(|w| w.elapsed() >= Duration::from_secs(1))
            {
                warned = Some(Instant::now());
                warn!(
                    node = %self.x.engine().id(),
                    late_ms = late.as_millis() as u64,
                    took_ms = took.as_millis() as u64,
                    events = n,
                    "driver turn slow or late: peers may miss this node's heartbeats"
                );
            }
            if stop {
                break;
            }
        }
        let id = self.x.engine().id();
        self.stop_workers().await;
        info!(node = %id, "raft node shut down");
    }

    /// Polls the RPCs in flight once: the requests `pump` just queued are
    /// written now rather than when the loop next sleeps, and the answers
    /// that are already in are queued in `answered`.
    pub(super) async fn start_rpcs(&mut self) {
        let (rpcs, answered) = (&mut self.rpcs, &mut self.answered);
        std::future::poll_fn(|cx| {
            while let Poll::Ready(Some(answer)) = rpcs.poll_next_unpin(cx) {
                answered.extend(answer);
            }
            Poll::Ready(())
        })
        .await
    }

    /// Closes the workers' queues and waits for them to finish what they
    /// were handed, so a restart on the same storage never races them.
    pub(super) async fn stop_workers(self) {
        let Driver {
            log_tx,
            sm_tx,
            workers,
            mut lanes,
            ..
        } = self;
        drop((log_tx, sm_tx));
        while lanes.next().await.is_some() {}
        for w in workers {
            let _ = w.await;
        }
    }

    pub(super) fn handle(&mut self, input: Input<C>) {
        match input {
            Input::Write { command, reply } => self.x.propose(command, reply),
            Input::Membership { change, reply } => {
                let e = self.x.engine_mut();
                let proposed = match change {
                    MembershipChange::AddLearner(id, node) => e.add_learner(id, node),
                    MembershipChange::RemoveLearner(id) => e.remove_learner(id),
                    MembershipChange::Voters(voters) => e.change_membership(voters),
                    MembershipChange::Demote(id) => e.demote_voter(id),
                };
                self.x.await_entry(proposed, reply);
            }
            Input::Read { reply } => self.x.read(reply),
            Input::Rpc { from, msg, reply } => {
                let kind = msg.kind();
                if let Err((e, reply)) = self.x.step(from, msg, Some(reply)) {
                    warn!(peer = %from, kind, error = %e, "refused message");
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(RaftError::Refused(e)));
                    }
                }
            }
            Input::Peer { from, msg } => self.answer(from, msg),
            Input::Initialize { members, reply } => {
                match self
                    .x
                    .engine_mut()
                    .initialize(Membership::new_voters(members))
                {
                    Ok(()) => self.initialize_reply = Some(reply),
                    Err(e) => {
                        let _ = reply.send(Err(RaftError::Initialize(e)));
                    }
                }
            }
            Input::Transfer { to, reply } => {
                let r = self
                    .x
                    .engine_mut()
                    .transfer_leader(to)
                    .map_err(RaftError::NotLeader);
                let _ = reply.send(r);
            }
            Input::Shutdown => {}
        }
    }

    /// Steps a peer's message that needs no reply (a response, TimeoutNow).
    pub(super) fn answer(&mut self, from: NodeId, msg: Message<C>) {
        let kind = msg.kind();
        if let Err((e, _)) = self.x.step(from, msg, None) {
            warn!(peer = %from, kind, error = %e, "refused response");
        }
    }

    /// Hands a storage worker's report to the executor.
    pub(super) fn report(&mut self, report: Report<C>) -> Result<(), StorageError> {
        match report {
            Report::Log(done) => {
                for d in done {
                    match d {
                        LogDone::Durable(n) => (0..n).for_each(|_| self.x.log_done()),
                        LogDone::Read(entries) => self.x.log_read(entries),
                    }
                }
            }
            Report::Applied(counts) => {
                for n in counts {
                    if let Err((got, want)) = self.x.applied_batch(n) {
                        return Err(StorageError::Corrupt {
                            location: "state machine".into(),
                            detail: format!("{got} responses for {want} entries"),
                        });
                    }
                }
            }
            Report::SnapshotBuilt(meta) => self.x.snapshot_built(meta),
            Report::ChunkRead(to, msg) => self.x.snapshot_chunk_read(to, msg),
            Report::ChunkWritten => self.x.snapshot_chunk_written(),
            Report::Installed(meta) => self.x.snapshot_installed(&meta),
            Report::Failed(e) => return Err(e),
        }
        Ok(())
    }

    /// Hands out what the executor has ready and answers callers.
    pub(super) fn pump(&mut self) {
        for io in self.x.poll_io() {
            match io {
                Io::Log(op) => {
                    let _ = self.log_tx.send(LogItem::Op(op));
                }
                Io::Sm(op) => {
                    let _ = self.sm_tx.send(op);
                }
                Io::Send { to, msg } => self.send(to, msg),
                Io::Reply { to, msg } => {
                    let _ = to.send(Ok(msg));
                }
                Io::ReplyAfterLog { to, msg } => {
                    let _ = self.log_tx.send(LogItem::Reply(to, msg));
                }
            }
        }
        for done in self.x.take_done() {
            match done {
                Done::Write(reply, e) => {
                    let _ = reply.send(Err(RaftError::from(e)));
                }
                Done::Read(reply, r) => {
                    let _ = reply.send(r.map_err(RaftError::NotLeader));
                }
                Done::Refused { from, reply, error } => {
                    warn!(peer = %from, kind = "append", error = %error, "refused message");
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(RaftError::Refused(error)));
                    }
                }
            }
        }
        if self.x.log_idle()
            && let Some(reply) = self.initialize_reply.take()
        {
            let _ = reply.send(Ok(()));
        }
    }

    pub(super) fn send(&mut self, to: NodeId, msg: Message<C>) {
        let Some(node) = self.x.engine().membership().nodes.get(&to).cloned() else {
            debug!(peer = %to, "no address for peer; dropping message");
            return;
        };
        let client = match self.peers.get(&to) {
            Some((addr, c)) if *addr == node => c.clone(),
            _ => {
                let c = Arc::new(self.network.connect(to, &node));
                self.peers.insert(to, (node, c.clone()));
                c
            }
        };
        // A late answer is still an answer (the engine drops stale ones by
        // term and round): the bound only reclaims calls to a peer that
        // never answers.
        let timeout = Duration::from_millis(self.x.engine().config().election_timeout_max_ms * 20);
        self.rpcs.push(Box::pin(async move {
            let kind = msg.kind();
            match tokio::time::timeout(timeout, call_peer(&*client, msg)).await {
                Ok(Ok(resp)) => resp.map(|resp| (to, resp)),
                Ok(Err(e)) => {
                    debug!(peer = %to, kind, error = %e, "rpc failed");
                    None
                }
                Err(_) => {
                    debug!(peer = %to, kind, "rpc timed out");
                    None
                }
            }
        }));
    }

    pub(super) fn fail_stop(&mut self, e: StorageError) {
        let msg = e.to_string();
        error!(node = %self.x.engine().id(), error = %msg, "storage error; stopping this node");
        let (writes, reads) = self.x.fail_all();
        for reply in writes {
            let _ = reply.send(Err(RaftError::Fatal(msg.clone())));
        }
        for reply in reads {
            let _ = reply.send(Err(RaftError::Fatal(msg.clone())));
        }
        self.publish(Some(msg));
    }

    /// Brings the published metrics up to date in place: the loop calls
    /// this after every batch, so it allocates only when the membership or
    /// the set of replicated peers changed.
    pub(super) fn publish(&mut self, fatal: Option<String>) {
        let (e, applied) = (self.x.engine(), self.x.applied());
        self.metrics.send_if_modified(|m| {
            let was = (m.role, m.leader_id);
            let changed = update_metrics(m, e, applied, fatal);
            if (m.role, m.leader_id) != was {
                info!(node = %m.id, term = %m.term, role = ?m.role, leader = ?m.leader_id, "role changed");
            }
            changed
        });
    }
}

pub(super) async fn call_peer<C: TypeConfig, N: Network<C>>(
    client: &N,
    msg: Message<C>,
) -> Result<Option<Message<C>>, NetworkError> {
    Ok(Some(match msg {
        Message::AppendEntries(r) => {
            Message::AppendEntriesResponse(client.append_entries(r).await?)
        }
        Message::Vote(r) => Message::VoteResponse(client.vote(r).await?),
        Message::InstallSnapshot(r) => {
            Message::InstallSnapshotResponse(client.install_snapshot(r).await?)
        }
        Message::TimeoutNow(r) => {
            client.timeout_now(r).await?;
            return Ok(None);
        }
        // Responses are never sent as requests.
        _ => return Ok(None),
    }))
}
