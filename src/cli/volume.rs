//! The `volume` subcommands and the arguments of `volume create`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::values;
use crate::crypto::BackendChoice;
use crate::volume::header::VolumeType;

/// `nbdcrypt volume …`.
#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume: a fresh 512-bit data key from the KMS, wrapped in the volume header.
    Create(VolumeCreateArgs),
    /// List volumes.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Describe a volume (persistent volumes show their KMS key; scratch volumes never do).
    Describe {
        /// Volume name.
        name: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Rewrap the volume's data key under another KMS key (ReEncrypt); no data is rewritten.
    Rewrap {
        /// Volume name.
        name: String,
        /// The new KMS key: id, alias or ARN.
        #[arg(long)]
        kms_key: String,
    },
    /// Grow a volume, served or not, to SIZE (K/M/G/T suffixes; a multiple of its sector
    /// size). Shrinking is refused. A server of the volume tells new connections the new size;
    /// open connections keep theirs (reattach, then grow the file system: resize2fs).
    Resize {
        /// Volume name.
        name: String,
        /// The new size.
        #[arg(long, value_parser = values::parse_size)]
        size: u64,
    },
    /// Re-encrypt every sector under a new data key (GenerateDataKey under the volume's KMS
    /// key), then destroy the old key. For a data key that may have leaked (after
    /// export-key); KMS key rotation and rewrap only re-wrap the same data key. Crash-safe:
    /// after an interruption run it again to finish. The volume cannot be served meanwhile.
    Reencrypt {
        /// Volume name.
        name: String,
        /// Progress and the result as JSON lines on stdout (instead of a progress bar).
        #[arg(long)]
        json: bool,
        /// XTS backend: auto, hw, portable, vaes or vaes256.
        #[arg(long, env = "NBDCRYPT_XTS_BACKEND", default_value = "auto")]
        backend: BackendChoice,
    },
    /// Print a persistent volume's 512-bit key as 128 hex digits, for recovery with
    /// cryptsetup (audited; scratch volumes refuse).
    ExportKey {
        /// Volume name.
        name: String,
        /// Required: you are about to see the key.
        #[arg(long)]
        confirm: bool,
    },
    /// Adopt an existing nbdcrypt volume (e.g. one created on another node): reads its header,
    /// checks that the KMS unwraps its key, and registers it. Never writes to the store.
    Import {
        /// Name to register it under.
        name: String,
        /// Its backing file or block device, or the upstream NBD export that holds it
        /// (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`).
        #[arg(long)]
        backing: PathBuf,
    },
    /// Delete a volume: its wrapped key is destroyed in every header copy (crypto-shredding),
    /// and the backing file is removed unless `--keep-ciphertext`. A volume being served is
    /// refused unless `--force`. Also removes an incomplete volume.
    Delete {
        /// Volume name.
        name: String,
        /// Delete it even while a server serves it: the server cuts its clients off (their
        /// requests in flight fail) and destroys the key in its memory within a second.
        #[arg(long)]
        force: bool,
        /// Keep the (now undecryptable) backing file.
        #[arg(long)]
        keep_ciphertext: bool,
        /// First overwrite the data area with random bytes (slow; shows progress). For block
        /// devices, or where policy asks for overwriting on top of crypto-shredding.
        #[arg(long)]
        wipe: bool,
    },
}

/// `nbdcrypt volume create`.
#[derive(Debug, Args)]
pub struct VolumeCreateArgs {
    /// Volume name.
    pub name: String,
    /// Size (K/M/G/T suffixes, powers of 1024). On an upstream `--backing` it may be left out:
    /// the export's size less the 1 MiB header area.
    #[arg(long, value_parser = values::parse_size, required_unless_present_any = ["resume", "backing"])]
    pub size: Option<u64>,
    /// scratch (service-managed key, destroyed with the volume) or persistent.
    #[arg(long = "type", value_enum, default_value_t = VolumeType::Scratch)]
    pub volume_type: VolumeType,
    /// KMS key for a persistent volume: key id, alias/NAME or ARN.
    #[arg(long)]
    pub kms_key: Option<String>,
    /// Encryption sector size.
    #[arg(long, default_value = "4096", value_parser = values::parse_sector_size)]
    pub sector_size: crate::crypto::SectorSize,
    /// Backing file or block device (default: `<state-dir>/volumes/NAME.img`), or an upstream
    /// NBD export (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`: an RBD image
    /// exported by qemu-nbd, an nbdkit plugin…). The header is written into the export, so the
    /// volume is self-describing wherever its bytes are.
    #[arg(long)]
    pub backing: Option<PathBuf>,
    /// Allow TRIM and BLOCK_STATUS (reveals unused sectors; see docs/threat-model.md).
    #[arg(long)]
    pub discards: bool,
    /// Write encrypted zeroes over the whole volume now (slow; shows progress): every block is
    /// allocated, and the backing file's sparseness no longer reveals which regions hold data.
    /// Interrupted, the volume stays incomplete until `--resume`.
    #[arg(long)]
    pub preallocate: bool,
    /// Overwrite a `--backing` store that already holds data (a file system, a partition
    /// table, another volume's deleted ciphertext, any non-zero byte). Never allowed for the
    /// store of another registered volume.
    #[arg(long)]
    pub force: bool,
    /// Finish an interrupted creation (other options are taken from the first attempt).
    #[arg(long, conflicts_with_all = ["size", "kms_key", "backing", "force"])]
    pub resume: bool,
}
