//! The shell snippets people copy first, run as written: the blocks marked
//! `<!-- tests/docs_snippets.rs runs this block … -->` in README.md and docs/*.md (the mark on
//! the line right before the block's sh fence) and the commands in the comments of
//! `examples/local/shop.yaml`. `apitree` and `cargo run [--release] --` run this build's
//! binary; nothing else in a snippet is changed, except that a snippet's database is a fresh
//! one of the test's and a `<ID>` placeholder is the id the snippet's own listing printed.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::TestDb;

const MARK: &str = "<!-- tests/docs_snippets.rs runs this block";

/// The snippets listen on the ports they name (8080, 9090, 18000…): one at a time.
static PORTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The docs' marked blocks, in order: README.md's, then those of every docs/*.md file in name
/// order.
fn marked_blocks() -> Vec<String> {
    let mut files = vec![root().join("README.md")];
    files.extend(common::files_under(&root().join("docs"), &["md"]));
    let mut blocks = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            if line.starts_with(MARK) {
                let fence = lines.next().unwrap_or_default();
                assert!(
                    fence.starts_with("```sh"),
                    "{}: a mark is followed by a sh block: {fence:?}",
                    file.display()
                );
                let body: Vec<&str> = lines
                    .by_ref()
                    .take_while(|l| !l.starts_with("```"))
                    .collect();
                blocks.push(body.join("\n"));
            }
        }
    }
    blocks
}

/// A directory of shims: `apitree` is this build's binary, `cargo run [--release] -- ARGS`
/// runs it with ARGS (anything else `cargo` is asked fails the snippet).
fn shims() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_apitree");
    let write = |name: &str, body: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    write("apitree", format!("#!/bin/sh\nexec '{bin}' \"$@\"\n"));
    write(
        "cargo",
        format!(
            "#!/bin/sh\n[ \"$1\" = run ] || {{ echo \"cargo $1: not in this test\" >&2; exit 2; }}\nshift\n\
             [ \"$1\" = --release ] && shift\n[ \"$1\" = -- ] && shift\nexec '{bin}' \"$@\"\n"
        ),
    );
    dir
}

/// Runs `script` with bash from the repository's root, in its own process group (killed when
/// it ends, with whatever it left in the background); stdout and stderr, or why it failed.
fn run(script: &str, shims: &Path, timeout: Duration) -> Result<(String, String), String> {
    use std::os::unix::process::CommandExt;
    let _one_at_a_time = PORTS.lock().unwrap_or_else(|p| p.into_inner());
    let path = format!(
        "{}:{}",
        shims.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new("bash")
        .args(["-e", "-o", "pipefail", "-c", script])
        .current_dir(root())
        .env("PATH", path)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let group = child.id() as i32;
    let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let (out, err) = (read(Box::new(out)), read(Box::new(err)));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > timeout {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // The snippet's own background jobs, and anything they started. (bash's kill: procps-ng
    // 4.0.2's `kill -KILL -PGID` reads the group as `-1` and signals every process.)
    assert!(group > 1);
    let _ = Command::new("bash")
        .args(["-c", &format!("kill -s KILL -- -{group}")])
        .status();
    let _ = child.wait();
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    match status {
        Some(s) if s.success() => Ok((out, err)),
        Some(s) => Err(format!("{s}\n--- stdout\n{out}\n--- stderr\n{err}")),
        None => Err(format!(
            "still running after {timeout:?}\n--- stdout\n{out}\n--- stderr\n{err}"
        )),
    }
}

/// The gateway with a throwaway upstream: it answers with a key, refuses past the burst with
/// 429s, and masks PII; the block stops what it started.
#[test]
fn the_readmes_gateway_block_runs_as_written() {
    let block = marked_blocks()
        .into_iter()
        .find(|b| b.contains("proxy --config examples/proxy.yaml"))
        .expect("the docs' gateway block is marked");
    let shims = shims();
    let (out, err) =
        run(&block, shims.path(), Duration::from_secs(90)).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.contains("Directory listing"),
        "the upstream answered through the gateway:\n{out}\n{err}"
    );
    assert!(
        out.contains("200 ") && out.contains("429 "),
        "some pass, then 429s:\n{out}"
    );
    assert!(
        out.contains("900101-1******, 010-****-5678"),
        "the PII is masked:\n{out}"
    );
    assert!(!out.contains("900101-1234568"), "{out}");
}

/// The Connector Agent on one machine: the control plane's keys and token made as shown,
/// `apitree local` serving the agent endpoint, an agent that receives its pool's routes and
/// serves the bank's API with the example key, and the gateway's status listing it; the
/// agent's token and signing key appear in no log line.
#[test]
fn the_readmes_agent_block_runs_as_written() {
    let block = marked_blocks()
        .into_iter()
        .find(|b| b.contains("apitree agent keygen"))
        .expect("the docs' agent block is marked");
    let shims = shims();
    let (out, err) =
        run(&block, shims.path(), Duration::from_secs(120)).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.contains("Directory listing"),
        "the bank's API answered through the agent:\n{out}\n{err}"
    );
    assert!(
        out.contains(r#""route":"accounts""#),
        "the agent's access log names the pool's route:\n{out}"
    );
    assert!(
        out.contains(r#""name":"bank-a-1","pool":"bank-a","state":"Connected""#),
        "the gateway lists its agent:\n{out}\n{err}"
    );
    for secret in ["agt_bank-a-1_", "apitree-ed25519-pkcs8:"] {
        assert!(
            !err.contains(secret) && !out.contains(secret),
            "{secret} was logged"
        );
    }
}

/// Database mode end to end, on a database of the test's own.
#[tokio::test]
async fn the_readmes_database_block_runs_as_written() {
    let tdb = TestDb::new().await;
    let block = marked_blocks()
        .into_iter()
        .find(|b| b.contains("apitree migrate"))
        .expect("the docs' database block is marked");
    let named = "postgres://postgres@127.0.0.1:5432/apitree ";
    assert!(
        block.contains(named),
        "the block names its database: {block}"
    );
    let block = block.replace(named, &format!("{} ", tdb.url)).replace(
        "<ID>",
        "\"$(apitree keys list | awk 'NR == 2 { print $1 }')\"",
    );
    let shims = shims();
    let (out, err) =
        tokio::task::spawn_blocking(move || run(&block, shims.path(), Duration::from_secs(60)))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{e}"));
    let key = out
        .lines()
        .find(|l| l.starts_with("at_live_"))
        .unwrap_or_else(|| panic!("the key is printed once:\n{out}\n{err}"));
    assert!(!err.contains(key), "the key is not in the log: {err}");
    assert!(out.contains("active"), "keys list shows the key: {out}");
    assert!(
        err.contains("valid until"),
        "the rotation says until when: {err}"
    );
}

/// `examples/local/shop.yaml`'s comment: run `apitree local` as shown, and the curl it gives
/// reaches the status API through the example gateway.
#[test]
fn the_local_examples_commands_work_as_written() {
    let text = std::fs::read_to_string(root().join("examples/local/shop.yaml")).unwrap();
    // Commands are the comment lines indented by three spaces, with their continuations.
    let mut commands: Vec<String> = Vec::new();
    let mut continued = false;
    for line in text.lines().take_while(|l| l.starts_with('#')) {
        let Some(cmd) = line.strip_prefix("#   ") else {
            continued = false;
            continue;
        };
        let cmd = cmd.trim();
        if continued {
            commands.last_mut().unwrap().push_str(&format!(" {cmd}"));
        } else if cmd.starts_with("apitree ") || cmd.starts_with("curl ") {
            commands.push(cmd.to_string());
        } else {
            continue;
        }
        continued = cmd.ends_with('\\');
    }
    let commands: Vec<String> = commands.iter().map(|c| c.replace("\\ ", "")).collect();
    let (local, curl) = match commands.as_slice() {
        [local, curl] if local.starts_with("apitree local") && curl.starts_with("curl ") => {
            (local, curl)
        }
        other => panic!("the example shows `apitree local` and a curl: {other:?}"),
    };
    let script = format!(
        "{local} &\nfor i in $(seq 120); do\n  if out=$({curl} -sf); then echo \"$out\"; exit 0; fi\n  sleep 1\ndone\nexit 1\n",
        curl = curl.trim_end_matches('\\').trim()
    );
    let shims = shims();
    let (out, err) =
        run(&script, shims.path(), Duration::from_secs(150)).unwrap_or_else(|e| panic!("{e}"));
    let status: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| {
        panic!("the status API's JSON through the gateway ({e}):\n{out}\n{err}")
    });
    assert!(status.to_string().contains("shop"), "{status}");
}
