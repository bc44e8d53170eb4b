//! Detector quality: the labelled corpus (`apitree::detect::eval`) through `apitree detect
//! replay`'s code, side by side with a windowed Gaussian and a rolling median/MAD, scored per
//! category and overall (null detector 0, perfect 100).
//!
//!   cargo bench --bench detector_quality                   # the table
//!   cargo bench --bench detector_quality -- --write DIR    # also the corpus as CSV + labels
//!   cargo bench --bench detector_quality -- --series ramp  # also each series of a category:
//!                                                          # when each detector first fired in
//!                                                          # each window, and where it fired
//!                                                          # outside them
//!
//! Runs only under `cargo bench` (it exits at once under `cargo test --all-targets`).

use std::time::Instant;

use apitree::crd::gateway::DetectionSpec;
use apitree::detect::eval::{self, CATEGORIES, DETECTORS};
use apitree::detect::ScoreConfig;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let cfg = ScoreConfig::from(&DetectionSpec::default());
    let started = Instant::now();
    let corpus = eval::corpus();
    if let Some(dir) = args
        .iter()
        .position(|a| a == "--write")
        .and_then(|i| args.get(i + 1))
    {
        write(dir, &corpus);
    }
    let scores = eval::run_all(&corpus, &cfg);
    let rows: usize = corpus.iter().map(|s| s.times.len()).sum();
    let thresholds: Vec<f64> = scores
        .iter()
        .enumerate()
        .map(|(d, sc)| {
            if d == 0 {
                eval::DETECTOR_THRESHOLD
            } else {
                eval::best_threshold(&corpus, sc)
            }
        })
        .collect();
    let results: Vec<_> = scores
        .iter()
        .zip(&thresholds)
        .map(|(sc, t)| eval::tallies(&corpus, sc, *t))
        .collect();
    println!(
        "detector quality: {} series, {rows} windows, {} categories (null detector 0, perfect 100)",
        corpus.len(),
        CATEGORIES.len()
    );
    print!("{:<20}", "category");
    for (d, t) in DETECTORS.iter().zip(&thresholds) {
        print!("  {:>24}", format!("{d} @{t:.2}"));
    }
    println!();
    for (c, category) in CATEGORIES.iter().enumerate() {
        print!("{category:<20}");
        for (per, _) in &results {
            let t = per[c];
            print!(
                "  {:>24}",
                format!(
                    "{:6.1} ({}/{} fp {})",
                    t.normalised(),
                    t.detected,
                    t.detected + t.missed,
                    t.false_positives
                )
            );
        }
        println!();
    }
    print!("{:<20}", "overall");
    for (_, all) in &results {
        print!(
            "  {:>24}",
            format!(
                "{:6.1} ({}/{} fp {})",
                all.normalised(),
                all.detected,
                all.detected + all.missed,
                all.false_positives
            )
        );
    }
    println!();
    if let Some(category) = args
        .iter()
        .position(|a| a == "--series")
        .and_then(|i| args.get(i + 1))
    {
        for (k, series) in corpus.iter().enumerate() {
            if series.category != category.as_str() {
                continue;
            }
            println!("{}: windows {:?}", series.name, series.windows);
            for ((d, sc), t) in DETECTORS.iter().zip(&scores).zip(&thresholds) {
                println!("  {d:<20} {}", detections(&sc[k], *t, &series.windows));
            }
        }
    }
    eprintln!("({:.1}s)", started.elapsed().as_secs_f64());
}

/// Where a detector fired on one series: each window's first detection as rows after its
/// start (or "miss"), then the rows it fired outside every window.
fn detections(scores: &[f64], threshold: f64, windows: &[(usize, usize)]) -> String {
    let fired = |i: usize| scores[i] >= threshold;
    let mut out: Vec<String> = windows
        .iter()
        .map(|&(a, b)| match (a..b).find(|&i| fired(i)) {
            Some(i) => format!("+{}", i - a),
            None => "miss".to_string(),
        })
        .collect();
    let outside: Vec<String> = (eval::WARM_UP..scores.len())
        .filter(|&i| fired(i) && !windows.iter().any(|&(a, b)| i >= a && i < b))
        .map(|i| i.to_string())
        .collect();
    if !outside.is_empty() {
        out.push(format!("outside: {}", outside.join(" ")));
    }
    out.join("  ")
}

fn write(dir: &str, corpus: &[eval::Labelled]) {
    std::fs::create_dir_all(dir).expect("create the corpus directory");
    let mut labels = serde_json::Map::new();
    for s in corpus {
        let file = format!("{}.csv", s.name.replace([' ', ','], "_"));
        std::fs::write(format!("{dir}/{file}"), s.csv()).expect("write a series");
        let windows: Vec<serde_json::Value> = s
            .windows
            .iter()
            .map(|&(a, b)| serde_json::json!([s.times[a], s.times[b - 1]]))
            .collect();
        labels.insert(file, serde_json::Value::Array(windows));
    }
    std::fs::write(
        format!("{dir}/labels.json"),
        serde_json::to_string_pretty(&labels).expect("labels as JSON"),
    )
    .expect("write labels.json");
    eprintln!("corpus written to {dir} (labels.json: first and last timestamp of each window)");
}
