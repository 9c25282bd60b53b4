//! Engine configuration, validated at construction.

use thiserror::Error;

/// Tunables of one Raft node. Build with [`Config::default`] and adjust, then
/// call [`Config::validate`]; the engine only accepts a validated config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Lower bound of the randomized election timeout, in milliseconds.
    pub election_timeout_min_ms: u64,
    /// Upper bound (exclusive) of the randomized election timeout.
    pub election_timeout_max_ms: u64,
    /// How often a leader sends heartbeats.
    pub heartbeat_interval_ms: u64,
    /// Run a pre-vote round before a real election (thesis §9.6), so a node
    /// that was partitioned away cannot raise everyone's term on return.
    pub pre_vote: bool,
    /// A leader that has not heard from a quorum within an election timeout
    /// steps down (thesis §6.2).
    pub check_quorum: bool,
    /// Most AppendEntries messages in flight to one follower.
    pub max_inflight: usize,
    /// Most entries in one AppendEntries message.
    pub max_entries_per_message: usize,
    /// Most payload bytes (as estimated by `TypeConfig::command_size`) in one
    /// AppendEntries message; a single larger entry is still sent alone.
    pub max_bytes_per_message: usize,
    /// Build a snapshot once this many entries were applied since the last
    /// one (and [`Config::snapshot_log_percent`] agrees). 0 disables
    /// automatic snapshots.
    pub snapshot_every: u64,
    /// Build a snapshot only once the log applied since the last one holds
    /// at least this many percent of that snapshot's size in bytes
    /// (`SnapshotMeta::size`, log entries by `Entry::size_hint`). Building
    /// writes the whole state, so with a large state and small entries a
    /// snapshot every `snapshot_every` entries would spend most of the disk
    /// on snapshots; weighing the log against the state bounds the bytes
    /// written for snapshots to `100 / snapshot_log_percent` per byte of log,
    /// and the log kept (and replayed at restart) to about that share of the
    /// state. 0 counts entries only.
    pub snapshot_log_percent: u64,
    /// Each node stretches both snapshot thresholds by a random 0 to this
    /// many percent, drawn anew after every snapshot (from the engine's
    /// seeded RNG). Nodes apply the same log, so without it they all build
    /// at the same index: at once on every node, the scan and the write of
    /// a large state took the CPU and the disk from the leader and the
    /// followers together, and the leader lost its quorum (seen in `cargo
    /// xtask bench join` with 300 MB of state on two cores).
    pub snapshot_jitter_percent: u64,
    /// Entries kept in the log behind a snapshot, so a follower that is only
    /// a little behind is repaired by entries rather than a whole snapshot.
    pub purge_keep: u64,
    /// Most entries a leader keeps behind a snapshot for a live follower
    /// (one that answered lately, or is being replicated to) that has not
    /// received them yet, or, if more, as many entries as weigh twice that
    /// snapshot (by the mean size of the cached entries). Within this bound
    /// a slow follower is repaired by entries; past it a snapshot is the
    /// cheaper path.
    pub purge_keep_max: u64,
    /// A leader about to start a snapshot transfer first builds a fresh
    /// snapshot if the log applied since its current one weighs more than
    /// this many percent of that snapshot (by `SnapshotMeta::size` and
    /// `Entry::size_hint`), and sends that one: otherwise the follower
    /// receives the old state and then replays all that log entry by
    /// entry, which under write load costs more than the state itself (in
    /// `cargo xtask bench join` a learner was sent a 312 MB snapshot and
    /// then 300,000 entries of 1 KiB, 17 s of its 23 s join). The transfer
    /// waits for the build; while another live follower is receiving a
    /// snapshot (builds are held back then) the current one is sent as is.
    /// 0 never rebuilds for a transfer, and neither does a node whose
    /// automatic snapshots are off (`snapshot_every` 0).
    pub snapshot_refresh_percent: u64,
    /// Bytes per InstallSnapshot chunk (default 1 MiB). Every chunk costs a
    /// read, an RPC and a write whatever its size, and each crosses the
    /// leader's and the follower's driver: in `cargo xtask bench join` with
    /// 8 MiB in flight, 64 KiB chunks moved 176 MB/s, 256 KiB 247-293 and
    /// 1 MiB 321-340 (one writer). Larger chunks outgrow QUIC's default
    /// per-stream flow-control window (1.25 MB) and wait for its updates: 2
    /// and 4 MiB moved about 215.
    pub snapshot_chunk_bytes: usize,
    /// Snapshot chunks a leader keeps in flight to one follower (default
    /// 8: 8 MiB of 1 MiB chunks). One is stop-and-wait: a chunk per round
    /// trip, which on a busy leader held a transfer to a fraction of the
    /// disk's and the network's rate; on a busy leader a chunk's round trip
    /// is tens of milliseconds, and with 256 KiB chunks 8 in flight moved
    /// 134 MB/s, 32 284 MB/s, 64 no more. A follower holds up to this many
    /// chunks that arrive ahead of a gap, so the window costs memory on
    /// both sides.
    pub snapshot_window: usize,
    /// `Raft::add_learner` returns, and a promotion proceeds, once the
    /// learner lacks at most this many of the leader's committed entries
    /// (what it lacks of the writes still in flight to every follower is
    /// not counted: the voters lack those too).
    pub learner_max_lag: u64,
    /// Most client writes one node holds at once (handed to it and not yet
    /// answered). Past it, `Raft::client_write` does what `when_full` says,
    /// so a flood of writers cannot grow a node's queues without bound.
    pub max_pending_writes: usize,
    /// Most linearizable reads one node holds at once (waiting for their
    /// quorum round or for the state machine). Past it,
    /// `Raft::ensure_linearizable` does what `when_full` says.
    pub max_pending_reads: usize,
    /// What a write or a read does when the node holds as many as it may.
    pub when_full: WhenFull,
    /// Bytes of log entries (by `TypeConfig::command_size`) the engine keeps
    /// in memory once they are durable and applied. Older entries are read
    /// back from the `LogStore` when a lagging follower needs them, so the
    /// engine's memory does not grow with value size or with how many
    /// entries the snapshot policy retains. Entries not yet durable or
    /// applied always stay (they are bounded by `max_pending_writes` and
    /// the followers' in-flight windows). 0 keeps only those.
    pub log_cache_bytes: usize,
}

/// What `Raft::client_write` (`Raft::ensure_linearizable`) does while the
/// node holds [`Config::max_pending_writes`] writes
/// ([`Config::max_pending_reads`] reads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenFull {
    /// Wait until one of them is answered.
    Wait,
    /// Fail at once with `RaftError::Overloaded`.
    FailFast,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            election_timeout_min_ms: 150,
            election_timeout_max_ms: 300,
            heartbeat_interval_ms: 50,
            pre_vote: true,
            check_quorum: true,
            max_inflight: 8,
            max_entries_per_message: 512,
            max_bytes_per_message: 1 << 20,
            snapshot_every: 10_000,
            snapshot_log_percent: 100,
            snapshot_jitter_percent: 50,
            purge_keep: 1_000,
            purge_keep_max: 100_000,
            snapshot_refresh_percent: 20,
            snapshot_chunk_bytes: 1 << 20,
            snapshot_window: 8,
            learner_max_lag: 100,
            max_pending_writes: 4096,
            max_pending_reads: 16384,
            when_full: WhenFull::Wait,
            log_cache_bytes: 64 << 20,
        }
    }
}

/// Why a [`Config`] was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `election_timeout_min_ms` is 0.
    #[error("election_timeout_min_ms must be > 0")]
    ZeroElectionTimeout,
    #[error("election timeout range [{min}, {max}) is empty: max must exceed min")]
    /// `election_timeout_max_ms` does not exceed the minimum.
    EmptyElectionRange {
        /// `election_timeout_min_ms`.
        min: u64,
        /// `election_timeout_max_ms`.
        max: u64,
    },
    #[error(
        "heartbeat_interval_ms ({heartbeat}) must be > 0 and below election_timeout_min_ms ({min})"
    )]
    /// Heartbeats would not come before followers time out.
    HeartbeatTooSlow {
        /// `heartbeat_interval_ms`.
        heartbeat: u64,
        /// `election_timeout_min_ms`.
        min: u64,
    },
    /// A field that must be positive is 0.
    #[error("{field} must be > 0")]
    Zero {
        /// The field's name.
        field: &'static str,
    },
}

impl Config {
    /// Checks the relations between fields; returns the config unchanged if
    /// it is usable.
    pub fn validate(self) -> Result<Config, ConfigError> {
        if self.election_timeout_min_ms == 0 {
            return Err(ConfigError::ZeroElectionTimeout);
        }
        if self.election_timeout_max_ms <= self.election_timeout_min_ms {
            return Err(ConfigError::EmptyElectionRange {
                min: self.election_timeout_min_ms,
                max: self.election_timeout_max_ms,
            });
        }
        if self.heartbeat_interval_ms == 0
            || self.heartbeat_interval_ms >= self.election_timeout_min_ms
        {
            return Err(ConfigError::HeartbeatTooSlow {
                heartbeat: self.heartbeat_interval_ms,
                min: self.election_timeout_min_ms,
            });
        }
        for (field, v) in [
            ("max_inflight", self.max_inflight),
            ("max_entries_per_message", self.max_entries_per_message),
            ("max_bytes_per_message", self.max_bytes_per_message),
            ("snapshot_chunk_bytes", self.snapshot_chunk_bytes),
            ("snapshot_window", self.snapshot_window),
            ("max_pending_writes", self.max_pending_writes),
            ("max_pending_reads", self.max_pending_reads),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero { field });
            }
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        assert!(Config::default().validate().is_ok());
    }

    #[test]
    fn inverted_election_range_is_a_typed_error() {
        let c = Config {
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 150,
            ..Config::default()
        };
        assert_eq!(
            c.validate(),
            Err(ConfigError::EmptyElectionRange { min: 300, max: 150 })
        );
    }

    #[test]
    fn heartbeat_not_below_election_timeout_is_refused() {
        let c = Config {
            heartbeat_interval_ms: 150,
            ..Config::default()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::HeartbeatTooSlow { .. })
        ));
    }

    #[test]
    fn zero_inflight_is_refused() {
        let c = Config {
            max_inflight: 0,
            ..Config::default()
        };
        assert_eq!(
            c.validate(),
            Err(ConfigError::Zero {
                field: "max_inflight"
            })
        );
    }
}
