//! `cargo xtask`: the project's entry points.
//!
//! - `cargo xtask demo`  — build and run the demo cluster.
//! - `cargo xtask test`  — the full test suite, as CI runs it (release mode;
//!   the simulator sweep runs `SIM_SEEDS` seeds, default 1000).
//! - `cargo xtask bench` — the benchmarks.
//! - `cargo xtask doctor [--install]` — check (and as root, install) what
//!   the build needs.
//!
//! xtask itself depends on nothing heavy, so it builds on a fresh machine
//! before anything else does.

use std::env;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

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

fn run() -> Result<()> {
    let args: Vec<String> = env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or(&[]);
    match args.first().map(String::as_str) {
        Some("demo") => demo(rest),
        Some("test") => test(rest),
        Some("bench") => bench(rest),
        Some("doctor") => doctor(rest.iter().any(|a| a == "--install")),
        _ => {
            eprintln!("usage: cargo xtask <demo|test|bench|doctor [--install]>");
            bail!("unknown or missing command")
        }
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
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

fn demo(extra: &[String]) -> Result<()> {
    doctor(false)?;
    let mut c = cargo();
    c.args([
        "run",
        "--release",
        "--quiet",
        "-p",
        "raft-core",
        "--example",
        "cluster",
        "--",
    ])
    .args(extra);
    status(c)
}

fn test(extra: &[String]) -> Result<()> {
    doctor(false)?;
    let mut c = cargo();
    c.args(["test", "--workspace", "--release"]).args(extra);
    if env::var_os("SIM_SEEDS").is_none() {
        c.env("SIM_SEEDS", "1000");
    }
    status(c)
}

fn bench(extra: &[String]) -> Result<()> {
    doctor(false)?;
    let mut c = cargo();
    c.args(["bench", "-p", "raft-core"]).args(extra);
    status(c)
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

fn doctor(install: bool) -> Result<()> {
    let missing: Vec<_> = NEEDS.iter().filter(|(_, ok, _)| !ok()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let what: Vec<&str> = missing.iter().map(|(w, _, _)| *w).collect();
    let pkgs: Vec<&str> = missing.iter().map(|(_, _, p)| *p).collect();
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
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

fn on_path(tool: &str) -> bool {
    env::var_os("PATH").is_some_and(|p| env::split_paths(&p).any(|d| d.join(tool).is_file()))
}
