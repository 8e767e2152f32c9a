//! Subcommand implementations.

mod admin;
mod ca;
mod conn;
mod control;
mod docstore;
mod federation;
mod policy;
mod proxy;
pub mod table;
mod wan;

use std::path::Path;

use anyhow::Context as _;

use crate::cli::{BenchCommand, Command};

pub use control::shutdown_signal;

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Ca(c) => ca::run(c),
        Command::Control(c) => control::run(c),
        Command::Policy(c) => policy::run(c),
        Command::Proxy(p) => proxy::run(p),
        Command::Gateway(g) => proxy::gateway(g),
        Command::Docstore { listen, name } => docstore::run(listen, name),
        Command::Node(c) => block_on(admin::node(c)),
        Command::Workload(c) => block_on(admin::workload(c)),
        Command::Apply { file, conn } => block_on(admin::apply(file, conn)),
        Command::Demo {
            federated: true,
            out_dir,
            ..
        } => crate::demo::federated::run(out_dir),
        Command::Demo { file, out_dir, .. } => crate::demo::run(file, out_dir),
        Command::Workflow(c) => block_on(admin::workflow(c)),
        Command::DistributionKey(c) => block_on(admin::distribution_key(c)),
        Command::Federation(c) => block_on(federation::run(c)),
        Command::Bench(BenchCommand::Gateway { seconds, out_dir }) => {
            crate::demo::gateway_bench::run(seconds, out_dir)
        }
        Command::Bench(BenchCommand::Study {
            federated: true,
            samples,
            scenarios,
            out_dir,
            ..
        }) => crate::demo::federated_study::run(
            samples,
            &scenarios,
            out_dir.unwrap_or_else(|| "bench/results/study-federated".into()),
        ),
        Command::Bench(BenchCommand::Study {
            file,
            samples,
            scenarios,
            out_dir,
            ..
        }) => crate::demo::study::run(
            file,
            samples,
            &scenarios,
            out_dir.unwrap_or_else(|| "bench/results/study".into()),
        ),
        Command::Bench(BenchCommand::Plot {
            csv,
            category,
            value,
            title,
            unit,
            out,
        }) => plot(&csv, &category, &value, &title, &unit, &out),
        Command::Bench(BenchCommand::WanRelay { interface, delay }) => wan::run(&interface, delay),
        Command::Status { output, conn } => block_on(admin::status(output, conn)),
    }
}

/// A small runtime for one CLI call (the control plane builds its own, multi-threaded one).
fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

fn plot(
    csv: &Path,
    category: &[String],
    value: &[String],
    title: &str,
    unit: &str,
    out: &Path,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(csv).with_context(|| format!("reading {}", csv.display()))?;
    let chart = crate::plot::from_csv(&text, category, value, title, unit)
        .with_context(|| format!("{}", csv.display()))?;
    std::fs::write(out, chart.svg()).with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(())
}
