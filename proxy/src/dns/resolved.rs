//! Addresses the proxy resolved for each workload: the egress check's memory of DNS answers.
//!
//! An egress entry that names a DNS name lets a workload reach the addresses a resolver gave *that
//! workload* for the name, for as long as the answer lives. Entries keep the name, not the rule, so the
//! check asks the current policy again: removing the egress entry closes the path at once, whatever the
//! TTL said.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use strait_policy::hostname::HostName;

/// An answer is remembered at least this long (a TTL of 0 would make the answer useless: the
/// workload connects right after resolving) and at most this long (a resolver's week-long TTL would
/// keep an address reachable long after the name moved).
const MIN_TTL: Duration = Duration::from_secs(30);
const MAX_TTL: Duration = Duration::from_secs(3600);
/// Addresses remembered per workload; past it, expired ones are swept, then new ones are not added (the
/// connection is refused, fail closed) rather than growing without bound.
const MAX_PER_SOURCE: usize = 4096;
/// Names remembered per address (several names can share one address, e.g. behind one CDN).
const MAX_NAMES_PER_ADDR: usize = 8;

/// One workload's answers: address → the names it was given for and until when.
type Table = HashMap<IpAddr, Vec<(HostName, Instant)>>;

#[derive(Default)]
pub struct Resolved {
    // A std mutex: held for a map operation, never across an await.
    by_source: Mutex<HashMap<String, Table>>,
}

impl Resolved {
    /// Records that `source` was told `name` is at `addrs` (address, TTL in seconds). Returns false when
    /// the source's table is full and some address was not recorded.
    pub fn record(
        &self,
        source: &str,
        name: &HostName,
        addrs: &[(IpAddr, u32)],
        now: Instant,
    ) -> bool {
        if addrs.is_empty() {
            return true;
        }
        let Ok(mut all) = self.by_source.lock() else {
            return false;
        };
        let table = all.entry(source.to_owned()).or_default();
        let mut complete = true;
        for (ip, ttl) in addrs {
            let until = now + Duration::from_secs(u64::from(*ttl)).clamp(MIN_TTL, MAX_TTL);
            if !table.contains_key(ip) && table.len() >= MAX_PER_SOURCE {
                sweep(table, now);
                if table.len() >= MAX_PER_SOURCE {
                    complete = false;
                    continue;
                }
            }
            let names = table.entry(*ip).or_default();
            match names.iter().position(|(n, _)| n == name) {
                Some(i) => names[i].1 = names[i].1.max(until),
                None if names.len() < MAX_NAMES_PER_ADDR => names.push((name.clone(), until)),
                None => {
                    // Replace the entry that expires first.
                    if let Some(slot) = names.iter_mut().min_by_key(|(_, t)| *t) {
                        *slot = (name.clone(), until);
                    }
                }
            }
        }
        complete
    }

    /// The names `source` resolved to `ip` that have not expired.
    pub fn names(&self, source: &str, ip: IpAddr, now: Instant) -> Vec<HostName> {
        let Ok(all) = self.by_source.lock() else {
            return Vec::new();
        };
        all.get(source)
            .and_then(|t| t.get(&ip))
            .into_iter()
            .flatten()
            .filter(|(_, until)| *until > now)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// How many addresses are remembered in all (for `/config_dump` and tests).
    pub fn len(&self) -> usize {
        self.by_source
            .lock()
            .map(|all| all.values().map(HashMap::len).sum())
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn sweep(table: &mut Table, now: Instant) {
    table.retain(|_, names| {
        names.retain(|(_, until)| *until > now);
        !names.is_empty()
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> HostName {
        HostName::parse(s).unwrap()
    }

    #[test]
    fn answers_are_per_source_and_expire() {
        let r = Resolved::default();
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        assert!(r.record("a", &n("api.example.com"), &[(ip, 0)], t0));
        assert_eq!(r.names("a", ip, t0), vec![n("api.example.com")]);
        assert!(
            r.names("b", ip, t0).is_empty(),
            "another workload never asked"
        );
        // TTL 0 is remembered for MIN_TTL, a huge TTL for MAX_TTL only.
        assert!(r.names("a", ip, t0 + MIN_TTL).is_empty());
        assert!(r.record("a", &n("api.example.com"), &[(ip, u32::MAX)], t0));
        assert!(!r
            .names("a", ip, t0 + MAX_TTL - Duration::from_secs(1))
            .is_empty());
        assert!(r.names("a", ip, t0 + MAX_TTL).is_empty());
    }

    #[test]
    fn a_full_table_refuses_new_addresses_after_sweeping() {
        let r = Resolved::default();
        let t0 = Instant::now();
        let addrs: Vec<(IpAddr, u32)> = (0..MAX_PER_SOURCE as u32)
            .map(|i| (IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)), 60))
            .collect();
        assert!(r.record("a", &n("x.example.com"), &addrs, t0));
        let one_more = [("192.0.2.1".parse().unwrap(), 60)];
        assert!(!r.record("a", &n("y.example.com"), &one_more, t0));
        // Once the old answers expired, the sweep makes room.
        assert!(r.record(
            "a",
            &n("y.example.com"),
            &one_more,
            t0 + Duration::from_secs(61)
        ));
        assert_eq!(r.len(), 1);
    }
}
