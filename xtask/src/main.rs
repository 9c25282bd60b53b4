//! `cargo xtask`: the project's entry points.
//!
//! - `cargo xtask demo [--pace SECS]`: build `raft-kv` and run the 3-node demo.
//! - `cargo xtask test`: the whole test suite as CI runs it (release mode;
//!   the simulator sweep runs `SIM_SEEDS` seeds, default 1000), then a short
//!   chaos run against real processes.
//! - `cargo xtask cluster up|status|down [--nodes 3|5]`: a local cluster
//!   that stays up (raft ports 7001.., HTTP ports 8001..).
//! - `cargo xtask chaos [--nodes 5] [--duration 60s] [--faults kill,pause,partition,membership,wipe] [--seed S] [--large-state]`.
//! - `cargo xtask bench [--clients 1,16,256] [--duration 20s]`: raft-kv
//!   against etcd on this machine; `cargo xtask bench core` runs the
//!   in-process benchmark of raft-core with openraft side by side;
//!   `cargo xtask bench join [--keys 300000] [--clients 256]` loads a
//!   3-node cluster and measures a fourth node joining under write load.
//! - `cargo xtask mutants [--seeds 1000] [--only a,b] [--list]`: run the
//!   randomized simulation suites against each catalogued Raft bug
//!   (`raft_core::mutation`) and report which seed caught it.
//! - `cargo xtask doctor [--install]`: check (and as root, install) what
//!   the build, chaos partitions and the etcd comparison need.
//!
//! xtask itself needs no C or C++ toolchain beyond the linker, so it builds
//! on a fresh machine before anything else does.

mod bench;
mod chaos;
mod cluster;
mod demo;
mod http;
mod join;
mod load;
mod mutants;

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, Result, bail};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: cargo xtask <demo [--pace SECS] | test | cluster up|status|down [--nodes N] | \
chaos [--nodes 5] [--duration 60s] [--faults kill,pause,partition,membership,wipe] [--seed S] [--large-state] | \
bench [core | join | --clients 1,16,256 --duration 20s] | mutants [--seeds N] [--only a,b] [--list] | \
doctor [--install [--bench]] | help>";

fn run() -> Result<()> {
    let args: Vec<String> = env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or(&[]);
    let root = root();
    match args.first().map(String::as_str) {
        Some("demo") => {
            let pace = demo::parse_pace(rest)?;
            doctor(&[])?;
            demo::build(&root)?;
            demo::run(&root, pace)
        }
        Some("test") => test(&root, rest),
        Some("cluster") => cluster(&root, rest),
        Some("chaos") => {
            let opts = chaos::Options::parse(rest)?;
            if env::var_os("RAFT_CHAOS_NETNS").is_none() {
                doctor(&[])?;
                demo::build(&root)?;
            }
            chaos::run(&root, opts)
        }
        Some("bench") if rest.first().map(String::as_str) == Some("core") => {
            doctor(&[])?;
            let mut c = cargo();
            // The openraft column needs the baseline feature; it is part of
            // what this command promises (issue 15: the ratio in one run).
            c.args([
                "bench",
                "-p",
                "raft-core",
                "--bench",
                "cluster",
                "--features",
                "openraft-baseline",
            ])
            .args(&rest[1..]);
            status(c)
        }
        Some("bench") if rest.first().map(String::as_str) == Some("join") => {
            let opts = join::Options::parse(&rest[1..])?;
            doctor(&[])?;
            demo::build(&root)?;
            join::run(&root, opts)
        }
        Some("bench") => {
            let opts = bench::Options::parse(rest)?;
            doctor(&[])?;
            demo::build(&root)?;
            bench::run(&root, opts)
        }
        Some("mutants") => mutants::run(&root, mutants::Options::parse(rest)?),
        Some("doctor") => doctor(rest),
        Some("help" | "-h" | "--help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => {
            eprintln!("{USAGE}");
            bail!("unknown or missing command")
        }
    }
}

/// The workspace this xtask runs for. `cargo run` (what `cargo xtask` is)
/// tells the running binary where its manifest is; run by hand, the binary
/// looks up from the current directory for the workspace that holds an
/// `xtask` member; the path baked in at build time is only the last resort.
/// With a target directory shared by two checkouts (CI's cache), the binary
/// built for one checkout would otherwise act on the other, or on a clone
/// that no longer exists.
fn root() -> PathBuf {
    let from_cargo = env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .and_then(|xtask| xtask.parent().map(PathBuf::from));
    let from_cwd = || {
        let cwd = env::current_dir().ok()?;
        cwd.ancestors()
            .find(|d| d.join("Cargo.toml").is_file() && d.join("xtask/Cargo.toml").is_file())
            .map(PathBuf::from)
    };
    from_cargo
        .or_else(from_cwd)
        .or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn status(mut cmd: Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("running {shown}"))?;
    if !st.success() {
        bail!("{shown} failed ({st})");
    }
    Ok(())
}

/// Clippy with warnings denied, then the unit and integration tests, then
/// a short chaos run with every fault.
fn test(root: &Path, extra: &[String]) -> Result<()> {
    doctor(&[])?;
    lint()?;
    let mut c = cargo();
    c.args(["test", "--workspace", "--release"]).args(extra);
    if env::var_os("SIM_SEEDS").is_none() {
        c.env("SIM_SEEDS", "1000");
    }
    status(c)?;
    // `cargo test` built target/release/raft-kv for raft-kv-example's
    // integration tests; the chaos run uses that binary as it is.
    let secs = env::var("CHAOS_SECS").unwrap_or_else(|_| "25".into());
    let opts = chaos::Options::parse(&[
        "--nodes".into(),
        "3".into(),
        "--duration".into(),
        format!("{secs}s"),
        "--faults".into(),
        "kill,pause,partition,membership,wipe".into(),
        "--seed".into(),
        env::var("CHAOS_SEED").unwrap_or_else(|_| "1".into()),
    ])?;
    chaos::run(root, opts.clone())?;
    // Again with a state many snapshots deep, so the faults land on
    // snapshot builds, transfers and installs.
    chaos::run(
        root,
        chaos::Options {
            large_state: true,
            ..opts
        },
    )
}

/// `cargo clippy` over every target with warnings denied. In the release
/// profile, the one the tests build: RocksDB's build script (13 minutes of
/// C++ on two cores) then runs once for both. Skipped, saying so, where
/// the toolchain has no clippy.
fn lint() -> Result<()> {
    let has_clippy = cargo()
        .args(["clippy", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_clippy {
        println!("xtask test: clippy is not installed (rustup component add clippy); lint skipped");
        return Ok(());
    }
    let mut c = cargo();
    c.args([
        "clippy",
        "--release",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    status(c)?;
    // raft-core without its driver (no tokio): what those who drive the
    // engine themselves build; it must keep compiling, warning-free.
    let mut c = cargo();
    c.args([
        "clippy",
        "--release",
        "-p",
        "raft-core",
        "--no-default-features",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    status(c)
}

/// `cargo xtask cluster up|status|down [--nodes N]`.
fn cluster(root: &Path, args: &[String]) -> Result<()> {
    let dir = root.join("target").join("xtask").join("cluster");
    let nodes: u64 = match args.iter().position(|a| a == "--nodes") {
        Some(i) => args.get(i + 1).context("--nodes needs a value")?.parse()?,
        None => 3,
    };
    match args.first().map(String::as_str) {
        Some("up") => {
            doctor(&[])?;
            demo::build(root)?;
            if let Ok(old) = cluster::LocalCluster::attach(root, dir.clone()) {
                let mut old = old;
                if old.ids().into_iter().any(|id| old.is_running(id)) {
                    bail!(
                        "a cluster is already up in {}; `cargo xtask cluster down` first",
                        dir.display()
                    );
                }
            }
            let mut c = cluster::LocalCluster::create(root, dir, nodes, 7000, "")?;
            c.start_all()?;
            let leader = c.wait_leader(&c.ids(), Duration::from_secs(20))?;
            c.detach();
            println!(
                "{nodes} nodes up; node {leader} leads. cluster file: {}",
                c.file().display()
            );
            for id in c.ids() {
                println!(
                    "  node {id}: {}  (logs: {})",
                    c.endpoint(id),
                    c.dir.join("logs").join(format!("node-{id}.log")).display()
                );
            }
            println!(
                "dashboard (any node; the browser will ask to trust {} or to accept the certificate):\n  {}",
                c.tls_dir().join("ca.pem").display(),
                c.dashboard_url(1)
            );
            let certs = c.tls_dir();
            println!(
                "the client API: {scheme} with a bearer token; to use it:\n  \
                 export RAFT_KV_CA={ca} RAFT_KV_ENDPOINT={ep}\n  \
                 export RAFT_KV_TOKEN=$(cat {token})\n  \
                 target/release/raft-kv put hello world\n  \
                 curl --cacert {ca} -H \"Authorization: Bearer $RAFT_KV_TOKEN\" {ep}/v1/kv/hello",
                scheme = c.scheme(),
                ca = certs.join("ca.pem").display(),
                token = certs.join("admin.token").display(),
                ep = c.endpoint(1),
            );
            Ok(())
        }
        Some("status") => {
            let c = cluster::LocalCluster::attach(root, dir)?;
            println!(
                "{:<5} {:<28} {:<10} {:>6} {:>7} {:>8} {:>8}",
                "node", "endpoint", "role", "term", "leader", "commit", "applied"
            );
            let statuses = c.statuses();
            for (id, s) in statuses.clone() {
                match s {
                    Some(s) => println!(
                        "{id:<5} {:<28} {:<10} {:>6} {:>7} {:>8} {:>8}",
                        c.endpoint(id),
                        s.role,
                        s.term,
                        s.leader_id.map_or("-".into(), |l| l.to_string()),
                        s.commit_index,
                        s.applied_index
                    ),
                    None => println!("{id:<5} {:<28} down", c.endpoint(id)),
                }
            }
            if let Some(l) = statuses.values().flatten().find(|s| s.role == "leader") {
                println!("voters {:?}, learners {:?}", l.voters, l.learners);
            }
            Ok(())
        }
        Some("down") => {
            let mut c = cluster::LocalCluster::attach(root, dir)?;
            c.stop_all()?;
            println!("cluster stopped (data kept in {})", c.dir.display());
            Ok(())
        }
        _ => bail!("usage: cargo xtask cluster up|status|down [--nodes 3|5]"),
    }
}

/// What the build needs: a check, and the Debian package that satisfies it.
/// RocksDB's bindings are generated with bindgen (clang + libclang) and its
/// C++ is compiled from source.
/// What is needed, how to check for it, and the package that provides it.
type Need = (&'static str, fn() -> bool, &'static str);

const NEEDS: &[Need] = &[
    ("a C compiler (cc)", || on_path("cc"), "gcc"),
    ("a C++ compiler (c++)", || on_path("c++"), "g++"),
    ("clang", || on_path("clang"), "clang"),
    ("libclang (for bindgen)", has_libclang, "libclang-dev"),
];

/// Needed only for chaos partitions (as root); without it they are skipped
/// with a message saying so. `doctor --install` installs it too.
const FOR_CHAOS: Need = (
    "iptables (chaos partitions)",
    || find_tool("iptables").is_some(),
    "iptables",
);
/// The dashboard's browser test (skipped, saying so, without them);
/// `doctor --install` installs them.
const FOR_BROWSER: &[Need] = &[
    (
        "chromium (the dashboard's browser test)",
        || on_path("chromium"),
        "chromium",
    ),
    (
        "chromedriver (the dashboard's browser test)",
        || on_path("chromedriver"),
        "chromium-driver",
    ),
];
/// The baseline of `cargo xtask bench`; `doctor --install --bench` installs it.
const FOR_BENCH: Need = (
    "etcd (the bench baseline)",
    || find_tool("etcd").is_some(),
    "etcd-server",
);

/// Checks what the build needs (and with `install`, as root, installs it
/// along with the chaos and browser-test tools and, with `--bench`, the
/// benchmark's).
fn doctor(args: &[String]) -> Result<()> {
    let install = args.iter().any(|a| a == "--install");
    let mut needs: Vec<&Need> = NEEDS.iter().collect();
    if install {
        needs.push(&FOR_CHAOS);
        needs.extend(FOR_BROWSER);
        if args.iter().any(|a| a == "--bench") {
            needs.push(&FOR_BENCH);
        }
    }
    let missing: Vec<&Need> = needs.into_iter().filter(|(_, ok, _)| !ok()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let what: Vec<&str> = missing.iter().map(|(w, _, _)| *w).collect();
    let pkgs: Vec<&str> = missing.iter().map(|(_, _, p)| *p).collect();
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false);
    if install && is_root {
        eprintln!("xtask: installing {} ({})", pkgs.join(" "), what.join(", "));
        let mut update = Command::new("apt-get");
        update.args(["update", "-qq"]);
        status(update)?;
        let mut c = Command::new("apt-get");
        c.args(["install", "-y", "-qq"])
            .args(&pkgs)
            .env("DEBIAN_FRONTEND", "noninteractive");
        return status(c);
    }
    bail!(
        "missing {}; install with: apt-get install -y {} (or run `cargo xtask doctor --install` as root)",
        what.join(", "),
        pkgs.join(" ")
    )
}

fn has_libclang() -> bool {
    if env::var_os("LIBCLANG_PATH").is_some() {
        return true;
    }
    let roots = [
        "/usr/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/local/lib",
    ];
    let named = |dir: &std::path::Path| {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.starts_with("libclang") && n.contains(".so") && !n.starts_with("libclang-cpp")
            })
    };
    roots.iter().any(|r| named(std::path::Path::new(r)))
        || std::fs::read_dir("/usr/lib")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                e.file_name().to_string_lossy().starts_with("llvm-") && named(&e.path().join("lib"))
            })
}

/// `tool` on PATH or in the sbin directories (which a non-root PATH lacks).
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn on_path(tool: &str) -> bool {
    env::var_os("PATH").is_some_and(|p| env::split_paths(&p).any(|d| d.join(tool).is_file()))
}
