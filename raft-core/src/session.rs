//! Client sessions: writes applied exactly once although clients retry
//! (the Raft dissertation, section 6.3).
//!
//! Without sessions a client whose write timed out cannot tell whether it
//! was applied, and a retry may apply it twice. With them:
//! 1. The client registers a session: a log entry whose log index becomes
//!    its client id, so every node names it alike.
//! 2. It tags each write with its client id and a sequence number of its
//!    own ([`SessionTag`]), and with the lowest sequence whose answer it has
//!    not yet seen (`ack`), so the state machine may forget older answers.
//! 3. The state machine applies each (client id, sequence) at most once and
//!    keeps its response; a retry that commits again gets the first
//!    response back ([`Admission::Replay`]) instead of a second apply.
//! 4. Sessions expire after an idle time measured in *log time*: every
//!    session command carries a time stamped by the leader that proposed
//!    it, and the state machine's clock is the largest stamp it has applied
//!    ([`SessionClock`]). Expiry thus depends only on the log, and every
//!    node expires the same sessions at the same entry. A write on an
//!    expired or unknown session is refused ([`SessionError::Unknown`]),
//!    never applied a second time on a fresh session.
//!
//! This module is the part every state machine shares; where the sessions
//! live is the state machine's business ([`SessionStore`]): an in-memory
//! one embeds a [`SessionTable`] (serialized with its snapshots), a durable
//! one stores each [`Session`] beside its data, written in the same atomic
//! batch as the write it records, so sessions survive snapshots and
//! restarts exactly as the data does.
//!
//! The apply of one tagged write, for any store:
//! ```
//! use raft_core::session::{self, Admission, SessionLimits, SessionTable, SessionTag};
//!
//! let mut table: SessionTable<String> = SessionTable::default();
//! let limits = SessionLimits::default();
//! // The registration entry at log index 7 opens session 7.
//! session::register(&mut table, 7, 1_000, limits);
//! let tag = SessionTag { client_id: 7, seq: 1, ack: 1 };
//! // First commit of the write (log index 9): apply it, record the answer.
//! assert!(matches!(session::admit(&mut table, &tag, 1_010), Admission::Apply));
//! session::record(&mut table, &tag, 9, "ok".to_string());
//! // A retry committed at index 12 is answered, not applied.
//! match session::admit(&mut table, &tag, 1_020) {
//!     Admission::Replay { index, response } => assert_eq!((index, response.as_str()), (9, "ok")),
//!     other => panic!("{other:?}"),
//! }
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a client attaches to a write made in a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionTag {
    /// The session: the log index of its registration entry.
    pub client_id: u64,
    /// The write's sequence number, unique within the session (a retry
    /// reuses it).
    pub seq: u64,
    /// The lowest sequence number whose answer the client has not yet seen:
    /// answers below it may be forgotten. Taken as at most `seq`.
    pub ack: u64,
}

/// A session's limits, fixed when it is registered (they travel in the
/// registration entry, so every node applies the same ones whatever its
/// own configuration says).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionLimits {
    /// A session no write has used for this long, in log time, expires.
    pub idle_timeout_ms: u64,
    /// Answers a session may hold unacknowledged; a write beyond them is
    /// refused ([`SessionError::TooManyPending`]) instead of growing the
    /// state without bound.
    pub max_pending: u32,
}

impl Default for SessionLimits {
    /// Ten minutes idle, 4,096 unacknowledged answers.
    fn default() -> Self {
        SessionLimits {
            idle_timeout_ms: 10 * 60 * 1000,
            max_pending: 4096,
        }
    }
}

/// One client's session: when it was last used and the answers its client
/// has not yet acknowledged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session<R> {
    /// Its limits, from the registration entry.
    pub limits: SessionLimits,
    /// Log time of the last write in it (or of its registration).
    pub last_active_ms: u64,
    /// Answers below this sequence were acknowledged and are forgotten.
    pub acked_below: u64,
    /// The answers kept: sequence → (log index of the entry that applied
    /// the write, its response).
    pub responses: BTreeMap<u64, (u64, R)>,
}

impl<R> Session<R> {
    fn new(now_ms: u64, limits: SessionLimits) -> Self {
        Session {
            limits,
            last_active_ms: now_ms,
            acked_below: 0,
            responses: BTreeMap::new(),
        }
    }

    /// The session has been idle for longer than its timeout at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_active_ms) > self.limits.idle_timeout_ms
    }
}

/// The state machine's log time, and when it last swept expired sessions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionClock {
    /// The largest leader stamp applied, in milliseconds. Never goes back,
    /// even when a new leader's clock is behind the old one's.
    pub now_ms: u64,
    /// `now_ms` at the last sweep.
    pub swept_ms: u64,
}

/// Where a state machine keeps its sessions. Every method acts on the
/// state as of the entries applied so far in this apply (a durable store
/// stages its writes in the batch that applies them).
pub trait SessionStore<R> {
    /// The clock (the default one if none was stored yet).
    fn clock(&mut self) -> SessionClock;
    /// Stores the clock.
    fn set_clock(&mut self, clock: SessionClock);
    /// Session `client_id`, if it exists.
    fn load(&mut self, client_id: u64) -> Option<Session<R>>;
    /// Stores session `client_id`.
    fn save(&mut self, client_id: u64, session: &Session<R>);
    /// Removes every session that has expired at `now_ms`
    /// ([`Session::expired`]).
    fn remove_expired(&mut self, now_ms: u64);
}

/// Why a write in a session was refused. Refusals are decided by the state
/// machine, so they are the same on every node, and a refused write was
/// not applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum SessionError {
    /// No such session: it expired, or was never registered. Register a
    /// new one; whether an earlier write of the old one was applied can no
    /// longer be told.
    #[error("client session {0} is unknown or has expired; register a new session")]
    Unknown(u64),
    /// The client acknowledged this sequence's answer already, and it was
    /// forgotten: a client retries only what it has not seen answered.
    #[error(
        "sequence {seq} of client session {client_id} was acknowledged and its answer forgotten"
    )]
    Stale {
        /// The session.
        client_id: u64,
        /// The sequence.
        seq: u64,
    },
    /// The session holds as many unacknowledged answers as it may.
    #[error(
        "client session {client_id} holds {max} unacknowledged answers; acknowledge some before writing more"
    )]
    TooManyPending {
        /// The session.
        client_id: u64,
        /// Its limit.
        max: u32,
    },
}

/// What the state machine does with one tagged write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission<R> {
    /// A first commit: apply the write, then [`record`] its response.
    Apply,
    /// A retry of a write already applied at log index `index`: answer
    /// `response`, apply nothing.
    Replay {
        /// The log index of the entry that applied the write.
        index: u64,
        /// What applying it answered.
        response: R,
    },
    /// Refused: answer the error, apply nothing.
    Refuse(SessionError),
}

/// Advances the clock to `stamp_ms` (if later) and sweeps expired sessions
/// once a quarter of the shortest sensible timeout (a second) has passed in
/// log time since the last sweep. Returns the log time.
fn tick<R>(store: &mut impl SessionStore<R>, stamp_ms: u64) -> u64 {
    let mut clock = store.clock();
    let now = clock.now_ms.max(stamp_ms);
    if now != clock.now_ms {
        clock.now_ms = now;
        if now.saturating_sub(clock.swept_ms) >= SWEEP_EVERY_MS {
            store.remove_expired(now);
            clock.swept_ms = now;
        }
        store.set_clock(clock);
    }
    now
}

/// Log time between sweeps of expired sessions: a session expires at most
/// this long (in log time) after its timeout, and is refused as soon as it
/// is used after its timeout in any case.
pub const SWEEP_EVERY_MS: u64 = 1_000;

/// Applies the registration entry at log index `client_id`, stamped
/// `stamp_ms` by its leader: opens session `client_id`.
pub fn register<R>(
    store: &mut impl SessionStore<R>,
    client_id: u64,
    stamp_ms: u64,
    limits: SessionLimits,
) {
    let now = tick(store, stamp_ms);
    store.save(client_id, &Session::new(now, limits));
}

/// Decides what to do with a write tagged `tag`, committed with the leader
/// stamp `stamp_ms`: drops the answers it acknowledges and marks the
/// session active.
pub fn admit<R: Clone>(
    store: &mut impl SessionStore<R>,
    tag: &SessionTag,
    stamp_ms: u64,
) -> Admission<R> {
    let now = tick(store, stamp_ms);
    let Some(mut session) = store.load(tag.client_id) else {
        return Admission::Refuse(SessionError::Unknown(tag.client_id));
    };
    if session.expired(now) {
        // The sweep removes it later; until then it is refused the same.
        return Admission::Refuse(SessionError::Unknown(tag.client_id));
    }
    session.last_active_ms = now;
    let ack = tag.ack.min(tag.seq);
    if ack > session.acked_below {
        session.acked_below = ack;
        session.responses = session.responses.split_off(&ack);
    }
    let admission = if let Some((index, response)) = session.responses.get(&tag.seq) {
        Admission::Replay {
            index: *index,
            response: response.clone(),
        }
    } else if tag.seq < session.acked_below {
        Admission::Refuse(SessionError::Stale {
            client_id: tag.client_id,
            seq: tag.seq,
        })
    } else if session.responses.len() >= session.limits.max_pending as usize {
        Admission::Refuse(SessionError::TooManyPending {
            client_id: tag.client_id,
            max: session.limits.max_pending,
        })
    } else {
        Admission::Apply
    };
    store.save(tag.client_id, &session);
    admission
}

/// Records the response of a write [`admit`] let through, applied by the
/// entry at log index `index`.
pub fn record<R>(store: &mut impl SessionStore<R>, tag: &SessionTag, index: u64, response: R) {
    if let Some(mut session) = store.load(tag.client_id) {
        session.responses.insert(tag.seq, (index, response));
        store.save(tag.client_id, &session);
    }
}

/// Sessions kept in memory: for state machines whose whole state is in
/// memory (and serialized into their snapshots).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(serialize = "R: Serialize", deserialize = "R: Deserialize<'de>"))]
pub struct SessionTable<R> {
    clock: SessionClock,
    sessions: BTreeMap<u64, Session<R>>,
}

impl<R> Default for SessionTable<R> {
    fn default() -> Self {
        SessionTable {
            clock: SessionClock::default(),
            sessions: BTreeMap::new(),
        }
    }
}

impl<R> SessionTable<R> {
    /// Open sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// No session is open.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

impl<R: Clone> SessionStore<R> for SessionTable<R> {
    fn clock(&mut self) -> SessionClock {
        self.clock
    }
    fn set_clock(&mut self, clock: SessionClock) {
        self.clock = clock;
    }
    fn load(&mut self, client_id: u64) -> Option<Session<R>> {
        self.sessions.get(&client_id).cloned()
    }
    fn save(&mut self, client_id: u64, session: &Session<R>) {
        self.sessions.insert(client_id, session.clone());
    }
    fn remove_expired(&mut self, now_ms: u64) {
        self.sessions.retain(|_, s| !s.expired(now_ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: SessionLimits = SessionLimits {
        idle_timeout_ms: 60_000,
        max_pending: 3,
    };

    fn tag(seq: u64, ack: u64) -> SessionTag {
        SessionTag {
            client_id: 5,
            seq,
            ack,
        }
    }

    fn opened() -> SessionTable<&'static str> {
        let mut t = SessionTable::default();
        register(&mut t, 5, 1_000, LIMITS);
        t
    }

    #[test]
    fn a_retry_is_answered_with_the_first_response_and_not_applied() {
        let mut t = opened();
        assert_eq!(admit(&mut t, &tag(1, 1), 1_000), Admission::Apply);
        record(&mut t, &tag(1, 1), 8, "first");
        for stamp in [1_001, 900, 5_000] {
            assert_eq!(
                admit(&mut t, &tag(1, 1), stamp),
                Admission::Replay {
                    index: 8,
                    response: "first"
                }
            );
        }
    }

    #[test]
    fn writes_may_commit_out_of_order_and_each_is_applied_once() {
        let mut t = opened();
        for seq in [3, 1, 2] {
            assert_eq!(admit(&mut t, &tag(seq, 1), 1_000), Admission::Apply);
            record(&mut t, &tag(seq, 1), 10 + seq, "x");
        }
        for seq in [1, 2, 3] {
            assert!(
                matches!(admit(&mut t, &tag(seq, 1), 1_000), Admission::Replay { index, .. } if index == 10 + seq)
            );
        }
    }

    #[test]
    fn acknowledged_answers_are_forgotten_and_their_retries_refused() {
        let mut t = opened();
        for seq in 1..=2 {
            admit(&mut t, &tag(seq, 1), 1_000);
            record(&mut t, &tag(seq, 1), seq, "x");
        }
        // The client has seen answers 1 and 2: it says so with seq 3.
        assert_eq!(admit(&mut t, &tag(3, 3), 1_000), Admission::Apply);
        assert_eq!(t.load(5).unwrap().responses.len(), 0);
        assert_eq!(
            admit(&mut t, &tag(1, 3), 1_000),
            Admission::Refuse(SessionError::Stale {
                client_id: 5,
                seq: 1
            })
        );
        // An ack above the write's own sequence cannot forget the write.
        record(&mut t, &tag(3, 3), 9, "three");
        assert!(matches!(
            admit(&mut t, &tag(3, 99), 1_000),
            Admission::Replay { index: 9, .. }
        ));
    }

    #[test]
    fn a_session_that_never_acknowledges_is_refused_past_its_limit() {
        let mut t = opened();
        for seq in 1..=3 {
            assert_eq!(admit(&mut t, &tag(seq, 1), 1_000), Admission::Apply);
            record(&mut t, &tag(seq, 1), seq, "x");
        }
        assert_eq!(
            admit(&mut t, &tag(4, 1), 1_000),
            Admission::Refuse(SessionError::TooManyPending {
                client_id: 5,
                max: 3
            })
        );
        // Retries of what it holds are still answered.
        assert!(matches!(
            admit(&mut t, &tag(2, 1), 1_000),
            Admission::Replay { .. }
        ));
        // Acknowledging makes room.
        assert_eq!(admit(&mut t, &tag(4, 3), 1_000), Admission::Apply);
    }

    #[test]
    fn an_idle_session_expires_in_log_time_and_is_refused_not_reapplied() {
        let mut t = opened();
        admit(&mut t, &tag(1, 1), 1_000);
        record(&mut t, &tag(1, 1), 7, "x");
        // Used just within its timeout: alive, and the use renews it.
        assert!(matches!(
            admit(&mut t, &tag(1, 1), 61_000),
            Admission::Replay { .. }
        ));
        // A leader whose clock is behind does not turn log time back.
        assert!(matches!(
            admit(&mut t, &tag(1, 1), 2_000),
            Admission::Replay { .. }
        ));
        // Idle for longer than its timeout: refused, even before the sweep.
        assert_eq!(
            admit(&mut t, &tag(1, 1), 121_001),
            Admission::Refuse(SessionError::Unknown(5))
        );
        assert_eq!(t.len(), 0, "the sweep removed it");
        assert_eq!(
            admit(&mut t, &tag(2, 1), 121_002),
            Admission::Refuse(SessionError::Unknown(5))
        );
    }

    #[test]
    fn sweeps_remove_only_idle_sessions() {
        let mut t = opened();
        register(&mut t, 6, 30_000, LIMITS);
        // Log time moves on through other sessions' writes only.
        register(&mut t, 9, 62_000, LIMITS);
        assert_eq!(t.len(), 2, "session 5 idled out, 6 and 9 remain");
        assert_eq!(
            admit(&mut t, &tag(1, 1), 62_000),
            Admission::Refuse(SessionError::Unknown(5))
        );
    }

    #[test]
    fn an_unknown_session_is_refused() {
        let mut t: SessionTable<()> = SessionTable::default();
        assert_eq!(
            admit(&mut t, &tag(1, 1), 0),
            Admission::Refuse(SessionError::Unknown(5))
        );
        record(&mut t, &tag(1, 1), 3, ());
        assert!(t.is_empty(), "recording on no session creates none");
    }

    #[test]
    fn the_table_survives_its_snapshot_encoding() {
        let mut t: SessionTable<String> = SessionTable::default();
        register(&mut t, 5, 1_000, LIMITS);
        admit(&mut t, &tag(1, 1), 1_000);
        record(&mut t, &tag(1, 1), 7, "x".to_string());
        let mut t: SessionTable<String> = {
            let bytes = crate::codec::encode(&t).unwrap();
            crate::codec::decode(&bytes).unwrap()
        };
        assert!(matches!(
            admit(&mut t, &tag(1, 1), 1_000),
            Admission::Replay { index: 7, .. }
        ));
    }
}
