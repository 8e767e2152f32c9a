//! `strait-policy`: Rego authorization for the mesh (no network I/O).
//!
//! - [`input`]: the OPA-Envoy input document.
//! - [`engine`]: regorus prepared per bundle; decisions that fail closed.
//! - [`extensions`]: `io.jwt.decode` and `io.jwt.decode_verify`.
//! - [`workflow`]: the workflow YAML model; [`compile`]: workflow → Rego + data;
//!   [`reference`]: the same decision in plain Rust, for tests; [`ordering`]: ordered workflow
//!   instances (`instances:`, step `after` and `max`) and their reference semantics.
//! - [`graph`]: a workflow drawn as SVG.
//! - [`hostname`]: DNS names and the patterns egress entries name.
//! - [`bundle`]: OPA-layout bundles (directory or .tar.gz); [`testing`]: `strait policy test`.

#![forbid(unsafe_code)]
pub mod bundle;
pub mod compile;
pub mod engine;
pub mod extensions;
pub mod graph;
pub mod hostname;
pub mod input;
pub mod ordering;
pub mod reference;
pub mod testing;
pub mod workflow;
