//! Scoring throughput: one detector tick over many series, each with a day of history.
//!
//!   cargo bench --bench scoring            # 100,000 series (the goal: every tick under 50 ms)
//!   cargo bench --bench scoring -- 20000   # another count
//!
//! Runs only under `cargo bench` (it exits at once under `cargo test --all-targets`).

use std::time::Instant;

use apitree::crd::gateway::DetectionSpec;
use apitree::detect::{ScoreConfig, Series};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let count: usize = args
        .iter()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let cfg = ScoreConfig::from(&DetectionSpec::default());
    let t0: i64 = 1_767_225_600;
    let history_windows = 288; // one day of 5-minute windows
    let started = Instant::now();
    let mut series: Vec<Series> = (0..count).map(|_| Series::default()).collect();
    for (i, s) in series.iter_mut().enumerate() {
        for w in 0..history_windows {
            let requests = 1_000 + ((i * 7 + w * 13) % 500) as u64;
            let errors = requests / 100 + (w % 3) as u64;
            s.observe_errors(t0 + w as i64 * 300, requests, errors, &cfg);
        }
    }
    eprintln!(
        "built {count} series x {history_windows} windows of history in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    // One tick: every series scores its newest window (1 in 100 is a real spike).
    let at = t0 + history_windows as i64 * 300;
    let mut best = f64::MAX;
    let mut worst = 0.0f64;
    for round in 0..5 {
        let start = Instant::now();
        let mut raised = 0;
        for (i, s) in series.iter_mut().enumerate() {
            let requests = 1_200;
            let errors = if i % 100 == 0 { 150 } else { 12 };
            if s.observe_errors(at + round * 300, requests, errors, &cfg)
                .event
                .is_some()
            {
                raised += 1;
            }
        }
        let ms = start.elapsed().as_secs_f64() * 1e3;
        best = best.min(ms);
        worst = worst.max(ms);
        eprintln!("tick {round}: {count} series scored in {ms:.1} ms ({raised} incident events)");
    }
    println!(
        "scoring: {count} series per tick on one core: best of 5 {best:.1} ms ({:.0} ns per \
         series), worst {worst:.1} ms",
        best * 1e6 / count as f64
    );
}
