//! Passwords: Argon2id (RustCrypto `argon2`, its default parameters: 19 MiB, 2 passes, one
//! lane, OWASP's recommendation) stored as PHC strings. A sign-in for an unknown or
//! password-less account verifies against a fixed hash, so it takes as long as a real one and
//! timing does not say which emails exist.

use std::sync::OnceLock;

use argon2::{Argon2, PasswordHasher, PasswordVerifier};

/// Shortest accepted password, in characters.
pub const MIN_CHARS: usize = 12;
/// Longest accepted password, in bytes (hashing cost must not be the caller's to choose).
pub const MAX_BYTES: usize = 1024;

/// Why a new password was refused.
pub fn check_new(password: &str) -> Result<(), String> {
    let chars = password.chars().count();
    if chars < MIN_CHARS {
        return Err(format!(
            "the password has {chars} characters; at least {MIN_CHARS} are needed"
        ));
    }
    if password.len() > MAX_BYTES {
        return Err(format!("the password is longer than {MAX_BYTES} bytes"));
    }
    if password.trim().is_empty() {
        return Err("the password is only white space".into());
    }
    Ok(())
}

/// Hashes a new password after [`check_new`].
pub fn hash(password: &str) -> Result<String, String> {
    check_new(password)?;
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| format!("hashing the password failed: {e}"))
}

/// Whether `password` matches `stored`; with no stored hash, spends the same time and says no.
pub fn verify(password: &str, stored: Option<&str>) -> bool {
    if password.len() > MAX_BYTES {
        return false;
    }
    match stored {
        Some(phc) => Argon2::default()
            .verify_password(password.as_bytes(), phc)
            .is_ok(),
        None => {
            let _ = Argon2::default().verify_password(password.as_bytes(), dummy());
            false
        }
    }
}

/// Computes the fixed hash unknown accounts verify against, so the first such sign-in takes
/// no longer than the others. Call at start.
pub fn prepare() {
    dummy();
}

/// Bounds the Argon2 work (19 MiB and tens of milliseconds each) that requests can start:
/// `parallel` hashes run at once on the blocking pool, a few more wait, and the rest are
/// turned away at once rather than queued without end.
pub struct Gate {
    running: tokio::sync::Semaphore,
    admitted: tokio::sync::Semaphore,
}

/// The gate is full: the caller should answer 503 and ask the client to retry shortly.
#[derive(Debug)]
pub struct Busy;

impl Gate {
    /// `parallel` at once (at least one), four times as many waiting.
    pub fn new(parallel: usize) -> Self {
        let parallel = parallel.max(1);
        Gate {
            running: tokio::sync::Semaphore::new(parallel),
            admitted: tokio::sync::Semaphore::new(parallel * 5),
        }
    }

    /// One per core of this machine.
    pub fn per_core() -> Self {
        Self::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Runs `work` off the async workers when the gate admits it.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Busy> {
        let _admitted = self.admitted.try_acquire().map_err(|_| Busy)?;
        let _running = self.running.acquire().await.map_err(|_| Busy)?;
        tokio::task::spawn_blocking(work).await.map_err(|_| Busy)
    }
}

fn dummy() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| hash("not a password anyone has").expect("hashing a constant"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_argon2id_salted_and_verify_only_the_password() {
        let a = hash("correct horse battery").unwrap();
        let b = hash("correct horse battery").unwrap();
        assert!(a.starts_with("$argon2id$"), "{a}");
        assert_ne!(a, b, "a salt per hash");
        assert!(verify("correct horse battery", Some(&a)));
        for wrong in [
            "correct horse batter",
            "Correct horse battery",
            "",
            "correct horse battery ",
        ] {
            assert!(!verify(wrong, Some(&a)), "{wrong:?}");
        }
        assert!(!verify("correct horse battery", None));
        assert!(!verify("correct horse battery", Some("not a phc string")));
    }

    #[tokio::test]
    async fn the_gate_runs_a_bounded_number_and_turns_the_rest_away() {
        let gate = std::sync::Arc::new(Gate::new(1));
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let wait = std::sync::Arc::new(std::sync::Mutex::new(wait));
        let mut held = Vec::new();
        for _ in 0..5 {
            let (gate, wait) = (gate.clone(), wait.clone());
            held.push(tokio::spawn(async move {
                gate.run(move || wait.lock().unwrap().recv().unwrap()).await
            }));
        }
        // Let the five be admitted (one running, four waiting).
        while gate.admitted.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        assert!(gate.run(|| ()).await.is_err(), "a sixth is turned away");
        for _ in 0..5 {
            release.send(()).unwrap();
        }
        for h in held {
            assert!(h.await.unwrap().is_ok());
        }
        assert!(gate.run(|| ()).await.is_ok(), "free again");
    }

    #[test]
    fn weak_passwords_are_refused_with_the_rule() {
        assert!(check_new("short").unwrap_err().contains("at least 12"));
        assert!(check_new("            ")
            .unwrap_err()
            .contains("white space"));
        assert!(check_new(&"x".repeat(MAX_BYTES + 1))
            .unwrap_err()
            .contains("longer"));
        // Characters, not bytes: 12 Hangul syllables pass.
        assert!(check_new("가나다라마바사아자차카타").is_ok());
        assert!(check_new("가나다라마바사아자차카").is_err());
    }
}
