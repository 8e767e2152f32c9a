//! A mesh in a [`Lab`]: the control plane on host `cp`, one document store per service on its own host as
//! its own Unix user, a node proxy per service host joined with a one-time token. Shared by `strait demo`
//! and `strait bench study`, which build the same topology and differ in what they send through it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};

use super::lab::Lab;

/// The services' port (the study's document stores listen on 5000).
pub const PORT: u16 = 5000;
const FIRST_UID: u32 = 2001;

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub struct Mesh<'a> {
    pub lab: &'a Lab,
    exe: String,
    state: PathBuf,
    out: PathBuf,
    /// The control plane's host and address.
    host: String,
    cp: Ipv4Addr,
    config: String,
    services: Vec<String>,
}

impl<'a> Mesh<'a> {
    /// Creates the control plane's data directory for `trust_domain` (in `state`) and starts it on
    /// host `host` (its log `control.log` on host `cp`, else `control-<host>.log`).
    pub fn start_control(
        lab: &'a Lab,
        host: &str,
        exe: &str,
        state: &Path,
        out: &Path,
        trust_domain: &str,
        services: &[String],
    ) -> anyhow::Result<Self> {
        let cp = lab.v4(host);
        let cp_dir = state.join("cp");
        let cp_dir_s = cp_dir.to_string_lossy().into_owned();
        let init = std::process::Command::new(exe)
            .args([
                "control",
                "init",
                "--data-dir",
                &cp_dir_s,
                "--trust-domain",
                trust_domain,
                "--server",
                &format!("{cp}:15012"),
            ])
            .output()?;
        if !init.status.success() {
            bail!("control plane init: {}", text(&init));
        }
        let log = match host {
            "cp" => "control.log".to_owned(),
            h => format!("control-{h}.log"),
        };
        std::fs::create_dir_all(state)?;
        lab.spawn(
            host,
            None,
            &[
                exe,
                "control",
                "--data-dir",
                &cp_dir_s,
                "--listen",
                &format!("{cp}:15012"),
            ],
            &out.join(log),
        )?;
        lab.eventually(Duration::from_secs(15), "the control plane", || {
            lab.run(
                host,
                None,
                &["curl", "-sk", &format!("https://{cp}:15012/v1/ready")],
            )
            .is_ok_and(|o| o.status.success())
        })?;
        Ok(Self {
            lab,
            exe: exe.to_owned(),
            state: state.to_owned(),
            out: out.to_owned(),
            host: host.to_owned(),
            cp,
            config: format!("STRAIT_CONFIG={}", cp_dir.join("admin.yaml").display()),
            services: services.to_vec(),
        })
    }

    pub fn url(&self) -> String {
        format!("https://{}:15012", self.cp)
    }

    /// Runs `strait ARGS` as the administrator on the control plane's host; its stdout.
    pub fn admin(&self, args: &[&str]) -> anyhow::Result<String> {
        Ok(String::from_utf8_lossy(&self.admin_output(args)?.stdout).into_owned())
    }

    /// [`Mesh::admin`], with its standard error too.
    pub fn admin_output(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let mut full = vec!["env", self.config.as_str(), self.exe.as_str()];
        full.extend_from_slice(args);
        let out = self.lab.run(&self.host, None, &full)?;
        if !out.status.success() {
            bail!("strait {}: {}", args.join(" "), text(&out).trim());
        }
        Ok(out)
    }

    pub fn state(&self) -> &Path {
        &self.state
    }

    /// The Unix user the service runs as (how its node proxy recognises it).
    pub fn uid(&self, service: &str) -> u32 {
        FIRST_UID + self.services.iter().position(|s| s == service).unwrap_or(0) as u32
    }

    /// Registers one workload per service, on its own host, recognised by its Unix user.
    pub fn register(&self, ids: &BTreeMap<String, String>) -> anyhow::Result<()> {
        let mut doc = String::from("apiVersion: strait.dev/v1\nkind: WorkloadList\nworkloads:\n");
        for s in &self.services {
            let id = ids
                .get(s)
                .with_context(|| format!("no identity for service {s}"))?;
            let _ = writeln!(
                doc,
                "  - {{id: \"{id}\", node: {s}, uid: {}, ports: [{{port: {PORT}, protocol: http}}]}}",
                self.uid(s)
            );
        }
        let workloads = self.state.join("workloads.yaml");
        std::fs::write(&workloads, doc)?;
        self.admin(&["apply", "-f", &workloads.to_string_lossy()])?;
        Ok(())
    }

    /// Starts every service's document store and waits until each answers on its host.
    pub fn start_docstores(&self) -> anyhow::Result<()> {
        for s in &self.services {
            self.lab.spawn(
                s,
                Some(self.uid(s)),
                &[
                    &self.exe,
                    "docstore",
                    "--listen",
                    &format!("[::]:{PORT}"),
                    "--name",
                    s,
                ],
                &self.out.join(format!("docstore-{s}.log")),
            )?;
        }
        for s in &self.services {
            self.lab
                .eventually(Duration::from_secs(15), &format!("the service {s}"), || {
                    self.lab
                        .run(
                            s,
                            None,
                            &[
                                "curl",
                                "-sf",
                                "-o",
                                "/dev/null",
                                &format!("http://127.0.0.1:{PORT}/"),
                            ],
                        )
                        .is_ok_and(|o| o.status.success())
                })?;
        }
        Ok(())
    }

    /// Starts a node proxy on every service host (one-time join token each) and waits until all are ready.
    pub fn start_proxies(&self) -> anyhow::Result<()> {
        for s in &self.services {
            let token = self.admin(&["node", "token", "create", "--node", s])?;
            let data = self
                .state
                .join(format!("proxy-{s}"))
                .to_string_lossy()
                .into_owned();
            let (v4, v6) = (self.lab.v4(s).to_string(), self.lab.v6(s).to_string());
            self.lab.spawn(
                s,
                None,
                &[
                    &self.exe,
                    "proxy",
                    "--control",
                    &self.url(),
                    "--node",
                    s,
                    "--token",
                    token.trim(),
                    "--data-dir",
                    &data,
                    "--address",
                    &v4,
                    "--address",
                    &v6,
                ],
                &self.out.join(format!("proxy-{s}.log")),
            )?;
        }
        for s in &self.services {
            self.lab.eventually(
                Duration::from_secs(30),
                &format!("the proxy of {s}"),
                || {
                    self.lab
                        .run(s, None, &["curl", "-s", "http://127.0.0.1:15000/ready"])
                        .is_ok_and(|o| o.stdout.starts_with(b"ready"))
                },
            )?;
        }
        Ok(())
    }

    /// Applies a workflow through the control plane and waits until every proxy enforces it.
    pub fn apply_workflow(&self, yaml: &str, wait: &str) -> anyhow::Result<String> {
        let file = self.state.join("workflow.yaml");
        std::fs::write(&file, yaml)?;
        self.admin(&[
            "workflow",
            "apply",
            "-f",
            &file.to_string_lossy(),
            "--wait",
            wait,
        ])
    }

    /// `http://<dst's address>:5000<path>`.
    pub fn service_url(&self, dst: &str, path: &str) -> String {
        format!("http://{}:{PORT}{path}", self.lab.v4(dst))
    }
}
