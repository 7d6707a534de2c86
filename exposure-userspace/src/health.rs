//! `/healthz` and `/livez` on the healthz address (kube-proxy's port 10256): 200 once the first full
//! sync into the maps is done, 503 before. `/healthz` also answers 503 while this node is being
//! deleted (as kube-proxy does since 1.29, KEP-3836), so load balancers that send to every node
//! (`externalTrafficPolicy: Cluster`) drain it first; `/livez` does not. Both answer 503 when the
//! agent's loop has not come round for [`STALE_AFTER`] (kube-proxy's healthz fails when its syncs
//! stall), so a wedged agent is restarted by its liveness probe.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

/// How long the agent's loop may go without a pass (it passes every 200 ms) before the agent
/// counts as stuck.
pub const STALE_AFTER: Duration = Duration::from_secs(60);

#[derive(Clone, Default)]
pub struct Health {
    synced: Arc<AtomicBool>,
    draining: Arc<AtomicBool>,
    last_pass: Arc<Mutex<Option<Instant>>>,
}

impl Health {
    /// The agent's loop came round (at `now`).
    pub fn pass(&self, now: Instant) {
        if let Ok(mut last) = self.last_pass.lock() {
            *last = Some(now);
        }
    }

    /// How long since the loop's last pass, at `now` (zero before the first).
    fn since_pass(&self, now: Instant) -> Duration {
        self.last_pass
            .lock()
            .ok()
            .and_then(|last| *last)
            .map_or(Duration::ZERO, |last| now.saturating_duration_since(last))
    }

    /// This node is being deleted (its Node has a deletion timestamp or the cluster autoscaler's
    /// `ToBeDeletedByClusterAutoscaler` taint). Returns whether that changed.
    pub fn set_draining(&self, draining: bool) -> bool {
        self.draining.swap(draining, Ordering::AcqRel) != draining
    }
    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::Release);
    }
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }
}

/// The response for a request line's path.
pub fn respond(path: &str, health: &Health) -> (u16, &'static str) {
    respond_at(path, health, Instant::now())
}

fn respond_at(path: &str, health: &Health, now: Instant) -> (u16, &'static str) {
    match path {
        "/healthz" | "/livez" if !health.is_synced() => (503, "not synced yet\n"),
        "/healthz" | "/livez" if health.since_pass(now) > STALE_AFTER => {
            (503, "the agent's loop has stalled\n")
        }
        "/healthz" if health.draining.load(Ordering::Acquire) => {
            (503, "this node is being deleted\n")
        }
        "/healthz" | "/livez" => (200, "ok\n"),
        _ => (404, "not found\n"),
    }
}

pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding healthz address {addr}"))
}

/// An HTTP response.
pub struct Response {
    pub code: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Response {
    pub fn new(code: u16, content_type: &'static str, body: impl Into<String>) -> Self {
        Response {
            code,
            content_type,
            headers: Vec::new(),
            body: body.into(),
        }
    }
}

/// Serves GET requests with `route(path)`; one request per connection.
pub async fn serve(
    listener: TcpListener,
    route: std::sync::Arc<dyn Fn(&str) -> Response + Send + Sync>,
) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let route = route.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n = match tokio::time::timeout(
                std::time::Duration::from_secs(5),
                stream.read(&mut buf),
            )
            .await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let Response {
                code,
                content_type,
                headers,
                body,
            } = route(path);
            let reason = match code {
                200 => "OK",
                503 => "Service Unavailable",
                _ => "Not Found",
            };
            let extra: String = headers
                .iter()
                .map(|(k, v)| format!("{k}: {v}\r\n"))
                .collect();
            let reply = format!(
                "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes()).await;
        });
    }
}

/// The healthz server's routes.
pub fn healthz_routes(health: Health) -> std::sync::Arc<dyn Fn(&str) -> Response + Send + Sync> {
    std::sync::Arc::new(move |path| {
        let (code, body) = respond(path, &health);
        Response::new(code, "text/plain", body)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_follows_sync_state() {
        let h = Health::default();
        assert_eq!(respond("/healthz", &h).0, 503);
        h.set_synced();
        assert_eq!(respond("/healthz", &h).0, 200);
        assert_eq!(respond("/livez", &h).0, 200);
        assert_eq!(respond("/other", &h).0, 404);
        // A node being deleted: load balancers drain it; the agent itself is still alive.
        assert!(h.set_draining(true));
        assert!(!h.set_draining(true), "no change");
        assert_eq!(
            respond("/healthz", &h),
            (503, "this node is being deleted\n")
        );
        assert_eq!(respond("/livez", &h).0, 200);
        assert!(h.set_draining(false));
        assert_eq!(respond("/healthz", &h).0, 200);
        // A loop that stops coming round fails both, until it passes again.
        let t0 = Instant::now();
        h.pass(t0);
        let later = t0 + STALE_AFTER;
        assert_eq!(respond_at("/livez", &h, later).0, 200);
        let stuck = later + Duration::from_secs(1);
        assert_eq!(
            respond_at("/healthz", &h, stuck),
            (503, "the agent's loop has stalled\n")
        );
        assert_eq!(respond_at("/livez", &h, stuck).0, 503);
        h.pass(stuck);
        assert_eq!(respond_at("/livez", &h, stuck).0, 200);
    }

    #[tokio::test]
    async fn serves_http() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let h = Health::default();
        h.set_synced();
        tokio::spawn(serve(listener, healthz_routes(h)));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(out.ends_with("ok\n"));
    }
}
