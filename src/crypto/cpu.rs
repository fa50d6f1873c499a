//! Which CPU features this machine offers, and which AES path each backend takes with them.
//!
//! Detection runs once per process (`cpufeatures` and `std` cache it) and is reported by
//! `nbdcrypt info` and in the server's startup log. The path names mirror the selection logic
//! of the code that really runs: the `aes` crate's dispatch (VAES-512 → VAES-256 → AES-NI →
//! bitsliced software) and AWS-LC's (`avx512_xts_available()` → AES-NI; ARMv8 Crypto
//! Extensions on aarch64).

/// A CPU feature that matters to AES-XTS, and whether this CPU has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    /// The name as `/proc/cpuinfo` and `cpufeatures` spell it.
    pub name: &'static str,
    /// The CPU (and OS, for register state) supports it.
    pub present: bool,
}

#[cfg(target_arch = "x86_64")]
mod detect {
    cpufeatures::new!(aes_ni, "aes");
    cpufeatures::new!(pclmul, "pclmulqdq");
    cpufeatures::new!(avx2, "avx2");
    // `cpufeatures` reports VAES and VPCLMULQDQ only where the OS also saves ZMM state, as if
    // they needed AVX-512; their VEX (YMM) forms do not, and CPUs without AVX-512 have them
    // (AMD Zen 3, Intel Alder Lake). `std` checks YMM state for them: the truth for `info` and
    // for `vaes256`. The `aes` crate's own dispatch uses `cpufeatures`' answer.
    cpufeatures::new!(vaes_for_aes_crate, "vaes");
    cpufeatures::new!(avx512f, "avx512f");
    cpufeatures::new!(avx512bw, "avx512bw");
    cpufeatures::new!(avx512vbmi2, "avx512vbmi2");

    /// Whether the `aes` crate (which asks `cpufeatures`) takes a VAES path here.
    pub fn aes_crate_sees_vaes() -> bool {
        vaes_for_aes_crate::get()
    }

    pub fn features() -> Vec<super::Feature> {
        use super::Feature;
        vec![
            Feature {
                name: "aes",
                present: aes_ni::get(),
            },
            Feature {
                name: "pclmulqdq",
                present: pclmul::get(),
            },
            Feature {
                name: "avx2",
                present: avx2::get(),
            },
            Feature {
                name: "vaes",
                present: std::arch::is_x86_feature_detected!("vaes"),
            },
            Feature {
                name: "vpclmulqdq",
                present: std::arch::is_x86_feature_detected!("vpclmulqdq"),
            },
            Feature {
                name: "avx512f",
                present: avx512f::get(),
            },
            Feature {
                name: "avx512bw",
                present: avx512bw::get(),
            },
            Feature {
                name: "avx512vbmi2",
                present: avx512vbmi2::get(),
            },
        ]
    }
}

#[cfg(target_arch = "aarch64")]
mod detect {
    cpufeatures::new!(aes_arm, "aes");

    pub fn features() -> Vec<super::Feature> {
        vec![super::Feature {
            name: "aes",
            present: aes_arm::get(),
        }]
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod detect {
    pub fn features() -> Vec<super::Feature> {
        Vec::new()
    }
}

/// The AES-relevant features of this CPU.
pub fn features() -> Vec<Feature> {
    detect::features()
}

/// Whether the `aes` crate takes a VAES path here (never off x86_64).
fn aes_crate_sees_vaes() -> bool {
    #[cfg(target_arch = "x86_64")]
    return detect::aes_crate_sees_vaes();
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

fn has(name: &str) -> bool {
    features().iter().any(|f| f.name == name && f.present)
}

/// Whether AES instructions exist at all (AES-NI or ARMv8 AES).
pub fn has_aes_instructions() -> bool {
    has("aes")
}

/// The code path AWS-LC's XTS takes on this CPU.
pub fn hw_path() -> &'static str {
    if cfg!(target_arch = "x86_64") {
        if has("vaes") && has("vpclmulqdq") && has("avx512f") && has("avx512vbmi2") {
            "AWS-LC VAES+VPCLMULQDQ AVX-512 assembly"
        } else if has("aes") {
            "AWS-LC AES-NI assembly"
        } else {
            "AWS-LC constant-time software"
        }
    } else if cfg!(target_arch = "aarch64") && has("aes") {
        "AWS-LC ARMv8 Crypto Extensions assembly"
    } else {
        "AWS-LC software"
    }
}

/// The code path the `aes` crate takes on this CPU (it is what `portable` runs on).
pub fn portable_path() -> &'static str {
    if cfg!(target_arch = "x86_64") {
        if has("avx512f") && has("vaes") {
            "aes crate VAES-512 (64-block batches)"
        } else if aes_crate_sees_vaes() {
            "aes crate VAES-256"
        } else if has("aes") {
            "aes crate AES-NI (8-block batches)"
        } else {
            "aes crate fixsliced software"
        }
    } else if cfg!(target_arch = "aarch64") && has("aes") {
        "aes crate ARMv8 AES"
    } else {
        "aes crate fixsliced software"
    }
}
