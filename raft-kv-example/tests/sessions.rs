//! Exactly-once writes through client sessions, on a 3-node cluster over
//! real QUIC and RocksDB: a write retried with the same (session,
//! sequence) through a leader's death, snapshots, a snapshot install and a
//! restart of every node is applied once, and every retry gets the first
//! answer back.

mod common;

use std::time::Duration;

use common::Cluster;
use raft_core::NodeId;
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn open_session(http: &reqwest::Client, endpoint: &str) -> u64 {
    let resp = http
        .post(format!("{endpoint}/v1/sessions"))
        .send()
        .await
        .expect("open session");
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.expect("json");
    v["client_id"].as_u64().expect("client_id")
}

/// One try of `PUT /v1/kv/{key}` in session `id` with sequence `seq`:
/// its status, `Replayed` header and body; `None` if it got no answer.
async fn put_in_session(
    http: &reqwest::Client,
    endpoint: &str,
    key: &str,
    value: &str,
    (id, seq, ack): (u64, u64, u64),
) -> Option<(StatusCode, bool, Value)> {
    let resp = http
        .put(format!("{endpoint}/v1/kv/{key}"))
        .header("Client-Id", id.to_string())
        .header("Client-Seq", seq.to_string())
        .header("Client-Ack", ack.to_string())
        .body(value.to_string())
        .send()
        .await
        .ok()?;
    let status = resp.status();
    let replayed = resp.headers().get("replayed").is_some_and(|v| v == "true");
    let body = resp.json().await.ok()?;
    Some((status, replayed, body))
}

/// Retries the put until it is answered 200, through whichever of
/// `endpoints` answers; panics with the last answer after the test's wait.
/// Tries each of `endpoints` in turn (a follower answers 307: the next
/// one is tried) until one answers 200.
async fn put_until_definite(
    http: &reqwest::Client,
    endpoints: &[String],
    key: &str,
    value: &str,
    tag: (u64, u64, u64),
) -> (bool, u64) {
    let deadline = tokio::time::Instant::now() + common::WAIT;
    for endpoint in endpoints.iter().cycle() {
        // Unavailable, outcome unknown, no answer: retry.
        let last = match put_in_session(http, endpoint, key, value, tag).await {
            Some((StatusCode::OK, replayed, body)) => {
                return (replayed, body["index"].as_u64().expect("index"));
            }
            other => other,
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "no definite answer; last: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    unreachable!()
}

/// The issue's acceptance test: the leader is killed while a client
/// retries the same (session, sequence) many times; the write is applied
/// exactly once on every node, across snapshots, a snapshot install and a
/// restart of the whole cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_retried_through_failover_snapshots_and_restarts_is_applied_once() {
    let mut cluster = Cluster::start(3, "[raft]\nsnapshot_every = 50\npurge_keep = 5\n").await;
    let http = cluster.raw();
    let ids = [1, 2, 3].map(NodeId);
    let endpoints: Vec<String> = ids.iter().map(|id| cluster.endpoint(*id)).collect();
    let leader = cluster.leader().await;
    let id = open_session(&http, &cluster.endpoint(leader)).await;

    let tag = (id, 1, 1);
    let (replayed, first) = put_until_definite(&http, &endpoints, "k", "first", tag).await;
    assert!(!replayed, "the first try is no replay");
    // A later write overwrites it: applying the first one again would
    // bring "first" back, which every check below would see.
    let leader_client = cluster.client(leader);
    leader_client.put("k", b"second").await.expect("put");

    // Retries, many, concurrently with the leader's death and writes
    // enough for snapshots.
    let retrier = {
        let (endpoints, http) = (endpoints.clone(), http.clone());
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for _ in 0..60 {
                answers.push(put_until_definite(&http, &endpoints, "k", "first", tag).await);
            }
            answers
        })
    };
    cluster.stop_node(leader).await;
    let new = cluster.leader().await;
    let c = cluster.client(new);
    for i in 0..150 {
        c.put(&format!("filler{i}"), b"x").await.expect("put");
    }
    for (replayed, index) in retrier.await.expect("retrier") {
        assert!(replayed, "a retry was applied again");
        assert_eq!(index, first, "a replay names the entry that applied it");
    }

    // The old leader comes back needing a snapshot (purge_keep = 5), which
    // must carry the session; then it leads and answers the retry itself.
    cluster.start_node(leader).await;
    common::wait_applied(
        &cluster.client(leader),
        "filler149",
        "the old leader never caught up",
    )
    .await;
    c.transfer_leader(leader.0).await.expect("transfer");
    assert_eq!(cluster.leader().await, leader);
    assert_eq!(
        put_until_definite(&http, &[cluster.endpoint(leader)], "k", "first", tag).await,
        (true, first),
        "answered from the session the snapshot installed"
    );

    // Every node restarts: sessions are durable like the data.
    for id in ids {
        cluster.stop_node(id).await;
    }
    for id in ids {
        cluster.start_node(id).await;
    }
    cluster.leader().await;
    assert_eq!(
        put_until_definite(&http, &endpoints, "k", "first", tag).await,
        (true, first)
    );
    for id in ids {
        let c = cluster.client(id);
        common::wait_applied(&c, "filler149", "a node never caught up").await;
        assert_eq!(
            c.get("k", true).await.expect("stale get"),
            Some(b"second".to_vec()),
            "node {id} applied the write twice"
        );
    }
    cluster.shutdown().await;
}

/// What the session headers refuse, as the API documents it: none of these
/// writes is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn session_refusals_are_typed_and_apply_nothing() {
    let cluster = Cluster::start(3, "").await;
    let http = cluster.raw();
    let endpoint = cluster.endpoint(cluster.leader().await);
    let id = open_session(&http, &endpoint).await;
    assert!(
        open_session(&http, &endpoint).await > id,
        "each session gets its own id"
    );
    let status_of = |tag| {
        let (endpoint, http) = (endpoint.clone(), http.clone());
        async move {
            let (status, replayed, body) = put_in_session(&http, &endpoint, "r", "v", tag)
                .await
                .expect("an answer");
            (status, replayed, body["error"].clone())
        }
    };

    // An id no registration made.
    assert_eq!(
        status_of((id + 1_000, 1, 1)).await,
        (StatusCode::GONE, false, json!("session_unknown"))
    );
    // Sequences 1 and 2 answered, then acknowledged by sequence 3: a retry
    // of 1 is stale, while 3 itself is replayed.
    for seq in 1..=3 {
        assert_eq!(status_of((id, seq, seq)).await.0, StatusCode::OK);
    }
    assert_eq!(
        status_of((id, 1, 3)).await,
        (StatusCode::CONFLICT, false, json!("session_stale"))
    );
    assert!(status_of((id, 3, 3)).await.1, "sequence 3 is replayed");

    // Malformed or partial headers.
    let c = http.clone();
    for headers in [
        vec![("Client-Id", id.to_string())],
        vec![("Client-Seq", "1".to_string())],
        vec![
            ("Client-Id", "x".to_string()),
            ("Client-Seq", "1".to_string()),
        ],
        vec![("Client-Ack", "1".to_string())],
    ] {
        let mut req = c.put(format!("{endpoint}/v1/kv/r")).body("w");
        for (name, value) in &headers {
            req = req.header(*name, value);
        }
        let resp = req.send().await.expect("answer");
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{headers:?}");
    }
    let client = cluster.client_at(&endpoint);
    assert_eq!(
        client.get("r", false).await.expect("get"),
        Some(b"v".to_vec())
    );

    // DELETE and CAS take the headers too, and replay their own answers.
    let cas = |seq: u64| {
        c.post(format!("{endpoint}/v1/cas/n"))
            .header("Client-Id", id.to_string())
            .header("Client-Seq", seq.to_string())
            .header("Client-Ack", "4")
            .body(r#"{"expected": null, "new": "1"}"#)
            .send()
    };
    let first = cas(4).await.expect("cas");
    assert!(first.headers().get("replayed").is_none());
    assert_eq!(
        first.json::<Value>().await.expect("json"),
        json!({"succeeded": true, "current": "1"})
    );
    let again = cas(4).await.expect("cas");
    assert_eq!(again.headers()["replayed"], "true");
    assert_eq!(
        again.json::<Value>().await.expect("json"),
        json!({"succeeded": true, "current": "1"}),
        "a second apply would have failed the swap"
    );
    let del = || {
        c.delete(format!("{endpoint}/v1/kv/n"))
            .header("Client-Id", id.to_string())
            .header("Client-Seq", "5")
            .send()
    };
    let first: Value = del().await.expect("delete").json().await.expect("json");
    let again = del().await.expect("delete");
    assert_eq!(again.headers()["replayed"], "true");
    assert_eq!(again.json::<Value>().await.expect("json"), first);
    assert_eq!(first["deleted"], json!(true));
    cluster.shutdown().await;
}
