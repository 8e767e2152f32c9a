//! What a partner's bundle endpoint serves (SPIFFE bundles, JWK sets) and what an operator hands over as a
//! bootstrap bundle: only CA certificates whose JWK states their own key may come out, and a bundle that
//! parses serialises back to one that parses to the same anchors.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_ca::{SpiffeBundle, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let Ok(td) = TrustDomain::new("partner.example") else {
        return;
    };
    if let Ok(b) = SpiffeBundle::parse(td.clone(), data) {
        assert!(!b.bundle.certs().is_empty());
        let again =
            serde_json::to_vec(&b.bundle.to_spiffe_json(b.sequence, 300)).unwrap_or_default();
        let back = SpiffeBundle::parse(td, &again).expect("a parsed bundle round-trips");
        assert_eq!(back.bundle.fingerprint(), b.bundle.fingerprint());
        assert_eq!(back.sequence, b.sequence);
    }
});
