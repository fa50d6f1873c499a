//! `nbdcrypt info`: the CPU's AES features, each backend's code path, and which one is selected.

use std::io::Write;

use crate::cli::InfoArgs;
use crate::crypto::{self, BackendKind, SectorSize, VolumeKey};

/// Prints the report.
pub fn run(args: &InfoArgs, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "nbdcrypt {}", env!("CARGO_PKG_VERSION"))?;
    writeln!(out, "architecture: {}", std::env::consts::ARCH)?;
    let feats: Vec<String> = crypto::cpu::features()
        .iter()
        .map(|f| format!("{}{}", if f.present { "+" } else { "-" }, f.name))
        .collect();
    writeln!(out, "cpu features: {}", feats.join(" "))?;
    writeln!(
        out,
        "cipher: aes-xts-plain64, 512-bit keys, IV in 512-byte units"
    )?;
    writeln!(out, "backends:")?;
    for kind in BackendKind::ALL {
        writeln!(out, "  {:<9} {}", kind.name(), kind.path())?;
    }
    writeln!(out, "selection ({}):", args.backend)?;
    for size in SectorSize::ALL {
        let kind = args.backend.resolve(size);
        writeln!(out, "  {size:>4}-byte sectors: {kind} ({})", kind.path())?;
    }
    let protection = VolumeKey::generate().map(|k| k.protection());
    match protection {
        Ok(p) => writeln!(
            out,
            "key memory: {}, {}",
            if p.locked {
                "locked (mlock)"
            } else {
                "NOT locked: raise RLIMIT_MEMLOCK"
            },
            if p.excluded_from_dumps {
                "excluded from core dumps"
            } else {
                "NOT excluded from core dumps"
            }
        )?,
        Err(e) => writeln!(out, "key memory: unavailable: {e}")?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::BackendChoice;

    #[test]
    fn info_reports_backends_and_selection() {
        let mut out = Vec::new();
        run(
            &InfoArgs {
                backend: BackendChoice::Force(BackendKind::Portable),
            },
            &mut out,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("cpu features:"), "{text}");
        assert!(text.contains("hw "), "{text}");
        assert!(text.contains("4096-byte sectors: portable"), "{text}");
        assert!(text.contains("key memory:"), "{text}");
    }
}
