//! `strait-control`: the control plane (CA service, node join, workload registry, policy distributor).
//!
//! Built by the issue "Control plane"; this crate is empty until then.
