//! What this node saw of leadership changes: when it lost its leader and
//! why, and when it knew the next one. Observation only: nothing here
//! changes what the engine does (it is what a dashboard shows as "the last
//! elections").

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::Engine;
use crate::types::{NodeId, Term, TypeConfig};

/// How many leadership changes an engine remembers.
pub const LEADERSHIP_HISTORY: usize = 16;

/// Why a node was without a leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ElectionCause {
    /// The node had just started and knew no leader yet.
    Start,
    /// Its election timeout passed without word from a leader.
    Timeout,
    /// The leader handed over (TimeoutNow, thesis §3.10).
    Transfer,
    /// It led, and stepped down when a quorum went silent (check-quorum,
    /// thesis §6.2).
    CheckQuorum,
    /// Another node's higher term reached it (a campaign it took no part
    /// in starting).
    HigherTerm,
    /// It led, and stepped down on leaving the configuration (§6).
    Removed,
}

/// One change of leadership as this node saw it: from losing its leader
/// (or starting) to knowing the next one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeadershipChange {
    /// The new leader's term.
    pub term: Term,
    /// The new leader.
    pub leader: NodeId,
    /// Why the node was without a leader.
    pub cause: ElectionCause,
    /// When it lost its leader (engine milliseconds): for a timeout, when
    /// it last heard from that leader.
    pub lost_at_ms: u64,
    /// When it knew the new one.
    pub known_at_ms: u64,
}

impl LeadershipChange {
    /// How long the node was without a leader.
    pub fn duration_ms(&self) -> u64 {
        self.known_at_ms.saturating_sub(self.lost_at_ms)
    }
}

/// The history's state in the engine.
#[derive(Clone, Debug)]
pub(crate) struct History {
    /// Since when, and why, the node has had no leader.
    lost: Option<(u64, ElectionCause)>,
    /// The last leader known, and its term.
    last: Option<(Term, NodeId)>,
    changes: VecDeque<LeadershipChange>,
}

impl Default for History {
    fn default() -> Self {
        History {
            lost: Some((0, ElectionCause::Start)),
            last: None,
            changes: VecDeque::with_capacity(LEADERSHIP_HISTORY),
        }
    }
}

impl<C: TypeConfig> Engine<C> {
    /// The node has no leader from now, for `cause` (if it had one).
    pub(super) fn leader_lost(&mut self, cause: ElectionCause) {
        if self.history.lost.is_none() {
            // A timeout is noticed an election timeout late: the leader
            // was gone from the last word heard from it.
            let since = match cause {
                ElectionCause::Timeout if self.history.last.is_some() => self.leader_contact,
                _ => self.now,
            };
            self.history.lost = Some((since, cause));
        }
    }

    /// The node knows `leader` leads its current term. (Called on every
    /// append from the leader: the common case returns at the first test.)
    pub(super) fn leader_known(&mut self, leader: NodeId) {
        let now = (self.term, leader);
        let lost = self.history.lost.take();
        // Still the same leader: nothing changed (a pre-vote round that
        // found the leader alive included).
        if self.history.last == Some(now) {
            return;
        }
        self.history.last = Some(now);
        // A new leader's first message can arrive before anything that
        // told this node its old leader was gone.
        let (lost_at_ms, cause) = lost.unwrap_or((self.now, ElectionCause::HigherTerm));
        if self.history.changes.len() == LEADERSHIP_HISTORY {
            self.history.changes.pop_front();
        }
        self.history.changes.push_back(LeadershipChange {
            term: self.term,
            leader,
            cause,
            lost_at_ms,
            known_at_ms: self.now,
        });
    }

    /// The last leadership changes this node saw, oldest first (at most
    /// [`LEADERSHIP_HISTORY`]).
    pub fn leadership_changes(&self) -> impl ExactSizeIterator<Item = &LeadershipChange> + '_ {
        self.history.changes.iter()
    }

    /// Since when (engine milliseconds), and why, this node has known no
    /// leader; `None` while it knows one.
    pub fn leaderless_since(&self) -> Option<(u64, ElectionCause)> {
        self.history.lost
    }
}
