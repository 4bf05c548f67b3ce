//! Printing case reports, as text for people or JSON for tools.

use std::process::ExitCode;

use super::{CaseReport, TableOutcome, Tally};

/// Prints the reports and returns the exit status: success only when nothing failed.
pub fn print(reports: &[CaseReport], json: bool, tool: &str) -> ExitCode {
    if !json {
        for r in reports {
            print!("{}", render(r));
        }
    }
    print_summary(reports, json, tool)
}

/// Prints the closing summary (or, for `json`, the whole report) and returns the exit
/// status, for runners that print each case's text as it finishes.
pub fn print_summary(reports: &[CaseReport], json: bool, tool: &str) -> ExitCode {
    let mut total = Tally::default();
    for r in reports {
        let c = r.counts();
        total.passed += c.passed;
        total.failed += c.failed;
        total.skipped += c.skipped;
    }
    if json {
        let doc = serde_json::json!({ "cases": reports, "passed": total.passed, "failed": total.failed, "skipped": total.skipped });
        println!("{}", serde_json::to_string_pretty(&doc).expect("reports serialize"));
    } else {
        let failed_cases = reports.iter().filter(|r| r.counts().failed > 0).count();
        println!();
        println!("{} cases, {} with failures", reports.len(), failed_cases);
        if total.skipped > 0 {
            println!(
                "{tool}: {} passed, {} failed, {} skipped",
                total.passed, total.failed, total.skipped
            );
        } else {
            println!("{tool}: {} passed, {} failed", total.passed, total.failed);
        }
    }
    if total.failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// The text report of one case.
pub fn render(r: &CaseReport) -> String {
    let mut out = format!("CASE {}: {}\n", r.file.display(), r.name);
    for (i, s) in r.steps.iter().enumerate() {
        out.push_str(&format!("  step {}: {}\n", i + 1, s.description));
        for rej in &s.rejected {
            out.push_str(&format!("    rejected (not applied): {rej}\n"));
        }
        for t in &s.tables {
            let label = format!("{}/{}", t.protocol.to_uppercase(), t.port);
            match &t.outcome {
                TableOutcome::Pass => out.push_str(&format!("    {label:<9} PASS\n")),
                TableOutcome::Skipped { reason } => {
                    out.push_str(&format!("    {label:<9} SKIP: {reason}\n"))
                }
                TableOutcome::Error { message } => {
                    out.push_str(&format!("    {label:<9} FAIL: {message}\n"));
                    if let Some(o) = &t.observed {
                        out.push_str("      observed:\n");
                        out.push_str(&o.render("        "));
                    }
                }
                TableOutcome::Fail { diffs } => {
                    out.push_str(&format!("    {label:<9} FAIL: {} cells differ\n", diffs.len()));
                    if let Some(o) = &t.observed {
                        out.push_str("      observed:\n");
                        out.push_str(&o.render("        "));
                    }
                    out.push_str("      differing cells:\n");
                    for d in diffs {
                        out.push_str(&format!(
                            "        {} -> {}: expected {}, observed {}\n",
                            d.from,
                            d.to,
                            d.expected.symbol(),
                            d.observed.symbol()
                        ));
                    }
                }
            }
        }
    }
    if let Some(e) = &r.error {
        out.push_str(&format!("  ERROR: {e}\n"));
    }
    out
}
