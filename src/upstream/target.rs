//! Where an upstream NBD export is: `nbd://HOST[:PORT]/EXPORT` or
//! `nbd+unix:///EXPORT?socket=PATH`, and with TLS `nbds://…` or
//! `nbds+unix:///EXPORT?socket=PATH[&tls-hostname=NAME]` (the URI forms of the NBD URI
//! specification, as qemu, nbdkit and libnbd write them).

use std::path::PathBuf;

/// The NBD port when a URI names none.
pub const DEFAULT_PORT: u16 = 10809;

/// How to reach the upstream server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// TCP to a host (a name, an IPv4 address or a bracketed IPv6 address) and port.
    Tcp {
        /// Host, without brackets.
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix-domain socket.
    Unix(PathBuf),
}

/// An upstream export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The server.
    pub address: Address,
    /// The export name (empty: the server's default export).
    pub export: String,
    /// With TLS (`nbds`): the name the server's certificate must carry.
    pub tls: Option<String>,
    /// The URI as given, for messages.
    pub uri: String,
}

/// A URI that is not an upstream this build can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("upstream URI {uri:?}: {why}")]
pub struct BadUri {
    /// The URI.
    pub uri: String,
    /// What is wrong with it.
    pub why: &'static str,
}

/// Whether `s` is meant as an NBD URI rather than a path.
pub fn is_uri(s: &str) -> bool {
    ["nbd://", "nbd+unix://", "nbds://", "nbds+unix://"]
        .iter()
        .any(|p| s.starts_with(p))
}

impl Target {
    /// Parses an `nbd://` or `nbd+unix://` URI.
    pub fn parse(uri: &str) -> Result<Target, BadUri> {
        let bad = |why| BadUri {
            uri: uri.to_owned(),
            why,
        };
        let (tls, plain) = if let Some(rest) = uri.strip_prefix("nbds") {
            (true, format!("nbd{rest}"))
        } else {
            (false, uri.to_owned())
        };
        let mut t = Self::parse_plain(&plain, &bad)?;
        t.uri = uri.to_owned();
        if tls {
            t.tls = Some(match &t.address {
                Address::Tcp { host, .. } => host.clone(),
                Address::Unix(_) => plain
                    .split_once('?')
                    .and_then(|(_, q)| q.split('&').find_map(|kv| kv.strip_prefix("tls-hostname=")))
                    .filter(|h| !h.is_empty())
                    .map_or_else(|| Ok("localhost".to_owned()), |h| percent_decode(h, &bad))?,
            });
        }
        Ok(t)
    }

    fn parse_plain(uri: &str, bad: &dyn Fn(&'static str) -> BadUri) -> Result<Target, BadUri> {
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            // nbd+unix:///EXPORT?socket=PATH: no authority.
            let rest = rest
                .strip_prefix('/')
                .ok_or_else(|| bad("expected nbd+unix:///EXPORT?socket=PATH"))?;
            let (export, query) = rest
                .split_once('?')
                .ok_or_else(|| bad("missing ?socket=PATH"))?;
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .filter(|p| !p.is_empty())
                .ok_or_else(|| bad("missing ?socket=PATH"))?;
            return Ok(Target {
                address: Address::Unix(PathBuf::from(percent_decode(socket, bad)?)),
                export: percent_decode(export, bad)?,
                uri: uri.to_owned(),
                tls: None,
            });
        }
        let rest = uri.strip_prefix("nbd://").ok_or_else(|| {
            bad("expected nbd[s]://HOST[:PORT]/EXPORT or nbd[s]+unix:///EXPORT?socket=PATH")
        })?;
        let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
        if export.contains('?') {
            return Err(bad("query parameters are not supported for nbd://"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unclosed [ in the host"))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => p.parse().map_err(|_| bad("the port is not a number"))?,
        };
        Ok(Target {
            address: Address::Tcp {
                host: host.to_owned(),
                port,
            },
            export: percent_decode(export, bad)?,
            uri: uri.to_owned(),
            tls: None,
        })
    }
}

/// Decodes `%XX` escapes.
fn percent_decode(s: &str, bad: &dyn Fn(&'static str) -> BadUri) -> Result<String, BadUri> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .ok_or_else(|| bad("a truncated %-escape"))?;
            let hex = std::str::from_utf8(hex).map_err(|_| bad("a bad %-escape"))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad("a bad %-escape"))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad("the name is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_uri_forms_qemu_and_nbdkit_print() {
        let t = Target::parse("nbd://127.0.0.1:10810/disk").unwrap();
        assert_eq!(
            t.address,
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 10810
            }
        );
        assert_eq!(t.export, "disk");
        let t = Target::parse("nbd://storage.example").unwrap();
        assert_eq!(
            t.address,
            Address::Tcp {
                host: "storage.example".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(t.export, "");
        let t = Target::parse("nbd://[::1]:9000/a%20b").unwrap();
        assert_eq!(
            t.address,
            Address::Tcp {
                host: "::1".into(),
                port: 9000
            }
        );
        assert_eq!(t.export, "a b");
        let t = Target::parse("nbd+unix:///rbd?socket=/run/qemu-nbd.sock").unwrap();
        assert_eq!(t.address, Address::Unix("/run/qemu-nbd.sock".into()));
        assert_eq!(t.export, "rbd");
        let t = Target::parse("nbd+unix:///?socket=/tmp/s").unwrap();
        assert_eq!(t.export, "");
        assert_eq!(t.tls, None);
        let t = Target::parse("nbds://storage.example:10810/disk").unwrap();
        assert_eq!(t.tls.as_deref(), Some("storage.example"));
        assert_eq!(t.export, "disk");
        assert_eq!(t.uri, "nbds://storage.example:10810/disk");
        let t = Target::parse("nbds+unix:///d?socket=/s&tls-hostname=rbd.example").unwrap();
        assert_eq!(t.tls.as_deref(), Some("rbd.example"));
        assert_eq!(t.address, Address::Unix("/s".into()));
        let t = Target::parse("nbds+unix:///d?socket=/s").unwrap();
        assert_eq!(t.tls.as_deref(), Some("localhost"));
    }

    #[test]
    fn refuses_what_it_cannot_use_and_says_why() {
        for (uri, why) in [
            ("nbd+unix:///e", "missing ?socket"),
            ("nbd+unix:///e?socket=", "missing ?socket"),
            ("nbd://:10809/e", "no host"),
            ("nbd://h:port/e", "not a number"),
            ("nbd://h:99999/e", "not a number"),
            ("nbd://[::1/e", "unclosed"),
            ("nbd://h/e%2", "truncated"),
            ("nbd://h/e%zz", "bad %-escape"),
            ("http://h/e", "expected nbd[s]://"),
            ("nbds+unix:///e", "missing ?socket"),
        ] {
            let e = Target::parse(uri).unwrap_err();
            assert!(e.to_string().contains(why), "{uri}: {e}");
        }
        assert!(is_uri("nbd://h/e") && is_uri("nbd+unix:///e?socket=/s"));
        assert!(!is_uri("/var/lib/x.img") && !is_uri("nbd.img"));
    }
}
