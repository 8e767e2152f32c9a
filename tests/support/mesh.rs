//! The VM-mode mesh used by the end-to-end tests (`mesh_vm`, `distributor`):
//!
//! | host | address | runs |
//! |---|---|---|
//! | cp | 10.77.0.1 | `strait control` |
//! | a | 10.77.0.2 | proxy; workload `owner` = uid 1001 (client); uid 1003 is not registered |
//! | b | 10.77.0.3 | proxy; workload `vfx` = uid 1002: docstore on :5000, `wc -c` on :5001 (tcp), docstore on :5002 (PERMISSIVE) |
//! | out | 10.77.0.4 | not in the mesh: docstores on :8080 and :8081 |
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Netns, Proc};

pub const TD: &str = "example.org";
pub const OWNER_UID: u32 = 1001;
pub const VFX_UID: u32 = 1002;
pub const STRANGER_UID: u32 = 1003;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_strait")
}

pub struct Mesh {
    pub net: Netns,
    pub _tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub proxies: std::sync::Mutex<Vec<(String, Proc)>>,
    pub control: std::sync::Mutex<Option<Proc>>,
}

pub fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl Mesh {
    /// Control plane up, workloads registered, services running; proxies not started yet.
    pub fn new(svid_ttl: &str) -> Self {
        let net = Netns::new(&["cp", "a", "b", "out"]);
        let tmp = tempfile::tempdir().unwrap();
        // Workload processes run as other users and must be able to read nothing here but run the binary.
        let dir = tmp.path().to_owned();
        let m = Self {
            net,
            _tmp: tmp,
            dir,
            proxies: Default::default(),
            control: Default::default(),
        };
        let cp = m.net.v4("cp");
        let out = std::process::Command::new(bin())
            .args([
                "control",
                "init",
                "--data-dir",
                m.p("cp"),
                "--trust-domain",
                TD,
                "--server",
                &format!("{cp}:15012"),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        m.start_control(svid_ttl);
        m.admin(&[
            "workload",
            "add",
            "--id",
            &id("owner"),
            "--node",
            "host-a",
            "--uid",
            "1001",
            "--port",
            "5000/http",
        ]);
        m.register_vfx("");
        m.net.spawn(
            "b",
            Some(VFX_UID),
            &[bin(), "docstore", "--listen", "[::]:5000", "--name", "vfx"],
            &m.dir.join("vfx.log"),
        );
        m.net.spawn(
            "b",
            Some(VFX_UID),
            &[bin(), "docstore", "--listen", "[::]:5002", "--name", "vfx"],
            &m.dir.join("vfx2.log"),
        );
        // Reads until the client's half-close, then answers with the byte count: it only ever answers
        // if the FIN crossed both proxies.
        m.net.spawn(
            "b",
            Some(VFX_UID),
            &[
                "socat",
                "TCP6-LISTEN:5001,ipv6only=0,reuseaddr,fork",
                "EXEC:wc -c",
            ],
            &m.dir.join("wc.log"),
        );
        m.net.spawn(
            "out",
            None,
            &[
                bin(),
                "docstore",
                "--listen",
                "[::]:8080",
                "--name",
                "outside",
            ],
            &m.dir.join("out.log"),
        );
        m.net.spawn(
            "out",
            None,
            &[
                bin(),
                "docstore",
                "--listen",
                "[::]:8081",
                "--name",
                "allowed",
            ],
            &m.dir.join("out2.log"),
        );
        m
    }

    /// (Re-)registers vfx: HTTP on 5000, a raw TCP service on 5001, a PERMISSIVE HTTP port 5002, and
    /// `extra_ports` (", {port: …}" entries of the YAML list).
    pub fn register_vfx(&self, extra_ports: &str) {
        let apply = self.dir.join("vfx.yaml");
        std::fs::write(
            &apply,
            format!(
                "apiVersion: strait.dev/v1\nkind: WorkloadList\nworkloads:\n- id: {}\n  node: host-b\n  uid: 1002\n  ports: [{{port: 5000, protocol: http}}, {{port: 5001, protocol: tcp}}, {{port: 5002, protocol: http, permissive: true}}{extra_ports}]\n",
                id("vfx")
            ),
        )
        .unwrap();
        self.admin(&["apply", "-f", apply.to_str().unwrap()]);
    }

    /// A host's proxy `/config_dump` (as root), or `null` when it does not answer.
    #[allow(dead_code)]
    pub fn config_dump(&self, host: &str) -> serde_json::Value {
        let out = self.net.run(
            host,
            None,
            &["curl", "-s", "http://127.0.0.1:15000/config_dump"],
        );
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    /// Starts the control plane in "cp" and waits until it answers.
    pub fn start_control(&self, svid_ttl: &str) {
        let cp = self.net.v4("cp");
        let control = self.net.spawn(
            "cp",
            None,
            &[
                bin(),
                "control",
                "--data-dir",
                self.p("cp"),
                "--listen",
                &format!("{cp}:15012"),
                "--svid-ttl",
                svid_ttl,
            ],
            &self.dir.join("control.log"),
        );
        *self.control.lock().unwrap() = Some(control);
        self.net
            .eventually(Duration::from_secs(10), "control plane", || {
                self.net
                    .run(
                        "cp",
                        None,
                        &["curl", "-sk", &format!("https://{cp}:15012/v1/ready")],
                    )
                    .status
                    .success()
            });
    }

    /// Kills the control plane (SIGKILL: no goodbye to the proxies) and waits until it is gone.
    pub fn kill_control(&self) {
        if let Some(c) = self.control.lock().unwrap().take() {
            self.net.signal(c, libc::SIGKILL);
            self.net.wait(c, Duration::from_secs(10));
        }
    }

    pub fn p(&self, name: &str) -> &str {
        // Leaked for the test's lifetime: paths are used in argument lists.
        Box::leak(
            self.dir
                .join(name)
                .into_os_string()
                .into_string()
                .unwrap()
                .into_boxed_str(),
        )
    }

    /// An admin CLI call from the control plane's host, whatever its outcome.
    pub fn admin_output(&self, args: &[&str]) -> std::process::Output {
        self.net.run(
            "cp",
            None,
            &[
                "env",
                &format!("STRAIT_CONFIG={}", self.dir.join("cp/admin.yaml").display()),
                bin(),
            ]
            .iter()
            .copied()
            .chain(args.iter().copied())
            .collect::<Vec<_>>(),
        )
    }

    /// An admin CLI call, made from the control plane's host (the control plane listens inside "cp"),
    /// that must succeed; returns its standard output.
    pub fn admin(&self, args: &[&str]) -> String {
        let out = self.admin_output(args);
        assert!(
            out.status.success(),
            "strait {}: {}",
            args.join(" "),
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn start_proxy(&self, host: &str, extra: &[&str]) -> Proc {
        let token = self.admin(&["node", "token", "create", "--node", &format!("host-{host}")]);
        self.start_proxy_with(host, Some(token.trim()), extra)
    }

    /// A bundle that allows everything: these tests are about the data path, not policy (without any
    /// bundle the proxy denies everything).
    pub fn allow_all(&self) -> &str {
        let dir = self.dir.join("allow-all");
        if !dir.exists() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(
                dir.join("policy.rego"),
                "package envoy.authz\nimport rego.v1\nallow := true\n",
            )
            .unwrap();
        }
        self.p("allow-all")
    }

    pub fn start_proxy_with(&self, host: &str, token: Option<&str>, extra: &[&str]) -> Proc {
        self.launch_proxy(host, token, extra, &[])
    }

    /// Starts the proxy behind a command prefix (e.g. `prlimit --nofile=1024:`).
    #[allow(dead_code)]
    pub fn start_proxy_behind(&self, host: &str, prefix: &[&str], extra: &[&str]) -> Proc {
        let token = self.admin(&["node", "token", "create", "--node", &format!("host-{host}")]);
        self.launch_proxy(host, Some(token.trim()), extra, prefix)
    }

    /// Starts the proxy as the systemd unit runs it: an unprivileged user (`uid`) holding only
    /// CAP_NET_ADMIN and CAP_NET_RAW as ambient capabilities (inherited by the `nft` it runs).
    pub fn start_proxy_unprivileged(&self, host: &str, uid: u32) -> Proc {
        let data = self.dir.join(format!("proxy-{host}"));
        std::fs::create_dir_all(&data).unwrap();
        std::os::unix::fs::chown(&data, Some(uid), Some(uid)).unwrap();
        // The test directory itself must be traversable by that user.
        let token = self.admin(&["node", "token", "create", "--node", &format!("host-{host}")]);
        let (reuid, regid) = (format!("--reuid={uid}"), format!("--regid={uid}"));
        let caps = "-all,+net_admin,+net_raw";
        let prefix = [
            "setpriv",
            reuid.as_str(),
            regid.as_str(),
            "--clear-groups",
            "--inh-caps",
            caps,
            "--ambient-caps",
            caps,
            "--bounding-set",
            caps,
        ];
        self.launch_proxy(host, Some(token.trim()), &[], &prefix)
    }

    fn launch_proxy(
        &self,
        host: &str,
        token: Option<&str>,
        extra: &[&str],
        prefix: &[&str],
    ) -> Proc {
        let cp = self.net.v4("cp");
        let (v4, v6) = (self.net.v4(host).to_string(), self.net.v6(host).to_string());
        let node = format!("host-{host}");
        let data = self.p(&format!("proxy-{host}"));
        let control = format!("https://{cp}:15012");
        let mut args = prefix.to_vec();
        args.extend([
            bin(),
            "proxy",
            "--control",
            &control,
            "--node",
            &node,
            "--data-dir",
            data,
            "--address",
            &v4,
            "--address",
            &v6,
            "--drain-timeout",
            "3s",
        ]);
        if let Some(t) = token {
            args.extend(["--token", t]);
        }
        if !extra.contains(&"--policy-bundle") && !extra.contains(&"--decision-log-allow-sample") {
            args.extend(["--policy-bundle", self.allow_all()]);
        }
        args.extend(extra);
        let p = self.net.spawn(
            host,
            None,
            &args,
            &self.dir.join(format!("proxy-{host}.log")),
        );
        self.net
            .eventually(Duration::from_secs(20), "proxy ready", || {
                let out = self
                    .net
                    .run(host, None, &["curl", "-s", "http://127.0.0.1:15000/ready"]);
                String::from_utf8_lossy(&out.stdout).starts_with("ready")
            });
        self.proxies.lock().unwrap().push((host.to_owned(), p));
        p
    }

    /// Waits until every running proxy knows every node that has joined (same directory revision).
    pub fn converge(&self) {
        let hosts: Vec<String> = self
            .proxies
            .lock()
            .unwrap()
            .iter()
            .map(|(h, _)| h.clone())
            .collect();
        self.net.eventually(
            Duration::from_secs(15),
            "proxies to share the directory",
            || {
                let revs: Vec<u64> = hosts
                    .iter()
                    .map(|h| {
                        let out = self.net.run(
                            h,
                            None,
                            &["curl", "-s", "http://127.0.0.1:15000/config_dump"],
                        );
                        let dump: serde_json::Value =
                            serde_json::from_slice(&out.stdout).unwrap_or_default();
                        let nodes = dump["directory"]["nodes"]
                            .as_array()
                            .map(|n| n.len())
                            .unwrap_or(0);
                        if nodes == hosts.len() {
                            dump["directory_revision"].as_u64().unwrap_or(0)
                        } else {
                            0
                        }
                    })
                    .collect();
                revs.iter().all(|r| *r > 0 && *r == revs[0])
            },
        );
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    /// curl in `host` as `uid`; returns the HTTP code (000 when the connection failed).
    pub fn curl(&self, host: &str, uid: Option<u32>, url: &str, extra: &[&str]) -> String {
        self.net.http_code(host, uid, url, extra, 5)
    }

    pub fn metrics(&self, host: &str) -> String {
        let out = self.net.run(
            host,
            None,
            &["curl", "-s", "http://127.0.0.1:15000/metrics"],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn vfx_url(&self, v6: bool) -> String {
        if v6 {
            format!("http://[{}]:5000/api/vfx", self.net.v6("b"))
        } else {
            format!("http://{}:5000/api/vfx", self.net.v4("b"))
        }
    }
}

impl Drop for Mesh {
    /// On failure, show what the processes said: the only way to debug a CI run.
    fn drop(&mut self) {
        if std::thread::panicking() {
            for f in ["control.log", "proxy-a.log", "proxy-b.log", "vfx.log"] {
                eprintln!("----- {f}\n{}", self.log(f));
            }
        }
    }
}

/// What tcpdump read from a capture, for failure messages.
pub fn pcap_summary(file: &Path) -> String {
    let out = std::process::Command::new("tcpdump")
        .args(["-nr", file.to_str().unwrap()])
        .output()
        .unwrap();
    let log = std::fs::read_to_string(format!("{}.log", file.display())).unwrap_or_default();
    format!(
        "{}{}\ntcpdump log: {log}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn id(name: &str) -> String {
    format!("spiffe://{TD}/ns/movie/sa/{name}")
}

/// Runs `during` while another thread repeats `request` (it returns an HTTP code) back to back, then
/// checks that the loop ran (more than 20 requests) and that every answer was `expected`; `what` names
/// the run in the printed count.
#[allow(dead_code)]
pub fn without_a_failed_request<T>(
    what: &str,
    request: impl Fn() -> String + Sync,
    expected: &str,
    during: impl FnOnce() -> T,
) -> T {
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (result, (sent, failed)) = std::thread::scope(|s| {
        let traffic = s.spawn(|| {
            let (mut sent, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let code = request();
                sent += 1;
                if code != expected {
                    failed.push(code);
                }
            }
            (sent, failed)
        });
        let result = during();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (result, traffic.join().unwrap())
    });
    eprintln!("{what}: {sent} requests, {} failed", failed.len());
    assert!(sent > 20, "the traffic loop ran ({sent} requests)");
    assert!(failed.is_empty(), "requests failed: {failed:?}");
    result
}

pub fn metric(text: &str, name: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Ends a capture on A's switch port that must hold only ciphertext of the mesh: first sends plaintext
/// around the mesh (root on A to the outside host's docstore) as a positive control, stops tcpdump and
/// checks the control is in the capture (or the capture proves nothing). Returns the captured bytes.
#[allow(dead_code)]
pub fn end_capture_with_plaintext_control(m: &Mesh, dump: Proc, pcap: &Path) -> Vec<u8> {
    let control_marker = "PLAINTEXT-CONTROL-MARKER-91c2";
    let out = m.curl(
        "a",
        None,
        &format!("http://{}:8080/api/outside", m.net.v4("out")),
        &["-d", control_marker],
    );
    assert_eq!(out, "201");
    std::thread::sleep(Duration::from_millis(300));
    m.net.signal(dump, libc::SIGINT);
    m.net.wait(dump, Duration::from_secs(5));
    let bytes = std::fs::read(pcap).unwrap();
    assert!(
        contains(&bytes, control_marker),
        "the capture must see plaintext when there is some: {}",
        pcap_summary(pcap)
    );
    bytes
}

/// Whether `needle` occurs in `bytes`.
pub fn contains(bytes: &[u8], needle: &str) -> bool {
    bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Starts tcpdump on a host's switch port, writing to `file` in the test directory (see
/// [`Netns::capture`]).
pub fn capture(m: &Mesh, host: &str, file: &Path) -> Proc {
    assert_eq!(
        file.parent(),
        Some(m.dir.as_path()),
        "captures live in the test directory"
    );
    m.net.capture(host, file)
}

/// An SVID for `spiffe_id` from the CA in `ca_dir` (a key made with OpenSSL, issued by `strait ca issue`),
/// written as `<name>.pem` and `<name>.key` in the test directory: (certificate, key) paths.
pub fn issue_cert(
    m: &Mesh,
    name: &str,
    ca_dir: &str,
    spiffe_id: &str,
    ttl: &str,
) -> (String, String) {
    issue_cert_in(&m.dir, name, ca_dir, spiffe_id, ttl)
}

/// [`issue_cert`] into the directory `dir`.
pub fn issue_cert_in(
    dir: &std::path::Path,
    name: &str,
    ca_dir: &str,
    spiffe_id: &str,
    ttl: &str,
) -> (String, String) {
    let (key, csr) = key_and_csr(dir, name);
    let crt = dir
        .join(format!("{name}.pem"))
        .to_string_lossy()
        .into_owned();
    let out = std::process::Command::new(bin())
        .args([
            "ca", "issue", "--dir", ca_dir, "--csr", &csr, "--id", spiffe_id, "--ttl", ttl,
            "--out", &crt,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    (crt, key)
}

/// A new P-256 key and a CSR for it (OpenSSL), as `<name>.key` and `<name>.csr` in `dir`.
fn key_and_csr(dir: &std::path::Path, name: &str) -> (String, String) {
    let key = dir
        .join(format!("{name}.key"))
        .to_string_lossy()
        .into_owned();
    let csr = dir
        .join(format!("{name}.csr"))
        .to_string_lossy()
        .into_owned();
    for args in [
        vec![
            "openssl",
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &key,
        ],
        vec![
            "openssl", "req", "-new", "-key", &key, "-subj", "/", "-out", &csr,
        ],
    ] {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    }
    (key, csr)
}

pub fn sha256(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    use std::process::Stdio;
    let mut c = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-binary"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(data).unwrap();
    c.wait_with_output().unwrap().stdout
}

/// The TLS server name a tunnel to `spiffe_id` asks for (the destination proxy picks the workload's
/// certificate by it).
pub fn tunnel_sni(spiffe_id: &str) -> String {
    let d = sha256(spiffe_id.as_bytes());
    format!(
        "{}.spiffe.strait",
        d[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// What a partner's CA key could sign whatever Strait's own CA refuses: an SVID-shaped certificate for any
/// `spiffe_id`, made with OpenSSL from the CA files in `ca_dir` ((certificate, key) paths).
pub fn forge_cert(m: &Mesh, name: &str, ca_dir: &str, spiffe_id: &str) -> (String, String) {
    let (key, csr) = key_and_csr(&m.dir, name);
    let crt = m.p(&format!("{name}.pem"));
    let ext = m.p(&format!("{name}.ext"));
    std::fs::write(
        ext,
        format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth,serverAuth\nsubjectAltName=critical,URI:{spiffe_id}\n"
        ),
    )
    .unwrap();
    let (ca_cert, ca_key) = (
        format!("{ca_dir}/ca-cert.pem"),
        format!("{ca_dir}/ca-key.pem"),
    );
    let out = std::process::Command::new("openssl")
        .args([
            "x509", "-req", "-in", &csr, "-CA", &ca_cert, "-CAkey", &ca_key, "-days", "1",
            "-extfile", ext, "-out", crt,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    (crt.to_owned(), key)
}

/// Opens a tunnel to `target` (a proxy's 15008) as the holder of `cert` would, asking for the workload
/// `sni` names, and keeps it open (`-ign_eof`) for up to a minute: the process ends when the proxy
/// closes the connection.
pub fn hold_tunnel(
    m: &Mesh,
    from: &str,
    target: &str,
    sni: &str,
    cert: &(String, String),
    log: &str,
) -> Proc {
    let (crt, key) = cert;
    m.net.spawn(
        from,
        None,
        &["timeout", "60", "bash", "-c", &format!(
            "printf 'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n' | openssl s_client -ign_eof -connect {target} -servername {sni} -alpn h2 -cert {crt} -key {key} -tls1_3 -quiet"
        )],
        &m.dir.join(log),
    )
}
