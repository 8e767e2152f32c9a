//! The Rego engine (regorus), prepared once per bundle and cloned per decision (cloning shares the parsed
//! policy and data, ~0.1 µs), and the decision it returns.
//!
//! Fail closed: an undefined result, a result of the wrong type, an evaluation error or exceeding the time
//! budget is a **deny**, with the reason saying which.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use regorus::Value;
use serde::Serialize;

/// Where the decision is read from unless the bundle says otherwise (OPA-Envoy's default).
pub const DEFAULT_DECISION_PATH: &str = "envoy/authz/allow";

/// How Rego source is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegoVersion {
    V0,
    #[default]
    V1,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{file}: {message}")]
    Compile { file: String, message: String },
    #[error("data: {0}")]
    Data(String),
    #[error("bad decision path {0:?}: use slash-separated identifiers such as envoy/authz/allow")]
    DecisionPath(String),
}

/// What the proxy does with a request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    /// Status for a denial (403 unless the policy says otherwise).
    pub http_status: u16,
    /// Headers to send with a denial.
    pub headers: Vec<(String, String)>,
    /// Body of a denial.
    pub body: Option<String>,
    /// Headers to add to an allowed request before forwarding.
    pub request_headers_to_add: Vec<(String, String)>,
    /// Headers to add to the response of an allowed request.
    pub response_headers_to_add: Vec<(String, String)>,
    /// Headers to strip from an allowed request.
    pub request_headers_to_remove: Vec<String>,
    /// Why: the policy's own `reason` if it gave one, otherwise how the decision was reached.
    pub reason: String,
    /// Evaluation time.
    #[serde(serialize_with = "micros")]
    pub took: Duration,
}

fn micros<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_micros() as u64)
}

impl Decision {
    pub fn deny(reason: impl Into<String>, took: Duration) -> Self {
        Self {
            allowed: false,
            http_status: 403,
            headers: Vec::new(),
            body: None,
            request_headers_to_add: Vec::new(),
            response_headers_to_add: Vec::new(),
            request_headers_to_remove: Vec::new(),
            reason: reason.into(),
            took,
        }
    }

    /// Interprets a policy result: a boolean, or an object with `allowed` (required) and optional
    /// `http_status`, `headers`, `body`, `response_headers_to_add`, `request_headers_to_remove`, `reason`.
    pub fn from_result(v: &Value, took: Duration) -> Self {
        match v {
            Value::Undefined => Self::deny("policy result undefined (default deny)", took),
            Value::Bool(true) => Self {
                reason: "allowed by policy".into(),
                allowed: true,
                ..Self::deny("", took)
            },
            Value::Bool(false) => Self::deny("denied by policy", took),
            Value::Object(_) => Self::from_object(v, took),
            other => Self::deny(
                format!("policy result is neither a boolean nor an object: {other}"),
                took,
            ),
        }
    }

    /// Reads a result object straight from the engine's value (no JSON round trip on the hot path, and
    /// no `as_*` accessors: their errors allocate, and capture backtraces when enabled).
    fn from_object(j: &Value, took: Duration) -> Self {
        let Value::Object(o) = j else {
            return Self::deny("policy result is not an object", took);
        };
        let field = |key: &str| -> Option<&Value> { o.get(&Value::from(key)) };
        let Some(Value::Bool(allowed)) = field("allowed") else {
            return Self::deny("policy result object has no boolean `allowed`", took);
        };
        let allowed = *allowed;
        let text = |v: &Value| -> String {
            match v {
                Value::String(s) => s.to_string(),
                other => serde_json::to_string(other).unwrap_or_default(),
            }
        };
        let pairs = |key: &str| -> Vec<(String, String)> {
            match field(key) {
                Some(Value::Object(m)) => m.iter().map(|(k, v)| (text(k), text(v))).collect(),
                _ => Vec::new(),
            }
        };
        let status = match field("http_status") {
            Some(Value::Number(n)) => n.as_u64().filter(|s| (200..600).contains(s)),
            _ => None,
        }
        .map(|s| s as u16);
        let reason = match field("reason") {
            Some(Value::String(r)) => r.to_string(),
            _ if allowed => "allowed by policy".into(),
            _ => "denied by policy".into(),
        };
        let headers = pairs("headers");
        Self {
            allowed,
            http_status: status.unwrap_or(if allowed { 200 } else { 403 }),
            request_headers_to_add: if allowed { headers.clone() } else { Vec::new() },
            headers,
            body: match field("body") {
                Some(Value::String(b)) => Some(b.to_string()),
                _ => None,
            },
            response_headers_to_add: pairs("response_headers_to_add"),
            request_headers_to_remove: match field("request_headers_to_remove") {
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(|v| match v {
                        Value::String(s) => Some(s.to_string()),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            },
            reason,
            took,
        }
    }
}

/// A prepared policy: modules parsed, data loaded, decision rule chosen.
#[derive(Clone)]
pub struct PolicyEngine {
    engine: regorus::Engine,
    /// `data.envoy.authz.allow` form of the decision path.
    rule: String,
    budget: Duration,
    /// The decision compiled for regorus's bytecode VM, when the policy compiles for it (several times
    /// faster than the interpreter). Policies the VM cannot run (extensions, `with`, `print`) use the
    /// interpreter, which stays the reference.
    vm: Option<VmProgram>,
}

#[derive(Clone)]
struct VmProgram {
    program: std::sync::Arc<regorus::rvm::program::Program>,
    data: Value,
}

thread_local! {
    /// Loaded VMs of this thread, by program: loading a program and its data (which regorus checks
    /// against the rule tree) happens once per thread, not per decision. A few programs at most (the
    /// current bundle and the one it replaced).
    static VMS: std::cell::RefCell<Vec<(usize, regorus::rvm::RegoVM)>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl VmProgram {
    fn execute(&self, input: Value, budget: Duration) -> Result<Value, String> {
        let key = std::sync::Arc::as_ptr(&self.program) as usize;
        VMS.with(|cell| {
            let mut vms = cell.borrow_mut();
            let idx = match vms.iter().position(|(k, _)| *k == key) {
                Some(i) => i,
                None => {
                    let mut machine = regorus::rvm::RegoVM::new();
                    machine.load_program(self.program.clone());
                    machine.set_execution_timer_config(Some(
                        regorus::utils::limits::ExecutionTimerConfig {
                            limit: budget,
                            check_interval: NonZeroU32::new(64).unwrap_or(NonZeroU32::MIN),
                        },
                    ));
                    machine
                        .set_data(self.data.clone())
                        .map_err(|e| e.to_string())?;
                    if vms.len() >= 4 {
                        vms.remove(0);
                    }
                    vms.push((key, machine));
                    vms.len() - 1
                }
            };
            let machine = &mut vms[idx].1;
            machine.set_input(input);
            machine.execute().map_err(|e| e.to_string())
        })
    }
}

impl std::fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEngine")
            .field("rule", &self.rule)
            .field("budget", &self.budget)
            .finish()
    }
}

/// The default evaluation budget: far above any sane policy's cost (µs), far below a client's patience.
pub const DEFAULT_BUDGET: Duration = Duration::from_millis(100);

fn rule_for(path: &str) -> Result<String, PolicyError> {
    let path = path.trim_matches('/');
    let ok = !path.is_empty()
        && path.split('/').all(|seg| {
            !seg.is_empty()
                && seg.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !seg.starts_with(|c: char| c.is_ascii_digit())
        });
    if !ok {
        return Err(PolicyError::DecisionPath(path.into()));
    }
    Ok(format!("data.{}", path.replace('/', ".")))
}

/// Deepest nesting of `[` and `{` accepted in a Rego module. regorus 0.14's parser takes time exponential
/// in that depth (found by the `bundle` fuzz target: each level doubles it; 14 levels take 1.5 s, 20 take
/// a minute, 64 never end), so deeper sources are refused before they reach it. Policies nest a few
/// levels; deep documents belong in `data.json`, which is not parsed as Rego.
pub const MAX_NESTING: usize = 12;

/// Refuses a module whose `[` and `{` nest deeper than [`MAX_NESTING`], outside strings and comments
/// (parentheses are parsed in linear time and do not count).
fn check_nesting(src: &str) -> Result<(), String> {
    let (mut depth, mut line) = (0usize, 1usize);
    let mut chars = src.chars();
    while let Some(c) = chars.next() {
        match c {
            '\n' => line += 1,
            '#' => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        line += 1;
                        break;
                    }
                }
            }
            '"' => {
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' | '\n' => {
                            line += usize::from(c == '\n');
                            break;
                        }
                        _ => {}
                    }
                }
            }
            '`' => {
                for c in chars.by_ref() {
                    line += usize::from(c == '\n');
                    if c == '`' {
                        break;
                    }
                }
            }
            '[' | '{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(format!(
                        "line {line}: `[` and `{{` nest deeper than {MAX_NESTING} levels; split the expression or move the document into data.json"
                    ));
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

impl PolicyEngine {
    /// Parses `modules` (file name, source) and loads `data` (a JSON object).
    pub fn new(
        modules: &[(String, String)],
        data: &serde_json::Value,
        version: RegoVersion,
        decision_path: &str,
        budget: Duration,
    ) -> Result<Self, PolicyError> {
        let mut engine = regorus::Engine::new();
        engine.set_rego_v0(version == RegoVersion::V0);
        // Errors in builtins (type errors, bad arguments) are errors, not silent undefined.
        engine.set_strict_builtin_errors(true);
        crate::extensions::register(&mut engine).map_err(|e| PolicyError::Compile {
            file: "<extensions>".into(),
            message: e.to_string(),
        })?;
        for (file, src) in modules {
            check_nesting(src).map_err(|message| PolicyError::Compile {
                file: file.clone(),
                message,
            })?;
            engine
                .add_policy(file.clone(), src.clone())
                .map_err(|e| PolicyError::Compile {
                    file: file.clone(),
                    message: e.to_string(),
                })?;
        }
        engine
            .add_data(Value::from(data.clone()))
            .map_err(|e| PolicyError::Data(e.to_string()))?;
        engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
            limit: budget,
            check_interval: NonZeroU32::new(64).unwrap_or(NonZeroU32::MIN),
        });
        let rule = rule_for(decision_path)?;
        // Evaluate once on the engine itself (not a clone): regorus prepares the policy (analysis,
        // scheduling) on first evaluation and clones share that work, so every later decision starts from
        // a prepared engine. The result is irrelevant (no input).
        engine.set_input(Value::from(serde_json::json!({})));
        let _ = engine.eval_rule(rule.clone());
        let vm = Self::compile_vm(&mut engine.clone(), &rule, data, modules);
        Ok(Self {
            engine,
            rule,
            budget,
            vm,
        })
    }

    /// Compiles the decision rule for the bytecode VM, or `None` when the policy needs the interpreter.
    fn compile_vm(
        engine: &mut regorus::Engine,
        rule: &str,
        data: &serde_json::Value,
        modules: &[(String, String)],
    ) -> Option<VmProgram> {
        // The VM has no extensions and no `with`/`print`: keep those policies on the interpreter.
        let interpreter_only = modules.iter().any(|(_, src)| {
            src.lines()
                .map(|l| l.split('#').next().unwrap_or_default())
                .any(|code| {
                    code.contains("io.jwt.") || code.contains(" with ") || code.contains("print(")
                })
        });
        if interpreter_only {
            return None;
        }
        let entry: std::sync::Arc<str> = rule.into();
        // A policy the VM compiler does not support simply stays on the interpreter.
        let compiled = engine.compile_with_entrypoint(&entry).ok()?;
        let program =
            regorus::languages::rego::compiler::Compiler::compile_from_policy(&compiled, &[rule])
                .ok()?;
        Some(VmProgram {
            program,
            data: Value::from(data.clone()),
        })
    }

    /// Whether decisions run on the bytecode VM.
    pub fn uses_vm(&self) -> bool {
        self.vm.is_some()
    }

    pub fn decision_rule(&self) -> &str {
        &self.rule
    }

    /// One decision. Never fails: every failure is a deny with its reason.
    pub fn decide(&self, input: &serde_json::Value) -> Decision {
        self.decide_value(Value::from(input.clone()))
    }

    /// One decision on an input already in the engine's form (the proxy's hot path: see
    /// [`crate::input::http_input_value`]).
    pub fn decide_value(&self, input: Value) -> Decision {
        let start = Instant::now();
        let result = match &self.vm {
            Some(vm) => vm.execute(input, self.budget),
            None => {
                let mut engine = self.engine.clone();
                engine.set_input(input);
                engine
                    .eval_rule(self.rule.clone())
                    .map_err(|e| e.to_string())
            }
        };
        let took = start.elapsed();
        match result {
            Ok(v) => Decision::from_result(&v, took),
            Err(e) if took >= self.budget => Decision::deny(
                format!("policy exceeded its {:?} budget: {e}", self.budget),
                took,
            ),
            Err(e) => Decision::deny(format!("policy error: {e}"), took),
        }
    }

    /// Evaluates an arbitrary rule (for `policy test` and `policy eval`).
    pub fn eval_rule(
        &self,
        rule: &str,
        input: Option<&serde_json::Value>,
    ) -> Result<Value, String> {
        let mut engine = self.engine.clone();
        if let Some(i) = input {
            engine.set_input(Value::from(i.clone()));
        }
        engine.eval_rule(rule.to_owned()).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn engine(src: &str, v: RegoVersion) -> PolicyEngine {
        PolicyEngine::new(
            &[("p.rego".into(), src.into())],
            &json!({}),
            v,
            DEFAULT_DECISION_PATH,
            DEFAULT_BUDGET,
        )
        .unwrap()
    }

    /// Regression (fuzz target `bundle`): deeply nested brackets used to keep regorus's parser busy for
    /// minutes; they are refused at once with the line, and brackets in strings and comments do not count.
    #[test]
    fn deeply_nested_brackets_are_refused_before_the_parser() {
        let deep = format!(
            "package envoy.authz\nimport rego.v1\nallow if input.att{}x\n",
            "[".repeat(64)
        );
        let started = std::time::Instant::now();
        let Err(err) = PolicyEngine::new(
            &[("p.rego".into(), deep)],
            &json!({}),
            RegoVersion::V1,
            DEFAULT_DECISION_PATH,
            DEFAULT_BUDGET,
        ) else {
            panic!("a 64-deep module must be refused");
        };
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(
            err.to_string()
                .contains("line 3: `[` and `{` nest deeper than 12"),
            "{err}"
        );
        let quoted = format!(
            "package envoy.authz\nimport rego.v1\n# {}\nallow if \"{}\" != `{}`\n",
            "[".repeat(64),
            "[".repeat(64),
            "{".repeat(64)
        );
        let e = engine(&quoted, RegoVersion::V1);
        assert!(e.decide(&json!({})).allowed);
        // Parentheses parse in linear time and are not limited here (regorus stops at 32 itself).
        let parens = format!(
            "package envoy.authz\nimport rego.v1\nallow if {}1{} == 1\n",
            "(".repeat(20),
            ")".repeat(20)
        );
        assert!(engine(&parens, RegoVersion::V1).decide(&json!({})).allowed);
    }

    #[test]
    fn boolean_and_object_results() {
        let e = engine(
            "package envoy.authz\nimport rego.v1\ndefault allow := false\nallow if input.attributes.request.http.method == \"GET\"",
            RegoVersion::V1,
        );
        assert!(
            e.decide(&json!({"attributes": {"request": {"http": {"method": "GET"}}}}))
                .allowed
        );
        let d = e.decide(&json!({"attributes": {"request": {"http": {"method": "POST"}}}}));
        assert!(!d.allowed);
        assert_eq!(d.http_status, 403);

        let e = engine(
            "package envoy.authz\nimport rego.v1\nallow := {\"allowed\": false, \"http_status\": 451, \"body\": \"no\", \"headers\": {\"x-why\": \"law\"}}",
            RegoVersion::V1,
        );
        let d = e.decide(&json!({}));
        assert_eq!(
            (d.allowed, d.http_status, d.body.as_deref()),
            (false, 451, Some("no"))
        );
        assert_eq!(d.headers, vec![("x-why".into(), "law".into())]);
    }

    #[test]
    fn undefined_errors_and_wrong_types_deny() {
        let e = engine(
            "package envoy.authz\nimport rego.v1\nallow if input.x == 1",
            RegoVersion::V1,
        );
        let d = e.decide(&json!({}));
        assert!(!d.allowed && d.reason.contains("undefined"), "{d:?}");
        let e = engine(
            "package envoy.authz\nimport rego.v1\nallow := \"yes\"",
            RegoVersion::V1,
        );
        assert!(!e.decide(&json!({})).allowed);
        let e = engine(
            "package envoy.authz\nimport rego.v1\nallow := {\"status\": 1}",
            RegoVersion::V1,
        );
        assert!(!e.decide(&json!({})).allowed);
        // A runtime error (division by zero) is a deny, not a crash.
        let e = engine(
            "package envoy.authz\nimport rego.v1\nallow if { x := 1 / input.zero; x > 0 }",
            RegoVersion::V1,
        );
        assert!(!e.decide(&json!({"zero": 0})).allowed);
    }

    #[test]
    fn v0_syntax_when_asked() {
        let e = engine(
            "package envoy.authz\ndefault allow = false\nallow { input.ok == true }",
            RegoVersion::V0,
        );
        assert!(e.decide(&json!({"ok": true})).allowed);
        assert!(PolicyEngine::new(
            &[(
                "p.rego".into(),
                "package envoy.authz\nallow { true }".into()
            )],
            &json!({}),
            RegoVersion::V1,
            DEFAULT_DECISION_PATH,
            DEFAULT_BUDGET
        )
        .is_err());
    }

    #[test]
    fn the_time_budget_denies() {
        // Millions of interpreted iterations (the budget is checked between evaluation steps; a single
        // builtin call is not interrupted).
        let src = "package envoy.authz\nimport rego.v1\nallow if { some i in numbers.range(1, 4000); some j in numbers.range(1, 4000); i == j + 9000 }";
        let e = PolicyEngine::new(
            &[("p.rego".into(), src.into())],
            &json!({}),
            RegoVersion::V1,
            DEFAULT_DECISION_PATH,
            Duration::from_millis(20),
        )
        .unwrap();
        let d = e.decide(&json!({}));
        assert!(!d.allowed);
        assert!(d.took < Duration::from_secs(2), "{:?}", d.took);
    }

    #[test]
    fn decision_paths_are_validated() {
        assert_eq!(
            rule_for("envoy/authz/allow").unwrap(),
            "data.envoy.authz.allow"
        );
        assert!(rule_for("envoy/../x").is_err());
        assert!(rule_for("").is_err());
    }
}
