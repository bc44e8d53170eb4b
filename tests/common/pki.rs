//! Certificates made by openssl for the TLS tests: a CA of the test's own and leaves it issues.

use std::path::{Path, PathBuf};
use std::process::Command;

use rustls::pki_types::{pem::PemObject, CertificateDer};

pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl must be installed (scripts/test installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// openssl's arguments for a new P-256 key, unencrypted.
const NEW_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// A CA (`ca.crt`) in a directory of its own, and a way to issue leaf certificates from it.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = ["-keyout", "ca.key", "-out", "ca.crt", "-days", "30"];
        openssl(
            dir.path(),
            &[
                &["req", "-x509"][..],
                &NEW_KEY,
                &ca,
                &["-subj", "/CN=apitree test CA"],
            ]
            .concat(),
        );
        Self { dir }
    }

    /// A CA with leaf `a` (10 days, 127.0.0.1 and localhost) installed as `tls.crt`/`tls.key`.
    pub fn serving() -> Self {
        let pki = Self::new();
        pki.issue("a", 10);
        pki.install("a.crt", "a.key");
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Issues `NAME.crt` and `NAME.key` for 127.0.0.1 and localhost, valid for `days`.
    pub fn issue(&self, name: &str, days: u32) {
        self.issue_for(name, days, "IP:127.0.0.1,DNS:localhost")
    }

    /// Issues `NAME.crt` and `NAME.key` for the names in `san` (`subjectAltName` syntax).
    pub fn issue_for(&self, name: &str, days: u32, san: &str) {
        let (key, csr, crt) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        let leaf = [
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            "/CN=apitree test leaf",
        ];
        openssl(self.dir.path(), &[&["req"][..], &NEW_KEY, &leaf].concat());
        let ext = format!("{name}.ext");
        std::fs::write(self.path(&ext), format!("subjectAltName={san}\n")).unwrap();
        openssl(
            self.dir.path(),
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                &days.to_string(),
                "-extfile",
                &ext,
            ],
        );
    }

    /// Puts `NAME`'s files where the gateway reads them, each replaced in one rename (as a
    /// Secret volume's symlink swap does).
    pub fn install(&self, cert_from: &str, key_from: &str) {
        for (from, to) in [(cert_from, "tls.crt"), (key_from, "tls.key")] {
            let tmp = self.path(&format!("{to}.new"));
            std::fs::copy(self.path(from), &tmp).unwrap();
            std::fs::rename(&tmp, self.path(to)).unwrap();
        }
    }

    pub fn ca(&self) -> Vec<u8> {
        std::fs::read(self.path("ca.crt")).unwrap()
    }

    pub fn der(&self, name: &str) -> Vec<u8> {
        CertificateDer::from_pem_file(self.path(&format!("{name}.crt")))
            .unwrap()
            .to_vec()
    }

    /// `notAfter` as openssl prints it, in unix seconds.
    pub fn not_after(&self, name: &str) -> i64 {
        let out = Command::new("openssl")
            .current_dir(self.dir.path())
            .args(["x509", "-noout", "-enddate", "-in", &format!("{name}.crt")])
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let date = text.trim().strip_prefix("notAfter=").unwrap();
        let date = date.split_whitespace().collect::<Vec<_>>().join(" ");
        chrono::NaiveDateTime::parse_from_str(&date, "%b %d %H:%M:%S %Y GMT")
            .unwrap_or_else(|e| panic!("{date}: {e}"))
            .and_utc()
            .timestamp()
    }
}
