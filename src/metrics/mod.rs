//! Prometheus metrics (`serve --metrics-listen`), through the `prometheus-client` crate.
//!
//! One process-wide [`Metrics`] holds every family. Process-level events (connections,
//! handshake failures, KMS calls, upstream reconnects) are always counted: each is rare and
//! costs an atomic add. Per-request metrics exist only for exports served with metrics on
//! ([`ExportMetrics`]); their handles are resolved once per export and command, so the hot path
//! costs a few atomic operations and one clock read per request, never a label lookup.
//!
//! Label values are bounded: export names, command names, errno names, KMS operation names and
//! outcomes, configured upstream URIs, fixed reason words. No client address, offset or key id
//! of a request is ever a label. [`http`] serves the text at `/metrics`.

mod classic;
mod histogram;
pub mod http;
mod labels;

pub use histogram::LatencyHistogram;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::protocol::consts::err;
use classic::to_classic;
use labels::{
    BuildLabels, CommandLabels, ExportInfoLabels, ExportLabels, KmsLabels, KmsOpLabels,
    ReasonLabels, RequestLabels, TlsLabels, UpstreamLabels,
};

/// KMS call latency buckets, seconds: 100 µs to 30 s (AWS retries included).
const KMS_BUCKETS: [f64; 12] = [
    0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
];

/// Commands with their own label value; anything else is `other`.
pub const COMMANDS: [&str; 8] = [
    "read",
    "write",
    "flush",
    "trim",
    "write_zeroes",
    "block_status",
    "cache",
    "other",
];

/// The command label index of an NBD command type.
pub fn command_index(kind: u16) -> usize {
    use crate::protocol::consts::cmd;
    match kind {
        cmd::READ => 0,
        cmd::WRITE => 1,
        cmd::FLUSH => 2,
        cmd::TRIM => 3,
        cmd::WRITE_ZEROES => 4,
        cmd::BLOCK_STATUS => 5,
        cmd::CACHE => 6,
        _ => 7,
    }
}

/// The `result` label of an NBD error value: `ok` or the errno's name.
pub fn result_name(errno: u32) -> &'static str {
    match errno {
        0 => "ok",
        err::EPERM => "EPERM",
        err::EIO => "EIO",
        err::ENOMEM => "ENOMEM",
        err::EINVAL => "EINVAL",
        err::ENOSPC => "ENOSPC",
        err::EOVERFLOW => "EOVERFLOW",
        err::ENOTSUP => "ENOTSUP",
        err::ESHUTDOWN => "ESHUTDOWN",
        _ => "other",
    }
}

fn kms_histogram() -> Histogram {
    Histogram::new(KMS_BUCKETS)
}

/// Run before each scrape.
type ScrapeHook = Box<dyn Fn(&Metrics) + Send + Sync>;

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric family of the process.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<CommandLabels, LatencyHistogram>,
    read_bytes: Family<ExportLabels, Counter>,
    written_bytes: Family<ExportLabels, Counter>,
    in_flight: Family<ExportLabels, Gauge>,
    export_info: Family<ExportInfoLabels, Gauge>,
    connections_open: Family<TlsLabels, Gauge>,
    connections: Family<TlsLabels, Counter>,
    handshake_failures: Family<ReasonLabels, Counter>,
    kms_calls: Family<KmsLabels, Counter>,
    kms_latency: HistogramFamily<KmsOpLabels>,
    upstream_reconnects: Family<UpstreamLabels, Counter>,
    upstream_give_ups: Family<UpstreamLabels, Counter>,
    payload_in_use: Gauge<u64, AtomicU64>,
    payload_budget: Gauge<u64, AtomicU64>,
    /// Run before each scrape: refreshes the gauges that are read, not counted.
    refresh: Mutex<Vec<ScrapeHook>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("nbdcrypt");
        let m = Metrics {
            requests: Family::default(),
            latency: Family::default(),
            read_bytes: Family::default(),
            written_bytes: Family::default(),
            in_flight: Family::default(),
            export_info: Family::default(),
            connections_open: Family::default(),
            connections: Family::default(),
            handshake_failures: Family::default(),
            kms_calls: Family::default(),
            kms_latency: Family::new_with_constructor(kms_histogram),
            upstream_reconnects: Family::default(),
            upstream_give_ups: Family::default(),
            payload_in_use: Gauge::default(),
            payload_budget: Gauge::default(),
            refresh: Mutex::new(Vec::new()),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "requests",
            "NBD requests answered, by export, command and result (ok or the errno name)",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time from a request's header read to its reply written, by export and command",
            m.latency.clone(),
        );
        r.register(
            "read_bytes",
            "Plaintext bytes returned by successful reads",
            m.read_bytes.clone(),
        );
        r.register(
            "written_bytes",
            "Plaintext bytes accepted by successful writes",
            m.written_bytes.clone(),
        );
        r.register(
            "requests_in_flight",
            "Requests admitted and not yet answered",
            m.in_flight.clone(),
        );
        r.register(
            "export_info",
            "Each served export's cipher, crypto backend and sector size (value 1)",
            m.export_info.clone(),
        );
        r.register(
            "connections_open",
            "Connections in the transmission phase, by TLS",
            m.connections_open.clone(),
        );
        r.register(
            "connections",
            "Connections that completed negotiation, by TLS",
            m.connections.clone(),
        );
        r.register(
            "handshake_failures",
            "Connections that ended before transmission, by reason",
            m.handshake_failures.clone(),
        );
        r.register(
            "kms_calls",
            "Key service calls, by operation and outcome (success, failure, denied)",
            m.kms_calls.clone(),
        );
        r.register(
            "kms_call_duration_seconds",
            "Key service call latency, by operation",
            m.kms_latency.clone(),
        );
        r.register(
            "upstream_reconnects",
            "Upstream NBD connections re-established after a failure",
            m.upstream_reconnects.clone(),
        );
        r.register(
            "upstream_give_ups",
            "Requests failed with EIO because an upstream stayed unreachable past its timeout",
            m.upstream_give_ups.clone(),
        );
        r.register(
            "payload_bytes_in_use",
            "Bytes of the server-wide payload budget held by requests",
            m.payload_in_use.clone(),
        );
        r.register(
            "payload_bytes_budget",
            "The server-wide payload budget (serve --max-buffer-mib)",
            m.payload_budget.clone(),
        );
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                target_arch: std::env::consts::ARCH,
            })
            .set(1);
        r.register("build_info", "nbdcrypt's version (value 1)", build);
        Metrics { registry, ..m }
    }

    /// The text exposition (OpenMetrics), after the refresh hooks ran.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        for f in self
            .refresh
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            f(self);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// The classic Prometheus text format (version 0.0.4), for clients that do not ask for
    /// OpenMetrics (`curl`, `promtool check metrics`): the same families from the same
    /// encoder, with the two formats' differences applied — a counter's HELP and TYPE name
    /// carry its `_total` suffix, and there are no `# UNIT` or `# EOF` lines.
    pub fn encode_classic(&self) -> Result<String, std::fmt::Error> {
        Ok(to_classic(&self.encode()?))
    }

    /// Runs `f` before every scrape (gauges that are read rather than counted).
    pub fn on_scrape(&self, f: impl Fn(&Metrics) + Send + Sync + 'static) {
        self.refresh
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Box::new(f));
    }

    /// Sets the payload-budget gauges.
    pub fn set_payload(&self, in_use: u64, budget: u64) {
        self.payload_in_use.set(in_use);
        self.payload_budget.set(budget);
    }

    /// Per-request handles for `export`, and its info metric.
    pub fn export(
        &self,
        export: &str,
        cipher: &'static str,
        backend: &str,
        sector_size: u64,
    ) -> Arc<ExportMetrics> {
        self.export_info
            .get_or_create(&ExportInfoLabels {
                export: export.into(),
                backend: backend.into(),
                sector_size: sector_size.to_string(),
                cipher,
            })
            .set(1);
        let label = ExportLabels {
            export: export.into(),
        };
        let per_command = |i: usize| CommandHandles {
            ok: self.requests.get_or_create_owned(&RequestLabels {
                export: export.into(),
                command: COMMANDS[i],
                result: "ok",
            }),
            latency: self.latency.get_or_create_owned(&CommandLabels {
                export: export.into(),
                command: COMMANDS[i],
            }),
        };
        Arc::new(ExportMetrics {
            export: export.into(),
            commands: std::array::from_fn(per_command),
            read_bytes: self.read_bytes.get_or_create_owned(&label),
            written_bytes: self.written_bytes.get_or_create_owned(&label),
            in_flight: self.in_flight.get_or_create_owned(&label),
        })
    }

    /// A connection reached transmission.
    pub fn connection_opened(&self, tls: bool) -> ConnectionGuard {
        let labels = TlsLabels {
            tls: if tls { "yes" } else { "no" },
        };
        self.connections.get_or_create(&labels).inc();
        let open = self.connections_open.get_or_create_owned(&labels);
        open.inc();
        ConnectionGuard { open }
    }

    /// A connection ended before transmission; `reason` is a fixed word.
    pub fn handshake_failed(&self, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// One key service call.
    pub fn kms_call(&self, operation: &'static str, outcome: &'static str, started: Instant) {
        self.kms_calls
            .get_or_create(&KmsLabels { operation, outcome })
            .inc();
        self.kms_latency
            .get_or_create(&KmsOpLabels { operation })
            .observe(started.elapsed().as_secs_f64());
    }

    /// An upstream connection was re-established.
    pub fn upstream_reconnected(&self, upstream: &str) {
        self.upstream_reconnects
            .get_or_create(&UpstreamLabels {
                upstream: upstream.into(),
            })
            .inc();
    }

    /// An upstream stayed unreachable past its timeout.
    pub fn upstream_gave_up(&self, upstream: &str) {
        self.upstream_give_ups
            .get_or_create(&UpstreamLabels {
                upstream: upstream.into(),
            })
            .inc();
    }
}

/// Decrements the open-connections gauge when the connection ends.
#[derive(Debug)]
pub struct ConnectionGuard {
    open: Gauge,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.open.dec();
    }
}

#[derive(Debug)]
struct CommandHandles {
    ok: Counter,
    latency: LatencyHistogram,
}

/// One export's per-request handles.
#[derive(Debug)]
pub struct ExportMetrics {
    export: String,
    commands: [CommandHandles; COMMANDS.len()],
    read_bytes: Counter,
    written_bytes: Counter,
    in_flight: Gauge,
}

impl ExportMetrics {
    /// A request was admitted: counted in flight until the returned mark is finished or
    /// dropped.
    pub fn admit(self: &Arc<Self>, kind: u16, payload: u32) -> RequestMark {
        self.in_flight.inc();
        RequestMark {
            export: Arc::clone(self),
            command: command_index(kind),
            payload,
            started: Instant::now(),
        }
    }

    /// A request answered without being admitted (refused by validation).
    pub fn refused(&self, kind: u16, errno: u32) {
        self.count(command_index(kind), errno);
    }

    fn count(&self, command: usize, errno: u32) {
        if errno == 0 {
            self.commands[command].ok.inc();
        } else {
            global()
                .requests
                .get_or_create(&RequestLabels {
                    export: self.export.clone(),
                    command: COMMANDS[command],
                    result: result_name(errno),
                })
                .inc();
        }
    }
}

/// One admitted request, from its header to its reply.
#[derive(Debug)]
pub struct RequestMark {
    export: Arc<ExportMetrics>,
    command: usize,
    payload: u32,
    started: Instant,
}

impl RequestMark {
    /// The reply (with NBD error value `errno`) has been written.
    pub fn finish(&self, errno: u32) {
        let e = &self.export;
        e.count(self.command, errno);
        let ns = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        e.commands[self.command].latency.observe_ns(ns);
        if errno == 0 {
            match self.command {
                0 => e.read_bytes.inc_by(u64::from(self.payload)),
                1 => e.written_bytes.inc_by(u64::from(self.payload)),
                _ => 0,
            };
        }
    }
}

impl Drop for RequestMark {
    fn drop(&mut self) {
        self.export.in_flight.dec();
    }
}

#[cfg(test)]
mod tests;
