//! Chaos clients write in client sessions, and retry a write whose outcome
//! was unknown with the same (session, sequence) until its answer is
//! definite: the cluster applies it at most once, and answers a retry
//! with the first answer. The history then records the write as one
//! operation, from its first try to its definite answer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use raft_core::sim::Rng;
use raft_core::sim::linearizability::OpOutput;
use serde_json::Value;

use crate::http::{Http, Outcome};

/// What one try of a write in a session came to.
pub enum Try {
    /// Answered: the write was applied (by this try or an earlier one).
    Done(OpOutput),
    /// Surely not applied by this try.
    NotApplied,
    /// Maybe applied.
    Unknown,
    /// The session is gone (expired or unknown): if an earlier try may
    /// have been applied, no retry can tell any more.
    SessionGone,
}

/// Counts for the report.
#[derive(Default)]
pub struct Counts {
    /// Tries that ended with the outcome unknown (before retries).
    pub unknown_tries: AtomicU64,
    /// Writes still unknown after retrying.
    pub unknown_after_retries: AtomicU64,
    /// Retries answered from the session (`Replayed: true`).
    pub replayed: AtomicU64,
}

/// One client's session.
pub struct Session {
    pub client_id: u64,
    seq: u64,
}

impl Session {
    /// Opens a session through any of the endpoints, retrying until one
    /// answers or `give_up` says so. An open that timed out may have
    /// opened a session nobody uses; it expires.
    pub fn open(
        http: &Http,
        rng: &mut Rng,
        endpoint: impl Fn(&mut Rng) -> String,
        give_up: impl Fn() -> bool,
    ) -> Option<Session> {
        loop {
            let ep = endpoint(rng);
            if let Outcome::Ok(a) = http.call("POST", &format!("{ep}/v1/sessions"), Some(b""))
                && a.status == 200
                && let Some(client_id) = serde_json::from_slice::<Value>(&a.body)
                    .ok()
                    .and_then(|v| v["client_id"].as_u64())
            {
                return Some(Session { client_id, seq: 0 });
            }
            if give_up() {
                return None;
            }
            sleep(Duration::from_millis(100));
        }
    }

    /// The headers of the next write. The client writes one at a time, so
    /// every earlier answer has been seen: it acknowledges them all.
    pub fn next(&mut self) -> Vec<(&'static str, String)> {
        self.seq += 1;
        vec![
            ("client-id", self.client_id.to_string()),
            ("client-seq", self.seq.to_string()),
            ("client-ack", self.seq.to_string()),
        ]
    }
}

/// One try of a write (`PUT` with `body` the value, or a CAS with its JSON
/// body) at `url` with the session `headers`.
pub fn try_write(
    http: &Http,
    method: &str,
    url: &str,
    body: &[u8],
    headers: &[(&str, String)],
    counts: &Counts,
) -> Try {
    match http.call_with(method, url, Some(body), headers) {
        Outcome::Ok(a) if a.status == 200 => {
            if a.replayed {
                counts.replayed.fetch_add(1, Ordering::Relaxed);
            }
            if method == "PUT" {
                return Try::Done(OpOutput::Put);
            }
            match serde_json::from_slice::<Value>(&a.body) {
                Ok(v) => Try::Done(OpOutput::Cas {
                    succeeded: v["succeeded"].as_bool().unwrap_or(false),
                    current: v["current"].as_str().map(str::to_string),
                }),
                // The write was applied; what it answered is lost.
                Err(_) => Try::Unknown,
            }
        }
        Outcome::Ok(a) if a.status == 410 => Try::SessionGone,
        Outcome::Ok(_) | Outcome::Fail(_) => Try::NotApplied,
        Outcome::Unknown(_) => Try::Unknown,
    }
}

/// Retries `attempt` (given a fresh endpoint each time) until its outcome
/// is definite: `Ok` if answered, `Fail` if its first try surely did not
/// apply it, `Unknown` only if the session vanished after a try that may
/// have applied it, or if `deadline` passes.
pub fn until_definite(
    rng: &mut Rng,
    endpoint: impl Fn(&mut Rng) -> String,
    deadline: impl Fn() -> Option<Instant>,
    counts: &Counts,
    mut attempt: impl FnMut(&str) -> Try,
) -> Outcome<OpOutput> {
    let mut maybe_applied = false;
    loop {
        match attempt(&endpoint(rng)) {
            Try::Done(o) => return Outcome::Ok(o),
            Try::NotApplied if !maybe_applied => return Outcome::Fail("not applied".into()),
            Try::NotApplied => {}
            Try::Unknown => {
                counts.unknown_tries.fetch_add(1, Ordering::Relaxed);
                maybe_applied = true;
            }
            Try::SessionGone if !maybe_applied => return Outcome::Fail("session gone".into()),
            Try::SessionGone => break,
        }
        if deadline().is_some_and(|d| Instant::now() > d) {
            break;
        }
        sleep(Duration::from_millis(rng.range(20, 120)));
    }
    counts.unknown_after_retries.fetch_add(1, Ordering::Relaxed);
    Outcome::Unknown("still unknown after retrying".into())
}
