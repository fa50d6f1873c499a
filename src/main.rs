//! The `nbdcrypt` binary: parse the command line, set up logging, hand over to the library.

use clap::Parser;
use nbdcrypt::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("NBDCRYPT_LOG").unwrap_or_else(|_| EnvFilter::new(&cli.log)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Our error types put the reason in their message; no backtrace for users.
            eprintln!("nbdcrypt: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Info(args) => nbdcrypt::commands::info::run(&args, &mut out)?,
        Command::Benchmark(args) => nbdcrypt::commands::benchmark::run(&args, &mut out)?,
        Command::Serve(args) => nbdcrypt::commands::serve::run(
            args,
            &nbdcrypt::commands::volume::state_dir(cli.state_dir),
        )?,
        Command::Keygen(args) => nbdcrypt::commands::serve::keygen(&args.path)?,
        Command::Kms(cmd) => {
            let state = nbdcrypt::commands::volume::state_dir(cli.state_dir);
            nbdcrypt::commands::kms::run(&state, cmd, &mut out)?
        }
        Command::Volume(cmd) => {
            let state = nbdcrypt::commands::volume::state_dir(cli.state_dir);
            nbdcrypt::commands::volume::run(&state, cmd, &mut out)?
        }
    }
    Ok(())
}
