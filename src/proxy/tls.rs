//! TLS on the public listener: rustls (ring), TLS 1.3 only unless `minVersion: "1.2"`, ALPN
//! `h2` and `http/1.1`, and a certificate that is replaced without a restart.
//!
//! The certificate and key files are read again every second (cert-manager and Kubernetes
//! Secret volumes replace them by swapping a symlink) and on SIGHUP. A new pair is used for
//! new handshakes only once it parses, the key belongs to the certificate and the certificate
//! has not expired; connections already open keep theirs. A pair that fails keeps the old one
//! serving and says why: an error in the log, `apitree_proxy_tls_certificate_reloads_total
//! {result="error"}`, and `tls.lastError` on `/readyz`. A failure must hold for two reads in a
//! row before it counts (a pair caught between the writes of its two files is not a failure);
//! a SIGHUP decides at once.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use http::HeaderValue;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    ServerConfig,
};
use sha2::{Digest, Sha256};

use super::config::{TlsConfig, TlsVersion};

/// How often the certificate and key files are looked at.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Everything the listener needs for TLS.
pub struct ServerTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub certificates: Arc<Certificates>,
    /// `Strict-Transport-Security` for every response sent over TLS.
    pub hsts: HeaderValue,
    /// Handshakes that failed or did not finish within `headerReadTimeout`.
    pub handshake_failures: IntCounter,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("certificates", &self.certificates)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// The gateway's listener: HTTP/2 and HTTP/1.1, metrics named `apitree_proxy_tls_*`.
    pub fn gateway(cfg: &TlsConfig, base: &Path, registry: &Registry) -> Result<Arc<Self>, String> {
        Self::new(cfg, base, registry, "apitree_proxy", &[b"h2", b"http/1.1"])
    }

    /// Loads the pair named by `cfg` (paths relative to `base`) and builds the server config
    /// offering `alpn`; registers the TLS metrics (`{prefix}_tls_*`) in `registry`. Fails,
    /// saying why, when the pair is unusable.
    pub fn new(
        cfg: &TlsConfig,
        base: &Path,
        registry: &Registry,
        prefix: &str,
        alpn: &[&[u8]],
    ) -> Result<Arc<Self>, String> {
        let certificates = Certificates::load(
            base.join(&cfg.cert_file),
            base.join(&cfg.key_file),
            registry,
            prefix,
        )?;
        let versions: &[&rustls::SupportedProtocolVersion] = match cfg.min_version {
            TlsVersion::V1_3 => &[&rustls::version::TLS13],
            TlsVersion::V1_2 => {
                tracing::warn!("tls.minVersion is 1.2: clients may connect with TLS 1.2, which lacks TLS 1.3's protections; raise it to 1.3 once old clients are gone");
                &[&rustls::version::TLS13, &rustls::version::TLS12]
            }
        };
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(versions)
                .map_err(|e| format!("TLS settings: {e}"))?
                .with_no_client_auth()
                .with_cert_resolver(certificates.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let hsts = HeaderValue::from_str(&cfg.hsts.header_value())
            .map_err(|e| format!("tls.hsts: {e}"))?;
        let handshake_failures = IntCounter::new(
            format!("{prefix}_tls_handshake_failures_total"),
            "TLS handshakes that failed (e.g. a client offering only TLS 1.2 while minVersion is 1.3) or did not finish within headerReadTimeout.",
        )
        .map_err(|e| e.to_string())?;
        registry
            .register(Box::new(handshake_failures.clone()))
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            certificates,
            hsts,
            handshake_failures,
        }))
    }
}

impl ServerTls {
    /// An acceptor with the same certificates and versions offering HTTP/1.1 only (the admin
    /// port, `adminTls`).
    pub fn http1_acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let mut config = (**self.acceptor.config()).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    /// The stream of a finished handshake, given the handshake run under a deadline (`Err`:
    /// the deadline passed). Failures and timeouts are counted; a client that connected and
    /// closed without a byte (a TCP health check) is not a failed handshake.
    pub fn accepted<S, E>(&self, handshake: Result<std::io::Result<S>, E>) -> Option<S> {
        match handshake {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => None,
            _ => {
                self.handshake_failures.inc();
                None
            }
        }
    }
}

/// The outcome of looking at the files again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// The files hold the pair in use (or a pair already refused).
    Unchanged,
    /// A new pair serves new handshakes.
    Loaded,
    /// A new pair failed once; it counts as refused if it still fails on the next look.
    Pending,
    /// A new pair is refused; the old one keeps serving.
    Refused(String),
}

/// The certificate in use and where it comes from; hands it to each handshake.
pub struct Certificates {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    state: Mutex<State>,
    expiry: IntGauge,
    reloads: IntCounterVec,
}

#[derive(Default)]
struct State {
    /// Hash of the cert and key files of the pair in use.
    loaded: [u8; 32],
    /// The pair in use's `notAfter`, unix seconds.
    not_after: i64,
    /// A failing pair seen once, not yet refused.
    failing: Option<[u8; 32]>,
    /// The last pair refused (not logged again while the files stay so).
    refused: Option<[u8; 32]>,
    /// The files could not be read at the last look.
    unreadable: bool,
    last_error: Option<String>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

impl Certificates {
    /// Loads the pair, or says why it cannot serve.
    pub fn load(
        cert_file: PathBuf,
        key_file: PathBuf,
        registry: &Registry,
        prefix: &str,
    ) -> Result<Arc<Self>, String> {
        let (cert_pem, key_pem) = read_pair(&cert_file, &key_file)?;
        let (key, not_after) = parse_pair(&cert_pem, &key_pem, chrono::Utc::now().timestamp())
            .map_err(|e| format!("tls: {e}"))?;
        let expiry = IntGauge::new(
            format!("{prefix}_tls_cert_expiry_timestamp_seconds"),
            "When the certificate this listener serves expires (notAfter), unix seconds.",
        )
        .map_err(|e| e.to_string())?;
        let reloads = IntCounterVec::new(
            Opts::new(
                format!("{prefix}_tls_certificate_reloads_total"),
                "New certificate/key pairs found in tls.certFile and tls.keyFile, by result: ok (serving new handshakes) or error (refused; the previous pair keeps serving).",
            ),
            &["result"],
        )
        .map_err(|e| e.to_string())?;
        for m in [
            Box::new(expiry.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reloads.clone()),
        ] {
            registry.register(m).map_err(|e| e.to_string())?;
        }
        expiry.set(not_after);
        for result in ["ok", "error"] {
            reloads.with_label_values(&[result]);
        }
        tracing::info!(
            cert_file = %cert_file.display(),
            not_after = %timestamp(not_after),
            "TLS certificate loaded"
        );
        Ok(Arc::new(Self {
            cert_file,
            key_file,
            current: RwLock::new(Arc::new(key)),
            state: Mutex::new(State {
                loaded: fingerprint(&cert_pem, &key_pem),
                not_after,
                ..State::default()
            }),
            expiry,
            reloads,
        }))
    }

    /// Looks at the files again. `now`: a SIGHUP asked (a failing pair is refused at once).
    pub fn reload(&self, now: bool) -> Reload {
        let read = read_pair(&self.cert_file, &self.key_file);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (e, print) = match read {
            // A file that cannot be read (being replaced, or gone): keep serving; a failure
            // once it holds for two looks, said once.
            Err(e) => {
                if !now && !state.unreadable {
                    state.unreadable = true;
                    return Reload::Pending;
                }
                let print = state.last_error.as_deref() != Some(e.as_str());
                (e, print)
            }
            Ok((cert_pem, key_pem)) => {
                state.unreadable = false;
                let seen = fingerprint(&cert_pem, &key_pem);
                if seen == state.loaded {
                    // The pair in use (perhaps restored after a bad one): nothing is wrong.
                    state.refused = None;
                    state.failing = None;
                    state.last_error = None;
                    return Reload::Unchanged;
                }
                if state.refused == Some(seen) {
                    return Reload::Unchanged;
                }
                match parse_pair(&cert_pem, &key_pem, chrono::Utc::now().timestamp()) {
                    Ok((key, not_after)) => {
                        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
                        *state = State {
                            loaded: seen,
                            not_after,
                            ..State::default()
                        };
                        self.expiry.set(not_after);
                        self.reloads.with_label_values(&["ok"]).inc();
                        tracing::info!(
                            cert_file = %self.cert_file.display(),
                            not_after = %timestamp(not_after),
                            "TLS certificate reloaded: new connections get the new one"
                        );
                        return Reload::Loaded;
                    }
                    // Perhaps caught between the writes of the two files: look again.
                    Err(_) if !now && state.failing != Some(seen) => {
                        state.failing = Some(seen);
                        return Reload::Pending;
                    }
                    Err(e) => {
                        state.failing = None;
                        let print = state.last_error.as_deref() != Some(e.as_str());
                        if !e.starts_with(NOT_YET_VALID) {
                            state.refused = Some(seen);
                        }
                        (e, print)
                    }
                }
            }
        };
        if print {
            self.reloads.with_label_values(&["error"]).inc();
            tracing::error!(
                "new TLS certificate NOT loaded, the previous one keeps serving (expires {}): {e}",
                timestamp(state.not_after)
            );
        }
        state.last_error = Some(e.clone());
        Reload::Refused(e)
    }

    /// For `/readyz`: the certificate's expiry and the last refused pair's reason.
    pub fn status(&self) -> serde_json::Value {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::json!({
            "certFile": self.cert_file.display().to_string(),
            "notAfter": timestamp(state.not_after),
            "lastError": state.last_error,
        })
    }

    /// Looks at the files every [`WATCH_EVERY`] until the process ends.
    pub async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let me = self.clone();
            // File reads off the async threads.
            let _ = tokio::task::spawn_blocking(move || me.reload(false)).await;
        }
    }
}

fn timestamp(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| unix.to_string())
}

fn fingerprint(cert_pem: &[u8], key_pem: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((cert_pem.len() as u64).to_be_bytes());
    h.update(cert_pem);
    h.update(key_pem);
    h.finalize().into()
}

fn read_pair(cert_file: &Path, key_file: &Path) -> Result<(Vec<u8>, Vec<u8>), String> {
    let read = |what: &str, path: &Path| {
        std::fs::read(path)
            .map_err(|e| format!("tls.{what} {}: cannot read it: {e}", path.display()))
    };
    Ok((read("certFile", cert_file)?, read("keyFile", key_file)?))
}

/// How far ahead of this clock a new certificate's notBefore may be (its issuer's clock may
/// run a little ahead).
const CLOCK_SKEW: i64 = 300;
/// The start of the error for a certificate not valid yet: such a pair is looked at again
/// every second (it becomes usable with time), not refused for good.
const NOT_YET_VALID: &str = "certFile's first certificate is not valid until";

/// A usable pair from PEM text: the chain parses, the key parses and belongs to the leaf, the
/// leaf has not expired at `now`. Errors never quote the files' contents.
fn parse_pair(cert_pem: &[u8], key_pem: &[u8], now: i64) -> Result<(CertifiedKey, i64), String> {
    // The parser's errors can carry bytes of the file (a private key pasted into the wrong
    // file, say): never quoted.
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| {
            "certFile is not a PEM certificate chain (a BEGIN or END line is missing or misplaced)"
                .to_string()
        })?;
    if chain.is_empty() {
        return Err("certFile holds no CERTIFICATE block".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|_| "keyFile holds no PEM private key (PKCS#8, PKCS#1 or SEC1)".to_string())?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|_| "keyFile's private key is of a type TLS cannot use".to_string())?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|_| {
        "keyFile's private key does not belong to certFile's first certificate".to_string()
    })?;
    let (not_before, not_after) = validity(&certified.cert[0])
        .ok_or("certFile's first certificate has no readable validity period")?;
    if not_before > now + CLOCK_SKEW {
        return Err(format!(
            "{NOT_YET_VALID} {} (clients would refuse it until then)",
            timestamp(not_before)
        ));
    }
    if not_after <= now {
        return Err(format!(
            "certFile's first certificate expired at {}; renew it",
            timestamp(not_after)
        ));
    }
    Ok((certified, not_after))
}

/// `notAfter` of an X.509 certificate (DER, RFC 5280 §4.1), unix seconds; None when the bytes
/// are not shaped like one.
pub fn not_after(cert: &[u8]) -> Option<i64> {
    validity(cert).map(|(_, not_after)| not_after)
}

/// `notBefore` and `notAfter` of an X.509 certificate (DER), unix seconds.
pub fn validity(cert: &[u8]) -> Option<(i64, i64)> {
    let (0x30, certificate, _) = tlv(cert)? else {
        return None;
    };
    let (0x30, tbs, _) = tlv(certificate)? else {
        return None;
    };
    let mut rest = tbs;
    // version [0] EXPLICIT, absent for v1 certificates.
    let (tag, _, after) = tlv(rest)?;
    if tag == 0xA0 {
        rest = after;
    }
    // serialNumber, signature, issuer.
    for expected in [0x02, 0x30, 0x30] {
        let (tag, _, after) = tlv(rest)?;
        if tag != expected {
            return None;
        }
        rest = after;
    }
    let (0x30, validity, _) = tlv(rest)? else {
        return None;
    };
    let (tag, time, after) = tlv(validity)?;
    let not_before = der_time(tag, time)?;
    let (tag, time, _) = tlv(after)?;
    Some((not_before, der_time(tag, time)?))
}

/// One DER tag-length-value: (tag, value, what follows). Definite lengths up to 4 bytes.
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |l, &b| (l << 8) | b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// UTCTime (`YYMMDDHHMMSSZ`, years 1950-2049) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn der_time(tag: u8, value: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(value).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i32 = text.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        0x18 => (text.get(..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    if rest.len() != 10 || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let two = |i: usize| rest[i..i + 2].parse::<u32>().ok();
    chrono::NaiveDate::from_ymd_opt(year, two(0)?, two(2)?)?
        .and_hms_opt(two(4)?, two(6)?, two(8)?)
        .map(|t| t.and_utc().timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DER SEQUENCE (or other tag) around `parts`.
    fn wrap(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
        let body: Vec<u8> = parts.concat();
        let mut out = vec![tag];
        if body.len() < 0x80 {
            out.push(body.len() as u8);
        } else {
            let len = (body.len() as u32).to_be_bytes();
            let skip = len.iter().take_while(|b| **b == 0).count();
            out.push(0x80 | (4 - skip) as u8);
            out.extend_from_slice(&len[skip..]);
        }
        out.extend(body);
        out
    }

    fn cert(version: bool, not_after: (u8, &str)) -> Vec<u8> {
        let validity = wrap(
            0x30,
            &[
                &wrap(0x17, &[b"250101000000Z"]),
                &wrap(not_after.0, &[not_after.1.as_bytes()]),
            ],
        );
        let name = wrap(0x30, &[&wrap(0x31, &[&[0u8; 200]])]);
        let mut tbs: Vec<&[u8]> = Vec::new();
        let v = wrap(0xA0, &[&wrap(0x02, &[&[2]])]);
        if version {
            tbs.push(&v);
        }
        let serial = wrap(0x02, &[&[1, 2, 3]]);
        let alg = wrap(0x30, &[&wrap(0x06, &[&[1, 2]])]);
        tbs.extend([&serial[..], &alg, &name, &validity]);
        wrap(0x30, &[&wrap(0x30, &tbs), &alg, &wrap(0x03, &[&[0]])])
    }

    #[test]
    fn not_after_reads_both_time_forms_with_and_without_a_version() {
        let at = |y, mo, d, h, mi, s| {
            chrono::NaiveDate::from_ymd_opt(y, mo, d)
                .unwrap()
                .and_hms_opt(h, mi, s)
                .unwrap()
                .and_utc()
                .timestamp()
        };
        let cases: [(bool, (u8, &str), Option<i64>); 9] = [
            (
                true,
                (0x17, "491231235959Z"),
                Some(at(2049, 12, 31, 23, 59, 59)),
            ),
            (true, (0x17, "500101000000Z"), Some(at(1950, 1, 1, 0, 0, 0))),
            (
                false,
                (0x17, "270615120000Z"),
                Some(at(2027, 6, 15, 12, 0, 0)),
            ),
            (
                true,
                (0x18, "20510301083000Z"),
                Some(at(2051, 3, 1, 8, 30, 0)),
            ),
            (
                true,
                (0x18, "99991231235959Z"),
                Some(at(9999, 12, 31, 23, 59, 59)),
            ),
            // Not times RFC 5280 allows: no zone, fractions, a wrong tag, an impossible date.
            (true, (0x17, "270615120000"), None),
            (true, (0x18, "20510301083000.5Z"), None),
            (true, (0x04, "270615120000Z"), None),
            (true, (0x17, "270230120000Z"), None),
        ];
        for (version, time, want) in cases {
            assert_eq!(not_after(&cert(version, time)), want, "{time:?}");
        }
        // notBefore is the first time of the validity (250101000000Z in `cert`).
        assert_eq!(
            validity(&cert(true, (0x17, "270615120000Z"))).map(|v| v.0),
            Some(at(2025, 1, 1, 0, 0, 0))
        );
    }

    #[test]
    fn not_after_never_reads_past_the_bytes_it_is_given() {
        let good = cert(true, (0x17, "270615120000Z"));
        assert!(not_after(&good).is_some());
        // Every truncation, and every single-byte change, is refused or read within bounds.
        for cut in 0..good.len() {
            assert_eq!(not_after(&good[..cut]), None, "cut at {cut}");
        }
        for i in 0..good.len() {
            for b in [0x00, 0x7f, 0x80, 0x81, 0x84, 0x85, 0xff] {
                let mut bent = good.clone();
                bent[i] = b;
                let _ = not_after(&bent);
            }
        }
        assert_eq!(not_after(b""), None);
        assert_eq!(not_after(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }
}
