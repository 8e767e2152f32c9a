//! `strait-proxy`: the node proxy (nftables capture, listeners, mTLS tunnels, enforcement, admin endpoint).
//!
//! Built by the issue "Node proxy data path"; this crate is empty until then.
