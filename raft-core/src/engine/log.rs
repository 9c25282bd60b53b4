//! The engine's in-memory view of the log: the entries after the last purge
//! point, plus the id of the entry just before them.
//!
//! The view holds what the `LogStore` holds (or is about to hold, once the
//! engine's persist actions complete). Its length is bounded by the snapshot
//! policy: entries are dropped from the front when a snapshot covers them.

use std::collections::VecDeque;

use crate::types::{Entry, LogId, LogIndex, Term, TypeConfig};

#[derive(Debug)]
pub struct RaftLog<C: TypeConfig> {
    /// The last purged (or snapshotted) entry; index 0 when nothing was.
    base: LogId,
    entries: VecDeque<Entry<C>>,
}

impl<C: TypeConfig> RaftLog<C> {
    pub fn new(base: LogId, entries: Vec<Entry<C>>) -> Self {
        RaftLog {
            base,
            entries: entries.into(),
        }
    }

    pub fn base(&self) -> LogId {
        self.base
    }

    pub fn first_index(&self) -> LogIndex {
        self.base.index.next()
    }

    pub fn last_log_id(&self) -> LogId {
        self.entries.back().map(|e| e.log_id).unwrap_or(self.base)
    }

    pub fn last_index(&self) -> LogIndex {
        self.last_log_id().index
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn offset(&self, index: LogIndex) -> Option<usize> {
        if index <= self.base.index {
            return None;
        }
        let off = (index.0 - self.base.index.0 - 1) as usize;
        (off < self.entries.len()).then_some(off)
    }

    /// The term of the entry at `index`, if the view knows it (the base
    /// entry's term is known even though its payload was purged).
    pub fn term_at(&self, index: LogIndex) -> Option<Term> {
        if index == self.base.index {
            return Some(self.base.term);
        }
        self.offset(index).map(|o| self.entries[o].log_id.term)
    }

    pub fn log_id_at(&self, index: LogIndex) -> Option<LogId> {
        self.term_at(index).map(|term| LogId { term, index })
    }

    /// Whether the log holds an entry with exactly this id.
    pub fn matches(&self, id: LogId) -> bool {
        self.term_at(id.index) == Some(id.term)
    }

    pub fn get(&self, index: LogIndex) -> Option<&Entry<C>> {
        self.offset(index).map(|o| &self.entries[o])
    }

    /// Entries in `[from, to]` (inclusive), clipped to what the view holds.
    pub fn range(&self, from: LogIndex, to: LogIndex) -> impl Iterator<Item = &Entry<C>> {
        let start = from.0.max(self.base.index.0 + 1);
        let end = to.0.min(self.last_index().0);
        let (s, e) = if start > end {
            (0, 0)
        } else {
            (
                (start - self.base.index.0 - 1) as usize,
                (end - self.base.index.0) as usize,
            )
        };
        self.entries.range(s..e)
    }

    /// Appends one entry; the caller guarantees it follows the last one.
    pub fn push(&mut self, entry: Entry<C>) {
        debug_assert_eq!(entry.log_id.index, self.last_index().next());
        self.entries.push_back(entry);
    }

    /// Drops every entry at `from` and after.
    pub fn truncate(&mut self, from: LogIndex) {
        if let Some(o) = self.offset(from) {
            self.entries.truncate(o);
        }
    }

    /// Drops every entry up to and including `upto`, which becomes the base.
    /// If `upto` is past the end the log becomes empty with base `upto`.
    pub fn purge(&mut self, upto: LogId) {
        if upto.index <= self.base.index {
            return;
        }
        let n = ((upto.index.0 - self.base.index.0) as usize).min(self.entries.len());
        self.entries.drain(..n);
        self.base = upto;
    }

    /// The last index whose term is `term`, searching backwards from `at_or_before`.
    pub fn last_index_of_term(&self, term: Term, at_or_before: LogIndex) -> Option<LogIndex> {
        let mut idx = at_or_before.0.min(self.last_index().0);
        while idx > self.base.index.0 {
            let t = self.term_at(LogIndex(idx))?;
            if t == term {
                return Some(LogIndex(idx));
            }
            if t < term {
                return None;
            }
            idx -= 1;
        }
        (self.base.term == term && self.base.index.0 > 0).then_some(self.base.index)
    }

    /// The first index of the run of entries with `term` that contains `index`.
    pub fn first_index_of_term_at(&self, index: LogIndex) -> LogIndex {
        let Some(term) = self.term_at(index) else {
            return index;
        };
        let mut idx = index;
        while idx > self.first_index() {
            match self.term_at(idx.prev()) {
                Some(t) if t == term => idx = idx.prev(),
                _ => break,
            }
        }
        idx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::kv::KvConfig;
    use crate::types::EntryPayload;

    /// A log after base `(term, index)` holding entries of `terms`.
    fn log(base: (u64, u64), terms: &[u64]) -> RaftLog<KvConfig> {
        let base = LogId::new(base.0, base.1);
        let entries = terms
            .iter()
            .enumerate()
            .map(|(i, t)| Entry {
                log_id: LogId::new(*t, base.index.0 + 1 + i as u64),
                payload: EntryPayload::Blank,
            })
            .collect();
        RaftLog::new(base, entries)
    }

    #[test]
    fn the_view_knows_its_bounds_and_entries() {
        let l = log((1, 3), &[1, 2, 2]);
        assert_eq!(l.first_index(), LogIndex(4));
        assert_eq!((l.len(), l.is_empty()), (3, false));
        let empty = log((1, 3), &[]);
        assert_eq!((empty.len(), empty.is_empty()), (0, true));
        assert_eq!(empty.last_log_id(), LogId::new(1, 3));
        assert_eq!(l.get(LogIndex(5)).map(|e| e.log_id), Some(LogId::new(2, 5)));
        assert!(l.get(LogIndex(3)).is_none(), "the base's payload is purged");
        assert!(l.get(LogIndex(7)).is_none());
    }

    #[test]
    fn last_index_of_term_searches_back_and_stops_below_the_term() {
        // base 1-3; then 4:1 5:2 6:2 7:4
        let l = log((1, 3), &[1, 2, 2, 4]);
        assert_eq!(
            l.last_index_of_term(Term(2), LogIndex(7)),
            Some(LogIndex(6))
        );
        assert_eq!(
            l.last_index_of_term(Term(2), LogIndex(5)),
            Some(LogIndex(5))
        );
        assert_eq!(
            l.last_index_of_term(Term(4), LogIndex(100)),
            Some(LogIndex(7))
        );
        assert_eq!(
            l.last_index_of_term(Term(1), LogIndex(7)),
            Some(LogIndex(4))
        );
        assert_eq!(l.last_index_of_term(Term(3), LogIndex(7)), None);
        assert_eq!(l.last_index_of_term(Term(5), LogIndex(7)), None);
        assert_eq!(
            l.last_index_of_term(Term(0), LogIndex(7)),
            None,
            "older than every entry and the base"
        );
        // Found at the base, whose term is kept though its entry is purged.
        let l = log((1, 3), &[2, 2]);
        assert_eq!(
            l.last_index_of_term(Term(1), LogIndex(5)),
            Some(LogIndex(3))
        );
        // The zero base is no entry at all.
        let l = log((0, 0), &[1, 1]);
        assert_eq!(l.last_index_of_term(Term(0), LogIndex(2)), None);
    }

    #[test]
    fn first_index_of_term_at_finds_the_start_of_the_run() {
        // base 1-3; then 4:1 5:2 6:2 7:2 8:4
        let l = log((1, 3), &[1, 2, 2, 2, 4]);
        assert_eq!(l.first_index_of_term_at(LogIndex(7)), LogIndex(5));
        assert_eq!(l.first_index_of_term_at(LogIndex(5)), LogIndex(5));
        assert_eq!(l.first_index_of_term_at(LogIndex(8)), LogIndex(8));
        assert_eq!(l.first_index_of_term_at(LogIndex(4)), LogIndex(4));
        assert_eq!(l.first_index_of_term_at(LogIndex(20)), LogIndex(20));
        // A run that reaches back to the view's start stops there.
        let l = log((2, 3), &[2, 2]);
        assert_eq!(l.first_index_of_term_at(LogIndex(5)), LogIndex(4));
    }
}
