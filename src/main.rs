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
        // The reader of our output went away (`nbdcrypt … | head`): nothing left to say. Only
        // our own standard output counts: a broken pipe anywhere else (an upstream server that
        // hung up) is an error like any other.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .and_then(std::io::Error::get_ref)
                    .is_some_and(|inner| inner.is::<OutputClosed>())
            }) =>
        {
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            // Our error types put the reason in their message; no backtrace for users.
            eprintln!("nbdcrypt: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Marks a broken pipe on standard output (and only there).
#[derive(Debug, thiserror::Error)]
#[error("the reader of the output went away")]
struct OutputClosed;

/// Standard output, whose broken pipe becomes an [`OutputClosed`] error.
struct Output<W>(W);

impl<W: std::io::Write> Output<W> {
    fn mark(e: std::io::Error) -> std::io::Error {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, OutputClosed)
        } else {
            e
        }
    }
}

impl<W: std::io::Write> std::io::Write for Output<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf).map_err(Self::mark)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush().map_err(Self::mark)
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut out = Output(std::io::stdout().lock());
    let Cli {
        command,
        state_dir,
        kms,
        kms_endpoint,
        region,
        kms_attempts,
        upstream_tls_ca,
        upstream_tls_cert,
        upstream_tls_key,
        ..
    } = cli;
    if let Some(ca) = &upstream_tls_ca {
        let client = upstream_tls_cert
            .as_deref()
            .zip(upstream_tls_key.as_deref());
        nbdcrypt::upstream::tls::install(nbdcrypt::upstream::tls::config(ca, client)?);
    }
    // Only the commands that keep state need a state directory.
    let state = if matches!(
        command,
        Command::Serve(_) | Command::Volume(_) | Command::Kms(_)
    ) {
        let state = nbdcrypt::commands::volume::state_dir(state_dir)?;
        nbdcrypt::commands::check_state_dir(&state)?;
        state
    } else {
        std::path::PathBuf::new()
    };
    let key_service = || {
        nbdcrypt::commands::key_service(
            kms,
            kms_endpoint.as_deref(),
            region.as_deref(),
            kms_attempts,
            &state,
        )
    };
    match command {
        Command::Info(args) => nbdcrypt::commands::info::run(&args, &mut out)?,
        Command::Benchmark(args) => nbdcrypt::commands::benchmark::run(&args, &mut out)?,
        Command::Serve(args) => {
            // Before the KMS client or anything else starts a thread: every thread inherits it.
            nbdcrypt::commands::privileges::no_new_privs();
            let (service, name) = key_service()?;
            nbdcrypt::commands::serve::run(*args, &state, service.as_ref(), name)?
        }
        Command::Keygen(args) => nbdcrypt::commands::export::keygen(&args.path)?,
        Command::Kms(cmd) => nbdcrypt::commands::kms::run(&state, cmd, &mut out)?,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut cmd = nbdcrypt::cli::Cli::command();
            // Into memory first: clap_complete panics on a write error (e.g. a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "nbdcrypt", &mut script);
            std::io::Write::write_all(&mut out, &script)?;
        }
        Command::Volume(cmd) => {
            let (service, name) = key_service()?;
            nbdcrypt::commands::volume::run(&state, service.as_ref(), name, cmd, &mut out)?
        }
    }
    Ok(())
}
