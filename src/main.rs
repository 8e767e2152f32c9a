//! `strait`: the one binary of the Strait mesh. Each subcommand lives in its own module under `cmd/`.

#![deny(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

mod cli;
mod cmd;
mod demo;
mod plot;
#[allow(unsafe_code)]
mod sys;

// `--features system-allocator` builds with the C library's malloc, which heap profilers (heaptrack,
// valgrind's massif) can follow; mimalloc maps its own memory and hides every allocation from them.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let daemon = matches!(&cli.command, cli::Command::Control(c) if c.command.is_none())
        || matches!(
            &cli.command,
            cli::Command::Proxy(_)
                | cli::Command::Gateway(_)
                | cli::Command::Bench(cli::BenchCommand::WanRelay { .. })
        );
    let default_level = if daemon {
        "info"
    } else if matches!(
        &cli.command,
        cli::Command::Demo { .. } | cli::Command::Bench(_)
    ) {
        "error"
    } else {
        "warn"
    };
    init_logging(&cli.global, default_level);
    match cmd::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, the whole cause chain: "reading CSR x.pem: not a certificate signing request: …".
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(global: &cli::GlobalArgs, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("STRAIT_LOG")
        .unwrap_or_else(|_| EnvFilter::new(global.log_level.as_deref().unwrap_or(default_level)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match global.log_format {
        cli::LogFormat::Text => builder.init(),
        cli::LogFormat::Json => builder.json().init(),
    }
}
