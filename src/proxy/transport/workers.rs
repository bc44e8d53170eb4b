//! The public listener's accept loop and worker pool: one single-threaded runtime per worker
//! (bound to a CPU when asked), accepted connections dispatched to the least busy worker, shed
//! with a 503 when every queue is full, and served by the client fast path (`front`) or hyper.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue};
use hyper_util::rt::TokioIo;
use prometheus::IntCounter;
use tokio::net::TcpListener;

use crate::proxy::server::Gateway;

/// Worker threads for the public listener: `APITREE_WORKERS`, else one per CPU.
pub fn default_workers() -> usize {
    std::env::var("APITREE_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n: &usize| *n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

/// How the public listener treats its clients: how long it waits on them (and on in-flight
/// requests at shutdown), which HTTP/1.1 loop serves them, how many accepted connections may
/// wait for a worker.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// A request head must be whole this long after the connection's start (the first head)
    /// or after its first byte (later heads).
    pub header_read: Duration,
    /// A kept-alive connection idle this long between requests is closed.
    pub keep_alive: Duration,
    /// A response the client takes nothing of for this long closes its connection.
    pub send: Duration,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// Plain requests on the gateway's own loop (`front`); false: hyper's server only.
    pub client_fast_path: bool,
    /// Accepted connections that may wait for each worker; more are shed with a 503.
    pub accept_queue: usize,
    /// Whether workers are bound to CPUs of their own (`workerCpuAffinity`).
    pub cpu_affinity: crate::proxy::config::CpuAffinity,
    /// TLS on the public listener (`tls:`); None: plain HTTP.
    pub tls: Option<Arc<crate::proxy::tls::ServerTls>>,
    /// TLS on the admin port (`adminTls`): HTTP/1.1 with the listener's certificate.
    pub admin_tls: bool,
}

impl ServerSettings {
    /// The config's `headerReadTimeout`, `keepAliveTimeout`, `sendTimeout`, `shutdownGrace`,
    /// `clientFastPath` and `acceptQueue`.
    pub fn of(cfg: &crate::proxy::config::ProxyConfig) -> Self {
        Self {
            header_read: cfg.header_read_timeout.as_std(),
            keep_alive: cfg.keep_alive_timeout.as_std(),
            send: cfg.send_timeout.as_std(),
            shutdown_grace: cfg.shutdown_grace.as_std(),
            client_fast_path: cfg.client_fast_path,
            accept_queue: cfg.accept_queue.max(1),
            cpu_affinity: cfg.worker_cpu_affinity,
            tls: None,
            admin_tls: cfg.admin_tls,
        }
    }
}

/// Hands accepted connections to the workers, round-robin, through bounded queues. When every
/// worker's queue is full the connection is shed: answered 503 with `Retry-After` and closed,
/// and counted, instead of queued without limit (linkerd2-proxy's load shedding).
pub struct Dispatch {
    queues: Vec<tokio::sync::mpsc::Sender<Accepted>>,
    next: usize,
    shed: IntCounter,
    /// Plain HTTP: a shed connection is told 503 (over TLS it is only closed: a plaintext
    /// answer would reach the client as a broken handshake).
    answer_shed: bool,
}

/// What a shed connection is told. Written without reading the request: nothing was read.
const SHED_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 94\r\n\r\n{\"error\":\"the gateway is overloaded; retry in a second\",\"code\":\"overloaded\",\"request_id\":null}";

impl Dispatch {
    pub fn new(queues: Vec<tokio::sync::mpsc::Sender<Accepted>>, shed: IntCounter) -> Self {
        Self {
            queues,
            next: 0,
            shed,
            answer_shed: true,
        }
    }

    /// Sheds by closing only (the listener speaks TLS).
    pub fn closing_only(mut self) -> Self {
        self.answer_shed = false;
        self
    }

    /// Queues the connection for the next worker with room; sheds it when none has any.
    pub fn hand_out(&mut self, mut conn: Accepted) {
        let n = self.queues.len();
        for i in 0..n {
            let queue = &self.queues[(self.next + i) % n];
            match queue.try_send(conn) {
                Ok(()) => {
                    self.next = (self.next + i + 1) % n;
                    return;
                }
                Err(e) => conn = e.into_inner(),
            }
        }
        self.shed.inc();
        if self.answer_shed {
            // Best effort on a non-blocking socket: a full send buffer only loses the courtesy.
            let _ = std::io::Write::write(&mut conn.0, SHED_RESPONSE);
        }
        let _ = conn.0.shutdown(std::net::Shutdown::Write);
    }
}

/// Runs the public and admin listeners until `shutdown` resolves, then drains in-flight
/// requests for up to `settings.shutdown_grace`.
/// What every accept loop does when `accept` fails: the process is out of file descriptors
/// (or memory, or the kernel's connection table is full), and the listener stays readable, so
/// trying again at once would spin a core and starve everything else. It waits a little,
/// and says so — once per [`ACCEPT_FAILED_LOG_EVERY`].
pub async fn accept_failed(e: &std::io::Error) {
    static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    {
        let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|at| at.elapsed() >= ACCEPT_FAILED_LOG_EVERY) {
            tracing::error!("cannot accept connections: {e}; waiting {ACCEPT_PAUSE:?} between tries (raise the open-files limit if it is too low)");
            *last = Some(std::time::Instant::now());
        }
    }
    tokio::time::sleep(ACCEPT_PAUSE).await;
}

/// How long an accept loop waits after `accept` failed.
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(50);
/// At most one log line per this long about failed accepts.
const ACCEPT_FAILED_LOG_EVERY: Duration = Duration::from_secs(10);

pub async fn run(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()>,
    settings: ServerSettings,
) {
    run_with_workers(
        gateway,
        listener,
        admin,
        shutdown,
        settings,
        default_workers(),
    )
    .await
}

pub type Accepted = (std::net::TcpStream, SocketAddr);

/// Like [`run`] with an explicit number of workers. Each worker is a thread with its own
/// single-threaded runtime and upstream connection pool (like nginx's worker processes): a
/// connection, its requests and their upstream calls stay on one thread, bound to a CPU of its
/// own when [`super::affinity::plan`] says so. This task accepts and hands connections out
/// round-robin, and serves the admin port itself.
pub async fn run_with_workers(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()>,
    settings: ServerSettings,
    workers: usize,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let workers = workers.max(1);
    let mut senders = Vec::with_capacity(workers);
    let mut finished = Vec::with_capacity(workers);
    let cpus = super::affinity::plan(
        settings.cpu_affinity,
        &super::affinity::allowed_cpus(),
        workers,
    );
    match &cpus {
        Some(cpus) => tracing::info!(?cpus, "proxy workers bound one per CPU"),
        None => tracing::info!(
            workers,
            "proxy workers placed by the kernel (workerCpuAffinity off, or not one worker per CPU the process may use)"
        ),
    }
    for i in 0..workers {
        let (tx, rx) = tokio::sync::mpsc::channel::<Accepted>(settings.accept_queue.max(1));
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let gw = gateway.clone();
        let stop = stop_rx.clone();
        let settings = settings.clone();
        let cpu = cpus.as_ref().map(|cpus| cpus[i]);
        let spawned = std::thread::Builder::new()
            .name(format!("proxy-worker-{i}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    if let Err(e) = super::affinity::bind_current_thread(cpu) {
                        tracing::warn!(
                            "proxy worker {i} stays unbound: cannot bind it to CPU {cpu}: {e}"
                        );
                    }
                }
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(worker(gw, rx, stop, settings)),
                    Err(e) => tracing::error!("cannot start proxy worker {i}: {e}"),
                }
                let _ = done_tx.send(());
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start proxy worker thread {i}: {e}");
            continue;
        }
        senders.push(tx);
        finished.push(done_rx);
    }

    let admin_graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let admin_tls = settings
        .tls
        .clone()
        .filter(|_| settings.admin_tls)
        .map(|tls| (tls.http1_acceptor(), tls));
    let http = http1_builder(settings.header_read);
    tokio::pin!(shutdown);
    let has_workers = !senders.is_empty();
    let mut dispatch = Dispatch::new(senders, gateway.metrics.connections_shed.clone());
    if settings.tls.is_some() {
        dispatch = dispatch.closing_only();
    }
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        accept_failed(&e).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let Ok(std_stream) = stream.into_std() else { continue };
                if has_workers {
                    dispatch.hand_out((std_stream, peer));
                }
            }
            accepted = admin.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        accept_failed(&e).await;
                        continue;
                    }
                };
                let gw = gateway.clone();
                let hsts = admin_tls.as_ref().map(|(_, tls)| tls.hsts.clone());
                let service = hyper::service::service_fn(move |req| {
                    let gw = gw.clone();
                    let mut resp = gw.admin(&req);
                    if let Some(hsts) = &hsts {
                        resp.headers_mut().insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
                    }
                    async move { Ok::<_, Infallible>(resp) }
                });
                match admin_tls.clone() {
                    None => {
                        let conn = admin_graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                        tokio::spawn(async move { let _ = conn.await; });
                    }
                    Some((acceptor, tls)) => {
                        let (http, header_read) = (http.clone(), settings.header_read);
                        tokio::spawn(async move {
                            let handshake = tokio::time::timeout(header_read, acceptor.accept(stream)).await;
                            if let Some(stream) = tls.accepted(handshake) {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        });
                    }
                }
            }
        }
    }
    drop(listener);
    gateway.start_draining();
    tracing::info!(
        grace_secs = settings.shutdown_grace.as_secs(),
        "shutting down: draining in-flight requests"
    );
    let _ = stop_tx.send(true);
    drop(dispatch);
    for done in finished {
        let _ = done.await;
    }
    let _ = tokio::time::timeout(Duration::from_millis(100), admin_graceful.shutdown()).await;
}

/// hyper's HTTP/1 server as the gateway's listeners use it; `header_read`: hyper's own
/// header-read timeout (None where the caller keeps that deadline itself).
pub(crate) fn http1_builder(
    header_read: impl Into<Option<Duration>>,
) -> hyper::server::conn::http1::Builder {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(true)
        .writev(false)
        // The worker's own deadline table on worker threads; tokio's timer elsewhere.
        .timer(super::timer::WorkerTimer)
        .header_read_timeout(header_read)
        // One head-size limit on both client paths: the fast path hands longer heads here,
        // and hyper answers them 431 (its buffer limit alone lets a head that arrives in a
        // few large reads through).
        .max_header_size(super::front::MAX_HEAD_BYTES)
        // A client that half-closes after its request still gets the response.
        .half_close(true);
    http
}

/// One worker: serves the connections it is handed until told to stop, then drains.
async fn worker(
    gateway: Arc<Gateway>,
    mut conns: tokio::sync::mpsc::Receiver<Accepted>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    settings: ServerSettings,
) {
    let drain = super::drain::Drain::new();
    tokio::spawn(super::timer::install());
    tokio::spawn(super::upstream::close_idle_periodically());
    loop {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
            next = conns.recv() => {
                let Some((std_stream, peer)) = next else { break };
                let Ok(stream) = tokio::net::TcpStream::from_std(std_stream) else { continue };
                let forwarded_for = HeaderValue::from_str(&peer.ip().to_string()).ok();
                let settings = settings.clone();
                match settings.tls.clone() {
                    Some(tls) => {
                        let conn = super::front::serve_tls(stream, tls, gateway.clone(), forwarded_for, drain.clone(), settings);
                        tokio::spawn(drain.watch(conn));
                    }
                    None => {
                        let conn = super::front::serve(stream, gateway.clone(), forwarded_for, drain.clone(), settings);
                        tokio::spawn(drain.watch(conn));
                    }
                }
            }
        }
    }
    if tokio::time::timeout(settings.shutdown_grace, drain.drain())
        .await
        .is_err()
    {
        tracing::warn!("drain period ended with requests still in flight");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected pair: the gateway's accepted end and the client's end.
    fn pair(listener: &std::net::TcpListener) -> (Accepted, std::net::TcpStream) {
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        ((server, peer), client)
    }

    #[test]
    fn connections_wait_in_bounded_queues_and_are_shed_with_503_when_all_are_full() {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (tx_a, mut rx_a) = tokio::sync::mpsc::channel::<Accepted>(1);
        let (tx_b, rx_b) = tokio::sync::mpsc::channel::<Accepted>(2);
        let shed = IntCounter::new("shed", "shed").unwrap();
        let mut dispatch = Dispatch::new(vec![tx_a, tx_b], shed.clone());
        // Round-robin while there is room: a, b, then b again (a is full), then b is full.
        let mut clients = Vec::new();
        for _ in 0..3 {
            let (conn, client) = pair(&listener);
            dispatch.hand_out(conn);
            clients.push(client);
        }
        assert_eq!(shed.get(), 0);
        assert_eq!(rx_a.len(), 1);
        assert_eq!(rx_b.len(), 2);
        // Every queue full: the fourth is answered 503 and closed, not queued.
        let (conn, mut client) = pair(&listener);
        dispatch.hand_out(conn);
        assert_eq!(shed.get(), 1);
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(head.contains("retry-after: 1"));
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(body.len(), length);
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["code"], "overloaded");
        // A worker takes one: room again, no shedding.
        assert!(rx_a.try_recv().is_ok());
        let (conn, _client) = pair(&listener);
        dispatch.hand_out(conn);
        assert_eq!(shed.get(), 1);
        assert_eq!(rx_a.len(), 1);
    }
}
