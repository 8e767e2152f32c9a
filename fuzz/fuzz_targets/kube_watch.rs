//! Kubernetes watch streams as the control plane reads them from the API server: each line applied to the
//! pod and namespace cache (the first byte picks which resource the stream is for), then the cache turned
//! into workloads as the directory would.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use strait_ca::{CertificateAuthority, TrustDomain};
use strait_control::kube::client::{KubeClient, KubeConfig};
use strait_control::kube::watch::{apply_line, Resource};
use strait_control::kube::{Kube, KubeSettings};

/// A cache whose client points nowhere (nothing here talks to an API server).
fn kube() -> Kube {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("token"), "t").expect("token");
    let ca = CertificateAuthority::generate(
        TrustDomain::new("cluster.local").expect("td"),
        std::time::Duration::from_secs(3600),
        std::time::SystemTime::now(),
    )
    .expect("ca");
    std::fs::write(dir.path().join("ca.crt"), ca.trust_bundle().to_pem()).expect("ca file");
    let client = KubeClient::new(&KubeConfig {
        server: "https://127.0.0.1:6443".into(),
        ca_file: dir.path().join("ca.crt"),
        token_file: dir.path().join("token"),
    })
    .expect("client");
    Kube::new(
        client,
        KubeSettings::default(),
        TrustDomain::new("cluster.local").expect("td"),
    )
}

static KUBE: LazyLock<Kube> = LazyLock::new(kube);

fuzz_target!(|data: &[u8]| {
    let Some((&which, lines)) = data.split_first() else {
        return;
    };
    let resource = if which % 2 == 0 {
        Resource::Pods
    } else {
        Resource::Namespaces
    };
    for line in lines.split(|b| *b == b'\n') {
        let _ = apply_line(&KUBE, resource, line);
    }
    let _ = KUBE.workloads();
});
