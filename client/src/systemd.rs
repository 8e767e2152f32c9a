//! systemd integration for `Type=notify` units: READY=1 when the process can do its job (not merely when it
//! started), STOPPING=1 on shutdown, and WATCHDOG=1 pings while the async runtime is alive. Every call is a
//! no-op outside systemd (no `NOTIFY_SOCKET`), so the same binary runs under Kubernetes, by hand and in tests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::{debug, warn};

static READY_SENT: AtomicBool = AtomicBool::new(false);

/// Tells systemd the service is ready, with a status line; only the first call is sent.
pub fn ready(status: &str) {
    if READY_SENT.swap(true, Ordering::SeqCst) {
        return;
    }
    if let Err(e) = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(status),
        ],
    ) {
        warn!(error = %e, "cannot notify systemd of readiness");
    }
}

/// A status line for `systemctl status` (e.g. what the service is waiting for).
pub fn status(status: &str) {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(status)]);
}

pub fn stopping() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}

/// When the unit has `WatchdogSec=`, pings systemd at half the interval from a task on the runtime: if the
/// runtime stalls (a blocked worker, a deadlock), the pings stop and systemd restarts the service.
pub fn spawn_watchdog() {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let every = Duration::from_micros(usec / 2);
    debug!(?every, "systemd watchdog enabled");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        }
    });
}
