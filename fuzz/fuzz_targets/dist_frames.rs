//! Distributor frames (4-byte length, then a JSON message) as both ends read them: the proxy reads the
//! control plane's messages, the control plane reads the proxies'. A stream of frames is read until the
//! first error; an oversized length must be refused without allocating it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_proto::wire::{self, ClientMsg, ServerMsg};

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
}

fuzz_target!(|data: &[u8]| {
    RT.with(|rt| {
        rt.block_on(async {
            let mut r = data;
            while wire::read::<_, ServerMsg>(&mut r).await.is_ok() {}
            let mut r = data;
            while wire::read::<_, ClientMsg>(&mut r).await.is_ok() {}
        })
    });
});
