//! One JSON line per request on stdout: metadata only (request id, org, key prefix, route,
//! status, upstream status, latency, bytes). Bodies and secrets never appear here unless a route
//! sets `logBodies`.
//!
//! Request threads format each line straight into their own pending lines; a writer thread
//! takes every thread's lines every 20 ms, so a slow stdout cannot stall requests, and there is
//! no allocation, channel hand-off or lock shared between worker cores per line. Each thread's
//! lines keep their order. A thread whose pending lines have grown past [`MAX_PENDING_BYTES`]
//! (the writer has fallen that far behind) drops new lines and counts them. Dropping the last
//! handle flushes what is pending.

use std::cell::RefCell;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use prometheus::IntCounter;

/// One access-log record.
#[derive(Debug)]
pub struct AccessRecord<'a> {
    /// When the request arrived, in ms since the Unix epoch (written as RFC 3339, UTC).
    pub ts_ms: u64,
    pub request_id: &'a str,
    pub method: &'a str,
    pub route: &'a str,
    pub org: Option<&'a str>,
    pub key_prefix: Option<&'a str>,
    pub status: u16,
    pub upstream_status: Option<u16>,
    /// Time to the response head, in microseconds (written as `latency_ms` with 3 decimals).
    pub latency_us: u64,
    pub bytes_in: Option<u64>,
    pub bytes_out: Option<u64>,
    pub error_code: Option<&'a str>,
    pub request_body: Option<String>,
}

/// Unwritten lines per thread, at most this many bytes and one line (about 15,000 lines);
/// beyond it the thread's lines are dropped.
pub const MAX_PENDING_BYTES: usize = 4 * 1024 * 1024;
/// How long the writer waits between batches while lines keep coming.
const BATCH_INTERVAL: Duration = Duration::from_millis(20);

/// One thread's unwritten lines. Only that thread and the writer lock it.
#[derive(Default)]
struct ThreadLines(Mutex<Vec<u8>>);

impl ThreadLines {
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Shared {
    /// Every thread's lines; a thread joins on its first line, and leaves (the writer drops
    /// it) once it has ended and its lines are written.
    threads: Mutex<Vec<Arc<ThreadLines>>>,
    /// Closed (every handle gone, or shutdown): write what is left and stop.
    closed: Mutex<bool>,
    /// Wakes the waiting writer.
    wake: Condvar,
    /// The writer found nothing to write and waits for the next line.
    writer_waiting: AtomicBool,
    /// Disconnected when the writer thread has written everything and ended.
    finished: Mutex<Option<Receiver<()>>>,
}

impl Shared {
    fn closed(&self) -> MutexGuard<'_, bool> {
        self.closed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn threads(&self) -> MutexGuard<'_, Vec<Arc<ThreadLines>>> {
        self.threads.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn close(&self) {
        *self.closed() = true;
        self.wake.notify_one();
    }
}

/// Closes the log when the last [`AccessLog`] clone is dropped.
struct Closer(Arc<Shared>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Where access-log lines go.
#[derive(Clone)]
pub struct AccessLog {
    shared: Option<Arc<Closer>>,
    dropped: IntCounter,
}

/// What a thread reuses across requests.
#[derive(Default)]
struct Scratch {
    /// The last second seen and its RFC 3339 text (`2026-11-29T07:00:00.`).
    second: u64,
    date: String,
    /// This thread's pending lines, per log.
    logs: Vec<(Weak<Shared>, Arc<ThreadLines>)>,
}

/// This thread's pending lines in `shared`, joining it on first use.
fn lines_in<'a>(
    logs: &'a mut Vec<(Weak<Shared>, Arc<ThreadLines>)>,
    shared: &Arc<Shared>,
) -> &'a ThreadLines {
    let found = logs
        .iter()
        .position(|(log, _)| std::ptr::eq(log.as_ptr(), Arc::as_ptr(shared)));
    let i = match found {
        Some(i) => i,
        None => {
            // Logs that are gone (tests make many) leave with the next one joined.
            logs.retain(|(log, _)| log.strong_count() > 0);
            let lines = Arc::new(ThreadLines::default());
            shared.threads().push(lines.clone());
            logs.push((Arc::downgrade(shared), lines));
            logs.len() - 1
        }
    };
    &logs[i].1
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        second: u64::MAX,
        ..Scratch::default()
    });
}

impl AccessLog {
    /// Starts the writer thread on stdout.
    pub fn stdout(dropped: IntCounter) -> Self {
        Self::to_writer(Box::new(std::io::stdout()), dropped)
    }

    /// Starts the writer thread on any writer.
    pub fn to_writer(writer: Box<dyn Write + Send>, dropped: IntCounter) -> Self {
        let (finished_tx, finished_rx) = std::sync::mpsc::channel::<()>();
        let shared = Arc::new(Shared {
            threads: Mutex::default(),
            closed: Mutex::default(),
            wake: Condvar::new(),
            writer_waiting: AtomicBool::new(false),
            finished: Mutex::new(Some(finished_rx)),
        });
        let for_writer = shared.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let _finished = finished_tx;
                write_batches(&for_writer, writer);
            })
            .expect("spawn access-log thread");
        Self {
            shared: Some(Arc::new(Closer(shared))),
            dropped,
        }
    }

    /// A log that writes nothing.
    pub fn disabled(dropped: IntCounter) -> Self {
        Self {
            shared: None,
            dropped,
        }
    }

    /// At shutdown: writes what is pending and stops the writer, waiting at most `within` (a
    /// blocked stdout must not hold the exit). False when the writer did not finish in time.
    pub fn close(&self, within: Duration) -> bool {
        let Some(closer) = &self.shared else {
            return true;
        };
        let shared = &closer.0;
        shared.close();
        let finished = shared
            .finished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match finished {
            Some(rx) => !matches!(rx.recv_timeout(within), Err(RecvTimeoutError::Timeout)),
            None => true,
        }
    }

    /// Whether lines are written at all (callers skip building records otherwise).
    pub fn enabled(&self) -> bool {
        self.shared.is_some()
    }

    pub fn write(&self, record: &AccessRecord<'_>) {
        let Some(closer) = &self.shared else { return };
        let shared = &closer.0;
        SCRATCH.with(|s| {
            let Scratch { second, date, logs } = &mut *s.borrow_mut();
            {
                // Formatted in place: the lock is this thread's, shared only with the writer.
                let mut pending = lines_in(logs, shared).lock();
                if pending.len() >= MAX_PENDING_BYTES {
                    drop(pending);
                    self.dropped.inc();
                } else {
                    format_line(&mut pending, record, second, date);
                }
            }
            // Pairs with the writer's store before it looks at the lines one last time: either
            // it sees this line, or this sees it waiting.
            if shared.writer_waiting.load(SeqCst) && shared.writer_waiting.swap(false, SeqCst) {
                let _closed = shared.closed();
                shared.wake.notify_one();
            }
        });
    }
}

/// Moves every thread's pending lines to `out`; false when there were none. Threads that have
/// ended leave once their lines are taken.
fn take_lines(shared: &Shared, out: &mut impl Write, batch: &mut Vec<u8>) -> bool {
    let threads: Vec<Arc<ThreadLines>> = {
        let mut threads = shared.threads();
        threads.retain(|t| Arc::strong_count(t) > 1 || !t.lock().is_empty());
        threads.clone()
    };
    let mut wrote = false;
    for t in &threads {
        {
            let mut pending = t.lock();
            if pending.is_empty() {
                continue;
            }
            // The thread keeps appending to the (empty, already grown) buffer it gets back.
            std::mem::swap(&mut *pending, batch);
        }
        let _ = out.write_all(batch);
        batch.clear();
        if batch.capacity() > 1024 * 1024 {
            batch.shrink_to(64 * 1024);
        }
        wrote = true;
    }
    wrote
}

/// The writer thread: takes every thread's lines, writes them, naps, and waits when there is
/// nothing to write (a request wakes it once per idle period, not once per line).
fn write_batches(shared: &Shared, mut out: Box<dyn Write + Send>) {
    // No BufWriter: a batch is already one large buffer; copying it into another cost about
    // 250 instructions per request (callgrind).
    let mut batch = Vec::new();
    loop {
        // Read before taking the lines: what was written before the close is taken after it.
        let closed = *shared.closed();
        if take_lines(shared, &mut out, &mut batch) {
            let _ = out.flush();
            if !closed {
                std::thread::sleep(BATCH_INTERVAL);
            }
            continue;
        }
        if closed {
            let _ = out.flush();
            return;
        }
        let mut closed = shared.closed();
        shared.writer_waiting.store(true, SeqCst);
        let empty = shared.threads().iter().all(|t| t.lock().is_empty());
        if empty && !*closed {
            closed = shared.wake.wait(closed).unwrap_or_else(|p| p.into_inner());
        }
        drop(closed);
        shared.writer_waiting.store(false, SeqCst);
    }
}

/// The record as one JSON line, in the field order of the log's documentation.
fn format_line(out: &mut Vec<u8>, r: &AccessRecord<'_>, second: &mut u64, date: &mut String) {
    out.extend_from_slice(b"{\"ts\":\"");
    let secs = r.ts_ms / 1000;
    if *second != secs {
        *second = secs;
        *date = chrono::DateTime::from_timestamp(secs as i64, 0)
            .unwrap_or_default()
            .format("%Y-%m-%dT%H:%M:%S.")
            .to_string();
    }
    out.extend_from_slice(date.as_bytes());
    push_padded_millis(out, r.ts_ms % 1000);
    out.push(b'Z');
    out.push(b'"');
    let mut f = Fields(out);
    // Request ids are [A-Za-z0-9_-] (the gateway replaces any other), methods are HTTP tokens.
    f.plain(key!("request_id"), r.request_id);
    f.plain(key!("method"), r.method);
    f.text(key!("route"), Some(r.route));
    f.text(key!("org"), r.org);
    f.text(key!("key_prefix"), r.key_prefix);
    f.int(key!("status"), Some(r.status.into()));
    f.int(key!("upstream_status"), r.upstream_status.map(u64::from));
    f.name(key!("latency_ms"));
    push_int(f.0, r.latency_us / 1000);
    f.0.push(b'.');
    push_padded_millis(f.0, r.latency_us % 1000);
    f.int(key!("bytes_in"), r.bytes_in);
    f.int(key!("bytes_out"), r.bytes_out);
    f.text(key!("error_code"), r.error_code);
    if let Some(body) = &r.request_body {
        f.text(key!("request_body"), Some(body));
    }
    out.extend_from_slice(b"}\n");
}

/// A member's name with its punctuation, `,"name":`, as one piece to copy.
macro_rules! key {
    ($name:literal) => {
        concat!(",\"", $name, "\":")
    };
}
use key;

/// Appends `,"name":value` members to a line; names come from [`key!`].
struct Fields<'a>(&'a mut Vec<u8>);

impl Fields<'_> {
    fn name(&mut self, key: &'static str) {
        self.0.extend_from_slice(key.as_bytes());
    }

    fn plain(&mut self, key: &'static str, value: &str) {
        self.name(key);
        push_plain(self.0, value);
    }

    fn text(&mut self, key: &'static str, value: Option<&str>) {
        self.name(key);
        match value {
            Some(s) => push_str(self.0, s),
            None => self.0.extend_from_slice(b"null"),
        }
    }

    fn int(&mut self, key: &'static str, value: Option<u64>) {
        self.name(key);
        match value {
            Some(n) => push_int(self.0, n),
            None => self.0.extend_from_slice(b"null"),
        }
    }
}

fn push_padded_millis(out: &mut Vec<u8>, n: u64) {
    let n = n as u32 % 1000;
    out.extend_from_slice(&[
        b'0' + (n / 100) as u8,
        b'0' + (n / 10 % 10) as u8,
        b'0' + (n % 10) as u8,
    ]);
}

fn push_int(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// A JSON string known to need no escaping; checked in debug builds.
fn push_plain(out: &mut Vec<u8>, s: &str) {
    debug_assert!(!needs_escape(s), "{s:?} needs escaping");
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

fn needs_escape(s: &str) -> bool {
    s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\')
}

/// A JSON string: copied as is when nothing needs escaping (route names, org ids), else
/// escaped by serde_json.
fn push_str(out: &mut Vec<u8>, s: &str) {
    if !needs_escape(s) {
        push_plain(out, s);
    } else {
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn record(request_body: Option<String>) -> AccessRecord<'static> {
        AccessRecord {
            ts_ms: 1_795_935_600_007,
            request_id: "req-1",
            method: "POST",
            route: "orders \"eu\"",
            org: Some("alpha"),
            key_prefix: None,
            status: 201,
            upstream_status: Some(201),
            latency_us: 12_045,
            bytes_in: Some(12),
            bytes_out: None,
            error_code: None,
            request_body,
        }
    }

    fn line(r: &AccessRecord<'_>) -> Value {
        let mut out = Vec::new();
        let (mut second, mut date) = (u64::MAX, String::new());
        format_line(&mut out, r, &mut second, &mut date);
        assert_eq!(out.last(), Some(&b'\n'));
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn a_line_is_one_json_object_with_every_field() {
        let v = line(&record(None));
        assert_eq!(v["ts"], "2026-11-29T07:00:00.007Z");
        assert_eq!(v["request_id"], "req-1");
        assert_eq!(v["route"], "orders \"eu\"", "escaped where needed");
        assert_eq!(v["org"], "alpha");
        assert_eq!(v["key_prefix"], Value::Null);
        assert_eq!(v["status"], 201);
        assert_eq!(v["upstream_status"], 201);
        assert_eq!(v["latency_ms"].as_f64(), Some(12.045));
        assert_eq!(v["bytes_in"], 12);
        assert_eq!(v["bytes_out"], Value::Null);
        assert_eq!(v["error_code"], Value::Null);
        assert!(v.get("request_body").is_none());
        let v = line(&record(Some("{\"a\":\"line\nbreak\"}".into())));
        assert_eq!(v["request_body"], "{\"a\":\"line\nbreak\"}");
    }

    /// A writer that keeps what it is given.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn close_writes_what_is_pending_before_returning() {
        let sink = Sink::default();
        let dropped = IntCounter::new("d", "d").unwrap();
        let log = AccessLog::to_writer(Box::new(sink.clone()), dropped);
        let other = log.clone();
        for _ in 0..3 {
            log.write(&record(None));
        }
        assert!(log.close(Duration::from_secs(5)));
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        // A second close (another handle, or the last drop) has nothing left to wait for.
        assert!(other.close(Duration::from_millis(10)));
    }

    #[test]
    fn lines_from_many_threads_arrive_whole_and_in_order_per_thread_and_the_last_handle_flushes() {
        let sink = Sink::default();
        let dropped = IntCounter::new("d", "d").unwrap();
        let log = AccessLog::to_writer(Box::new(sink.clone()), dropped.clone());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..2_000u64 {
                        let id = format!("t{t}-{i}");
                        let mut r = record(None);
                        r.request_id = &id;
                        log.write(&r);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(log);
        // The writer exits after the final flush; wait for it.
        for _ in 0..200 {
            if sink.0.lock().unwrap().split(|&b| b == b'\n').count() > 8_000 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let mut next = [0u64; 4];
        for l in text.lines() {
            let v: Value = serde_json::from_str(l).unwrap();
            let id = v["request_id"].as_str().unwrap();
            let (t, i) = id[1..].split_once('-').unwrap();
            let (t, i): (usize, u64) = (t.parse().unwrap(), i.parse().unwrap());
            assert_eq!(i, next[t], "thread {t}'s lines out of order");
            next[t] += 1;
        }
        assert_eq!(next, [2_000; 4], "every line written once");
        assert_eq!(dropped.get(), 0);
    }
}
