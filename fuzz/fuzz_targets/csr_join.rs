//! What a joining or renewing node sends: the join request's JSON and the CSR inside it (PEM), and CSRs as
//! raw DER. Only a CSR whose self-signature verifies and whose key type is allowed may come out.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_ca::CheckedCsr;
use strait_proto::api::JoinRequest;

fuzz_target!(|data: &[u8]| {
    if let Ok(csr) = CheckedCsr::from_der(data) {
        let _ = csr.spki_der();
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = CheckedCsr::from_pem(text);
    }
    if let Ok(join) = serde_json::from_slice::<JoinRequest>(data) {
        let _ = CheckedCsr::from_pem(&join.csr_pem);
    }
});
