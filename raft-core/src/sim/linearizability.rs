//! A linearizability checker for key-value histories, in the style of
//! Wing & Gong with Lowe's memoization: a depth-first search for an order of
//! the operations that respects real time and a sequential register model.
//! Keys are independent (P-compositionality), so each key is checked alone.

use std::collections::{BTreeMap, HashSet};

/// What an operation asked for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// Sets the key.
    Put(String),
    /// Removes the key.
    Delete,
    /// Reads the key.
    Get,
    /// Compare-and-set.
    Cas {
        /// The value the key must hold.
        expected: Option<String>,
        /// The value it gets if it does.
        new: Option<String>,
    },
}

/// What the system answered.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum OpOutput {
    /// The put happened.
    Put,
    /// The delete happened; whether the key existed.
    Deleted(bool),
    /// The value read.
    Get(Option<String>),
    /// The compare-and-set's answer.
    Cas {
        /// Whether the swap happened.
        succeeded: bool,
        /// The key's value after it.
        current: Option<String>,
    },
}

/// One client operation. `output: None` means the outcome is unknown (it
/// timed out or its node crashed): it may have taken effect at any point
/// after `invoke`, or never.
#[derive(Clone, Debug)]
pub struct Operation {
    /// The key operated on.
    pub key: String,
    /// What was asked.
    pub kind: OpKind,
    /// When it was invoked (any clock, as long as it is one clock).
    pub invoke: u64,
    /// `None` when unknown.
    pub complete: Option<(u64, OpOutput)>,
}

/// Applies `kind` to the register `state`; returns the new state and the
/// output a correct system gives.
fn step(state: &Option<String>, kind: &OpKind) -> (Option<String>, OpOutput) {
    match kind {
        OpKind::Put(v) => (Some(v.clone()), OpOutput::Put),
        OpKind::Delete => (None, OpOutput::Deleted(state.is_some())),
        OpKind::Get => (state.clone(), OpOutput::Get(state.clone())),
        OpKind::Cas { expected, new } => {
            if state == expected {
                (
                    new.clone(),
                    OpOutput::Cas {
                        succeeded: true,
                        current: new.clone(),
                    },
                )
            } else {
                (
                    state.clone(),
                    OpOutput::Cas {
                        succeeded: false,
                        current: state.clone(),
                    },
                )
            }
        }
    }
}

/// Why a history is not linearizable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The key whose history has no linear order.
    pub key: String,
    /// How many operations on it were checked.
    pub ops: usize,
    /// What could not be placed.
    pub detail: String,
}

/// Checks every key; returns the first key whose history has no valid
/// linearization. `budget` caps the search states per key (a history too
/// large to decide is reported as a violation naming the budget, so the
/// check can never silently pass).
pub fn check(ops: &[Operation], budget: usize) -> Result<(), Violation> {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in ops {
        by_key.entry(&op.key).or_default().push(op);
    }
    for (key, ops) in by_key {
        let mut ops = prune_unobserved(ops);
        ops.sort_by_key(|o| o.invoke);
        check_key(key, &ops, budget)?;
    }
    Ok(())
}

/// Drops unknown-outcome writes whose value nobody ever observed. Such a
/// write may be linearized or omitted; omitting it is valid whenever keeping
/// it is, because any read in the window where it held would have returned
/// its (unique, unobserved) value. Without this, every crashed client's write
/// multiplies the search. Deletes observe presence without a value, so keys
/// with deletes are left alone.
fn prune_unobserved(ops: Vec<&Operation>) -> Vec<&Operation> {
    if ops.iter().any(|o| o.kind == OpKind::Delete) {
        return ops;
    }
    let mut observed: HashSet<&str> = HashSet::new();
    for o in &ops {
        if let OpKind::Cas {
            expected: Some(v), ..
        } = &o.kind
        {
            observed.insert(v);
        }
        match &o.complete {
            Some((_, OpOutput::Get(Some(v))))
            | Some((
                _,
                OpOutput::Cas {
                    current: Some(v), ..
                },
            )) => {
                observed.insert(v);
            }
            _ => {}
        }
    }
    let written = |o: &Operation| match &o.kind {
        OpKind::Put(v) => Some(v.clone()),
        OpKind::Cas { new: Some(v), .. } => Some(v.clone()),
        _ => None,
    };
    ops.into_iter()
        .filter(|o| {
            o.complete.is_some() || written(o).is_none_or(|v| observed.contains(v.as_str()))
        })
        .collect()
}

fn check_key(key: &str, ops: &[&Operation], budget: usize) -> Result<(), Violation> {
    let n = ops.len();
    let words = n.div_ceil(64);
    let must: usize = ops.iter().filter(|o| o.complete.is_some()).count();
    let mut seen: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    // Explicit DFS stack: (done set, state, completed count).
    let mut stack: Vec<(Vec<u64>, Option<String>, usize)> = vec![(vec![0; words], None, 0)];
    let mut explored = 0usize;
    while let Some((done, state, completed)) = stack.pop() {
        if completed == must {
            return Ok(());
        }
        explored += 1;
        if explored > budget {
            return Err(Violation {
                key: key.to_string(),
                ops: n,
                detail: format!("undecided after {budget} search states"),
            });
        }
        // An op may go next only if it was invoked before every pending
        // completed op finished.
        let horizon = ops
            .iter()
            .enumerate()
            .filter(|(i, _)| done[i / 64] & (1 << (i % 64)) == 0)
            .filter_map(|(_, o)| o.complete.as_ref().map(|(t, _)| *t))
            .min()
            .unwrap_or(u64::MAX);
        for (i, op) in ops.iter().enumerate() {
            if op.invoke > horizon {
                break;
            }
            if done[i / 64] & (1 << (i % 64)) != 0 {
                continue;
            }
            let (next, out) = step(&state, &op.kind);
            let counts = match &op.complete {
                Some((_, got)) if *got != out => continue,
                Some(_) => 1,
                None => 0,
            };
            let mut d = done.clone();
            d[i / 64] |= 1 << (i % 64);
            if seen.insert((d.clone(), next.clone())) {
                stack.push((d, next, completed + counts));
            }
        }
    }
    Err(Violation {
        key: key.to_string(),
        ops: n,
        detail: describe(ops),
    })
}

fn describe(ops: &[&Operation]) -> String {
    let mut s = String::new();
    for o in ops.iter().take(40) {
        let end = match &o.complete {
            Some((t, out)) => format!("{t} -> {out:?}"),
            None => "unknown".into(),
        };
        s.push_str(&format!("\n  [{} .. {}] {:?}", o.invoke, end, o.kind));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: OpKind, invoke: u64, complete: Option<(u64, OpOutput)>) -> Operation {
        Operation {
            key: "k".into(),
            kind,
            invoke,
            complete,
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = vec![
            op(OpKind::Put("a".into()), 0, Some((1, OpOutput::Put))),
            op(OpKind::Get, 2, Some((3, OpOutput::Get(Some("a".into()))))),
        ];
        assert!(check(&h, 10_000).is_ok());
    }

    #[test]
    fn stale_read_after_completed_write_is_caught() {
        let h = vec![
            op(OpKind::Put("a".into()), 0, Some((1, OpOutput::Put))),
            op(OpKind::Put("b".into()), 2, Some((3, OpOutput::Put))),
            op(OpKind::Get, 4, Some((5, OpOutput::Get(Some("a".into()))))),
        ];
        assert!(check(&h, 10_000).is_err());
    }

    #[test]
    fn concurrent_ops_may_order_either_way() {
        let h = vec![
            op(OpKind::Put("a".into()), 0, Some((10, OpOutput::Put))),
            op(OpKind::Get, 1, Some((2, OpOutput::Get(Some("a".into()))))),
            op(OpKind::Get, 3, Some((4, OpOutput::Get(Some("a".into()))))),
        ];
        assert!(check(&h, 10_000).is_ok());
    }

    #[test]
    fn unknown_write_may_or_may_not_have_happened() {
        let took_effect = vec![
            op(OpKind::Put("a".into()), 0, None),
            op(OpKind::Get, 5, Some((6, OpOutput::Get(Some("a".into()))))),
        ];
        assert!(check(&took_effect, 10_000).is_ok());
        let did_not = vec![
            op(OpKind::Put("a".into()), 0, None),
            op(OpKind::Get, 5, Some((6, OpOutput::Get(None)))),
        ];
        assert!(check(&did_not, 10_000).is_ok());
    }

    #[test]
    fn read_cannot_flip_back_to_an_older_value() {
        let h = vec![
            op(OpKind::Put("a".into()), 0, Some((1, OpOutput::Put))),
            op(OpKind::Put("b".into()), 0, None),
            op(OpKind::Get, 5, Some((6, OpOutput::Get(Some("b".into()))))),
            op(OpKind::Get, 7, Some((8, OpOutput::Get(Some("a".into()))))),
        ];
        assert!(check(&h, 10_000).is_err());
    }

    #[test]
    fn cas_outcomes_must_agree_with_the_register() {
        let h = vec![
            op(OpKind::Put("a".into()), 0, Some((1, OpOutput::Put))),
            op(
                OpKind::Cas {
                    expected: Some("a".into()),
                    new: Some("b".into()),
                },
                2,
                Some((
                    3,
                    OpOutput::Cas {
                        succeeded: true,
                        current: Some("b".into()),
                    },
                )),
            ),
            op(
                OpKind::Cas {
                    expected: Some("a".into()),
                    new: Some("c".into()),
                },
                4,
                Some((
                    5,
                    OpOutput::Cas {
                        succeeded: true,
                        current: Some("c".into()),
                    },
                )),
            ),
        ];
        assert!(
            check(&h, 10_000).is_err(),
            "two CAS from the same value cannot both succeed in sequence"
        );
    }
}
