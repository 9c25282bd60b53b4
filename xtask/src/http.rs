//! A blocking HTTP client for the `raft-kv` API (and etcd's JSON gateway in
//! benchmarks). Redirects are followed by hand, so a chaos run knows exactly
//! what happened to each request.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, bail};
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};

/// What became of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome<T> {
    Ok(T),
    /// Definitely did not take effect (refused, redirected nowhere, 503).
    Fail(String),
    /// May or may not have taken effect (timeout, connection lost, 504).
    Unknown(String),
}

impl<T> Outcome<T> {
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Outcome<U> {
        match self {
            Outcome::Ok(v) => Outcome::Ok(f(v)),
            Outcome::Fail(e) => Outcome::Fail(e),
            Outcome::Unknown(e) => Outcome::Unknown(e),
        }
    }
}

/// `GET /v1/status`: the type the server answers with.
pub use raft_kv_example::api::Status;

/// Resolves IP-literal hosts in place. ureq resolves the host on every
/// request, pooled connection or not, and with a timeout set it does so on
/// a thread it spawns for the purpose: at 256 bench clients the load
/// generator spent about half the machine creating and tearing down
/// threads (perf: `pthread_create`, `munmap` TLB shootdowns), CPU taken
/// from the servers it measures. Our URLs name addresses, so none of that
/// is needed; host names still go through ureq's resolver.
#[derive(Debug, Default)]
struct LiteralResolver(DefaultResolver);

impl Resolver for LiteralResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let literal = uri
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok());
        match literal {
            Some(addr) => {
                let mut addrs = self.empty();
                addrs.push(addr);
                Ok(addrs)
            }
            None => self.0.resolve(uri, config, timeout),
        }
    }
}

#[derive(Clone)]
pub struct Http {
    agent: ureq::Agent,
    creds: Credentials,
    timeout: Duration,
}

/// How a secured raft-kv cluster is reached: the CA its `https://`
/// certificates come from and the bearer token to send. Empty for plain
/// HTTP without tokens (etcd).
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// The cluster CA (`ca.pem`).
    pub ca_pem: Option<Vec<u8>>,
    /// The whole token (`rkv.<name>.<secret>`).
    pub token: Option<String>,
}

impl Credentials {
    /// The CA and admin token `raft-kv certs` wrote into `tls_dir`; what
    /// of them exists.
    pub fn from_tls_dir(tls_dir: &std::path::Path) -> Result<Credentials> {
        let read = |name: &str| -> Result<Option<Vec<u8>>> {
            match std::fs::read(tls_dir.join(name)) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(anyhow::anyhow!("{}: {e}", tls_dir.join(name).display())),
            }
        };
        Ok(Credentials {
            ca_pem: read("ca.pem")?,
            token: read("admin.token")?.map(|t| String::from_utf8_lossy(&t).trim().to_string()),
        })
    }

    /// The `Authorization` header's value, if there is a token.
    pub fn authorization(&self) -> Option<String> {
        self.token.as_ref().map(|t| format!("Bearer {t}"))
    }

    /// A rustls client configuration trusting the CA (ring, as everywhere
    /// in the workspace), for the load generator.
    pub fn tls(&self) -> Result<std::sync::Arc<rustls::ClientConfig>> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_pem.as_deref().unwrap_or_default()) {
            roots.add(cert?)?;
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(std::sync::Arc::new(config))
    }
}

/// A raw answer.
pub struct Answer {
    pub status: u16,
    pub location: Option<String>,
    /// The `Replayed: true` header: a retry answered from its session.
    pub replayed: bool,
    pub body: Vec<u8>,
}

impl Http {
    /// Plain HTTP, no token (etcd).
    pub fn new(timeout: Duration) -> Http {
        Http::secured(timeout, Credentials::default())
    }

    /// `https://` checked against `creds`' CA, and its token on every
    /// request.
    pub fn secured(timeout: Duration, creds: Credentials) -> Http {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(pem) = &creds.ca_pem {
            let certs: Vec<_> = ureq::tls::parse_pem(pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c.to_owned()),
                    _ => None,
                })
                .collect();
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(certs)));
        }
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .max_redirects(0)
            .http_status_as_error(false)
            .max_idle_connections_per_host(64)
            .tls_config(tls.build())
            .build();
        let agent = ureq::Agent::with_parts(
            config,
            DefaultConnector::default(),
            LiteralResolver::default(),
        );
        Http {
            agent,
            creds,
            timeout,
        }
    }

    /// The same credentials with another timeout.
    pub fn with_timeout(&self, timeout: Duration) -> Http {
        Http::secured(timeout, self.creds.clone())
    }

    /// This client's credentials.
    pub fn credentials(&self) -> &Credentials {
        &self.creds
    }

    /// This client's timeout per request.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// One request, no redirects. `Err` carries whether the request surely
    /// never reached the server.
    pub fn send(
        &self,
        method: &str,
        url: &str,
        body: Option<&[u8]>,
    ) -> Result<Answer, (bool, String)> {
        self.send_with(method, url, body, &[])
    }

    /// [`Http::send`] with extra request headers.
    pub fn send_with(
        &self,
        method: &str,
        url: &str,
        body: Option<&[u8]>,
        headers: &[(&str, String)],
    ) -> Result<Answer, (bool, String)> {
        let auth = self.creds.authorization();
        let mut all: Vec<(&str, String)> = headers.to_vec();
        if let Some(a) = auth {
            all.push(("authorization", a));
        }
        let headers = &all[..];
        let result = match (method, body) {
            ("GET", _) => with_headers(self.agent.get(url), headers).call(),
            ("DELETE", _) => with_headers(self.agent.delete(url), headers).call(),
            ("PUT", b) => with_headers(self.agent.put(url), headers).send(b.unwrap_or_default()),
            ("POST", b) => with_headers(self.agent.post(url), headers)
                .header("content-type", "application/json")
                .send(b.unwrap_or_default()),
            _ => return Err((true, format!("unsupported method {method}"))),
        };
        match result {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let location = resp
                    .headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let replayed = resp.headers().get("replayed").is_some_and(|v| v == "true");
                let body = resp
                    .body_mut()
                    .with_config()
                    .limit(64 << 20)
                    .read_to_vec()
                    .map_err(|e| (false, e.to_string()))?;
                Ok(Answer {
                    status,
                    location,
                    replayed,
                    body,
                })
            }
            Err(e) => Err((never_sent(&e), e.to_string())),
        }
    }

    /// Follows up to 5 redirects; classifies the final answer.
    pub fn call(&self, method: &str, url: &str, body: Option<&[u8]>) -> Outcome<Answer> {
        self.call_with(method, url, body, &[])
    }

    /// [`Http::call`] with extra request headers.
    pub fn call_with(
        &self,
        method: &str,
        url: &str,
        body: Option<&[u8]>,
        headers: &[(&str, String)],
    ) -> Outcome<Answer> {
        let mut url = url.to_string();
        for _ in 0..5 {
            match self.send_with(method, &url, body, headers) {
                Ok(a) if a.status == 307 => match a.location {
                    Some(l) => url = l,
                    None => return Outcome::Fail("307 without Location".into()),
                },
                Ok(a) if a.status == 503 => return Outcome::Fail(text(&a.body)),
                Ok(a) if a.status == 504 => return Outcome::Unknown(text(&a.body)),
                Ok(a) if a.status >= 500 => {
                    return Outcome::Unknown(format!("{}: {}", a.status, text(&a.body)));
                }
                Ok(a) => return Outcome::Ok(a),
                Err((true, e)) => return Outcome::Fail(e),
                Err((false, e)) => return Outcome::Unknown(e),
            }
        }
        Outcome::Fail("too many redirects".into())
    }

    pub fn status(&self, endpoint: &str) -> Result<Status> {
        let a = match self.send("GET", &format!("{endpoint}/v1/status"), None) {
            Ok(a) if a.status == 200 => a,
            Ok(a) => bail!("status: HTTP {}", a.status),
            Err((_, e)) => bail!("status: {e}"),
        };
        Ok(serde_json::from_slice(&a.body)?)
    }

    /// `PUT /v1/kv/{key}`.
    pub fn put(&self, endpoint: &str, key: &str, value: &str) -> Outcome<()> {
        match self.call(
            "PUT",
            &format!("{endpoint}/v1/kv/{key}"),
            Some(value.as_bytes()),
        ) {
            Outcome::Ok(a) if a.status == 200 => Outcome::Ok(()),
            Outcome::Ok(a) => Outcome::Fail(format!("{}: {}", a.status, text(&a.body))),
            Outcome::Fail(e) => Outcome::Fail(e),
            Outcome::Unknown(e) => Outcome::Unknown(e),
        }
    }

    /// `GET /v1/kv/{key}` (linearizable unless `stale`).
    pub fn get(&self, endpoint: &str, key: &str, stale: bool) -> Outcome<Option<String>> {
        let q = if stale { "?consistency=stale" } else { "" };
        match self.call("GET", &format!("{endpoint}/v1/kv/{key}{q}"), None) {
            Outcome::Ok(a) if a.status == 200 => Outcome::Ok(Some(text(&a.body))),
            Outcome::Ok(a) if a.status == 404 => Outcome::Ok(None),
            Outcome::Ok(a) => Outcome::Fail(format!("{}: {}", a.status, text(&a.body))),
            // A read that did not answer has no effect either way.
            Outcome::Fail(e) | Outcome::Unknown(e) => Outcome::Fail(e),
        }
    }
}

fn with_headers<B>(
    mut req: ureq::RequestBuilder<B>,
    headers: &[(&str, String)],
) -> ureq::RequestBuilder<B> {
    for (name, value) in headers {
        req = req.header(*name, value);
    }
    req
}

fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

/// Whether the request cannot have reached the server.
fn never_sent(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::ConnectionFailed | ureq::Error::HostNotFound | ureq::Error::BadUri(_) => true,
        ureq::Error::Io(io) => io.kind() == std::io::ErrorKind::ConnectionRefused,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_literals_resolve_in_place_and_names_fall_through() {
        let r = LiteralResolver::default();
        let config = ureq::config::Config::default();
        let uri: ureq::http::Uri = "http://127.0.0.1:7301/v1/kv/a".parse().unwrap();
        let addrs = r.resolve(&uri, &config, NextTimeout::default()).unwrap();
        assert_eq!(
            &addrs[..],
            &["127.0.0.1:7301".parse::<SocketAddr>().unwrap()]
        );
        let uri: ureq::http::Uri = "http://[::1]:2379/".parse().unwrap();
        let addrs = r.resolve(&uri, &config, NextTimeout::default()).unwrap();
        assert_eq!(&addrs[..], &["[::1]:2379".parse::<SocketAddr>().unwrap()]);
        // A name is not a literal: ureq's resolver answers it.
        let uri: ureq::http::Uri = "http://localhost:2379/".parse().unwrap();
        let addrs = r.resolve(&uri, &config, NextTimeout::default()).unwrap();
        assert!(
            addrs
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 2379)
        );
    }
}
