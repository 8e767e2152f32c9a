//! Subcommand implementations.

mod admin;
mod ca;
mod conn;
mod control;
mod docstore;
mod policy;
mod proxy;
pub mod table;

use crate::cli::Command;

pub use control::shutdown_signal;

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Ca(c) => ca::run(c),
        Command::Control(c) => control::run(c),
        Command::Policy(c) => policy::run(c),
        Command::Proxy(p) => proxy::run(p),
        Command::Docstore { listen, name } => docstore::run(listen, name),
        Command::Node(c) => block_on(admin::node(c)),
        Command::Workload(c) => block_on(admin::workload(c)),
        Command::Apply { file, conn } => block_on(admin::apply(file, conn)),
        Command::Demo { file, out_dir } => crate::demo::run(file, out_dir),
        Command::Workflow(c) => block_on(admin::workflow(c)),
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
