//! The HTTP API of a 3-node cluster on real QUIC and RocksDB: every path,
//! status code and redirect the API promises, malformed input, and leader
//! failover with every acknowledged write kept.

mod common;

use std::time::Duration;

use common::Cluster;
use raft_core::NodeId;
use raft_kv_example::client::CasAnswer;
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn json_of(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let body = resp.bytes().await.expect("body");
    let v = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "{status}: not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    });
    (status, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_operation_works_through_any_node() {
    let cluster = Cluster::start(3, "").await;
    let follower = cluster.follower().await;
    let c = cluster.client(follower);

    let put = c.put("color", b"blue").await.expect("put");
    assert!(put.index > 0 && !put.replayed, "{put:?}");
    assert_eq!(
        c.get("color", false).await.expect("get"),
        Some(b"blue".to_vec())
    );
    assert_eq!(c.get("missing", false).await.expect("get"), None);

    // Keys may hold slashes and need percent-encoding; values are raw bytes.
    let odd_key = "dir/sub key/ü?#";
    c.put(odd_key, &[0, 159, 255]).await.expect("put odd");
    assert_eq!(
        c.get(odd_key, false).await.expect("get odd"),
        Some(vec![0, 159, 255])
    );

    let cas = |succeeded, current: Option<&str>| CasAnswer {
        succeeded,
        current: current.map(str::to_string),
        replayed: false,
    };
    let got = c.cas("lock", None, Some("me")).await.expect("cas absent");
    assert_eq!(got, cas(true, Some("me")));
    let got = c.cas("lock", None, Some("you")).await.expect("cas taken");
    assert_eq!(got, cas(false, Some("me")));
    let got = c.cas("lock", Some("me"), None).await.expect("cas delete");
    assert_eq!(got, cas(true, None));

    let del = c.delete("color").await.expect("delete");
    assert!(del.deleted);
    let del = c.delete("color").await.expect("delete again");
    assert!(!del.deleted);
    assert!(del.index > put.index);

    // A stale read is served locally, by the follower, once it has applied.
    c.put("stale", b"x").await.expect("put");
    common::wait_applied(&c, "stale", "follower never applied").await;

    let status = c.status().await.expect("status");
    assert_eq!(status.id, follower.0);
    assert_eq!(status.role, "follower");
    assert_eq!(status.voters, vec![1, 2, 3]);
    assert!(status.learners.is_empty());
    assert_eq!(status.leader_id, Some(cluster.leader().await.0));
    assert!(status.commit_index >= del.index);

    let metrics = cluster
        .raw()
        .get(format!("{}/metrics", cluster.endpoint(follower)))
        .send()
        .await
        .expect("metrics");
    assert_eq!(metrics.status(), StatusCode::OK);
    assert_eq!(
        metrics.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = metrics.text().await.expect("text");
    for line in [
        "raft_term ",
        "raft_applied_index ",
        "raft_role{role=\"follower\"} 1",
        "# TYPE raft_log_append_seconds histogram",
        "raft_log_append_seconds_count ",
        "# TYPE raft_elections counter",
        "raft_elections_total ",
        "raft_proposals_total ",
        "raft_kv_memory_budget_bytes ",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    assert!(
        text.ends_with("# EOF\n"),
        "an OpenMetrics exposition ends with # EOF"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_redirects_writes_and_linearizable_reads_to_the_leader() {
    let cluster = Cluster::start(3, "").await;
    let leader = cluster.leader().await;
    let follower = cluster.follower().await;
    let leader_http = cluster.file.nodes[&leader].http_addr;
    let http = cluster.raw();
    let base = cluster.endpoint(follower);

    let put = http
        .put(format!("{base}/v1/kv/a%20b"))
        .body("v")
        .send()
        .await
        .expect("put");
    assert_eq!(put.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(
        put.headers()["location"].to_str().expect("ascii"),
        format!("https://{leader_http}/v1/kv/a%20b")
    );
    let read = http
        .get(format!("{base}/v1/kv/k?consistency=linearizable"))
        .send()
        .await
        .expect("get");
    assert_eq!(read.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(
        read.headers()["location"].to_str().expect("ascii"),
        format!("https://{leader_http}/v1/kv/k?consistency=linearizable")
    );
    for req in [
        http.delete(format!("{base}/v1/kv/k")),
        http.post(format!("{base}/v1/cas/k"))
            .body(r#"{"expected":null,"new":"1"}"#),
    ] {
        let (status, body) = json_of(req.send().await.expect("send")).await;
        assert_eq!(status, StatusCode::TEMPORARY_REDIRECT);
        assert_eq!(body["error"], "not_leader");
    }
    // A stale read is never redirected.
    let stale = http
        .get(format!("{base}/v1/kv/k?consistency=stale"))
        .send()
        .await
        .expect("get");
    assert_eq!(stale.status(), StatusCode::NOT_FOUND);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_requests_get_json_4xx_and_the_node_keeps_serving() {
    let cluster = Cluster::start(3, "[limits]\nmax_key_bytes = 16\nmax_value_bytes = 1024\n").await;
    let leader = cluster.leader().await;
    let base = cluster.endpoint(leader);
    let http = cluster.raw();

    let cases: Vec<(reqwest::RequestBuilder, StatusCode, &str)> = vec![
        (
            http.put(format!("{base}/v1/kv/{}", "k".repeat(17)))
                .body("v"),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
        ),
        (
            http.put(format!("{base}/v1/kv/k")).body(vec![7u8; 1025]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
        ),
        (
            http.post(format!("{base}/v1/cas/k")).body("{not json"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            http.post(format!("{base}/v1/cas/k"))
                .body(b"{\"expected\":null,\"new\":\"\xff\xfe\"}".to_vec()),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            http.post(format!("{base}/v1/cas/k")).body(r#"{"new":"x"}"#),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            http.post(format!("{base}/v1/cas/k"))
                .body(r#"{"expected":1,"new":"x"}"#),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            http.post(format!("{base}/v1/cas/k")).body(format!(
                r#"{{"expected":null,"new":"{}"}}"#,
                "x".repeat(1025)
            )),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
        ),
        (
            http.get(format!("{base}/v1/kv/%FF%FE")),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            http.get(format!("{base}/v1/kv/k?consistency=sometimes")),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            http.get(format!("{base}/v1/nothing")),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            http.get(format!("{base}/v1/kv/")),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            http.patch(format!("{base}/v1/kv/k")),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            http.get(format!("{base}/v1/cas/k")),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ];
    for (i, (req, want, code)) in cases.into_iter().enumerate() {
        let (status, body) = json_of(req.send().await.expect("send")).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (want, Some(code)),
            "case {i}: {body}"
        );
    }

    // A body far past the limit: the node answers 413 without reading all
    // of it and closes the connection, so a client still sending may see
    // its write fail instead of the answer. Either way nothing is stored.
    match http
        .put(format!("{base}/v1/kv/huge"))
        .body(vec![7u8; 8 << 20])
        .send()
        .await
    {
        Ok(resp) => {
            let (status, body) = json_of(resp).await;
            assert_eq!(
                (status, body["error"].as_str()),
                (StatusCode::PAYLOAD_TOO_LARGE, Some("too_large"))
            );
        }
        Err(e) => assert!(e.is_request() || e.is_body(), "unexpected error: {e}"),
    }

    // A client that sends half a body and disconnects leaves nothing behind.
    {
        use tokio::io::AsyncWriteExt;
        let mut s = common::tls_stream(&cluster.file, leader).await;
        s.write_all(b"PUT /v1/kv/half HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nonly-part")
            .await
            .expect("write");
    }

    let c = cluster.client_at(&base);
    c.put("k", b"still serving")
        .await
        .expect("put after bad input");
    assert_eq!(
        c.get("k", false).await.expect("get"),
        Some(b"still serving".to_vec())
    );
    assert_eq!(c.get("half", false).await.expect("get"), None);
    assert_eq!(c.get("huge", false).await.expect("get"), None);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_leader_failover_and_the_old_leader_catches_up() {
    let mut cluster = Cluster::start(3, "[raft]\nsnapshot_every = 50\npurge_keep = 5\n").await;
    let old = cluster.leader().await;
    let c = cluster.client(old);
    for i in 0..100 {
        c.put(&format!("k{i}"), format!("v{i}").as_bytes())
            .await
            .expect("put");
    }
    cluster.stop_node(old).await;

    let new = cluster.leader().await;
    assert_ne!(new, old);
    let c = cluster.client(new);
    for i in 0..100 {
        assert_eq!(
            c.get(&format!("k{i}"), false).await.expect("get"),
            Some(format!("v{i}").into_bytes())
        );
    }
    // Enough writes while it is down that it needs the snapshot.
    for i in 100..200 {
        c.put(&format!("k{i}"), format!("v{i}").as_bytes())
            .await
            .expect("put");
    }

    cluster.start_node(old).await;
    let commit = c.status().await.expect("status").commit_index;
    let back = cluster.client(old);
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        // A node installing the snapshot answers 503 "retry shortly" (its
        // state is being replaced); that is not yet caught up, not a failure.
        match back.status().await {
            Ok(s) if s.applied_index >= commit => break,
            Ok(_) => {}
            Err(raft_kv_example::client::ClientError::Api { status, .. })
                if status == StatusCode::SERVICE_UNAVAILABLE => {}
            Err(e) => panic!("status: {e:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "old leader never caught up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..200 {
        assert_eq!(
            back.get(&format!("k{i}"), true).await.expect("stale get"),
            Some(format!("v{i}").into_bytes()),
            "k{i} on the restarted node"
        );
    }
    assert!(cluster.data_dir(NodeId(1)).exists());
    cluster.shutdown().await;
}

/// `/healthz` answers as soon as the process serves; `/readyz` only once
/// the node follows a leader and has applied close to its commit index:
/// a node restarted while its peers are down is alive but not ready, and
/// becomes ready once they are back and it has caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_is_alive_at_once_and_ready_only_once_it_has_caught_up() {
    let mut cluster = Cluster::start(3, "").await;
    let l = cluster.leader().await;
    let c = cluster.client(l);
    for i in 0..20 {
        c.put(&format!("k{i}"), b"v").await.expect("put");
    }
    for id in [1, 2, 3].map(NodeId) {
        cluster.stop_node(id).await;
    }
    let lone = NodeId(1);
    cluster.start_node(lone).await;
    let probe = |path: &str| {
        cluster
            .raw()
            .get(format!("{}{path}", cluster.endpoint(lone)))
            .send()
    };
    let (status, body) = json_of(probe("/healthz").await.expect("healthz")).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ok"})));
    let (status, body) = json_of(probe("/readyz").await.expect("readyz")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["ready"], json!(false));
    assert_eq!(body["leader_id"], Value::Null);

    for id in [2, 3].map(NodeId) {
        cluster.start_node(id).await;
    }
    cluster.leader().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for id in [1, 2, 3].map(NodeId) {
        loop {
            let url = format!("{}/readyz", cluster.endpoint(id));
            let (status, body) =
                json_of(cluster.raw().get(url).send().await.expect("readyz")).await;
            if status == StatusCode::OK {
                assert_eq!(body["ready"], json!(true));
                assert!(body["applied_index"].as_u64() >= Some(20), "{body}");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {id} never became ready: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    cluster.shutdown().await;
}
