//! The engine's view of the log: the id and term of every entry after the
//! last purge point, and the payloads of the newest of them.
//!
//! The view holds what the `LogStore` holds (or is about to hold, once the
//! engine's persist actions complete). Terms are kept for every entry, as
//! runs (one `(first index, term)` pair per term), so the consistency checks
//! of AppendEntries never need storage. Payloads are a cache: the engine
//! drops the oldest ones that are both durable and applied once the cache
//! holds more than [`crate::Config::log_cache_bytes`], and reads them back
//! from the `LogStore` when a lagging follower needs them
//! ([`crate::engine::Action::ReadEntries`]). So the engine's memory is bounded by
//! configuration, not by how large the values are or how far behind the
//! snapshot policy lets the log grow.

use std::collections::VecDeque;

use crate::types::{Entry, LogId, LogIndex, Term, TypeConfig};

/// The engine's view of the log: where it starts and ends, and a cache
/// of the newest entries (older ones are read back from the `LogStore`).
#[derive(Debug)]
pub struct RaftLog<C: TypeConfig> {
    /// The last purged (or snapshotted) entry; index 0 when nothing was.
    base: LogId,
    /// Runs of equal terms covering `base + 1 ..= last`: the first index of
    /// each run and its term, in increasing order of both.
    terms: Vec<(LogIndex, Term)>,
    /// The last entry's index (`base.index` when the view is empty).
    last: LogIndex,
    /// The cached payloads: the entries `cached_from ..= last`.
    cached: VecDeque<Entry<C>>,
    cached_from: LogIndex,
    /// `size_hint` of the cached entries, summed.
    cached_bytes: usize,
}

impl<C: TypeConfig> RaftLog<C> {
    /// A log after `base` (the last purged entry) holding `entries`.
    pub fn new(base: LogId, entries: Vec<Entry<C>>) -> Self {
        let mut log = RaftLog {
            base,
            terms: Vec::new(),
            last: base.index,
            cached: VecDeque::with_capacity(entries.len()),
            cached_from: base.index.next(),
            cached_bytes: 0,
        };
        for e in entries {
            log.push(e);
        }
        log
    }

    /// The last purged entry (`LogId::ZERO` if none).
    pub fn base(&self) -> LogId {
        self.base
    }

    /// The first index the log holds.
    pub fn first_index(&self) -> LogIndex {
        self.base.index.next()
    }

    /// The last entry's id, or `base` when the log is empty.
    pub fn last_log_id(&self) -> LogId {
        match self.terms.last() {
            Some(&(_, term)) => LogId {
                term,
                index: self.last,
            },
            None => self.base,
        }
    }

    /// The last entry's index.
    pub fn last_index(&self) -> LogIndex {
        self.last
    }

    /// Whether the view holds no entry after its base.
    pub fn is_empty(&self) -> bool {
        self.last == self.base.index
    }

    /// The first index whose payload is cached (`last + 1` when none is).
    pub fn cached_from(&self) -> LogIndex {
        self.cached_from
    }

    /// Bytes of payload cached (by `Entry::size_hint`).
    pub fn cached_bytes(&self) -> usize {
        self.cached_bytes
    }

    /// The mean size of a cached entry (by `Entry::size_hint`), if any is
    /// cached.
    pub fn mean_cached_bytes(&self) -> Option<usize> {
        let cached = (self.last.0 + 1).saturating_sub(self.cached_from.0) as usize;
        self.cached_bytes.checked_div(cached)
    }

    fn offset(&self, index: LogIndex) -> Option<usize> {
        if index < self.cached_from || index > self.last {
            return None;
        }
        Some((index.0 - self.cached_from.0) as usize)
    }

    /// The term of the entry at `index`, if the view knows it (the base
    /// entry's term is known even though its payload was purged, and so is
    /// every evicted entry's).
    pub fn term_at(&self, index: LogIndex) -> Option<Term> {
        if index == self.base.index {
            return Some(self.base.term);
        }
        if index < self.base.index || index > self.last {
            return None;
        }
        let run = self.terms.partition_point(|&(first, _)| first <= index);
        Some(self.terms[run - 1].1)
    }

    /// The id of the entry at `index`, if the log holds it (or it is `base`).
    pub fn log_id_at(&self, index: LogIndex) -> Option<LogId> {
        self.term_at(index).map(|term| LogId { term, index })
    }

    /// Whether the log holds an entry with exactly this id.
    pub fn matches(&self, id: LogId) -> bool {
        self.term_at(id.index) == Some(id.term)
    }

    /// The entry at `index`, if its payload is cached.
    pub fn get(&self, index: LogIndex) -> Option<&Entry<C>> {
        self.offset(index).map(|o| &self.cached[o])
    }

    /// Cached entries in `[from, to]` (inclusive), clipped to the cache.
    pub fn range(&self, from: LogIndex, to: LogIndex) -> impl Iterator<Item = &Entry<C>> {
        let start = from.max(self.cached_from);
        let end = to.min(self.last);
        let (s, e) = if start > end {
            (0, 0)
        } else {
            (
                (start.0 - self.cached_from.0) as usize,
                (end.0 - self.cached_from.0 + 1) as usize,
            )
        };
        self.cached.range(s..e)
    }

    /// Appends one entry; the caller guarantees it follows the last one.
    pub fn push(&mut self, entry: Entry<C>) {
        debug_assert_eq!(entry.log_id.index, self.last.next());
        let id = entry.log_id;
        if self.terms.last().map(|&(_, t)| t) != Some(id.term) {
            self.terms.push((id.index, id.term));
        }
        self.last = id.index;
        if self.cached.is_empty() {
            self.cached_from = id.index;
        }
        self.cached_bytes += entry.size_hint();
        self.cached.push_back(entry);
    }

    /// Drops every entry at `from` and after.
    pub fn truncate(&mut self, from: LogIndex) {
        if from > self.last {
            return;
        }
        let from = from.max(self.first_index());
        let keep_runs = self.terms.partition_point(|&(first, _)| first < from);
        self.terms.truncate(keep_runs);
        self.last = from.prev();
        if from <= self.cached_from {
            self.cached_bytes = 0;
            self.cached.clear();
            self.cached_from = from;
        } else {
            let keep = (from.0 - self.cached_from.0) as usize;
            self.cached_bytes -= self
                .cached
                .range(keep..)
                .map(Entry::size_hint)
                .sum::<usize>();
            self.cached.truncate(keep);
        }
    }

    /// Drops every entry up to and including `upto`, which becomes the base.
    /// If `upto` is past the end the log becomes empty with base `upto`.
    pub fn purge(&mut self, upto: LogId) {
        if upto.index <= self.base.index {
            return;
        }
        if upto.index >= self.last {
            self.terms.clear();
            self.cached.clear();
            self.cached_bytes = 0;
            self.last = upto.index;
            self.cached_from = upto.index.next();
        } else {
            // The run holding `upto + 1` becomes the first, starting there.
            let first = upto.index.next();
            let run = self.terms.partition_point(|&(start, _)| start <= first) - 1;
            self.terms.drain(..run);
            self.terms[0].0 = first;
            self.drop_cached_before(first);
        }
        self.base = upto;
    }

    /// Drops the oldest cached payloads while the cache holds more than
    /// `budget` bytes, never one past index `upto` (what is not yet durable
    /// and applied stays). Their terms stay known.
    pub fn evict(&mut self, upto: LogIndex, budget: usize) {
        while self.cached_bytes > budget && self.cached_from <= upto {
            let Some(e) = self.cached.pop_front() else {
                break;
            };
            self.cached_bytes -= e.size_hint();
            self.cached_from = self.cached_from.next();
        }
    }

    fn drop_cached_before(&mut self, first: LogIndex) {
        while self.cached_from < first {
            let Some(e) = self.cached.pop_front() else {
                self.cached_from = first;
                break;
            };
            self.cached_bytes -= e.size_hint();
            self.cached_from = self.cached_from.next();
        }
    }

    /// The last index whose term is `term`, searching backwards from `at_or_before`.
    pub fn last_index_of_term(&self, term: Term, at_or_before: LogIndex) -> Option<LogIndex> {
        let at = at_or_before.min(self.last);
        if at > self.base.index {
            // Runs that start at or before `at`, newest first.
            let upto = self.terms.partition_point(|&(first, _)| first <= at);
            for (i, &(_, t)) in self.terms[..upto].iter().enumerate().rev() {
                if t == term {
                    let end = self
                        .terms
                        .get(i + 1)
                        .map_or(self.last, |&(next, _)| next.prev());
                    return Some(end.min(at));
                }
                if t < term {
                    return None;
                }
            }
        }
        (self.base.term == term && self.base.index.0 > 0).then_some(self.base.index)
    }

    /// The first index of the run of entries with `term` that contains `index`.
    pub fn first_index_of_term_at(&self, index: LogIndex) -> LogIndex {
        if index <= self.base.index || index > self.last {
            return index;
        }
        let run = self.terms.partition_point(|&(first, _)| first <= index);
        self.terms[run - 1].0
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
        assert_eq!((l.last_index(), l.is_empty()), (LogIndex(6), false));
        let empty = log((1, 3), &[]);
        assert_eq!((empty.last_index(), empty.is_empty()), (LogIndex(3), true));
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

    fn ids(l: &RaftLog<KvConfig>, from: u64, to: u64) -> Vec<u64> {
        l.range(LogIndex(from), LogIndex(to))
            .map(|e| e.log_id.index.0)
            .collect()
    }

    #[test]
    fn evicted_entries_keep_their_terms_and_leave_the_cache() {
        // base 1-3; then 4:1 5:2 6:2 7:2 8:4, 24 bytes each.
        let mut l = log((1, 3), &[1, 2, 2, 2, 4]);
        assert_eq!((l.cached_from(), l.cached_bytes()), (LogIndex(4), 5 * 24));
        l.evict(LogIndex(6), 2 * 24);
        assert_eq!(
            (l.cached_from(), l.cached_bytes()),
            (LogIndex(7), 2 * 24),
            "never past the allowed index, even over budget"
        );
        l.evict(LogIndex(8), 2 * 24);
        assert_eq!(l.cached_from(), LogIndex(7), "within budget: nothing goes");
        assert!(l.get(LogIndex(6)).is_none());
        assert_eq!(ids(&l, 1, 100), vec![7, 8]);
        for (i, t) in [(3, 1), (4, 1), (5, 2), (6, 2), (7, 2), (8, 4)] {
            assert_eq!(l.term_at(LogIndex(i)), Some(Term(t)), "term at {i}");
        }
        assert_eq!(l.term_at(LogIndex(9)), None);
        assert_eq!(l.term_at(LogIndex(2)), None);
        assert_eq!(l.first_index_of_term_at(LogIndex(7)), LogIndex(5));
        assert_eq!(
            l.last_index_of_term(Term(2), LogIndex(8)),
            Some(LogIndex(7))
        );
        l.evict(LogIndex(100), 0);
        assert_eq!((l.cached_from(), l.cached_bytes()), (LogIndex(9), 0));
        assert_eq!(l.last_log_id(), LogId::new(4, 8));
        // The next entry starts the cache again.
        l.push(Entry {
            log_id: LogId::new(4, 9),
            payload: EntryPayload::Blank,
        });
        assert_eq!((l.cached_from(), ids(&l, 1, 100)), (LogIndex(9), vec![9]));
    }

    #[test]
    fn truncation_and_purge_keep_runs_and_cache_consistent() {
        // base 0; then 1:1 2:1 3:2 4:2 5:3 6:3
        let mut l = log((0, 0), &[1, 1, 2, 2, 3, 3]);
        l.evict(LogIndex(2), 0);
        l.truncate(LogIndex(4));
        assert_eq!(l.last_log_id(), LogId::new(2, 3));
        assert_eq!((ids(&l, 1, 10), l.cached_bytes()), (vec![3], 24));
        assert_eq!(l.term_at(LogIndex(4)), None);
        assert_eq!(l.last_index_of_term(Term(3), LogIndex(10)), None);
        // A truncation below the cache empties it; the log continues there.
        l.truncate(LogIndex(2));
        assert_eq!((l.last_log_id(), l.cached_bytes()), (LogId::new(1, 1), 0));
        l.push(Entry {
            log_id: LogId::new(5, 2),
            payload: EntryPayload::Blank,
        });
        assert_eq!(
            (l.cached_from(), l.term_at(LogIndex(2))),
            (LogIndex(2), Some(Term(5)))
        );
        assert_eq!(l.term_at(LogIndex(1)), Some(Term(1)));

        // Purge into the middle of a run: the run now starts after the base.
        let mut l = log((0, 0), &[1, 2, 2, 2, 3]);
        l.evict(LogIndex(1), 0);
        l.purge(LogId::new(2, 3));
        assert_eq!(l.base(), LogId::new(2, 3));
        assert_eq!((ids(&l, 1, 10), l.cached_bytes()), (vec![4, 5], 48));
        assert_eq!(l.first_index_of_term_at(LogIndex(4)), LogIndex(4));
        assert_eq!(l.term_at(LogIndex(3)), Some(Term(2)), "the base's term");
        // Purge past the end.
        l.purge(LogId::new(7, 9));
        assert!(l.is_empty());
        assert_eq!(
            (l.last_log_id(), l.cached_from()),
            (LogId::new(7, 9), LogIndex(10))
        );
    }
}
