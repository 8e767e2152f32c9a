//! Policy bundles: a `.tar.gz` (OPA's layout, from `--policy-bundle` or inside a signed mesh version) when
//! the first byte is even, otherwise a directory's files (`name\n` then content, files separated by 0xFF).
//! A bundle that loads is compiled into an engine, as the proxy would before using it.
#![no_main]

use std::collections::BTreeMap;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use strait_policy::bundle::Bundle;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bundle = if mode % 2 == 0 {
        Bundle::from_tar_gz(rest)
    } else {
        let mut files = BTreeMap::new();
        for chunk in rest.split(|b| *b == 0xFF) {
            let (name, content) = match chunk.iter().position(|b| *b == b'\n') {
                Some(i) => (&chunk[..i], &chunk[i + 1..]),
                None => (chunk, &[][..]),
            };
            files.insert(String::from_utf8_lossy(name).into_owned(), content.to_vec());
        }
        Bundle::from_files(files)
    };
    if let Ok(b) = bundle {
        let _ = b.engine(Duration::from_millis(50));
    }
});
