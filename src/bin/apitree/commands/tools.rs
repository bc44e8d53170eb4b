//! Commands that need no server: the CRDs, the PII scanner and the detector's replay.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::{anyhow, Result};

use apitree::cli::{CrdsArgs, OutputFormat};
use apitree::crd;
use apitree::proxy::pii;

pub fn detect_replay(input: &Path, config: Option<&Path>, format: OutputFormat) -> Result<()> {
    use apitree::crd::gateway::DetectionSpec;
    use apitree::detect::{replay, ScoreConfig};
    let spec: DetectionSpec = match config {
        None => DetectionSpec::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
            serde_saphyr::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?
        }
    };
    // The thresholds are what a replay uses; the source does not matter here.
    if let Some(problem) = spec.thresholds.order_problem() {
        return Err(anyhow!(problem));
    }
    // Streamed: each verdict is written as its row is read, in bounded memory.
    let reader: Box<dyn std::io::BufRead + 'static> = if input == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(input)
            .map_err(|e| anyhow!("cannot read {}: {e}", input.display()))?;
        Box::new(std::io::BufReader::new(file))
    };
    let cfg = ScoreConfig::from(&spec);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    replay::replay_stream(reader, &cfg, |r| match format {
        OutputFormat::Json => writeln!(out, "{}", serde_json::to_string(&r)?),
        OutputFormat::Text => writeln!(out, "{}", replay::text_line(&r)),
    })
    .map_err(|e| match e {
        replay::StreamError::Output(e) => anyhow!(e),
        e => anyhow!("{}: {e}", input.display()),
    })?;
    out.flush()?;
    Ok(())
}

pub fn pii_scan(mask: bool, format: OutputFormat) -> Result<()> {
    let mut stdin = std::io::stdin().lock();
    if mask {
        let stdout = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
        let summary = pii::mask_stream(stdin, stdout)?.summary();
        eprintln!(
            "masked: {}",
            if summary.is_empty() {
                "nothing found".into()
            } else {
                summary
            }
        );
        return Ok(());
    }
    let mut text = Vec::new();
    stdin.read_to_end(&mut text)?;
    let (found, counts) = pii::locate(&text);
    match format {
        OutputFormat::Json => {
            let rows: Vec<serde_json::Value> = found
                .iter()
                .map(|f| {
                    serde_json::json!({
                        "kind": f.kind.label(),
                        "line": f.line,
                        "column": f.column,
                        "masked": f.masked,
                    })
                })
                .collect();
            let by_kind: serde_json::Map<String, serde_json::Value> = pii::PiiKind::ALL
                .iter()
                .map(|k| (k.label().to_string(), counts.0[*k as usize].into()))
                .collect();
            outln!(
                "{}",
                serde_json::json!({"findings": rows, "counts": by_kind})
            )?;
        }
        OutputFormat::Text => {
            for f in &found {
                outln!("{}:{}\t{}\t{}", f.line, f.column, f.kind.label(), f.masked)?;
            }
            eprintln!("{} finding(s)", found.len());
        }
    }
    Ok(())
}

pub fn crds(args: CrdsArgs) -> Result<()> {
    if args.out.is_empty() {
        print!("{}", crd::render_all()?);
        return Ok(());
    }
    for dir in &args.out {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow!("cannot create directory {}: {e}", dir.display()))?;
        for def in crd::all_crds() {
            let path = dir.join(crd::crd_file_name(&def));
            std::fs::write(&path, crd::render_crd(&def)?)
                .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}
