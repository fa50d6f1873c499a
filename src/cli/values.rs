//! Values of command-line arguments that are more than a word: sizes with suffixes, sector
//! sizes and `--export` specs. Pure parsing; what is done with them lives in
//! [`crate::commands`].

use std::path::PathBuf;
use std::str::FromStr;

use crate::crypto::SectorSize;

/// One `--export` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    /// Export name.
    pub name: String,
    /// Backing file or block device.
    pub file: PathBuf,
    /// Key file.
    pub key_file: PathBuf,
    /// Size in bytes, if given.
    pub size: Option<u64>,
    /// Sector size.
    pub sector_size: SectorSize,
    /// Discards (TRIM, BLOCK_STATUS) on.
    pub discards: bool,
    /// Read-only.
    pub read_only: bool,
    /// Description.
    pub description: String,
}

/// Parses `123`, `4K`, `512M`, `2G`, `1T` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in {s:?}")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid size {s:?}"))
}

/// Parses a size in bytes that must fit in memory (`usize`).
pub fn parse_size_usize(s: &str) -> Result<usize, String> {
    usize::try_from(parse_size(s)?).map_err(|_| format!("size {s:?} is too large"))
}

/// Parses a sector size: 512, 1024, 2048 or 4096 (suffixes allowed: `4K`).
pub fn parse_sector_size(s: &str) -> Result<SectorSize, String> {
    SectorSize::from_bytes(parse_size(s)?).map_err(|e| e.to_string())
}

impl FromStr for ExportSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut spec = ExportSpec {
            name: String::new(),
            file: PathBuf::new(),
            key_file: PathBuf::new(),
            size: None,
            sector_size: SectorSize::S4096,
            discards: false,
            read_only: false,
            description: String::new(),
        };
        for part in s.split(',') {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            match k {
                "name" => spec.name = v.to_owned(),
                "file" => spec.file = v.into(),
                "key-file" => spec.key_file = v.into(),
                "size" => spec.size = Some(parse_size(v)?),
                "sector-size" => {
                    spec.sector_size =
                        SectorSize::from_bytes(parse_size(v)?).map_err(|e| e.to_string())?
                }
                "discards" => spec.discards = true,
                "read-only" => spec.read_only = true,
                "description" => spec.description = v.to_owned(),
                other => return Err(format!("unknown export setting {other:?}")),
            }
        }
        if spec.name.is_empty()
            || spec.file.as_os_str().is_empty()
            || spec.key_file.as_os_str().is_empty()
        {
            return Err("an export needs name=, file= and key-file=".into());
        }
        if spec.name.len() > crate::codec::MAX_STRING {
            return Err("export name longer than 4096 bytes".into());
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_spec_parses_every_setting() {
        let s: ExportSpec = "name=d,file=/tmp/x,key-file=/tmp/k,size=1G,sector-size=512,discards,read-only,description=hi"
            .parse()
            .unwrap();
        assert_eq!(s.size, Some(1 << 30));
        assert_eq!(s.sector_size, SectorSize::S512);
        assert!(s.discards && s.read_only);
        assert_eq!(s.description, "hi");
        assert!("name=d,file=/x".parse::<ExportSpec>().is_err());
        assert!(
            "name=d,file=/x,key-file=/k,colour=red"
                .parse::<ExportSpec>()
                .is_err()
        );
        assert!(
            "name=d,file=/x,key-file=/k,sector-size=3000"
                .parse::<ExportSpec>()
                .is_err()
        );
    }

    #[test]
    fn parse_size_handles_suffixes_and_overflow() {
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("12Q").is_err());
    }
}
