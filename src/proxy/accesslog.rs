//! One JSON line per request on stdout: metadata only (request id, org, key prefix, route,
//! status, upstream status, latency, bytes). Bodies and secrets never appear here unless a route
//! sets `logBodies`. Lines go through a bounded queue to a writer thread so a slow stdout cannot
//! stall requests; a full queue drops the line and counts it.

use std::{
    io::Write,
    sync::mpsc::{sync_channel, SyncSender, TrySendError},
};

use prometheus::IntCounter;
use serde::Serialize;

/// One access-log record.
#[derive(Debug, Serialize)]
pub struct AccessRecord<'a> {
    pub ts: String,
    pub request_id: &'a str,
    pub method: &'a str,
    pub route: &'a str,
    pub org: Option<&'a str>,
    pub key_prefix: Option<&'a str>,
    pub status: u16,
    pub upstream_status: Option<u16>,
    pub latency_ms: f64,
    pub bytes_in: Option<u64>,
    pub bytes_out: Option<u64>,
    pub error_code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_body: Option<String>,
}

/// Where access-log lines go.
#[derive(Clone)]
pub struct AccessLog {
    tx: Option<SyncSender<String>>,
    dropped: IntCounter,
}

impl AccessLog {
    /// Starts the writer thread on stdout.
    pub fn stdout(dropped: IntCounter) -> Self {
        Self::to_writer(Box::new(std::io::stdout()), dropped)
    }

    /// Starts the writer thread on any writer.
    pub fn to_writer(writer: Box<dyn Write + Send>, dropped: IntCounter) -> Self {
        let (tx, rx) = sync_channel::<String>(65_536);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::with_capacity(64 * 1024, writer);
                // Under load the thread drains in batches and naps between them, so request
                // threads almost never have to wake it (one wake-up per busy period, not per line).
                while let Ok(first) = rx.recv() {
                    let _ = out.write_all(first.as_bytes());
                    loop {
                        let mut more = false;
                        while let Ok(line) = rx.try_recv() {
                            let _ = out.write_all(line.as_bytes());
                            more = true;
                        }
                        let _ = out.flush();
                        if !more {
                            break;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                }
            })
            .expect("spawn access-log thread");
        Self {
            tx: Some(tx),
            dropped,
        }
    }

    /// A log that writes nothing.
    pub fn disabled(dropped: IntCounter) -> Self {
        Self { tx: None, dropped }
    }

    /// Whether lines are written at all (callers skip building records otherwise).
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn write(&self, record: &AccessRecord<'_>) {
        let Some(tx) = &self.tx else { return };
        let Ok(mut line) = serde_json::to_string(record) else {
            return;
        };
        line.push('\n');
        if let Err(TrySendError::Full(_)) = tx.try_send(line) {
            self.dropped.inc();
        }
    }
}
