//! `strait policy compile|eval|test`.

use std::io::Read;

use anyhow::{bail, Context as _};
use strait_policy::bundle::Bundle;
use strait_policy::engine::{PolicyEngine, RegoVersion, DEFAULT_BUDGET};
use strait_policy::workflow::Workflow;

use crate::cli::PolicyCommand;

pub fn run(cmd: PolicyCommand) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Compile {
            file,
            out,
            custom,
            dry_run,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let wf = Workflow::from_yaml(&text).with_context(|| file.display().to_string())?;
            let custom = custom
                .iter()
                .map(|p| {
                    std::fs::read_to_string(p)
                        .map(|s| (p.display().to_string(), s))
                        .with_context(|| format!("reading {}", p.display()))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let bundle = Bundle::from_workflow(&wf, &custom, dry_run)?;
            // Prove it compiles before writing anything.
            bundle
                .engine(DEFAULT_BUDGET)
                .context("the compiled bundle does not load")?;
            bundle.write_tar_gz(&out)?;
            println!(
                "{}: workflow {} ({} steps, {} custom modules) -> {} (revision {})",
                file.display(),
                wf.metadata.name,
                wf.steps.len(),
                custom.len(),
                out.display(),
                &bundle.manifest.revision[..16]
            );
            Ok(())
        }
        PolicyCommand::Eval {
            bundle,
            input,
            path,
        } => {
            let b = Bundle::load(&bundle)?;
            let mut text = String::new();
            if input.as_os_str() == "-" {
                std::io::stdin().read_to_string(&mut text)?;
            } else {
                text = std::fs::read_to_string(&input)
                    .with_context(|| format!("reading {}", input.display()))?;
            }
            let doc: serde_json::Value =
                serde_json::from_str(&text).with_context(|| input.display().to_string())?;
            let engine = match &path {
                Some(p) => {
                    PolicyEngine::new(&b.modules, &b.data, b.rego_version(), p, DEFAULT_BUDGET)?
                }
                None => b.engine(DEFAULT_BUDGET)?,
            };
            let decision = engine.decide(&doc);
            let result = engine
                .eval_rule(engine.decision_rule(), Some(&doc))
                .ok()
                .and_then(|v| serde_json::to_value(&v).ok());
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "decision_path": engine.decision_rule(),
                    "revision": b.manifest.revision,
                    "allowed": decision.allowed,
                    "reason": decision.reason,
                    "result": result,
                    "eval_micros": decision.took.as_micros() as u64,
                }))?
            );
            if !decision.allowed {
                std::process::exit(1);
            }
            Ok(())
        }
        PolicyCommand::Test { paths, v0, verbose } => {
            if paths.is_empty() {
                bail!("give one or more .rego files or directories");
            }
            let version = if v0 { RegoVersion::V0 } else { RegoVersion::V1 };
            let results =
                strait_policy::testing::run(&paths, version).map_err(anyhow::Error::msg)?;
            let failed = results.iter().filter(|r| !r.passed).count();
            for r in &results {
                if !r.passed {
                    println!("FAIL {} ({})", r.name, r.detail);
                } else if verbose {
                    println!("PASS {}", r.name);
                }
            }
            println!("{} passed, {} failed", results.len() - failed, failed);
            if failed > 0 {
                std::process::exit(1);
            }
            if results.is_empty() {
                bail!("no test_* rules found");
            }
            Ok(())
        }
    }
}
