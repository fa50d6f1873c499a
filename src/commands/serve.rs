//! `nbdcrypt serve`: open the volumes and exports, bind, serve until SIGINT/SIGTERM, drain,
//! flush; withdraw volumes deleted meanwhile.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use super::export::open_export;
use super::guard::GuardConfig;
use crate::volume::lease::{LeaseOptions, ServingLease};
use crate::volume::manager::Manager;

use crate::cli::ServeArgs;
use crate::crypto::{self, SectorSize};
use crate::server::buffers::BufferPool;
use crate::server::pipeline::Resources;
use crate::server::workers::Workers;
use crate::server::{self, Export, Exports, Listen, Listener, ServerConfig};

/// Errors of `serve` and `keygen`.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A raw `--export` could not be opened.
    #[error(transparent)]
    Export(#[from] super::export::ExportError),
    /// Two exports share a name.
    #[error("two exports are named {0:?}")]
    DuplicateName(String),
    /// The metrics endpoint could not be bound.
    #[error("cannot listen for metrics on {addr}: {source}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The server could not start.
    #[error(transparent)]
    Server(#[from] server::ServerError),
    /// A named volume could not be opened.
    #[error(transparent)]
    NamedVolume(#[from] crate::volume::manager::ManagerError),
    /// A duration flag is not a positive number of seconds.
    #[error("{0} {1} is not a positive number of seconds")]
    Seconds(&'static str, f64),
    /// The crypto workers could not start.
    #[error(transparent)]
    Workers(crate::server::workers::WorkersError),
    /// The async runtime could not start.
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    /// The TLS credentials could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::server::tls::TlsError),
    /// `--user` could not be honoured.
    #[error(transparent)]
    Privileges(#[from] super::privileges::PrivilegeError),
}

/// The quick-start volume served when `serve` gets no `--volume` and no `--export`.
pub const QUICKSTART_VOLUME: &str = "scratch";
/// Its size when it has to be created.
pub const QUICKSTART_SIZE: u64 = 1 << 30;

/// The user to switch to (`--user`), by name and entry.
type SwitchTo = Option<(String, nix::unistd::User)>;
/// The TLS credentials, when TLS is on.
type TlsOn = Option<Arc<crate::server::tls::Tls>>;

/// What `open_all` opened: the exports, the leases of the `--volume`s, and their names.
struct Opened {
    exports: Vec<Export>,
    leases: Vec<ServingLease>,
    volumes: Vec<String>,
}

/// Checks `--user` and loads TLS before any key is unwrapped.
fn prepare(args: &ServeArgs) -> Result<(SwitchTo, TlsOn), ServeError> {
    let user = match &args.user {
        Some(name) => {
            let user = super::privileges::lookup(name)?;
            super::privileges::check(name, &user)?;
            Some((name.clone(), user))
        }
        None => None,
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = crate::server::tls::Tls::load(
                crate::server::tls::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: args.tls_client_ca.clone(),
                },
                args.tls_required,
            )?;
            tracing::info!(
                cert = %cert.display(),
                required = tls.required(),
                client_certificates = tls.verifies_clients(),
                "TLS ready (1.3 and 1.2; reload with SIGHUP)"
            );
            Some(Arc::new(tls))
        }
        _ => None,
    };
    if tls.is_none() && args.unix.is_none() && !args.listen.ip().is_loopback() {
        tracing::warn!(
            listen = %args.listen,
            "listening on a non-loopback address without TLS: anyone on the network can read \
             and write the volumes' plaintext; add --tls-cert/--tls-key (and \
             --tls-client-ca to admit only your clients)"
        );
    }
    Ok((user, tls))
}

/// A positive number of seconds.
fn seconds(flag: &'static str, v: f64) -> Result<std::time::Duration, ServeError> {
    std::time::Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or(ServeError::Seconds(flag, v))
}

/// The `--volume`s (the quick-start volume when nothing is named), each opened with its lease
/// taken and key unwrapped, then the raw `--export`s. On failure, leases taken so far are
/// released.
fn open_all(args: &ServeArgs, m: &Manager<'_>) -> Result<Opened, ServeError> {
    let mut volumes = args.volumes.clone();
    if volumes.is_empty() && args.exports.is_empty() {
        volumes.push(QUICKSTART_VOLUME.into());
        if matches!(
            m.entry(QUICKSTART_VOLUME),
            Err(crate::volume::manager::ManagerError::NoSuchVolume(_))
        ) {
            let h = m.create(
                QUICKSTART_VOLUME,
                &crate::volume::lifecycle::CreateOptions {
                    size: QUICKSTART_SIZE,
                    volume_type: crate::volume::header::VolumeType::Scratch,
                    kms_key: None,
                    sector_size: SectorSize::S4096,
                    backing: None,
                    discards: false,
                    preallocate: false,
                    force: false,
                },
            )?;
            tracing::info!(volume = h.name, size = h.size, state_dir = %m.state_dir().display(), "created the quick-start scratch volume on the local KMS");
        }
    }
    let lease = LeaseOptions {
        interval_ms: u32::try_from(seconds("--lease-interval", args.lease_interval)?.as_millis())
            .unwrap_or(u32::MAX),
        take_over: args.take_over,
    };
    let mut list: Vec<Export> = Vec::new();
    let mut leases: Vec<ServingLease> = Vec::new();
    let opened = (|| {
        for name in &volumes {
            if list.iter().any(|e| &e.name == name) {
                return Err(ServeError::DuplicateName(name.clone()));
            }
            // One Decrypt per volume per serve: the key is unwrapped here and only here.
            let (volume, held) = m.open(name, args.backend, lease)?;
            leases.push(held);
            tracing::info!(
                volume = name,
                size = volume.size(),
                crypto = volume.engine_summary(),
                lease_interval_s = args.lease_interval,
                "volume ready (lease taken)"
            );
            list.push(metered(
                args,
                Export::new(name.clone(), format!("nbdcrypt volume {name}"), volume)
                    .with_max_request(args.max_request_mib << 20),
            ));
        }
        for spec in &args.exports {
            if list.iter().any(|e| e.name == spec.name) {
                return Err(ServeError::DuplicateName(spec.name.clone()));
            }
            let export = metered(
                args,
                open_export(spec, args.backend, &upstream_options(args))?
                    .with_max_request(args.max_request_mib << 20),
            );
            tracing::info!(
                export = export.name,
                size = export.volume.size(),
                discards = spec.discards,
                read_only = spec.read_only,
                file = %spec.file.display(),
                crypto = export.volume.engine_summary(),
                "export ready"
            );
            list.push(export);
        }
        Ok(())
    })();
    match opened {
        Ok(()) => Ok(Opened {
            exports: list,
            leases,
            volumes,
        }),
        Err(e) => {
            for l in leases {
                let _ = l.release();
            }
            Err(e)
        }
    }
}

/// The export, with per-request metrics when `--metrics-listen` is given.
fn metered(args: &ServeArgs, export: Export) -> Export {
    if args.metrics_listen.is_some() {
        export.with_metrics()
    } else {
        export
    }
}

/// Binds the metrics endpoint (before any privilege drop) and starts serving it.
async fn start_metrics(
    args: &ServeArgs,
    config: &ServerConfig,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), ServeError> {
    let Some(addr) = args.metrics_listen else {
        return Ok(());
    };
    let listener = crate::metrics::http::bind(addr)
        .await
        .map_err(|source| ServeError::Metrics { addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    let buffers = Arc::clone(&config.resources.buffers);
    crate::metrics::global().on_scrape(move |m| {
        let budget = buffers.budget_bytes() as u64;
        let free = buffers.budget().available_permits() as u64;
        m.set_payload(budget.saturating_sub(free), budget);
    });
    tracing::info!(url = %format!("http://{bound}/metrics"), "metrics endpoint listening");
    tokio::spawn(crate::metrics::http::serve(listener, shutdown));
    Ok(())
}

/// Runs the server until SIGINT or SIGTERM.
pub fn run(
    args: ServeArgs,
    state_dir: &Path,
    kms: &dyn crate::kms::KeyService,
    kms_name: &str,
) -> Result<(), ServeError> {
    if !crypto::locked::disable_core_dumps() {
        tracing::warn!("could not mark the process undumpable (PR_SET_DUMPABLE)");
    }
    // main() does this before any thread exists; again here for library callers.
    super::privileges::no_new_privs();
    // Fail on a bad --user or TLS file before any key is unwrapped.
    let (user, tls) = prepare(&args)?;
    let guard_cfg = GuardConfig {
        lease_interval: seconds("--lease-interval", args.lease_interval)?,
        kms_recheck: args
            .kms_recheck
            .map(|v| seconds("--kms-recheck", v))
            .transpose()?,
        state_dir: state_dir.to_owned(),
    };
    let config = ServerConfig {
        listen: match &args.unix {
            Some(p) => Listen::Unix(p.clone()),
            None => Listen::Tcp(args.listen),
        },
        max_connections: args.max_connections,
        resources: Resources {
            workers: Arc::new(
                Workers::new(args.workers, args.split_bytes).map_err(ServeError::Workers)?,
            ),
            buffers: BufferPool::new(args.max_buffer_mib.saturating_mul(1024 * 1024)),
        },
        handshake_timeout: seconds("--handshake-timeout", args.handshake_timeout)?,
        tls: tls.clone(),
    };
    let m = Manager::new(state_dir, kms, kms_name).with_upstream(upstream_options(&args));
    let Opened {
        exports,
        leases,
        volumes,
    } = open_all(&args, &m)?;
    let exports = Exports::new(exports);
    tracing::info!(
        workers = config.resources.workers.threads(),
        split_bytes = config.resources.workers.split_bytes(),
        max_buffer_mib = args.max_buffer_mib,
        "crypto workers ready"
    );
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let (exports_ref, m_ref, guard_ref) = (&exports, &m, &guard_cfg);
    std::thread::scope(|scope| {
        let guard = std::thread::Builder::new()
            .name("nbdcrypt-guard".into())
            .spawn_scoped(scope, move || {
                super::guard::run(exports_ref, leases, m_ref, guard_ref, &stop_rx);
            })
            .map_err(ServeError::Runtime)?;
        let served = serve_until_signal(&args, state_dir, &config, &exports, user, tls, &volumes);
        let _ = stop_tx.send(());
        if guard.join().is_err() {
            tracing::error!("the volume guard panicked");
        }
        served
    })
}

/// Binds, drops privileges, prints the attach lines and serves until SIGINT/SIGTERM.
fn serve_until_signal(
    args: &ServeArgs,
    state_dir: &Path,
    config: &ServerConfig,
    exports: &Exports,
    user: SwitchTo,
    tls: TlsOn,
    volumes: &[String],
) -> Result<(), ServeError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("nbdcrypt")
        .build()
        .map_err(ServeError::Runtime)?;
    rt.block_on(async move {
        let listener = Listener::bind(&config.listen).await?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        start_metrics(args, config, rx.clone()).await?;
        // Opened now, written once serving: after a privilege drop the new user may not be
        // able to create it.
        let ready = args
            .ready_file
            .as_ref()
            .map(|p| (p, std::fs::File::create(p)));
        // Everything root could be needed for is done: volumes open, keys unwrapped, bound.
        if let Some((name, user)) = &user {
            super::privileges::drop_to(name, user)?;
            tracing::info!(
                user = name,
                uid = user.uid.as_raw(),
                gid = user.gid.as_raw(),
                "privileges dropped"
            );
            if std::fs::read_dir(crate::fsutil::StateLayout::new(state_dir).registry()).is_err() && !volumes.is_empty() {
                tracing::warn!(
                    user = name,
                    state_dir = %state_dir.display(),
                    "the state directory is not readable as this user: a volume deleted while \
                     served is withdrawn when its header is shredded, not from the registry \
                     (chown the state directory to the user to fix)"
                );
            }
        }
        let addr = listener.describe();
        tracing::info!(listen = addr, "serving");
        let bound = match (&config.listen, listener.tcp_addr()) {
            (Listen::Tcp(_), Some(a)) => Listen::Tcp(a),
            (other, _) => other.clone(),
        };
        print_attach_help(&bound, exports, tls.as_deref());
        if let Some((path, file)) = ready {
            use std::io::Write as _;
            if let Err(e) = file.and_then(|mut f| f.write_all(format!("{addr}\n").as_bytes())) {
                tracing::warn!(error = %e, path = %path.display(), "could not write the ready file");
            }
        }
        tokio::spawn(reload_on_hangup(tls));
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received: finishing in-flight requests");
            let _ = tx.send(true);
        });
        server::run(listener, exports.clone(), config, rx).await;
        tracing::info!("stopped");
        Ok(())
    })
}

fn print_attach_help(listen: &Listen, exports: &Exports, tls: Option<&crate::server::tls::Tls>) {
    let mut err = std::io::stderr().lock();
    // With TLS: libnbd's nbds:// scheme, and nbd-client's certificate options.
    let scheme = if tls.is_some() { "nbds" } else { "nbd" };
    let tls_opts = match tls {
        None => String::new(),
        Some(t) if t.verifies_clients() => {
            " -cacertfile CA.pem -certfile CLIENT.pem -keyfile CLIENT-KEY.pem".into()
        }
        Some(_) => " -cacertfile CA.pem".into(),
    };
    let all = exports.all();
    for (i, e) in all.iter().enumerate() {
        // Block size = the volume's sector size: no client-side or server-side partial sectors.
        let bs = e.volume.config().sector_size.bytes();
        // Several exports: a device and a mount directory each.
        let dir = if all.len() == 1 {
            "fuse".to_owned()
        } else {
            format!("fuse-{}", e.name)
        };
        let (uri, client) = match listen {
            Listen::Tcp(a) => (
                format!("{scheme}://{a}/{}", e.name),
                format!(
                    "nbd-client {} {} /dev/nbd{i} -N {} -b {bs}{tls_opts}",
                    a.ip(),
                    a.port(),
                    e.name
                ),
            ),
            Listen::Unix(p) => (
                format!("{scheme}+unix:///{}?socket={}", e.name, p.display()),
                format!(
                    "nbd-client -unix {} /dev/nbd{i} -N {} -b {bs}{tls_opts}",
                    p.display(),
                    e.name
                ),
            ),
        };
        let _ = writeln!(
            err,
            "serving {uri}\n  kernel:  {client}\n  nbdfuse: mkdir -p {dir} && (nbdfuse {dir}/disk '{uri}' &) && \
             until [ -e {dir}/disk ]; do sleep 0.1; done && losetup -f --show -b {bs} {dir}/disk\n  \
             detach:  losetup -d /dev/loopN && fusermount3 -u {dir}"
        );
    }
}

/// SIGHUP reloads the TLS certificate, key and client CA (new handshakes use them; existing
/// sessions keep theirs). Without TLS it is logged and ignored rather than ending the server.
async fn reload_on_hangup(tls: Option<Arc<crate::server::tls::Tls>>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot install the SIGHUP handler: TLS reload unavailable");
        return;
    };
    while hup.recv().await.is_some() {
        match &tls {
            None => tracing::info!("SIGHUP: no TLS configured, nothing to reload"),
            Some(tls) => match tls.reload() {
                Ok(()) => tracing::info!(
                    cert = %tls.files().cert.display(),
                    "SIGHUP: TLS certificates reloaded"
                ),
                Err(e) => tracing::error!(
                    error = %e,
                    "SIGHUP: TLS reload failed; keeping the previous certificates"
                ),
            },
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}

/// How exports on an upstream NBD server use it.
fn upstream_options(args: &ServeArgs) -> crate::upstream::Options {
    crate::upstream::Options {
        timeout: std::time::Duration::from_secs_f64(args.upstream_timeout.max(0.0)),
        connections: args.upstream_connections.max(1),
    }
}
