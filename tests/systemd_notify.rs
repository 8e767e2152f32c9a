//! The control plane speaks systemd's notification protocol as `Type=notify` units need it: READY=1 only
//! once the API accepts connections, WATCHDOG=1 at half the `WatchdogSec` interval, STOPPING=1 on SIGTERM.
//! systemd is played by a Unix datagram socket in `NOTIFY_SOCKET`, as systemd itself provides it.

use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_strait")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Next notification, or None after `timeout`.
fn recv(sock: &UnixDatagram, timeout: Duration) -> Option<String> {
    sock.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn the_control_plane_notifies_ready_when_listening_pings_the_watchdog_and_says_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cp");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let init = Command::new(bin())
        .args(["control", "init", "--data-dir"])
        .arg(&data)
        .args(["--trust-domain", "example.org", "--server", &addr])
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    // Run again with --keep-existing, as the unit's ExecStartPre does on every start: keeps the CA.
    let ca_before = std::fs::read(data.join("ca/ca-cert.pem")).unwrap();
    let again = Command::new(bin())
        .args(["control", "init", "--keep-existing", "--data-dir"])
        .arg(&data)
        .args(["--trust-domain", "example.org", "--server", &addr])
        .output()
        .unwrap();
    assert!(again.status.success(), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stdout).contains("keeping it"));
    assert_eq!(
        std::fs::read(data.join("ca/ca-cert.pem")).unwrap(),
        ca_before
    );

    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    // WATCHDOG_PID must name the service's own pid: `exec` keeps the shell's.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" control --data-dir \"$1\" --listen \"$2\" --monitoring off")
        .arg(bin())
        .arg(&data)
        .arg(&addr)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let first = recv(&sock, Duration::from_secs(20)).expect("no notification within 20 s");
    // At READY=1 the API must already accept connections (that is what ordering on the unit promises).
    let listening = TcpStream::connect(&addr).is_ok();
    assert!(first.contains("READY=1"), "{first:?}");
    assert!(
        first.contains(&format!("STATUS=serving the API on {addr}")),
        "{first:?}"
    );
    assert!(listening, "READY=1 came before the API listened");

    // Pings at half the interval (200 ms): at least two within a second.
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_secs(1) {
        if let Some(m) = recv(&sock, Duration::from_millis(500)) {
            if m.contains("WATCHDOG=1") {
                pings += 1;
            }
        }
    }
    assert!(pings >= 2, "{pings} watchdog pings in 1 s");

    // SAFETY: kill with the pid of our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stopping = false;
    while Instant::now() < deadline && !stopping {
        if let Some(m) = recv(&sock, Duration::from_millis(500)) {
            stopping = m.contains("STOPPING=1");
        }
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn without_notify_socket_nothing_changes() {
    // `strait control init` and a short run without NOTIFY_SOCKET: no error about systemd anywhere.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cp");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    assert!(Command::new(bin())
        .args(["control", "init", "--data-dir"])
        .arg(&data)
        .args(["--trust-domain", "example.org", "--server", &addr])
        .status()
        .unwrap()
        .success());
    let child = Command::new(bin())
        .args(["control", "--data-dir"])
        .arg(&data)
        .args(["--listen", &addr, "--monitoring", "off"])
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "control plane did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill with the pid of our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!log.contains("systemd"), "{log}");
}
