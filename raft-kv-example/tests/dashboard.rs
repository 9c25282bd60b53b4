//! The dashboard in a real browser (issue 12): headless Chromium driven
//! through chromedriver (WebDriver) opens a follower's dashboard, sees
//! three members and one leader, and follows the leader's death to the new
//! leader and term without a reload and without a JavaScript error.
//!
//! Skipped, saying so, where Chromium or chromedriver is not installed
//! (`cargo xtask doctor --install` installs Debian's `chromium` and
//! `chromium-driver`). `DASHBOARD_SCREENSHOT=path.png` keeps a screenshot.
//!
//! The test speaks W3C WebDriver itself (five commands, below) rather than
//! through a WebDriver crate: the one it used pulled ICU's proc macros
//! into the test build, which changed `syn`'s features for every build
//! script, so `cargo xtask demo` (the binary alone) and `cargo xtask test`
//! each compiled RocksDB's C++, 13 minutes apiece on two cores.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, WAIT};
use serde_json::{Value, json};

/// Where the browser and its driver are, if both are installed.
fn browser() -> Option<(PathBuf, PathBuf)> {
    let find = |name: &str| {
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    };
    match (find("chromium"), find("chromedriver")) {
        (Some(c), Some(d)) => Some((c, d)),
        _ => {
            eprintln!(
                "SKIPPED the dashboard's browser test: chromium and chromedriver are not both \
                 installed (apt-get install -y chromium chromium-driver, or `cargo xtask doctor \
                 --install` as root)"
            );
            None
        }
    }
}

/// A W3C WebDriver session (chromedriver's), with the commands the test
/// uses. A command that fails returns WebDriver's error as text.
struct WebDriver {
    http: reqwest::Client,
    /// `http://127.0.0.1:port/session/{id}`.
    session: String,
}

impl WebDriver {
    /// A new session of a browser with `capabilities`.
    async fn start(driver: &str, capabilities: Value) -> Result<WebDriver, String> {
        let http = raft_kv_example::client::http_builder(&Default::default())
            .map_err(|e| e.to_string())?
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| e.to_string())?;
        let body = json!({ "capabilities": { "alwaysMatch": capabilities } });
        let v = Self::call(
            &http,
            reqwest::Method::POST,
            format!("{driver}/session"),
            Some(body),
        )
        .await?;
        let id = v["sessionId"]
            .as_str()
            .ok_or(format!("no session id in {v}"))?;
        Ok(WebDriver {
            session: format!("{driver}/session/{id}"),
            http,
        })
    }

    /// The command's `value`, or its error.
    async fn call(
        http: &reqwest::Client,
        method: reqwest::Method,
        url: String,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let mut req = http.request(method, &url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status();
        let mut v: Value = resp.json().await.map_err(|e| format!("{url}: {e}"))?;
        if !status.is_success() {
            return Err(format!("{url}: {status}: {}", v["value"]));
        }
        Ok(v["value"].take())
    }

    async fn command(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        Self::call(&self.http, method, format!("{}{path}", self.session), body).await
    }

    async fn goto(&self, url: &str) -> Result<(), String> {
        self.command(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await
            .map(drop)
    }

    /// Runs `script` (a function body) in the page; what it returns.
    async fn execute(&self, script: &str) -> Result<Value, String> {
        let body = json!({ "script": script, "args": [] });
        self.command(reqwest::Method::POST, "/execute/sync", Some(body))
            .await
    }

    /// The page as PNG.
    async fn screenshot(&self) -> Result<Vec<u8>, String> {
        use base64::Engine;
        let v = self
            .command(reqwest::Method::GET, "/screenshot", None)
            .await?;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().ok_or(format!("not base64: {v}"))?)
            .map_err(|e| e.to_string())
    }

    /// Ends the session (and the browser).
    async fn close(&self) -> Result<(), String> {
        self.command(reqwest::Method::DELETE, "", None)
            .await
            .map(drop)
    }
}

/// What the page shows: each member's id and role, the term, and the
/// errors the page caught.
const READ_PAGE: &str = r##"
    const rows = [...document.querySelectorAll("#members tr[data-member]")];
    return {
        members: rows.map((r) => [Number(r.dataset.member), r.dataset.role]),
        term: Number(document.getElementById("term").dataset.term),
        errors: window.__dashboardErrors || ["the page's error list is missing"],
    };
"##;

struct Page {
    members: Vec<(u64, String)>,
    term: u64,
    errors: Vec<Value>,
}

impl Page {
    fn leaders(&self) -> Vec<u64> {
        self.members
            .iter()
            .filter(|(_, r)| r == "leader")
            .map(|(id, _)| *id)
            .collect()
    }
}

async fn read(client: &WebDriver) -> Page {
    let v = client.execute(READ_PAGE).await.expect("script");
    let members = v["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            (
                m[0].as_u64().expect("id"),
                m[1].as_str().expect("role").to_string(),
            )
        })
        .collect();
    Page {
        members,
        term: v["term"].as_u64().unwrap_or(0),
        errors: v["errors"].as_array().cloned().unwrap_or_default(),
    }
}

/// Polls the page until `done` holds; panics with `what` after `limit`.
async fn until(
    client: &WebDriver,
    limit: Duration,
    what: &str,
    done: impl Fn(&Page) -> bool,
) -> Page {
    let deadline = Instant::now() + limit;
    loop {
        let page = read(client).await;
        assert!(
            page.errors.is_empty(),
            "the page caught errors: {:?}",
            page.errors
        );
        if done(&page) {
            return page;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {limit:?}; the page shows {:?} in term {}",
            page.members,
            page.term
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_follows_a_leader_change_live_in_a_real_browser() {
    let Some((chromium, chromedriver)) = browser() else {
        return;
    };
    let mut cluster = Cluster::start(3, "").await;
    let leader = cluster.leader().await;
    let follower = cluster.follower().await;
    let admin = cluster.client(leader);
    for i in 0..50 {
        admin.put(&format!("k{i}"), b"v").await.expect("put");
    }

    let port = common::free_addr().port();
    let mut driver = Command::new(&chromedriver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let profile = tempfile::tempdir().expect("profile dir");
    // As the machine's notes have it: headless, no sandbox as root, and
    // none of the background connections a closed network refuses.
    let caps = json!({
        "browserName": "chrome",
        "acceptInsecureCerts": true,
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,860",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        },
    });
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + WAIT;
    let client = loop {
        match WebDriver::start(&url, caps.clone()).await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no WebDriver session: {e}"),
        }
    };

    // A follower's page: it shows the cluster as the leader sees it.
    let token = std::fs::read_to_string(cluster.file.tls_dir.join("admin.token")).expect("token");
    client
        .goto(&format!(
            "{}/#token={}",
            cluster.endpoint(follower),
            token.trim()
        ))
        .await
        .expect("open the dashboard");
    let before = until(&client, WAIT, "three members, one leader", |p| {
        p.members.len() == 3 && p.leaders() == [leader.0]
    })
    .await;
    let served_by = client
        .execute("return document.getElementById('served-by').textContent")
        .await
        .expect("script");
    assert!(
        served_by
            .as_str()
            .unwrap_or("")
            .contains(&format!("node {follower}")),
        "{served_by}"
    );

    // The leader dies; the page shows the new one, in a higher term, and
    // the old one unreachable, within 3 s, by itself.
    cluster.stop_node(leader).await;
    let killed = Instant::now();
    let after = until(
        &client,
        Duration::from_secs(3),
        "the new leader and a higher term",
        |p| {
            let l = p.leaders();
            let dead = p
                .members
                .iter()
                .any(|(id, role)| *id == leader.0 && role == "unreachable");
            l.len() == 1 && l[0] != leader.0 && p.term > before.term && dead
        },
    )
    .await;
    let shown = killed.elapsed();
    let new_leader = after.leaders()[0];
    println!(
        "dashboard: node {new_leader} shown leading term {} {} ms after node {leader} stopped",
        after.term,
        shown.as_millis()
    );
    // A few seconds of writes to the new leader, for the screenshot's
    // charts.
    let c = cluster.client(raft_core::NodeId(new_leader));
    let until_shot = Instant::now() + Duration::from_secs(4);
    let mut i = 0u64;
    while Instant::now() < until_shot {
        c.put(&format!("c{}", i % 20), b"v").await.expect("put");
        i += 1;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    if let Some(path) = std::env::var_os("DASHBOARD_SCREENSHOT") {
        let png = client.screenshot().await.expect("screenshot");
        std::fs::write(&path, png).expect("write the screenshot");
    }
    assert!(read(&client).await.errors.is_empty());

    client.close().await.expect("close the browser");
    let _ = driver.kill();
    let _ = driver.wait();
    cluster.shutdown().await;
}
