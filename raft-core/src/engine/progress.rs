//! What the leader knows about one follower's log, and the flow control for
//! sending to it (after etcd-io/raft's tracker/progress.go).

use std::collections::VecDeque;

use crate::types::{LogIndex, NodeUuid};

/// How the leader is currently sending to a follower.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProgressState {
    /// We do not know where the follower's log matches ours: one message at a
    /// time until an answer says where.
    Probe {
        /// A probe is out and unanswered.
        sent: bool,
    },
    /// The follower is in step: send optimistically, up to the in-flight
    /// window.
    Replicate,
    /// The entries the follower needs were purged; a snapshot is streaming,
    /// a window of chunks at a time.
    Snapshot {
        snapshot_id: u64,
        /// The snapshot's size as its meta says (0 if unknown). No chunk
        /// past it goes out ahead of the follower's acknowledgements; past
        /// it, or when it is unknown, one chunk at a time.
        size: u64,
        /// Bytes the follower acknowledged: the offset it expects next.
        acked: u64,
        /// Offset of the next chunk to send; `[acked, sent)` is in flight.
        sent: u64,
        /// When a chunk last went out or `acked` last moved.
        active_at: u64,
        /// When the transfer started.
        started_at: u64,
    },
}

impl ProgressState {
    /// The offset of the next snapshot chunk to send, if the window
    /// (`window` chunks of `chunk` bytes) has room for it.
    pub fn snapshot_chunk_due(&self, window: usize, chunk: usize) -> Option<u64> {
        let ProgressState::Snapshot {
            size, acked, sent, ..
        } = *self
        else {
            return None;
        };
        let room = acked.saturating_add((window as u64).saturating_mul(chunk as u64));
        (sent < room && (sent == acked || sent < size)).then_some(sent)
    }
}

/// A message in flight in the replicate state: the last index it carried
/// and when it was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inflight {
    pub last_index: LogIndex,
    pub sent_at: u64,
}

#[derive(Clone, Debug)]
pub struct Progress {
    /// Highest index known to be replicated on the follower (Figure 2's matchIndex).
    pub matched: LogIndex,
    /// Next index to send (Figure 2's nextIndex).
    pub next: LogIndex,
    pub state: ProgressState,
    pub inflight: VecDeque<Inflight>,
    /// Heard from in the current check-quorum window.
    pub recent_active: bool,
    /// When the follower last answered this leader, if it has.
    pub last_heard: Option<u64>,
    /// When an answer last moved `matched` forward (0 if none has).
    pub advanced_at: u64,
    /// The highest heartbeat round the follower has answered.
    pub acked_round: u64,
    /// The leader's round when `matched` last moved forward: a request
    /// sent in a later round reached a follower that had already
    /// acknowledged `matched`.
    pub matched_round: u64,
    /// Counts toward quorums (false for learners).
    pub voter: bool,
    /// The identity the follower last answered with (none before its
    /// first answer).
    pub uuid: NodeUuid,
    /// The configuration recognizes `uuid` as this member
    /// ([`crate::Membership::recognizes`]). Only then do its answers count
    /// toward commits, reads and check-quorum; a follower that is not
    /// recognized (its storage was wiped) is still sent the log.
    pub recognized: bool,
    /// Entries from this index are being read back from the `LogStore` for
    /// this follower (they were evicted from the engine's cache); nothing
    /// is sent from `next` until they arrive.
    pub reading: Option<LogIndex>,
}

impl Progress {
    pub fn new(next: LogIndex, voter: bool) -> Self {
        Progress {
            matched: LogIndex(0),
            next,
            state: ProgressState::Probe { sent: false },
            inflight: VecDeque::new(),
            recent_active: false,
            last_heard: None,
            advanced_at: 0,
            acked_round: 0,
            matched_round: 0,
            voter,
            uuid: NodeUuid::NONE,
            recognized: true,
            reading: None,
        }
    }

    /// Notes the identity an answer came with. A follower that answers
    /// under another identity than before lost its storage: nothing it
    /// acknowledged holds any more, so it is probed again from scratch.
    /// Returns whether that happened.
    pub fn on_identity(&mut self, uuid: NodeUuid) -> bool {
        if self.uuid == uuid {
            return false;
        }
        let changed = !self.uuid.is_none();
        self.uuid = uuid;
        if changed {
            self.matched = LogIndex(0);
            self.acked_round = 0;
            self.reading = None;
            self.become_probe();
        }
        changed
    }

    pub fn become_probe(&mut self) {
        self.state = ProgressState::Probe { sent: false };
        self.inflight.clear();
        self.next = self.matched.next();
    }

    pub fn become_replicate(&mut self) {
        self.state = ProgressState::Replicate;
        self.inflight.clear();
        self.next = self.matched.next();
    }

    /// Records an acknowledged match, heard in the leader's `round`;
    /// returns whether it moved forward.
    pub fn on_match(&mut self, index: LogIndex, round: u64) -> bool {
        while self.inflight.front().is_some_and(|f| f.last_index <= index) {
            self.inflight.pop_front();
        }
        if index > self.matched {
            self.matched = index;
            self.matched_round = round;
            if self.next <= index {
                self.next = index.next();
            }
            true
        } else {
            false
        }
    }

    /// Records that a message carrying entries up to `last` went out at
    /// `now`: a probe now waits for its answer; in the replicate state
    /// `next` moves past it and it takes a slot of the window.
    pub fn record_sent(&mut self, last: LogIndex, now: u64) {
        match &mut self.state {
            ProgressState::Probe { sent } => *sent = true,
            _ => {
                self.next = last.next();
                self.inflight.push_back(Inflight {
                    last_index: last,
                    sent_at: now,
                });
            }
        }
    }

    /// Whether the follower answered this leader at or after `t`.
    pub fn heard_since(&self, t: u64) -> bool {
        self.last_heard.is_some_and(|h| h >= t)
    }

    /// Whether a message carrying new entries may be sent now.
    pub fn can_send(&self, max_inflight: usize) -> bool {
        match &self.state {
            ProgressState::Probe { sent } => !sent,
            ProgressState::Replicate => self.inflight.len() < max_inflight,
            ProgressState::Snapshot { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_match_moves_matched_and_next_forward_only() {
        let mut p = Progress::new(LogIndex(3), true);
        p.matched = LogIndex(2);
        assert!(p.on_match(LogIndex(5), 0));
        assert_eq!((p.matched, p.next), (LogIndex(5), LogIndex(6)));
        assert!(
            !p.on_match(LogIndex(5), 0),
            "a repeated match is no progress"
        );
        assert!(!p.on_match(LogIndex(4), 0), "a stale match is no progress");
        assert_eq!((p.matched, p.next), (LogIndex(5), LogIndex(6)));
        // next already ahead (pipelined sends) stays where it is.
        p.next = LogIndex(10);
        assert!(p.on_match(LogIndex(7), 0));
        assert_eq!(p.next, LogIndex(10));
    }

    #[test]
    fn a_new_identity_forgets_what_the_old_one_acknowledged() {
        let mut p = Progress::new(LogIndex(1), true);
        assert!(
            !p.on_identity(NodeUuid(7)),
            "a first answer changes nothing"
        );
        p.on_match(LogIndex(9), 3);
        p.acked_round = 3;
        assert!(!p.on_identity(NodeUuid(7)));
        assert_eq!(p.matched, LogIndex(9));
        assert!(p.on_identity(NodeUuid(8)));
        assert_eq!(
            (p.matched, p.next, p.acked_round),
            (LogIndex(0), LogIndex(1), 0)
        );
        assert_eq!(p.state, ProgressState::Probe { sent: false });
    }

    #[test]
    fn a_match_retires_the_messages_it_covers() {
        let mut p = Progress::new(LogIndex(1), true);
        p.become_replicate();
        for (last, at) in [(3, 1), (5, 2), (8, 3)] {
            p.inflight.push_back(Inflight {
                last_index: LogIndex(last),
                sent_at: at,
            });
        }
        p.on_match(LogIndex(5), 0);
        assert_eq!(p.inflight.len(), 1);
        assert_eq!(p.inflight[0].last_index, LogIndex(8));
    }

    #[test]
    fn a_snapshot_window_stops_at_its_width_and_at_the_known_size() {
        let at = |acked, sent, size| {
            ProgressState::Snapshot {
                snapshot_id: 1,
                size,
                acked,
                sent,
                active_at: 0,
                started_at: 0,
            }
            .snapshot_chunk_due(2, 10)
        };
        assert_eq!(at(0, 0, 100), Some(0));
        assert_eq!(at(0, 10, 100), Some(10));
        assert_eq!(at(0, 20, 100), None, "two chunks of ten are out");
        assert_eq!(at(10, 20, 100), Some(20));
        assert_eq!(
            at(80, 100, 100),
            None,
            "nothing past the size while chunks are out"
        );
        assert_eq!(at(100, 100, 100), Some(100), "past the size: one at a time");
        assert_eq!(at(0, 0, 0), Some(0), "an unknown size: one at a time");
        assert_eq!(at(0, 10, 0), None);
        assert_eq!(ProgressState::Replicate.snapshot_chunk_due(2, 10), None);
    }

    #[test]
    fn the_window_holds_exactly_max_inflight_messages() {
        let mut p = Progress::new(LogIndex(1), true);
        p.become_replicate();
        for i in 0..2 {
            assert!(p.can_send(2));
            p.inflight.push_back(Inflight {
                last_index: LogIndex(i + 1),
                sent_at: 0,
            });
        }
        assert!(!p.can_send(2), "a third message past a window of two");
        p.become_probe();
        assert!(p.can_send(2));
        p.state = ProgressState::Probe { sent: true };
        assert!(!p.can_send(2), "a second probe while one is out");
    }
}
