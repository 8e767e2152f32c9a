//! Signed mesh versions as a proxy receives them from the distributor (or reads them back from disk):
//! the wire object parsed and checked against the distribution key, and, so that the fuzzer also reaches
//! what lies behind the signature, the input signed with the key the proxy trusts and prepared whole
//! (payload, trust domain, numbering, content hash, policy compilation).
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use strait_proto::version::{SignedVersion, SigningKey, Verifier};

static KEY: LazyLock<SigningKey> = LazyLock::new(SigningKey::ephemeral);

fuzz_target!(|data: &[u8]| {
    let verifier = Verifier::new(KEY.public(), "fuzz.example");
    if let Ok(v) = serde_json::from_slice::<SignedVersion>(data) {
        let _ = strait_proxy::mesh::prepare(&verifier, &v, None);
    }
    let signed = KEY.sign_bytes(data.to_vec());
    let _ = strait_proxy::mesh::prepare(&verifier, &signed, None);
    let _ = strait_proxy::mesh::prepare(&verifier, &signed, Some((1, "0000")));
});
