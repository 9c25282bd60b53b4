//! The client API's security (issue 11): who may call what, revocation on
//! every node, and clients that are hostile or wrong: plain HTTP to the TLS
//! port, certificates from another CA, slowloris, and fuzzed requests.

mod common;

use std::time::{Duration, Instant};

use common::{Cluster, WAIT};
use raft_core::NodeId;
use raft_kv_example::client::{Client, ClientOptions};
use raft_kv_example::listener::HEADER_TIMEOUT;
use raft_kv_example::token::{Role, Token};
use raft_transport_quic::tls::DevCerts;
use reqwest::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every endpoint, with a request that the role allowed to make it may
/// make harmlessly (an unknown member, a malformed body), and the weakest
/// role that may (`None`: anyone).
fn endpoints() -> Vec<(Method, &'static str, Option<&'static str>, Option<Role>)> {
    use Role::*;
    vec![
        (Method::GET, "/healthz", None, None),
        (Method::GET, "/", None, None),
        (Method::GET, "/v1/dashboard/sample", None, Some(Read)),
        (Method::GET, "/readyz", None, Some(Read)),
        (Method::GET, "/v1/status", None, Some(Read)),
        (Method::GET, "/metrics", None, Some(Read)),
        (Method::GET, "/v1/kv/k", None, Some(Read)),
        (Method::GET, "/v1/kv/k?consistency=stale", None, Some(Read)),
        (Method::GET, "/no/such/path", None, Some(Read)),
        (Method::PUT, "/v1/kv/k", Some("v"), Some(Write)),
        (Method::DELETE, "/v1/kv/k", None, Some(Write)),
        (
            Method::POST,
            "/v1/cas/k",
            Some(r#"{"expected": null, "new": "v"}"#),
            Some(Write),
        ),
        (Method::POST, "/v1/sessions", None, Some(Write)),
        (Method::GET, "/v1/snapshot", None, Some(Admin)),
        (Method::POST, "/v1/members", Some("{}"), Some(Admin)),
        (Method::DELETE, "/v1/members/99", None, Some(Admin)),
        (Method::POST, "/v1/members/99/promote", None, Some(Admin)),
        (Method::POST, "/v1/members/99/demote", None, Some(Admin)),
        (
            Method::POST,
            "/v1/leader/transfer",
            Some(r#"{"to": 99}"#),
            Some(Admin),
        ),
        (Method::GET, "/v1/tokens", None, Some(Admin)),
        (Method::POST, "/v1/tokens", Some("{}"), Some(Admin)),
        (Method::DELETE, "/v1/tokens/nobody", None, Some(Admin)),
    ]
}

/// A raw client of `cluster` with its CA and no token: each request says
/// which, if any.
fn anonymous(cluster: &Cluster) -> reqwest::Client {
    let options = ClientOptions {
        token: None,
        ..cluster.options()
    };
    raft_kv_example::client::http_builder(&options)
        .expect("http client")
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_role_may_call_exactly_what_its_role_allows_and_nothing_hints_at_a_token() {
    let cluster = Cluster::start(3, "").await;
    let leader = cluster.leader().await;
    let admin = cluster.client(leader);
    // Callers: no token, tokens that are not valid in four ways, and one
    // valid token per role.
    let mut callers: Vec<(String, Option<String>, Option<Role>)> = vec![
        ("no token".into(), None, None),
        ("not a token".into(), Some("Bearer nonsense".into()), None),
        (
            "another scheme".into(),
            Some(format!("Basic {}", Token::generate("x").unwrap().expose())),
            None,
        ),
        (
            "unknown name".into(),
            Some(format!(
                "Bearer {}",
                Token::generate("ghost").unwrap().expose()
            )),
            None,
        ),
    ];
    for role in Role::ALL {
        let token = Token::generate(&format!("as-{role}")).expect("token");
        admin.create_token(&token, role).await.expect("create");
        // The same name with another secret: a guess at the secret.
        let guess = Token::parse(&format!("rkv.as-{role}.{}", "0".repeat(64))).unwrap();
        callers.push((
            format!("wrong secret of as-{role}"),
            Some(format!("Bearer {}", guess.expose())),
            None,
        ));
        callers.push((
            format!("as-{role}"),
            Some(format!("Bearer {}", token.expose())),
            Some(role),
        ));
    }
    let revoked = Token::generate("gone").expect("token");
    admin
        .create_token(&revoked, Role::Admin)
        .await
        .expect("create");
    admin.revoke_token("gone").await.expect("revoke");
    callers.push((
        "revoked".into(),
        Some(format!("Bearer {}", revoked.expose())),
        None,
    ));

    let http = anonymous(&cluster);
    let base = cluster.endpoint(leader);
    let mut unauthorized_bodies = std::collections::BTreeSet::new();
    let mut cells = 0;
    for (method, path, body, needed) in endpoints() {
        for (who, header, has) in &callers {
            let mut req = http.request(method.clone(), format!("{base}{path}"));
            if let Some(h) = header {
                req = req.header("authorization", h);
            }
            if let Some(b) = body {
                req = req.body(b.to_string());
            }
            let resp = req.send().await.expect("an answer");
            let status = resp.status();
            let text = resp.text().await.expect("body");
            let cell = format!("{method} {path} as {who}: {status} {text}");
            match (needed, has) {
                (None, _) => assert_eq!(status, StatusCode::OK, "{cell}"),
                (Some(_), None) => {
                    assert_eq!(status, StatusCode::UNAUTHORIZED, "{cell}");
                    unauthorized_bodies.insert(text);
                }
                (Some(n), Some(h)) if *h < n => {
                    assert_eq!(status, StatusCode::FORBIDDEN, "{cell}");
                    assert!(text.contains("\"forbidden\""), "{cell}");
                }
                (Some(_), Some(_)) => {
                    assert!(
                        ![
                            StatusCode::UNAUTHORIZED,
                            StatusCode::FORBIDDEN,
                            StatusCode::INTERNAL_SERVER_ERROR
                        ]
                        .contains(&status),
                        "{cell}"
                    );
                }
            }
            cells += 1;
        }
    }
    // The dashboard's event stream (it never ends: only its status).
    let events = format!("{base}/v1/events");
    let status = http.get(&events).send().await.expect("an answer").status();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let reader_token = callers
        .iter()
        .find_map(|(who, header, _)| (who == "as-read").then(|| header.clone().unwrap()))
        .unwrap();
    let resp = http
        .get(&events)
        .header("authorization", &reader_token)
        .send()
        .await
        .expect("an answer");
    assert_eq!(resp.status(), StatusCode::OK);
    drop(resp);

    // Missing, malformed, unknown, wrong and revoked: one answer for all.
    assert_eq!(unauthorized_bodies.len(), 1, "{unauthorized_bodies:?}");
    let body = unauthorized_bodies.into_iter().next().unwrap();
    assert!(body.contains("\"unauthorized\""), "{body}");
    println!("role table: {cells} cells checked");

    // The role is judged on the path the router matches: an admin path
    // spelled another way is not a way around it.
    let reader = callers
        .iter()
        .find_map(|(who, header, _)| (who == "as-read").then(|| header.clone().unwrap()))
        .unwrap();
    for path in ["/v1/%74okens", "/%761/tokens", "/v1/tokens/", "/v1//tokens"] {
        let resp = http
            .get(format!("{base}{path}"))
            .header("authorization", &reader)
            .send()
            .await
            .expect("an answer");
        assert!(
            [StatusCode::NOT_FOUND, StatusCode::FORBIDDEN].contains(&resp.status()),
            "{path}: {}",
            resp.status()
        );
    }

    // A token can be created under a name only while no live one has it,
    // and the bootstrap token's name is taken from the start.
    let again = admin
        .create_token(&Token::generate("as-read").unwrap(), Role::Admin)
        .await
        .expect_err("a live name");
    assert!(again.to_string().contains("token_exists"), "{again}");
    let bootstrap = admin
        .create_token(&Token::generate("admin").unwrap(), Role::Read)
        .await
        .expect_err("the bootstrap name");
    assert!(
        bootstrap.to_string().contains("token_exists"),
        "{bootstrap}"
    );
    let listed = admin.list_tokens().await.expect("list").to_string();
    for name in ["admin", "as-read", "as-write", "as-admin", "gone"] {
        assert!(listed.contains(&format!("\"{name}\"")), "{listed}");
    }
    assert!(
        !listed.contains("hash"),
        "a listing shows no hashes: {listed}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_token_is_refused_by_every_node_once_it_applies_the_revocation() {
    let cluster = Cluster::start(3, "").await;
    let leader = cluster.leader().await;
    let admin = cluster.client(leader);
    let token = Token::generate("soon-gone").expect("token");
    admin
        .create_token(&token, Role::Read)
        .await
        .expect("create");

    // A stale read is served by the node asked, from what it has applied:
    // each node judges the token itself.
    let http = anonymous(&cluster);
    let ask = |id: NodeId| {
        let req = http
            .get(format!(
                "{}/v1/kv/k?consistency=stale",
                cluster.endpoint(id)
            ))
            .header("authorization", format!("Bearer {}", token.expose()));
        async move { req.send().await.expect("an answer").status() }
    };
    let ids: Vec<NodeId> = cluster.nodes.keys().copied().collect();
    for &id in &ids {
        let deadline = Instant::now() + WAIT;
        while ask(id).await == StatusCode::UNAUTHORIZED {
            assert!(
                Instant::now() < deadline,
                "node {id} never accepted the new token"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    let revoked_at = Instant::now();
    let answer = admin.revoke_token("soon-gone").await.expect("revoke");
    assert_eq!(answer["revoked"], true, "{answer}");
    let index = answer["index"].as_u64().expect("index");
    let mut slowest = Duration::ZERO;
    for &id in &ids {
        // No cache anywhere: the moment a node has applied the revocation,
        // it refuses the token.
        let metrics = cluster.nodes[&id].raft.metrics();
        let deadline = Instant::now() + WAIT;
        while metrics.borrow().applied_index.0 < index {
            assert!(
                Instant::now() < deadline,
                "node {id} never applied the revocation"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(
            ask(id).await,
            StatusCode::UNAUTHORIZED,
            "node {id} after applying {index}"
        );
        slowest = slowest.max(revoked_at.elapsed());
    }
    println!(
        "revocation: every node refused the token {} ms after the revoke was sent",
        slowest.as_millis()
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plain_http_to_the_tls_port_gets_only_a_hint_to_use_https() {
    let cluster = Cluster::start(3, "").await;
    let addr = cluster.file.nodes[&NodeId(1)].http_addr;
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /v1/kv/k HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut answer))
        .await
        .expect("the node closes the connection")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("\"tls_required\""), "{answer}");

    let plain = anonymous(&cluster)
        .get(format!("http://{addr}/v1/status"))
        .send()
        .await
        .expect("an answer");
    assert_eq!(plain.status(), StatusCode::BAD_REQUEST);
    cluster.shutdown().await;
}

/// A rustls client of `cluster` presenting `cert` and `key` (PEM).
fn tls_client(cluster: &Cluster, cert: &str, key: &str) -> tokio_rustls::TlsConnector {
    common::tls_connector(&cluster.file, Some((cert, key)))
}

/// Sends an unauthenticated status request over `connector`; the answer's
/// first line, or `None` if the connection failed or closed without one.
async fn status_line(cluster: &Cluster, connector: &tokio_rustls::TlsConnector) -> Option<String> {
    let addr = cluster.file.nodes[&NodeId(1)].http_addr;
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let mut s = connector.connect(name, tcp).await.ok()?;
    s.write_all(b"GET /v1/status HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut answer))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&answer).into_owned();
    text.lines()
        .next()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_from_another_ca_are_refused_both_ways() {
    let cluster = Cluster::start(3, "").await;
    let stranger = DevCerts::generate([NodeId(1)]).expect("another CA");

    // A client that trusts another CA does not trust the node.
    let options = ClientOptions {
        ca_pem: Some(stranger.ca_pem.clone().into_bytes()),
        retry_for: Duration::ZERO,
        ..cluster.options()
    };
    let c = Client::with_options(&[&cluster.endpoint(NodeId(1))], options).expect("client");
    let e = c
        .status()
        .await
        .expect_err("the node's certificate is not trusted");
    assert!(!e.to_string().contains("401"), "{e}");

    // A client certificate from another CA: the handshake fails.
    let (cert, key) = &stranger.nodes[&NodeId(1)];
    assert_eq!(
        status_line(&cluster, &tls_client(&cluster, cert, key)).await,
        None
    );

    // One from the cluster's CA is accepted, and authenticates nothing:
    // the request still needs a token.
    let dir = &cluster.file.tls_dir;
    let cert = std::fs::read_to_string(dir.join("node-2.pem")).expect("cert");
    let key = std::fs::read_to_string(dir.join("node-2-key.pem")).expect("key");
    let line = status_line(&cluster, &tls_client(&cluster, &cert, &key)).await;
    assert_eq!(line.as_deref(), Some("HTTP/1.1 401 Unauthorized"));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slowloris_client_neither_blocks_others_nor_keeps_its_connections() {
    const SLOW: usize = 100;
    let cluster = Cluster::start(3, "").await;
    let leader = cluster.leader().await;
    // Each connection sends a request line, then a header a byte at a
    // time, never finishing; each counts how long the node kept it.
    let mut slow = Vec::new();
    for _ in 0..SLOW {
        let mut s = common::tls_stream(&cluster.file, leader).await;
        slow.push(tokio::spawn(async move {
            let opened = Instant::now();
            if s.write_all(b"GET /v1/status HTTP/1.1\r\nhost: x\r\n")
                .await
                .is_err()
            {
                return opened.elapsed();
            }
            // Once the node has closed the connection, a write fails (the
            // first may still be buffered; the peer's reset fails the next).
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let closed = s.write_all(b"x").await.is_err() || s.flush().await.is_err();
                if closed || opened.elapsed() > 3 * HEADER_TIMEOUT {
                    return opened.elapsed();
                }
            }
        }));
    }
    // Meanwhile everyone else is served.
    let c = cluster.client(leader);
    for i in 0..20 {
        let key = format!("k{i}");
        c.put(&key, b"v").await.expect("put while slowloris runs");
        assert_eq!(c.get(&key, false).await.expect("get"), Some(b"v".to_vec()));
    }
    // And the node closes every slow connection at the header timeout.
    for task in slow {
        let held = task.await.expect("slow client");
        assert!(
            held < HEADER_TIMEOUT + Duration::from_secs(5),
            "a slow connection was kept {held:?}"
        );
    }
    cluster.shutdown().await;
}

/// Hostile requests (issue 11's fuzzing of the HTTP layer, on
/// `raft_core::fuzz`): valid requests of every kind, with and without
/// tokens, damaged the ways bytes get damaged (methods, paths, headers,
/// lengths, bodies, tokens), each sent on its own TLS connection to a
/// node. Every one must be answered or dropped, never with a 500, and the
/// node must keep serving. `FUZZ_SEED`, `FUZZ_ITERS`, `FUZZ_SECS` as for
/// the other fuzzers; kept inputs in `tests/fuzz_regressions/`.
#[test]
fn hostile_requests_never_get_a_500_and_the_node_keeps_serving() {
    use raft_core::fuzz::{self, Target};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    let cluster = rt.block_on(Cluster::start(3, ""));
    let leader = rt.block_on(cluster.leader());
    let admin = cluster.client(leader);
    let reader = Token::generate("fuzz-read").expect("token");
    rt.block_on(admin.create_token(&reader, Role::Read))
        .expect("create");
    let writer = Token::generate("fuzz-write").expect("token");
    rt.block_on(admin.create_token(&writer, Role::Write))
        .expect("create");
    let bearer = |t: &Token| format!("authorization: Bearer {}\r\n", t.expose());
    let (r, w) = (bearer(&reader), bearer(&writer));
    let request = |line: &str, headers: &str, body: &str| {
        format!(
            "{line} HTTP/1.1\r\nhost: node\r\n{headers}content-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let session = "client-id: 1\r\nclient-seq: 2\r\nclient-ack: 1\r\n";
    let json = "content-type: application/json\r\n";
    let inputs = [
        request("GET /v1/kv/a%20b?consistency=stale", &r, ""),
        request("GET /v1/status", &r, ""),
        request("PUT /v1/kv/k", &format!("{w}{session}"), "value"),
        request(
            "POST /v1/cas/k",
            &format!("{w}{json}"),
            r#"{"expected": "a", "new": null}"#,
        ),
        request("DELETE /v1/kv/k", &w, ""),
        request("POST /v1/sessions", &w, ""),
        request("GET /metrics", &r, ""),
        request("GET /v1/kv/k", "authorization: Bearer rkv.x.00\r\n", ""),
        request(
            "POST /v1/tokens",
            &format!("{w}{json}"),
            r#"{"name": "n", "role": "read", "hash": "00"}"#,
        ),
    ]
    .map(String::into_bytes);
    let tls_dir = cluster.file.tls_dir.clone();
    let addr = cluster.file.nodes[&leader].http_addr;
    let connector = {
        let (cert, key) = (
            std::fs::read_to_string(tls_dir.join("node-3.pem")).expect("cert"),
            std::fs::read_to_string(tls_dir.join("node-3-key.pem")).expect("key"),
        );
        tls_client(&cluster, &cert, &key)
    };
    // Sends the bytes, then half-closes; the answer's status, if any.
    let exchange = |bytes: &[u8]| -> Option<u16> {
        rt.block_on(async {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let mut s = connector.connect(name, tcp).await.expect("handshake");
            let _ = s.write_all(bytes).await;
            let _ = s.shutdown().await;
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
            let text = String::from_utf8_lossy(&answer);
            let status = text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
            assert_ne!(
                status,
                500,
                "a 500 for {:?}: {text}",
                String::from_utf8_lossy(bytes)
            );
            Some(status)
        })
    };
    // "Decoded": the node answered (a refusal is an answer).
    let answered = |bytes: &[u8]| exchange(bytes).is_some();
    let targets: Vec<Target<'_>> = inputs
        .iter()
        .map(|i| Target::new("HTTP request", i.clone(), &answered))
        .collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    fuzz::run_test("HTTP request", &targets, &dir, 300);

    // Still serving.
    rt.block_on(async {
        admin
            .put("after", b"fuzz")
            .await
            .expect("put after the fuzz");
        assert_eq!(
            admin.get("after", false).await.expect("get"),
            Some(b"fuzz".to_vec())
        );
        cluster.shutdown().await;
    });
}

/// The bearer-token parser on its own, against damaged `Authorization`
/// values: a token or an error, never a panic.
#[test]
fn damaged_authorization_headers_parse_or_are_refused_never_a_panic() {
    use raft_core::fuzz::{self, Target};
    let token = Token::generate("fuzz").expect("token");
    let parse = |b: &[u8]| Token::from_header(b).is_ok();
    let targets = [
        Target::new(
            "bearer token",
            format!("Bearer {}", token.expose()).into_bytes(),
            &parse,
        ),
        Target::new(
            "bearer token",
            format!("bearer  {}\n", token.expose()).into_bytes(),
            &parse,
        ),
    ];
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    fuzz::run_test("bearer token", &targets, &dir, 200_000);
}
