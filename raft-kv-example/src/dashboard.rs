//! The live dashboard of a node (issue 12).
//!
//! `GET /` serves one self-contained page (HTML, CSS and JavaScript
//! compiled into the binary: nothing is fetched from elsewhere). The page
//! holds no data and needs no token; it asks for one (or takes it from
//! the URL's `#token=` fragment, which browsers never send) and reads
//! `GET /v1/events`, server-sent events that need the `read` role like the
//! rest of the API.
//!
//! Each event is one JSON object: `served_by` (this node), `local` (this
//! node's view: role, term, leader, indices, membership with joint
//! configurations as such, learners, the leadership changes it saw with
//! their causes and durations), `leader` (the leader's view, which
//! includes every follower's replication progress: fetched by this node
//! from the leader's `GET /v1/dashboard/sample` with the caller's token;
//! the same object as `local` on the leader itself; `null` if no leader
//! answers), and `history`: per-second points of writes/s, reads/s and
//! p50/p99 latencies of the requests the node that leads served, new ones
//! only after the first event.
//!
//! A sampler task keeps the node's latest sample, once a second and on
//! every change of role, term or leader. An event stream is pulled: the
//! next event is made only once the connection took the last one, so a
//! slow or stuck browser holds one event's worth of memory, never a queue.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use raft_core::engine::{ElectionCause, PeerState};
use raft_core::{Raft, RaftMetrics};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::metrics::role_name;
use crate::types::{Kv, NodeAddr};

/// The page.
const PAGE: &str = include_str!("dashboard.html");
/// Per-second points kept: five minutes.
const HISTORY: usize = 300;
/// The longest a follower waits for the leader's sample.
const RELAY_TIMEOUT: Duration = Duration::from_millis(800);

/// Latency buckets: four per power of two of microseconds, up to ~2^27 µs.
const BUCKETS: usize = 4 * 28;

/// Latencies of one kind of request, in buckets.
struct Latencies {
    buckets: [AtomicU64; BUCKETS],
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// The bucket of `us` microseconds: four per doubling.
fn bucket(us: u64) -> usize {
    let us = us.max(1);
    let log = 63 - us.leading_zeros() as usize;
    let frac = if log >= 2 {
        ((us >> (log - 2)) & 3) as usize
    } else {
        ((us << (2 - log)) & 3) as usize
    };
    (log * 4 + frac).min(BUCKETS - 1)
}

/// The lower bound of bucket `b`, in milliseconds.
fn bucket_ms(b: usize) -> f64 {
    let (log, frac) = (b / 4, b % 4);
    (1u64 << log) as f64 * (1.0 + frac as f64 / 4.0) / 1000.0
}

impl Latencies {
    fn record(&self, took: Duration) {
        self.buckets[bucket(took.as_micros() as u64)].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> [u64; BUCKETS] {
        std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed))
    }
}

/// Counts and latencies of the key-value requests a node served, for the
/// dashboard's charts.
#[derive(Default)]
pub struct RequestStats {
    writes: Latencies,
    reads: Latencies,
}

impl RequestStats {
    /// Records one request that completed (`write`: PUT, DELETE or CAS).
    pub fn record(&self, write: bool, took: Duration) {
        match write {
            true => self.writes.record(took),
            false => self.reads.record(took),
        }
    }
}

/// One second: operations and quantiles (ms) from the buckets' growth.
fn summarize(now: &[u64; BUCKETS], before: &[u64; BUCKETS]) -> (u64, f64, f64) {
    let diff: Vec<u64> = now.iter().zip(before).map(|(a, b)| a - b).collect();
    let total: u64 = diff.iter().sum();
    let quantile = |q: f64| {
        if total == 0 {
            return 0.0;
        }
        let want = (q * total as f64).ceil() as u64;
        let mut seen = 0;
        for (b, n) in diff.iter().enumerate() {
            seen += n;
            if seen >= want {
                return bucket_ms(b);
            }
        }
        0.0
    };
    (total, quantile(0.5), quantile(0.99))
}

/// A node's latest sample, shared by every event stream.
#[derive(Clone)]
pub struct Sample {
    /// This node's view, as JSON.
    pub view: Arc<String>,
    /// Per-second points: `[unix ms, writes/s, reads/s, write p50 ms,
    /// write p99 ms, read p50 ms, read p99 ms]`.
    pub history: Arc<VecDeque<[f64; 7]>>,
    /// Whether this node leads.
    pub leader: bool,
    /// The leader's client API address, if one is known and it is not
    /// this node.
    pub leader_addr: Option<String>,
}

/// The dashboard's state in a node.
#[derive(Clone)]
pub struct Dashboard {
    /// The request counts the API records.
    pub stats: Arc<RequestStats>,
    latest: watch::Receiver<Sample>,
    closed: watch::Receiver<bool>,
    relay: reqwest::Client,
    scheme: &'static str,
    node: u64,
}

/// Ends the dashboard's streams when dropped or closed.
pub struct DashboardHandle {
    closed: watch::Sender<bool>,
}

impl DashboardHandle {
    /// Ends every event stream (a node that stops first closes these, so
    /// its HTTP server's graceful shutdown does not wait on them).
    pub fn close(&self) {
        let _ = self.closed.send(true);
    }
}

/// Milliseconds since the Unix epoch of `t`.
fn unix_ms(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_millis() as f64)
}

fn cause_name(c: ElectionCause) -> &'static str {
    match c {
        ElectionCause::Start => "start",
        ElectionCause::Timeout => "timeout",
        ElectionCause::Transfer => "transfer",
        ElectionCause::CheckQuorum => "check-quorum",
        ElectionCause::HigherTerm => "higher term",
        ElectionCause::Removed => "removed",
    }
}

/// A node's view as the page reads it.
fn view_of(m: &RaftMetrics<NodeAddr>, cluster_id: u64) -> Value {
    let at = |ms: u64| unix_ms(m.clock_origin + Duration::from_millis(ms));
    let members: serde_json::Map<String, Value> = m
        .membership
        .nodes
        .iter()
        .map(|(id, n)| {
            let addrs = json!({ "http_addr": n.http_addr, "raft_addr": n.raft_addr });
            (id.0.to_string(), addrs)
        })
        .collect();
    let progress: serde_json::Map<String, Value> = m
        .progress
        .iter()
        .map(|(id, p)| {
            let (state, acked, size) = match p.state {
                PeerState::Probe => ("probe", 0, 0),
                PeerState::Replicate => ("replicate", 0, 0),
                PeerState::Snapshot { acked, size } => ("snapshot", acked, size),
            };
            let v = json!({
                "matched": p.matched.0,
                "next": p.next.0,
                "inflight": p.inflight,
                "state": state,
                "snapshot_acked": acked,
                "snapshot_size": size,
                "voter": p.voter,
                "reachable": p.reachable,
            });
            (id.0.to_string(), v)
        })
        .collect();
    let elections: Vec<Value> = m
        .leadership
        .iter()
        .map(|c| {
            json!({
                "term": c.term.0,
                "leader": c.leader.0,
                "cause": cause_name(c.cause),
                "at_ms": at(c.known_at_ms),
                "duration_ms": c.duration_ms(),
            })
        })
        .collect();
    let ids = |s: std::collections::BTreeSet<raft_core::NodeId>| -> Vec<u64> {
        s.into_iter().map(|id| id.0).collect()
    };
    json!({
        "node": m.id.0,
        "role": role_name(m.role),
        "term": m.term.0,
        "leader_id": m.leader_id.map(|l| l.0),
        "commit_index": m.commit_index.0,
        "applied_index": m.applied_index.0,
        "last_log_index": m.last_log_index.0,
        "snapshot_index": m.snapshot.map(|s| s.index.0),
        "cluster_id": format!("{cluster_id:016x}"),
        "configs": m.membership.configs.iter().map(|c| ids(c.clone())).collect::<Vec<_>>(),
        "learners": ids(m.membership.learner_ids()),
        "members": members,
        "progress": progress,
        "elections": elections,
        "elections_started": m.elections,
        "leaderless_since_ms": m.leaderless_since.map(|(ms, _)| at(ms)),
        "leaderless_cause": m.leaderless_since.map(|(_, c)| cause_name(c)),
        "stopped": m.fatal.is_some(),
        "time_ms": unix_ms(SystemTime::now()),
    })
}

/// Starts the sampler of `raft`; what the router serves, and the handle
/// that ends the streams.
pub fn start(
    raft: Raft<Kv>,
    cluster: Arc<raft_transport_quic::ClusterId>,
    relay: reqwest::Client,
    scheme: &'static str,
) -> (Dashboard, DashboardHandle) {
    let stats = Arc::new(RequestStats::default());
    let node = raft.metrics().borrow().id.0;
    let sample = move |m: &RaftMetrics<NodeAddr>, history: &Arc<VecDeque<[f64; 7]>>| {
        let leader_addr = m
            .leader_id
            .filter(|l| *l != m.id)
            .and_then(|l| m.membership.nodes.get(&l))
            .map(|n| n.http_addr.clone());
        Sample {
            view: Arc::new(view_of(m, cluster.get()).to_string()),
            history: history.clone(),
            leader: m.role == raft_core::Role::Leader,
            leader_addr,
        }
    };
    let empty = Arc::new(VecDeque::new());
    let first = sample(&raft.metrics().borrow(), &empty);
    let (tx, latest) = watch::channel(first);
    let (closed_tx, closed) = watch::channel(false);
    let s = stats.clone();
    tokio::spawn(async move {
        let mut metrics = raft.metrics();
        let mut history: VecDeque<[f64; 7]> = VecDeque::with_capacity(HISTORY);
        let (mut writes, mut reads) = (s.writes.snapshot(), s.reads.snapshot());
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut key = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let (w, r) = (s.writes.snapshot(), s.reads.snapshot());
                    let (wn, wp50, wp99) = summarize(&w, &writes);
                    let (rn, rp50, rp99) = summarize(&r, &reads);
                    (writes, reads) = (w, r);
                    if history.len() == HISTORY {
                        history.pop_front();
                    }
                    let now = unix_ms(SystemTime::now());
                    history.push_back([now, wn as f64, rn as f64, wp50, wp99, rp50, rp99]);
                }
                changed = metrics.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Only what the page shows at once: role, term, leader.
                    let m = metrics.borrow_and_update();
                    let now = Some((m.role, m.term, m.leader_id));
                    if key == now {
                        continue;
                    }
                    key = now;
                }
                _ = tx.closed() => return,
            }
            let history = Arc::new(history.clone());
            let m = metrics.borrow().clone();
            if tx.send(sample(&m, &history)).is_err() {
                return;
            }
        }
    });
    let dashboard = Dashboard {
        stats,
        latest,
        closed,
        relay,
        scheme,
        node,
    };
    (dashboard, DashboardHandle { closed: closed_tx })
}

/// `GET /`: the page.
pub async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

/// `GET /v1/dashboard/sample`: this node's view and history, for a
/// follower's dashboard to relay.
pub async fn sample(dashboard: &Dashboard) -> Response {
    let s = dashboard.latest.borrow().clone();
    let body = format!(
        "{{\"view\":{},\"history\":{}}}",
        s.view,
        history_json(&s.history, 0.0)
    );
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The points of `history` after `after` (unix ms), as a JSON array.
fn history_json(history: &VecDeque<[f64; 7]>, after: f64) -> String {
    let mut out = String::from("[");
    for p in history.iter().filter(|p| p[0] > after) {
        if out.len() > 1 {
            out.push(',');
        }
        let _ = write!(
            out,
            "[{},{},{},{:.3},{:.3},{:.3},{:.3}]",
            p[0], p[1], p[2], p[3], p[4], p[5], p[6]
        );
    }
    out.push(']');
    out
}

/// What one event stream carries between events.
struct Stream {
    dashboard: Dashboard,
    /// This stream's own view of the samples (what it has seen).
    latest: watch::Receiver<Sample>,
    authorization: Option<HeaderValue>,
    /// The newest point sent.
    sent_until: f64,
    first: bool,
}

impl Stream {
    /// The leader's view and history, asked of the leader at `addr`.
    async fn leader(&self, addr: &str) -> Option<(String, VecDeque<[f64; 7]>)> {
        let url = format!("{}://{addr}/v1/dashboard/sample", self.dashboard.scheme);
        let mut req = self.dashboard.relay.get(url).timeout(RELAY_TIMEOUT);
        if let Some(a) = &self.authorization {
            req = req.header(header::AUTHORIZATION, a.clone());
        }
        let resp = req.send().await.ok()?;
        if resp.status() != StatusCode::OK {
            return None;
        }
        let v: Value = resp.json().await.ok()?;
        let history = v["history"]
            .as_array()?
            .iter()
            .filter_map(|p| {
                let p = p.as_array()?;
                let mut point = [0.0; 7];
                for (slot, x) in point.iter_mut().zip(p) {
                    *slot = x.as_f64()?;
                }
                Some(point)
            })
            .collect();
        Some((v["view"].to_string(), history))
    }

    /// The next event, once there is one: the first at once, then one per
    /// new sample; `None` once the node closes the dashboard.
    async fn next(&mut self) -> Option<String> {
        let mut closed = self.dashboard.closed.clone();
        if *closed.borrow() {
            return None;
        }
        if !self.first {
            tokio::select! {
                r = self.latest.changed() => r.ok()?,
                _ = closed.wait_for(|c| *c) => return None,
            }
        }
        self.first = false;
        let s = self.latest.borrow_and_update().clone();
        let (leader, history) = match (&s.leader_addr, s.leader) {
            (_, true) => (Some(s.view.to_string()), (*s.history).clone()),
            (Some(addr), false) => match self.leader(addr).await {
                Some((view, history)) => (Some(view), history),
                None => (None, (*s.history).clone()),
            },
            (None, false) => (None, (*s.history).clone()),
        };
        let points = history_json(&history, self.sent_until);
        if let Some(last) = history.back() {
            self.sent_until = self.sent_until.max(last[0]);
        }
        Some(format!(
            "data: {{\"served_by\":{},\"local\":{},\"leader\":{},\"history\":{points}}}\n\n",
            self.dashboard.node,
            s.view,
            leader.as_deref().unwrap_or("null"),
        ))
    }
}

/// `GET /v1/events`: the event stream.
pub async fn events(dashboard: &Dashboard, headers: &HeaderMap) -> Response {
    let stream = Stream {
        latest: dashboard.latest.clone(),
        dashboard: dashboard.clone(),
        authorization: headers.get(header::AUTHORIZATION).cloned(),
        sent_until: 0.0,
        first: true,
    };
    let body = futures_util::stream::unfold(stream, |mut s| async move {
        let event = s.next().await?;
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(event)), s))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_quantiles_land_in_them() {
        let mut last = 0;
        for us in 1..100_000u64 {
            let b = bucket(us);
            assert!(b >= last, "{us}");
            assert!(bucket_ms(b) * 1000.0 <= us as f64, "{us} in {b}");
            last = b;
        }
        let stats = Latencies::default();
        let before = stats.snapshot();
        for _ in 0..99 {
            stats.record(Duration::from_micros(500));
        }
        stats.record(Duration::from_millis(40));
        let (n, p50, p99) = summarize(&stats.snapshot(), &before);
        assert_eq!(n, 100);
        assert!((0.4..=0.5).contains(&p50), "{p50}");
        assert!((0.4..=0.5).contains(&p99), "{p99}");
        stats.record(Duration::from_millis(40));
        let (_, _, p99) = summarize(&stats.snapshot(), &before);
        assert!((30.0..=40.0).contains(&p99), "{p99}");
    }
}
