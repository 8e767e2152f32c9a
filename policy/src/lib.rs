//! `strait-policy`: workflow specs, their compiler to Rego + data, bundles and the regorus engine wrapper.
//!
//! Built by the issue "Inline Rego authorization and workflow policies"; this crate is empty until then.
