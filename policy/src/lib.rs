//! `strait-policy`: Rego authorization for the mesh (no network I/O).
//!
//! - [`input`]: the OPA-Envoy input document.
//! - [`engine`]: regorus prepared per bundle; decisions that fail closed.
//! - [`extensions`]: `io.jwt.decode` and `io.jwt.decode_verify`.
pub mod engine;
pub mod extensions;
pub mod input;
