//! Node identities: the rules that keep a node whose storage was wiped
//! from counting as the member it was.
//!
//! A node draws a [`NodeUuid`] when its store is new and keeps it with its
//! hard state. The leader records each member's identity in the
//! configuration ([`crate::Membership::uuids`]) when it first hears from it, and
//! from then on:
//! - a candidate counts a vote only from a voter the configuration
//!   recognizes, and a voter refuses a candidate it does not recognize
//!   ([`Engine::identities_allow_vote`], `on_vote_response`);
//! - a leader counts an acknowledgement toward commits, reads and
//!   check-quorum only from a recognized follower, and forgets what a
//!   follower acknowledged when it answers under a new identity
//!   ([`Engine::answered_by`]);
//! - a node that finds another identity recorded for its id neither votes
//!   nor campaigns ([`Engine::recognized`]); it follows the leader like a
//!   learner until it is removed and added back, when its new identity is
//!   recorded.
//!
//! What it cannot see: a member wiped before its identity was recorded, or
//! a candidate whose log ends before that record (one that received
//! nothing since about when the member joined) elected with the wiped
//! member's vote. The simulator's wipes stay out of that window
//! (`tests/sweep.rs`, `wipe_in_sync_follower`); the sweep found the window
//! at once when they did not.

use std::collections::BTreeSet;

use tracing::{debug, error, info, warn};

use super::{Engine, RoleState};
use crate::message::VoteRequest;
use crate::types::{EntryPayload, NodeId, NodeUuid, TypeConfig};

impl<C: TypeConfig> Engine<C> {
    /// This node's identity.
    pub fn uuid(&self) -> NodeUuid {
        self.uuid
    }

    /// Whether the configuration in force recognizes this node as itself.
    /// `false` means it records another identity for this id: this node's
    /// storage was wiped or replaced since it joined. Such a node follows
    /// the leader (it receives the log like a learner) but neither votes
    /// nor campaigns, and the leader counts none of its acknowledgements;
    /// an operator removes it and adds it back to make it a voter again.
    pub fn recognized(&self) -> bool {
        self.membership().recognizes(self.id, self.uuid)
    }

    /// Leader: the members that answered under an identity the
    /// configuration does not recognize (empty on other roles).
    pub fn unrecognized_peers(&self) -> BTreeSet<NodeId> {
        match &self.role {
            RoleState::Leader(l) => l
                .progress
                .iter()
                .filter(|(_, p)| !p.recognized)
                .map(|(id, _)| *id)
                .collect(),
            _ => BTreeSet::new(),
        }
    }

    /// Whether this node may vote for candidate `from` as far as
    /// identities go. Not if the configuration does not recognize this
    /// node (it lost its earlier votes with its storage) or the candidate
    /// (it lost its log and its vote).
    ///
    /// A wiped node whose log does not yet hold its old identity's record
    /// cannot know it was wiped: a new store looks the same. Refusing
    /// every candidate while it holds nothing would close that gap, but a
    /// majority of voters that never received anything (learners promoted
    /// before they caught up, members down since the cluster formed) would
    /// then never elect anyone, although every node is up. The candidate's
    /// side ([`crate::Membership::recognizes`] in `on_vote_response`) is what
    /// catches the wiped voter.
    pub(super) fn identities_allow_vote(&mut self, from: NodeId, req: &VoteRequest) -> bool {
        let reason = if !self.check_recognized() {
            "this node is not recognized"
        } else if !self.membership().recognizes(from, req.candidate_uuid) {
            "the candidate is not recognized"
        } else {
            return true;
        };
        debug!(node = %self.id, candidate = %from, reason, "vote refused: identity");
        false
    }

    /// [`Engine::recognized`], logging (once per change) when it is not.
    pub(super) fn check_recognized(&mut self) -> bool {
        let recognized = self.recognized();
        if !recognized && !self.unrecognized_logged {
            error!(
                node = %self.id,
                uuid = %self.uuid,
                recorded = %self.membership().uuids.get(&self.id).copied().unwrap_or_default(),
                "the configuration records another identity for this node id (was its storage \
                 wiped or replaced?): it will neither vote nor campaign; remove it from the \
                 cluster and add it back"
            );
        }
        self.unrecognized_logged = !recognized;
        recognized
    }

    /// Leader: notes who answered, under which identity, before the answer
    /// is read. An identity other than the last one seen means the
    /// follower's storage was replaced; one the configuration does not
    /// recognize makes its answers count toward nothing; one not recorded
    /// yet is recorded ([`Self::record_identities`]). Returns whether
    /// `from` is a member this leader replicates to.
    pub(super) fn answered_by(&mut self, from: NodeId, uuid: NodeUuid) -> bool {
        let recognized = self.membership().recognizes(from, uuid);
        let unrecorded = self.membership().nodes.contains_key(&from)
            && !self.membership().uuids.contains_key(&from);
        let Some(l) = self.role.leader_mut() else {
            return false;
        };
        let Some(p) = l.progress.get_mut(&from) else {
            return false;
        };
        if p.on_identity(uuid) {
            error!(
                node = %self.id,
                peer = %from,
                uuid = %uuid,
                "follower answers under a new identity (storage wiped or replaced): \
                 forgetting what it acknowledged and replicating to it from scratch"
            );
        }
        if !recognized && p.recognized {
            warn!(
                node = %self.id,
                peer = %from,
                uuid = %uuid,
                "the configuration records another identity for this member: \
                 its votes and acknowledgements do not count until it is removed and added back"
            );
        }
        p.recognized = recognized;
        if unrecorded && !uuid.is_none() {
            self.record_identities();
        }
        true
    }

    /// Leader: records the identity of every member it has heard from that
    /// has none recorded (and its own) with a membership entry that changes
    /// nothing else, once no other change is under way. Until a member's
    /// identity is recorded, a wipe of its storage goes unnoticed: the
    /// window between a member's first answer and this entry's commit.
    fn record_identities(&mut self) {
        if self.leader().transfer.is_some() {
            return;
        }
        let Ok(mut next) = self.membership_change_base() else {
            return;
        };
        let answers = self.leader().progress.iter().map(|(id, p)| (*id, p.uuid));
        let mut recorded = Vec::new();
        for (id, uuid) in answers.chain([(self.id, self.uuid)]) {
            if !uuid.is_none() && next.nodes.contains_key(&id) && !next.uuids.contains_key(&id) {
                next.uuids.insert(id, uuid);
                recorded.push(id);
            }
        }
        if !recorded.is_empty() {
            info!(node = %self.id, term = %self.term, members = ?recorded, "recording member identities");
            self.leader_append(EntryPayload::Membership(next));
        }
    }
}
