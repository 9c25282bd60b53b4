//! The client API's listener: TCP, then TLS (unless the cluster file says
//! `[client_api] tls = false`), then HTTP/1.1 by hyper, serving the axum
//! router.
//!
//! What a hostile or broken client can hold is bounded: a TLS handshake
//! must finish within [`HANDSHAKE_TIMEOUT`], each request's headers must
//! arrive within [`HEADER_TIMEOUT`] (which also closes a keep-alive
//! connection idle that long), and at most [`MAX_CONNECTIONS`] are served
//! at once; past that, new connections are closed at once. A slowloris
//! client (headers trickled a byte at a time) holds one slot for at most
//! the header timeout; the router bounds request bodies in size, and in
//! time with the rest of the handler (`crate::http`'s gate).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tracing::{debug, warn};

/// How long a client has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has to send a request's headers, counted from when
/// the connection is ready for the request (so also an idle keep-alive
/// connection's limit).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 4096;

/// What a plain-HTTP request to the HTTPS port gets before the connection
/// is closed: no data, only the hint (as Go's and nginx's servers do).
fn plain_to_tls() -> Vec<u8> {
    let body = r#"{"error":"tls_required","message":"this port serves HTTPS; use https://"}"#;
    format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `app` on `listener` until `stop` resolves; then stops accepting,
/// lets each connection finish the request it is in, and returns once
/// they are all closed. With `tls`, every connection must be TLS.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (closing, closing_rx) = watch::channel(false);
    let mut warned_full = false;
    tokio::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, or the peer left before
                    // accept: not a reason to stop serving.
                    warn!(error = %e, "accepting a client connection failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if !warned_full {
                warn!(
                    max = MAX_CONNECTIONS,
                    "client connections at the limit; closing new ones"
                );
                warned_full = true;
            }
            continue;
        };
        warned_full = false;
        let _ = tcp.set_nodelay(true);
        let (app, acceptor, closing) = (app.clone(), acceptor.clone(), closing_rx.clone());
        tokio::spawn(async move {
            match acceptor {
                Some(acceptor) => {
                    if let Some(tls) = handshake(tcp, &acceptor).await {
                        connection(tls, app, closing).await;
                    } else {
                        debug!(%peer, "client connection closed before or during TLS");
                    }
                }
                None => connection(tcp, app, closing).await,
            }
            drop(slot);
        });
    }
    let _ = closing.send(true);
    // Every connection holds a slot until it is closed.
    let _ = slots.acquire_many(MAX_CONNECTIONS as u32).await;
    Ok(())
}

/// The TLS handshake, bounded by [`HANDSHAKE_TIMEOUT`]. A connection that
/// opens with plain HTTP is told to use `https://` and closed.
async fn handshake(
    mut tcp: TcpStream,
    acceptor: &tokio_rustls::TlsAcceptor,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let work = async {
        let mut first = [0u8; 1];
        tcp.peek(&mut first).await.ok()?;
        // A TLS record starts with its content type (22, a handshake);
        // an HTTP request with a method's first letter.
        if first[0].is_ascii_uppercase() {
            let _ = tcp.write_all(&plain_to_tls()).await;
            let _ = tcp.shutdown().await;
            return None;
        }
        acceptor.accept(tcp).await.ok()
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, work)
        .await
        .ok()
        .flatten()
}

/// One HTTP/1.1 connection, until the client closes it, a timeout ends it,
/// or the server is closing (then after the request in progress).
async fn connection<S>(io: S, app: Router, mut closing: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true)
        // A client that shuts its write side after the request still gets
        // the answer.
        .half_close(true)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
    tokio::pin!(conn);
    let closed = async move {
        // Ends when the server closes (or is gone).
        let _ = closing.wait_for(|c| *c).await;
    };
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                debug!(error = %e, "client connection ended");
            }
            return;
        }
        () = closed => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}
