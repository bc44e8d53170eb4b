//! The detector on synthetic traces, through the same replay command users tune with.

use std::process::Command;

use apitree::crd::gateway::DetectionSpec;
use apitree::detect::{replay, ScoreConfig};
use rand::{rngs::StdRng, RngExt, SeedableRng};

const T0: i64 = 1_767_225_600; // a Thursday, 00:00 UTC
const WINDOW: i64 = 300;

/// Diurnal traffic (quiet nights, busy afternoons) with a steady 1% error ratio and binomial
/// noise (normal approximation), one row per 5-minute window.
fn diurnal_week(seed: u64, spike: Option<(usize, usize, f64)>) -> String {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut csv = String::from("timestamp,requests,errors\n");
    for i in 0..(7 * 288) {
        let at = T0 + i as i64 * WINDOW;
        let hour = ((at % 86_400) as f64) / 3600.0;
        let level = 0.5 - 0.5 * ((hour - 3.0) / 24.0 * std::f64::consts::TAU).cos(); // 0 at 03:00, 1 at 15:00
        let requests = (40.0 + 4000.0 * level * rng.random_range(0.85..1.15)) as u64;
        let mut p = 0.01;
        if let Some((from, to, ratio)) = spike {
            if (from..to).contains(&i) {
                p *= ratio;
            }
        }
        let mean = requests as f64 * p;
        let (u1, u2): (f64, f64) = (rng.random_range(1e-12..1.0), rng.random_range(0.0..1.0));
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        let errors = (mean + z * (mean * (1.0 - p)).sqrt())
            .round()
            .clamp(0.0, requests as f64) as u64;
        csv.push_str(&format!("{at},{requests},{errors}\n"));
    }
    csv
}

#[test]
fn a_steady_diurnal_week_with_noise_stays_silent() {
    let cfg = ScoreConfig::from(&DetectionSpec::default());
    for seed in 1..=5 {
        let rows = replay::replay(&diurnal_week(seed, None), &cfg).unwrap();
        assert_eq!(rows.len(), 2016);
        let loud: Vec<_> = rows
            .iter()
            .filter(|r| r.event.is_some() || r.severity != "none")
            .collect();
        assert!(loud.is_empty(), "seed {seed}: false alarms {loud:#?}");
    }
}

#[test]
fn an_error_burst_escalates_through_the_levels_and_resolves() {
    let cfg = ScoreConfig::from(&DetectionSpec::default());
    // Day 3 around 15:00: 20 minutes at 4x, 20 at 7x, 20 at 15x, then back to normal.
    let start = 2 * 288 + 180;
    let mut csv = String::from("timestamp,requests,errors\n");
    let base = diurnal_week(7, None);
    for (i, line) in base.lines().skip(1).enumerate() {
        let mut f: Vec<u64> = line.split(',').map(|x| x.parse().unwrap()).collect();
        let factor = match i.checked_sub(start) {
            Some(0..=3) => 4.0,
            Some(4..=7) => 7.0,
            Some(8..=11) => 15.0,
            _ => 1.0,
        };
        f[2] = ((f[2] as f64) * factor).min(f[1] as f64) as u64;
        csv.push_str(&format!("{},{},{}\n", f[0], f[1], f[2]));
    }
    let rows = replay::replay(&csv, &cfg).unwrap();
    let events: Vec<(i64, &str, &str)> = rows
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.event.map(|e| (i as i64 - start as i64, e, r.severity)))
        .collect();
    assert_eq!(
        events.iter().map(|e| (e.1, e.2)).collect::<Vec<_>>(),
        [
            ("open", "warning"),
            ("escalate", "high"),
            ("escalate", "critical"),
            ("resolve", "none")
        ],
        "{events:?}"
    );
    assert_eq!(events[0].0, 0, "opens in the first bad window");
    assert!(
        events[3].0 <= 12 + 3,
        "resolves within the hysteresis after recovery: {events:?}"
    );
}

#[test]
fn the_replay_command_prints_one_json_object_per_row_and_rejects_bad_rows() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("w.csv");
    std::fs::write(&input, diurnal_week(3, Some((1044, 1050, 12.0)))).unwrap();
    let cfg = dir.path().join("d.yaml");
    std::fs::write(
        &cfg,
        "thresholds: { warning: 2, high: 4, critical: 8 }\nresolveAfterWindows: 2\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_apitree"))
        .args([
            "detect",
            "replay",
            "--input",
            input.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2016);
    for key in [
        "timestamp",
        "baseline",
        "ratio",
        "p_value",
        "severity",
        "anomaly_score",
        "event",
    ] {
        assert!(
            rows[1044].get(key).is_some(),
            "{key} missing: {}",
            rows[1044]
        );
    }
    assert_eq!(rows[1044]["event"], "open");
    assert_eq!(rows[1044]["severity"], "critical");
    assert!(rows[1044]["anomaly_score"].as_f64().unwrap() > 0.9);

    std::fs::write(
        &input,
        "timestamp,requests,errors\n1767225600,100,1\n1767225900,ten,1\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_apitree"))
        .args(["detect", "replay", "--input", input.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 3: requests \"ten\" is not a whole number"),
        "{err}"
    );

    std::fs::write(&cfg, "thresholds: { warning: 5, high: 4, critical: 8 }\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_apitree"))
        .args([
            "detect",
            "replay",
            "--input",
            input.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning < high < critical"));
}
