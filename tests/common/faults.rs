//! A TCP pass-through a test can break: it forwards to a real server (PostgreSQL, Redis) until
//! it is taken down, then drops every open connection and refuses new ones (accepted and closed
//! at once, as a restarting server's port does) until it is brought back up. It can also go
//! down by itself just before forwarding the client's `n`-th write, so a test can cut a
//! conversation at every point in turn.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

struct State {
    down: AtomicBool,
    /// Bumped whenever the proxy goes down; every live connection ends when it changes.
    cuts: watch::Sender<u64>,
    /// Client writes forwarded since the last `cut_at`.
    writes: AtomicUsize,
    /// Go down before forwarding this write (usize::MAX: never).
    cut_at: AtomicUsize,
}

impl State {
    fn go_down(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.go_down();
        self.task.abort();
    }
}

impl FaultProxy {
    /// Forwards a loopback port to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            down: AtomicBool::new(false),
            cuts: watch::channel(0).0,
            writes: AtomicUsize::new(0),
            cut_at: AtomicUsize::new(usize::MAX),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if st.down.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                tokio::spawn(relay(client, target, st.clone()));
            }
        });
        Self { addr, state, task }
    }

    /// The server "stops": open connections are dropped, new ones refused.
    pub fn down(&self) {
        self.state.go_down();
    }

    /// The server is back.
    pub fn up(&self) {
        self.state.cut_at.store(usize::MAX, Ordering::SeqCst);
        self.state.down.store(false, Ordering::SeqCst);
    }

    /// Goes down just before forwarding the `n`-th client write from now (1 = the next one).
    pub fn down_at_write(&self, n: usize) {
        self.state.writes.store(0, Ordering::SeqCst);
        self.state.cut_at.store(n, Ordering::SeqCst);
    }

    /// Client writes forwarded since the last [`FaultProxy::down_at_write`] (or the start).
    pub fn writes(&self) -> usize {
        self.state.writes.load(Ordering::SeqCst)
    }

    pub fn is_down(&self) -> bool {
        self.state.down.load(Ordering::SeqCst)
    }
}

async fn relay(mut client: TcpStream, target: SocketAddr, st: Arc<State>) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut cuts = st.cuts.subscribe();
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let (mut up, mut down) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        tokio::select! {
            _ = cuts.changed() => return,
            n = cr.read(&mut up) => {
                let Ok(n @ 1..) = n else { return };
                let seen = st.writes.fetch_add(1, Ordering::SeqCst) + 1;
                if seen >= st.cut_at.load(Ordering::SeqCst) || st.down.load(Ordering::SeqCst) {
                    st.go_down();
                    return;
                }
                if sw.write_all(&up[..n]).await.is_err() {
                    return;
                }
            }
            n = sr.read(&mut down) => {
                let Ok(n @ 1..) = n else { return };
                if cw.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
