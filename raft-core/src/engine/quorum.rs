//! Quorum math. A joint configuration (§6) is just several majority
//! configurations that must all agree.

use std::collections::BTreeSet;

use crate::types::{LogIndex, NodeId};

/// Whether `yes` holds for a majority of every configuration in `configs`.
/// An empty list of configurations has no quorum.
pub fn has_quorum(configs: &[BTreeSet<NodeId>], yes: impl Fn(NodeId) -> bool) -> bool {
    !configs.is_empty()
        && configs.iter().all(|c| {
            let n = c.iter().filter(|id| yes(**id)).count();
            n * 2 > c.len()
        })
}

/// Whether `no` already holds for enough voters that a quorum for the other
/// answer is impossible in at least one configuration.
pub fn quorum_impossible(configs: &[BTreeSet<NodeId>], no: impl Fn(NodeId) -> bool) -> bool {
    configs.iter().any(|c| {
        let n = c.iter().filter(|id| no(**id)).count();
        n * 2 >= c.len() && !c.is_empty()
    })
}

/// The largest index that a majority of every configuration has reached, given
/// each voter's match index (quorum/majority.go in etcd-io/raft).
pub fn committed_index(
    configs: &[BTreeSet<NodeId>],
    matched: impl Fn(NodeId) -> LogIndex,
) -> LogIndex {
    configs
        .iter()
        .map(|c| {
            if c.is_empty() {
                return LogIndex(0);
            }
            let mut v: Vec<LogIndex> = c.iter().map(|id| matched(*id)).collect();
            v.sort_unstable_by(|a, b| b.cmp(a));
            // The (n/2+1)-th highest value is held by a majority.
            v[c.len() / 2]
        })
        .min()
        .unwrap_or(LogIndex(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[u64]) -> BTreeSet<NodeId> {
        ids.iter().map(|i| NodeId(*i)).collect()
    }

    #[test]
    fn majority_of_three_is_two() {
        let c = [set(&[1, 2, 3])];
        assert!(has_quorum(&c, |id| id.0 <= 2));
        assert!(!has_quorum(&c, |id| id.0 == 1));
    }

    #[test]
    fn joint_configuration_needs_both_majorities() {
        let c = [set(&[1, 2, 3]), set(&[3, 4, 5])];
        assert!(
            !has_quorum(&c, |id| id.0 <= 3),
            "old majority alone is not enough"
        );
        assert!(has_quorum(&c, |id| [1, 2, 4, 5].contains(&id.0)));
    }

    #[test]
    fn committed_index_is_the_median_and_min_across_joint() {
        let m = |id: NodeId| LogIndex([0, 10, 7, 3, 9, 1][id.0 as usize]);
        assert_eq!(committed_index(&[set(&[1, 2, 3])], m), LogIndex(7));
        assert_eq!(
            committed_index(&[set(&[1, 2, 3]), set(&[3, 4, 5])], m),
            LogIndex(3)
        );
        assert_eq!(committed_index(&[set(&[1, 2, 3, 4])], m), LogIndex(7));
    }

    #[test]
    fn rejections_make_quorum_impossible() {
        let c = [set(&[1, 2, 3, 4])];
        assert!(!quorum_impossible(&c, |id| id.0 == 1));
        assert!(quorum_impossible(&c, |id| id.0 <= 2));
        // Of three, one refusal leaves a majority possible; two do not.
        let c = [set(&[1, 2, 3])];
        assert!(!quorum_impossible(&c, |id| id.0 == 1));
        assert!(quorum_impossible(&c, |id| id.0 <= 2));
    }
}
