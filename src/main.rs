//! The `cgsvmm` command: parses the command line and hands each subcommand
//! to its front end in `cli/` (which calls the library). Nothing else lives
//! here.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

#[derive(Parser)]
#[command(
    name = "cgsvmm",
    version,
    about = "A minimal KVM VMM that live-migrates confidential guests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM and run it until it powers off, `quit` over QMP, or Ctrl-C.
    Run(Box<cli::run::RunArgs>),
    /// Send one QMP command to a running cgsvmm and print its reply.
    Qmp(cli::qmp::QmpArgs),
    /// Migrate a running cgsvmm's guest live (over its QMP socket), with a
    /// progress bar and a summary.
    Migrate(cli::migrate::MigrateArgs),
    /// Start a source and a target on this machine, migrate the embedded
    /// dirtier live between them, and check that it verifies its memory on
    /// the target (exit 0 only then).
    Demo(cli::demo::DemoArgs),
    /// Measure a component and print the numbers.
    Bench {
        #[command(subcommand)]
        what: cli::bench::BenchCommand,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match Cli::parse().command {
        Command::Run(args) => cli::run::exec(*args),
        Command::Qmp(args) => cli::qmp::exec(args),
        Command::Migrate(args) => cli::migrate::exec(args),
        Command::Demo(args) => cli::demo::exec(args),
        Command::Bench { what } => cli::bench::exec(what),
    }
}
