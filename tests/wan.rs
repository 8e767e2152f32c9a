//! The lab's WAN link where the kernel has no `sch_netem`: `strait bench wan-relay` between two bridges
//! adds its delay to every frame between the regions, and nothing within a region; TCP (with the
//! kernel's segmentation and checksum offloads) and IPv6 cross it intact.

mod support;

use std::time::Duration;

use support::{require_root, Netns};

/// Median time for a TCP connection to a closed port to be refused (one round trip), in milliseconds.
fn refused_rtt_ms(net: &Netns, from: &str, url: &str) -> f64 {
    let mut rtts: Vec<f64> = (0..5)
        .map(|_| {
            let out = net.run(
                from,
                None,
                &[
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{time_total}",
                    "--max-time",
                    "5",
                    url,
                ],
            );
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<f64>()
                .unwrap()
                * 1e3
        })
        .collect();
    rtts.sort_by(f64::total_cmp);
    rtts[2]
}

#[test]
fn the_wan_relay_delays_frames_between_regions_only() {
    if !require_root() {
        return;
    }
    support::require_commands(&["curl", "socat"]);
    let mut net = Netns::new(&["near", "near2", "far"]);
    let tmp = tempfile::tempdir().unwrap();
    let _relay = net.split_by_wan(&["far"], "40ms", &tmp.path().join("relay.log"));

    // A round trip across the WAN pays the delay twice; one within a region does not pay it at all.
    let far = format!("http://{}:9/", net.v4("far"));
    let near = format!("http://{}:9/", net.v4("near2"));
    let across = refused_rtt_ms(&net, "near", &far);
    let within = refused_rtt_ms(&net, "near", &near);
    eprintln!("round trip across the WAN {across:.1} ms, within a region {within:.1} ms");
    assert!(
        across >= 80.0,
        "the relay must add 40 ms each way: {across} ms"
    );
    assert!(within < 40.0, "no delay within a region: {within} ms");

    // 4 MiB of varied bytes over TCP from the far region, over IPv6 (neighbour discovery crosses the
    // relay too): they arrive unchanged, although the sender hands the kernel 64 KiB segments with
    // checksums left to offload.
    let data = tmp.path().join("data");
    let bytes: Vec<u8> = (0..4_194_304u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&data, &bytes).unwrap();
    let sha = |out: std::process::Output| {
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let expected = sha(net.run("near", None, &["sha256sum", data.to_str().unwrap()]));
    net.spawn(
        "far",
        None,
        &[
            "socat",
            "-U",
            "TCP6-LISTEN:7000,reuseaddr,fork",
            &format!("OPEN:{},rdonly", data.display()),
        ],
        &tmp.path().join("sender.log"),
    );
    let target = format!("TCP6:[{}]:7000", net.v6("far"));
    net.eventually(
        Duration::from_secs(30),
        "4 MiB across the WAN, unchanged",
        || {
            let got = sha(net.run(
                "near",
                None,
                &["sh", "-c", &format!("socat -u {target} - | sha256sum")],
            ));
            got == expected
        },
    );
}
