//! `raft-kv`: run a node of the replicated key-value service, create its
//! development certificates, or talk to a running cluster.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use raft_core::NodeId;
use raft_kv_example::client::{Client, ClientOptions};
use raft_kv_example::token::{Role, Token};
use raft_kv_example::{ClusterFile, Node};

#[derive(Parser)]
#[command(
    name = "raft-kv",
    version,
    about = "A replicated key-value service on Raft"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    #[command(flatten)]
    creds: Creds,
}

/// How the client commands (and `serve --join`) reach a secured cluster.
#[derive(clap::Args)]
struct Creds {
    /// The cluster CA's certificate (`ca.pem` in the TLS directory), that
    /// https:// nodes must present certificates from. Default: the system's
    /// roots.
    #[arg(long, global = true, env = "RAFT_KV_CA")]
    ca: Option<PathBuf>,
    /// A file holding the bearer token (`admin.token` from `raft-kv certs`,
    /// or one `raft-kv token create --out` wrote). Without it, the token in
    /// the environment variable RAFT_KV_TOKEN, if set.
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
}

impl Creds {
    /// Client options carrying these credentials.
    fn options(&self) -> Result<ClientOptions> {
        let mut options = ClientOptions::default();
        if let Some(ca) = &self.ca {
            options = options.with_ca_file(ca)?;
        }
        options.token = self.token()?;
        Ok(options)
    }

    fn token(&self) -> Result<Option<Token>> {
        if let Some(path) = &self.token_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the token file {}", path.display()))?;
            return Ok(Some(
                Token::parse(&text).with_context(|| format!("token file {}", path.display()))?,
            ));
        }
        match std::env::var("RAFT_KV_TOKEN") {
            Ok(text) if !text.trim().is_empty() => {
                Ok(Some(Token::parse(&text).context("RAFT_KV_TOKEN")?))
            }
            _ => Ok(None),
        }
    }

    /// A client of `endpoint` with these credentials.
    fn client(&self, endpoint: &str) -> Result<Client> {
        Ok(Client::with_options(&[endpoint], self.options()?)?)
    }

    /// Like [`Creds::client`], each request allowed up to `timeout`.
    fn client_waiting(&self, endpoint: &str, timeout: std::time::Duration) -> Result<Client> {
        let options = ClientOptions {
            request_timeout: timeout,
            ..self.options()?
        };
        Ok(Client::with_options(&[endpoint], options)?)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run node N of the cluster described by the file.
    Serve {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        id: u64,
        /// Join a running cluster through this member's HTTP endpoint
        /// (instead of bootstrapping the file's members).
        #[arg(long, conflicts_with = "bootstrap")]
        join: Option<String>,
        /// Found a one-node cluster if this node has no data and its file
        /// names only itself (without it such a node refuses to start).
        #[arg(long)]
        bootstrap: bool,
        /// Threads of this node's async runtime: 1 runs the whole node on
        /// one thread, which is fastest when several nodes share a small
        /// machine (no hand-offs between threads; `cargo xtask` passes it
        /// for local clusters); default: one per core.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        worker_threads: Option<u16>,
    },
    /// Write a development CA, each node's certificates (QUIC, and HTTPS
    /// for the client API's address) and the first admin token
    /// (`admin.token`, with its hash in `admin.token.sha256` for the
    /// nodes). Keeps what exists: run it again after adding nodes.
    Certs {
        #[arg(long)]
        config: PathBuf,
        /// Default: the file's TLS dir (`certs/` next to it unless `[tls] dir` says otherwise).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Set KEY to VALUE.
    Put {
        key: String,
        value: String,
        #[arg(long, env = "RAFT_KV_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
        endpoint: String,
    },
    /// Print KEY's value (linearizable unless --stale).
    Get {
        key: String,
        #[arg(long)]
        stale: bool,
        #[arg(long, env = "RAFT_KV_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
        endpoint: String,
    },
    /// Delete KEY.
    Delete {
        key: String,
        #[arg(long, env = "RAFT_KV_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
        endpoint: String,
    },
    /// Set KEY to NEW if it holds EXPECTED (`--absent` / `--delete` for none).
    Cas {
        key: String,
        expected: Option<String>,
        new: Option<String>,
        /// Succeed only if KEY is absent (instead of EXPECTED).
        #[arg(long)]
        absent: bool,
        /// Delete KEY on success (instead of NEW).
        #[arg(long)]
        delete: bool,
        #[arg(long, env = "RAFT_KV_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
        endpoint: String,
    },
    /// Add, promote or remove cluster members.
    Member {
        #[command(subcommand)]
        action: MemberCmd,
    },
    /// Hand leadership to node ID.
    TransferLeader {
        id: u64,
        #[arg(long, env = "RAFT_KV_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
        endpoint: String,
    },
    /// Print the node's status.
    Status {
        #[arg(long, env = "RAFT_KV_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
        endpoint: String,
    },
    /// Back up the cluster's state, or seed a new cluster from a backup.
    Snapshot {
        #[command(subcommand)]
        action: SnapshotCmd,
    },
    /// Create, revoke or list the client API's bearer tokens (needs an
    /// admin token).
    Token {
        #[command(subcommand)]
        action: TokenCmd,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Make a token, record it on the cluster (which keeps only its hash)
    /// and print it once, or write it to --out (mode 0600).
    Create {
        /// read (GET, status), write (read + PUT, DELETE, CAS) or admin
        /// (write + membership, leadership, backups, tokens).
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Its name: letters, digits, `-` and `_`.
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, env = "RAFT_KV_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
        endpoint: String,
    },
    /// Revoke token NAME on every node.
    Revoke {
        name: String,
        #[arg(long, env = "RAFT_KV_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
        endpoint: String,
    },
    /// List the tokens' names and roles.
    List {
        #[arg(long, env = "RAFT_KV_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
        endpoint: String,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
        .map_err(|e: raft_kv_example::token::TokenError| e.to_string())
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Save a consistent backup of the cluster's state (from the leader,
    /// holding every acknowledged write) to FILE.
    Save {
        file: PathBuf,
        #[arg(long, env = "RAFT_KV_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
        endpoint: String,
    },
    /// Seed node ID of a new cluster (the nodes of --config) from FILE.
    /// Run it for every node, then start them with `serve`.
    Restore {
        file: PathBuf,
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        id: u64,
    },
}

#[derive(Subcommand)]
enum MemberCmd {
    /// Add node ID (reached at RAFT_ADDR / HTTP_ADDR) as a learner.
    Add {
        id: u64,
        raft_addr: String,
        http_addr: String,
        #[arg(long, env = "RAFT_KV_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
        endpoint: String,
    },
    /// Make learner ID a voter.
    Promote {
        id: u64,
        #[arg(long, env = "RAFT_KV_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
        endpoint: String,
    },
    /// Make voter ID a learner (it keeps its data and the log).
    Demote {
        id: u64,
        #[arg(long, env = "RAFT_KV_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
        endpoint: String,
    },
    /// Remove node ID (voter or learner) from the cluster.
    Remove {
        id: u64,
        #[arg(long, env = "RAFT_KV_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
        endpoint: String,
    },
}

/// The runtime for `threads` workers: one thread is a current-thread
/// runtime. On the 2-core bench machine running three nodes, that took the
/// single-client write p50 from 1.17-1.39 ms to 0.89-0.98 ms and 256-client
/// writes from 8,100-8,300/s to 8,400-9,700/s (three runs each): six worker
/// threads woke each other across two cores for every hand-off, and stole
/// each other's tasks.
fn runtime(threads: Option<u16>) -> std::io::Result<tokio::runtime::Runtime> {
    match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n.into())
            .enable_all()
            .build(),
        None => tokio::runtime::Runtime::new(),
    }
}

/// glibc's malloc took about 15% of a node's CPU at 256 clients (perf:
/// `_int_malloc`, `_int_free`, `unlink_chunk`, `malloc_consolidate`); a
/// node allocates and frees small buffers across threads all the time
/// (requests, entries, frames), which mimalloc's per-thread pages serve
/// without those locks and consolidations.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEFAULT_ENDPOINT: &str = "https://127.0.0.1:8001";

/// Membership requests may wait for a learner to catch up.
const MEMBERSHIP_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let (serving, threads) = match &cli.command {
        Cmd::Serve { worker_threads, .. } => (true, *worker_threads),
        _ => (false, None),
    };
    let runtime = match runtime(threads) {
        Ok(r) => {
            if serving {
                let threads = r.metrics().num_workers();
                tracing::info!(threads, "runtime started");
            }
            r
        }
        Err(e) => {
            eprintln!("raft-kv: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, cli.creds)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("raft-kv: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd, creds: Creds) -> Result<()> {
    match cmd {
        Cmd::Serve {
            config,
            id,
            join,
            bootstrap,
            ..
        } => {
            let file = ClusterFile::load(&config)?;
            let node = Node::start_with_token(
                &file,
                NodeId(id),
                join.as_deref(),
                bootstrap,
                creds.token()?,
            )
            .await?;
            node.run_until(shutdown_signal()).await;
            Ok(())
        }
        Cmd::Certs { config, out } => {
            let file = ClusterFile::load(&config)?;
            let dir = out.unwrap_or_else(|| file.tls_dir.clone());
            let issued = raft_kv_example::certs::issue(&file, &dir)?;
            println!("{issued}");
            Ok(())
        }
        Cmd::Token { action } => token(action, &creds).await,
        Cmd::Put {
            key,
            value,
            endpoint,
        } => {
            let r = creds.client(&endpoint)?.put(&key, value.as_bytes()).await?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Cmd::Get {
            key,
            stale,
            endpoint,
        } => {
            match creds.client(&endpoint)?.get(&key, stale).await? {
                Some(v) => println!("{}", String::from_utf8_lossy(&v)),
                None => anyhow::bail!("key `{key}` not found"),
            }
            Ok(())
        }
        Cmd::Delete { key, endpoint } => {
            let r = creds.client(&endpoint)?.delete(&key).await?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Cmd::Cas {
            key,
            expected,
            new,
            absent,
            delete,
            endpoint,
        } => {
            let (expected, new) = cas_args(expected, new, absent, delete)?;
            let r = creds
                .client(&endpoint)?
                .cas(&key, expected.as_deref(), new.as_deref())
                .await?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Cmd::Member { action } => {
            let r = match action {
                MemberCmd::Add {
                    id,
                    raft_addr,
                    http_addr,
                    endpoint,
                } => {
                    creds
                        .client_waiting(&endpoint, MEMBERSHIP_WAIT)?
                        .add_member(id, &raft_addr, &http_addr)
                        .await?
                }
                MemberCmd::Promote { id, endpoint } => {
                    creds
                        .client_waiting(&endpoint, MEMBERSHIP_WAIT)?
                        .promote_member(id)
                        .await?
                }
                MemberCmd::Demote { id, endpoint } => {
                    creds
                        .client_waiting(&endpoint, MEMBERSHIP_WAIT)?
                        .demote_member(id)
                        .await?
                }
                MemberCmd::Remove { id, endpoint } => {
                    creds
                        .client_waiting(&endpoint, MEMBERSHIP_WAIT)?
                        .remove_member(id)
                        .await?
                }
            };
            println!("{r}");
            Ok(())
        }
        Cmd::TransferLeader { id, endpoint } => {
            println!("{}", creds.client(&endpoint)?.transfer_leader(id).await?);
            Ok(())
        }
        Cmd::Snapshot {
            action: SnapshotCmd::Save { file, endpoint },
        } => {
            let saved = creds.client(&endpoint)?.save_snapshot(&file).await?;
            println!("{}", serde_json::to_string(&saved)?);
            Ok(())
        }
        Cmd::Snapshot {
            action: SnapshotCmd::Restore { file, config, id },
        } => {
            let cluster = ClusterFile::load(&config)?;
            let at = raft_kv_example::server::restore(&cluster, NodeId(id), &file).await?;
            println!(
                "node {id} restored at index {} (term {}); start it with serve",
                at.index, at.term
            );
            Ok(())
        }
        Cmd::Status { endpoint } => {
            let s = creds.client(&endpoint)?.status().await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&s).context("encoding status")?
            );
            Ok(())
        }
    }
}

/// `raft-kv token ...`.
async fn token(action: TokenCmd, creds: &Creds) -> Result<()> {
    match action {
        TokenCmd::Create {
            role,
            name,
            out,
            endpoint,
        } => {
            let token = Token::generate(&name)?;
            if let Some(path) = &out {
                // Before the cluster knows it: a token that cannot be kept
                // is never made.
                raft_kv_example::certs::write_secret(path, token.expose())?;
            }
            let created = creds.client(&endpoint)?.create_token(&token, role).await;
            if let Err(e) = created {
                if let Some(path) = &out {
                    let _ = std::fs::remove_file(path);
                }
                return Err(e.into());
            }
            match &out {
                Some(path) => println!("token `{name}` ({role}) written to {}", path.display()),
                None => println!("{}", token.expose()),
            }
            Ok(())
        }
        TokenCmd::Revoke { name, endpoint } => {
            let r = creds.client(&endpoint)?.revoke_token(&name).await?;
            println!("{r}");
            Ok(())
        }
        TokenCmd::List { endpoint } => {
            let r = creds.client(&endpoint)?.list_tokens().await?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(())
        }
    }
}

/// `cas KEY EXPECTED NEW`, `cas KEY --absent NEW`, `cas KEY EXPECTED --delete`.
fn cas_args(
    first: Option<String>,
    second: Option<String>,
    absent: bool,
    delete: bool,
) -> Result<(Option<String>, Option<String>)> {
    let mut given = [first, second].into_iter().flatten();
    let expected = if absent {
        None
    } else {
        Some(given.next().context("missing EXPECTED (or --absent)")?)
    };
    let new = if delete {
        None
    } else {
        Some(given.next().context("missing NEW (or --delete)")?)
    };
    anyhow::ensure!(given.next().is_none(), "too many values for cas");
    Ok((expected, new))
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
