//! `strait policy test`: runs every rule named `test_*` in the given Rego files, as `opa test` does. A test
//! passes when its rule evaluates to `true`.

use std::path::{Path, PathBuf};

use crate::engine::{PolicyEngine, RegoVersion, DEFAULT_BUDGET};

#[derive(Debug, Clone)]
pub struct TestResult {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.path());
        for e in entries {
            collect(&e.path(), out)?;
        }
    } else if path.extension().is_some_and(|e| e == "rego" || e == "json") {
        out.push(path.to_owned());
    }
    Ok(())
}

/// Test rule names in a module: `test_x` at the start of a line, with the module's package.
fn test_rules(src: &str) -> Vec<String> {
    let Some(pkg) = src.lines().find_map(|l| l.trim().strip_prefix("package ")) else {
        return Vec::new();
    };
    let mut rules: Vec<String> = src
        .lines()
        .filter_map(|l| {
            let name: String = l
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            name.starts_with("test_")
                .then(|| format!("data.{}.{name}", pkg.trim()))
        })
        .collect();
    rules.dedup();
    rules
}

/// Loads `.rego` modules and `data.json`-style JSON files from `paths` and runs the tests.
pub fn run(paths: &[PathBuf], version: RegoVersion) -> Result<Vec<TestResult>, String> {
    let mut files = Vec::new();
    for p in paths {
        collect(p, &mut files).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    let mut modules = Vec::new();
    let mut data = serde_json::json!({});
    for f in &files {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        if f.extension().is_some_and(|e| e == "json") {
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", f.display()))?;
            if let (Some(d), Some(v)) = (data.as_object_mut(), v.as_object()) {
                d.extend(v.clone());
            }
        } else {
            modules.push((f.display().to_string(), text));
        }
    }
    if modules.is_empty() {
        return Err("no .rego files found".into());
    }
    let engine = PolicyEngine::new(
        &modules,
        &data,
        version,
        "strait/test/unused",
        DEFAULT_BUDGET,
    )
    .map_err(|e| e.to_string())?;
    let mut results = Vec::new();
    for (_, src) in &modules {
        for rule in test_rules(src) {
            let (passed, detail) = match engine.eval_rule(&rule, None) {
                Ok(regorus::Value::Bool(true)) => (true, String::new()),
                Ok(regorus::Value::Undefined) => (false, "undefined".into()),
                Ok(v) => (false, format!("evaluated to {v}")),
                Err(e) => (false, format!("error: {e}")),
            };
            results.push(TestResult {
                name: rule,
                passed,
                detail,
            });
        }
    }
    Ok(results)
}
