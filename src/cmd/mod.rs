//! Subcommand implementations.

mod ca;

use crate::cli::Command;

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Ca(c) => ca::run(c),
    }
}
