//! What an idle keep-alive connection costs the gateway in heap, counted by a global allocator
//! that keeps the live total (this binary holds this one test, so nothing else allocates while
//! it counts). The figure is heap asked for, not resident memory: the allocator's own pages come
//! on top (benches/latency-matrix.sh measures resident memory with 10,000 connections).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use apitree::crd::gateway::KeyScope;
use common::gateway::*;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, layout, new_size) };
        if !q.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Sends one request on `conn` and reads its whole answer (a Content-Length body), without
/// allocating: the test's own side must not count.
fn one_request(conn: &mut std::net::TcpStream, request: &[u8]) {
    conn.write_all(request).unwrap();
    let mut buf = [0u8; 8192];
    let mut got = 0;
    loop {
        let n = conn.read(&mut buf[got..]).unwrap();
        assert!(n > 0, "the gateway closed the connection");
        got += n;
        let Some(head_end) = buf[..got].windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        assert!(buf.starts_with(b"HTTP/1.1 200"), "not a 200");
        let head = std::str::from_utf8(&buf[..head_end]).unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .expect("a Content-Length answer");
        if got >= head_end + 4 + length {
            return;
        }
    }
}

/// The live heap once it stops moving (the worker has reached its idle wait on every
/// connection), or after two seconds.
fn settled() -> isize {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut last = LIVE.load(Ordering::Relaxed);
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = LIVE.load(Ordering::Relaxed);
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_holds_little_heap() {
    const IDLE: usize = 400;
    let up = start_upstream().await;
    let (key, key_e) = key_entry(KeyScope::Live, "alpha", "");
    let yaml = format!(
        "tiers:\n  - {{ name: t, perKey: {{ burst10s: 100000, perMinute: 1000000, perDay: 10000000 }}, perOrg: {{ burst10s: 100000, perMinute: 1000000, perDay: 10000000 }} }}\ndefaultTier: t\norgs: [{{ id: alpha }}]\nkeys:\n{key_e}routes:\n  - {{ name: api, pathPrefix: /api/, upstream: \"http://{}/\" }}\n",
        up.addr.unwrap()
    );
    // One worker: every connection lands on it, as it would on each worker of a busy gateway.
    let gw = start_gateway_with_workers(&yaml, None, 1).await;
    let addr = gw.addr;
    let request = format!(
        "GET /api/x HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {}\r\n\r\n",
        key.expose_secret()
    );
    let per_connection = tokio::task::spawn_blocking(move || {
        let request = request.into_bytes();
        let mut open = Vec::with_capacity(2 * IDLE);
        // Warm-up: the upstream pool, lazily built tables and the access log's buffers exist
        // before counting.
        for _ in 0..IDLE {
            let mut conn = std::net::TcpStream::connect(addr).unwrap();
            one_request(&mut conn, &request);
            open.push(conn);
        }
        let before = settled();
        for _ in 0..IDLE {
            let mut conn = std::net::TcpStream::connect(addr).unwrap();
            one_request(&mut conn, &request);
            open.push(conn);
        }
        let with = settled();
        // Still open and served: each can carry another request.
        one_request(open.last_mut().unwrap(), &request);
        (with - before) / IDLE as isize
    })
    .await
    .unwrap();
    eprintln!("heap per idle keep-alive connection: {per_connection} bytes");
    // 2.6 KB in a debug build (the test profile) when this test was written, 1.6 KB of it the
    // connection's future (front.rs holds that size); 5.0 KB with a request's handling inline
    // in that future, as it was before.
    assert!(
        per_connection <= 3 * 1024,
        "an idle keep-alive connection holds {per_connection} bytes of heap"
    );
    drop(gw);
}
