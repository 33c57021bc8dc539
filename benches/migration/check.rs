//! Whether the result file holds everything a run promised: every transport's raw figure, every
//! case with all its runs and, for each completed run, every figure the tables show; every
//! cancel run with its timings; and each case's plot on disk. CI runs the quick mode and fails
//! on a gap, without judging any figure.

use std::path::Path;

use serde_json::Value;

/// Figures a completed migration always has.
const RUN_FIGURES: &[&str] = &[
    "total_ms",
    "setup_ms",
    "downtime_ms",
    "guest_blackout_ms",
    "transferred_mib",
    "transferred_gib_per_s",
    "transferred_pct_of_raw",
    "transferred_pct_of_fresh_raw",
    "rounds",
    "source_overhead_mib",
    "destination_overhead_mib",
];

/// Figures a cancel run that canceled always has.
const CANCEL_FIGURES: &[&str] = &["reply_ms", "canceled_ms", "stall_ms", "latency_ms"];

/// What the file at `path` lacks of `cases` (names), `transports` and `cancels` (transport
/// names), each with `runs` runs; empty when complete.
pub fn gaps(
    path: &Path,
    transports: &[&str],
    cases: &[String],
    cancels: &[&str],
    runs: usize,
) -> Vec<String> {
    let record: Value = match std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
    {
        Ok(record) => record,
        Err(error) => return vec![format!("{}: {error}", path.display())],
    };
    let mut gaps = Vec::new();
    let named = |list: &str, key: &str, name: &str| {
        record[list]
            .as_array()
            .and_then(|items| items.iter().find(|item| item[key] == name))
            .cloned()
    };
    for transport in transports {
        match named("raw", "transport", transport) {
            Some(raw) if !raw["gib_per_s"]["median"].is_number() => {
                gaps.push(format!("raw {transport}: no median throughput"))
            }
            Some(raw) if !raw["fresh_memory"]["gib_per_s"]["median"].is_number() => {
                gaps.push(format!("raw {transport}: no median into fresh memory"))
            }
            Some(_) => {}
            None => gaps.push(format!("raw {transport}: missing")),
        }
    }
    for case in cases {
        let Some(result) = named("cases", "case", case) else {
            gaps.push(format!("case {case}: missing"));
            continue;
        };
        if result["unsupported"] == true {
            continue;
        }
        let results = result["results"].as_array().cloned().unwrap_or_default();
        if results.len() != runs {
            gaps.push(format!("case {case}: {} of {runs} runs", results.len()));
        }
        for (index, run) in results.iter().enumerate() {
            if run["status"] != "completed" {
                continue;
            }
            for figure in RUN_FIGURES {
                if !run[figure].is_number() {
                    gaps.push(format!("case {case} run {}: no {figure}", index + 1));
                }
            }
        }
        match result["plot"].as_str() {
            Some(plot) if Path::new(plot).is_file() => {}
            _ => gaps.push(format!("case {case}: no plot")),
        }
    }
    for transport in cancels {
        let Some(cancel) = named("cancel", "transport", transport) else {
            gaps.push(format!("cancel {transport}: missing"));
            continue;
        };
        let results = cancel["results"].as_array().cloned().unwrap_or_default();
        if results.len() != runs {
            gaps.push(format!(
                "cancel {transport}: {} of {runs} runs",
                results.len()
            ));
        }
        for (index, run) in results.iter().enumerate() {
            if run["status"] != "canceled" {
                continue;
            }
            for figure in CANCEL_FIGURES {
                if !run[figure].is_number() {
                    gaps.push(format!("cancel {transport} run {}: no {figure}", index + 1));
                }
            }
        }
    }
    gaps
}
