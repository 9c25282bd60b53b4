//! Starting an engine from what its storage recovered.

use super::*;

/// What a node recovered from its storage, handed to [`Engine::new`].
#[derive(Clone, Debug)]
pub struct RecoveredState<C: TypeConfig> {
    /// The saved term and vote.
    pub hard_state: HardState,
    /// The last purged entry of the `LogStore` (`LogId::ZERO` if none).
    pub log_base: LogId,
    /// Every entry after `log_base`, in order.
    pub entries: Vec<Entry<C>>,
    /// The newest durable snapshot, if any.
    pub snapshot: Option<SnapshotMeta<C>>,
    /// The state machine's last applied entry.
    pub applied: LogId,
}

impl<C: TypeConfig> Default for RecoveredState<C> {
    fn default() -> Self {
        RecoveredState {
            hard_state: HardState::default(),
            log_base: LogId::ZERO,
            entries: Vec::new(),
            snapshot: None,
            applied: LogId::ZERO,
        }
    }
}

impl<C: TypeConfig> Engine<C> {
    /// Builds a node from what it recovered. `seed` drives every random
    /// choice (election timeouts); `now` is the current time in milliseconds
    /// on any monotonic clock. Repair actions (if storage must be reconciled
    /// with a newer snapshot) come out of the first [`Engine::take_actions`].
    pub fn new(
        id: NodeId,
        config: Config,
        seed: u64,
        now: u64,
        state: RecoveredState<C>,
    ) -> Result<Self, RecoveryError> {
        let RecoveredState {
            hard_state,
            log_base,
            entries,
            snapshot,
            applied,
        } = state;
        validate_entries(log_base, &entries, hard_state.term)?;
        let mut actions = Vec::new();
        let mut log = RaftLog::new(log_base, entries);

        let snap_id = snapshot
            .as_ref()
            .map(|s| s.last_log_id)
            .unwrap_or(LogId::ZERO);
        let base_membership = (
            snap_id,
            snapshot
                .as_ref()
                .map(|s| s.membership.clone())
                .unwrap_or_default(),
        );
        if snap_id.index > log.base().index {
            // The snapshot is newer than the log's purge point. If the log
            // agrees with it, keep it, purged as `snapshot_built` would
            // (`purge_keep` entries behind the snapshot stay, so a follower
            // a little behind is still repaired by entries after a
            // restart); otherwise the log was superseded (a crash between
            // installing a snapshot and cleaning the log).
            if log.matches(snap_id) {
                let keep_from = LogIndex(snap_id.index.0.saturating_sub(config.purge_keep));
                if keep_from > log.base().index
                    && let Some(upto) = log.log_id_at(keep_from)
                {
                    log.purge(upto);
                    actions.push(Action::PurgeLog { upto });
                }
            } else {
                if !log.is_empty() {
                    actions.push(Action::TruncateLog {
                        from: log.first_index(),
                    });
                }
                log = RaftLog::new(snap_id, Vec::new());
                actions.push(Action::PurgeLog { upto: snap_id });
            }
        }
        if applied.index < snap_id.index {
            return Err(RecoveryError::AppliedBeforeSnapshot {
                applied: applied.index,
                snapshot: snap_id.index,
            });
        }
        if applied.index < log.base().index {
            // The log was purged past what the state machine holds and no
            // snapshot covers the gap: those entries are gone.
            return Err(RecoveryError::AppliedBeforeLogStart {
                applied: applied.index,
                first: log.first_index(),
            });
        }
        if applied.index > log.last_index() {
            return Err(RecoveryError::AppliedPastLog {
                applied: applied.index,
                last: log.last_index(),
            });
        }
        if applied.index > snap_id.index && !log.matches(applied) {
            return Err(RecoveryError::AppliedMismatch {
                applied: applied.index,
            });
        }
        // What the log since the snapshot weighs, for the snapshot policy.
        let applied_log_bytes = log
            .range(snap_id.index.next(), applied.index)
            .map(|e| e.size_hint() as u64)
            .sum();
        let mut log_memberships = Vec::new();
        for e in log.range(LogIndex(0), log.last_index()) {
            if let EntryPayload::Membership(m) = &e.payload
                && e.log_id.index > base_membership.0.index
            {
                log_memberships.push((e.log_id, m.clone()));
            }
        }

        // A store that never held an identity (new, or written before
        // identities existed) gets one now, saved before anything else this
        // node does: every later write queues behind it.
        let mut uuid = hard_state.uuid;
        if uuid.is_none() {
            let mut r = Rng::new(seed ^ id.0.wrapping_mul(0x94D0_49BB_1331_11EB) ^ 0x1D);
            while uuid.is_none() {
                uuid = NodeUuid(u128::from(r.next_u64()) << 64 | u128::from(r.next_u64()));
            }
            actions.insert(0, Action::SaveHardState(HardState { uuid, ..hard_state }));
        }

        let mut engine = Engine {
            id,
            uuid,
            unrecognized_logged: false,
            rng: Rng::new(seed ^ id.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            snapshot_rng: Rng::new(seed ^ id.0.wrapping_mul(0xC2B2_AE3D_27D4_EB4F) ^ 0x5EED),
            snapshot_stretch: 100,
            now,
            term: hard_state.term,
            voted_for: hard_state.voted_for,
            durable: log.last_index(),
            commit: applied.index,
            leader_commit: applied.index,
            applied: applied.index,
            log,
            role: RoleState::Follower,
            leader_id: None,
            election_due: 0,
            leader_contact: 0,
            leader_keeps_from: LogIndex(0),
            base_membership,
            log_memberships,
            snapshot,
            previous_snapshot: None,
            building_snapshot: false,
            building_for_transfer: false,
            snapshot_for_transfer: false,
            applied_log_bytes,
            log_bytes_at_snapshot: 0,
            log_bytes_at_build: 0,
            receiving: None,
            unflushed: None,
            read_round_wanted: false,
            elections: 0,
            history: Default::default(),
            snapshots_sent: 0,
            snapshot_bytes_delivered: 0,
            snapshot_delivery_ms: 0,
            snapshots_installed: 0,
            actions,
            config,
        };
        engine.reset_election_timer();
        engine.stretch_snapshot_thresholds();
        engine.evict_cached();
        Ok(engine)
    }
}

pub(super) fn validate_entries<C: TypeConfig>(
    base: LogId,
    entries: &[Entry<C>],
    saved: Term,
) -> Result<(), RecoveryError> {
    let mut prev = base;
    for e in entries {
        if e.log_id.index != prev.index.next() {
            return Err(RecoveryError::Gap {
                index: e.log_id.index,
                expected: prev.index.next(),
            });
        }
        if e.log_id.term < prev.term {
            return Err(RecoveryError::TermRegression {
                index: e.log_id.index,
                term: e.log_id.term,
            });
        }
        if e.log_id.term > saved {
            return Err(RecoveryError::TermFromFuture {
                index: e.log_id.index,
                term: e.log_id.term,
                saved,
            });
        }
        prev = e.log_id;
    }
    Ok(())
}
