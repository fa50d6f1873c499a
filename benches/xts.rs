//! XTS-AES-256 throughput: nbdcrypt's backends and the references, in one run.
//!
//! Measured for 512-byte and 4096-byte sectors, and 4 KiB, 64 KiB and 1 MiB requests (one call
//! per request, single thread):
//! * `hw` and `portable`: `XtsEngine::encrypt_sectors` / `decrypt_sectors`, in place;
//! * `aws-lc-raw`: AWS-LC's `EVP_aes_256_xts` called directly, one IV set and one
//!   `EVP_EncryptUpdate` per sector, nothing else: the floor our `hw` wrapper is compared with;
//! * `openssl`: OpenSSL 3 `EVP_aes_256_xts` through the `openssl` crate, context reused, one
//!   IV set and one update per sector;
//! * `xts-mode`: RustCrypto's `xts-mode` 0.6 over `aes` 0.9 (encrypt only; it is slow).
//!
//! `scripts/bench-xts.sh` runs this and turns criterion's estimates into the ratio table of
//! `BENCHMARKING.md`.
#![allow(unsafe_code, missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use aes::Aes256;
use aes::cipher::KeyInit;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use nbdcrypt::crypto::{BackendChoice, BackendKind, SectorIndex, SectorSize, VolumeKey, XtsEngine};

const REQUESTS: [usize; 3] = [4 << 10, 64 << 10, 1 << 20];
const SECTORS: [SectorSize; 2] = [SectorSize::S512, SectorSize::S4096];
/// A first sector above 2^32, as on a large volume.
const FIRST: u64 = (1 << 32) + 12345;

fn raw_key() -> [u8; 64] {
    let mut k = [0u8; 64];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::try_from(i).unwrap().wrapping_mul(37).wrapping_add(11);
    }
    k
}

/// AWS-LC called directly: one context, per sector one IV set and one update.
struct AwsLcRaw {
    ctx: *mut aws_lc_sys::EVP_CIPHER_CTX,
}

impl AwsLcRaw {
    fn new(key: &[u8; 64]) -> Self {
        // SAFETY: a fresh context, a 64-byte key for AES-256-XTS, null IV allowed at key setup.
        unsafe {
            let ctx = aws_lc_sys::EVP_CIPHER_CTX_new();
            assert_eq!(
                aws_lc_sys::EVP_EncryptInit_ex(
                    ctx,
                    aws_lc_sys::EVP_aes_256_xts(),
                    std::ptr::null_mut(),
                    key.as_ptr(),
                    std::ptr::null()
                ),
                1
            );
            AwsLcRaw { ctx }
        }
    }

    fn encrypt(&mut self, first_iv: u64, step: u64, sector: usize, buf: &mut [u8]) {
        let mut iv = first_iv;
        for chunk in buf.chunks_exact_mut(sector) {
            let ivb = u128::from(iv).to_le_bytes();
            let mut out_len = 0;
            // SAFETY: ctx is keyed; chunk is valid for `sector` bytes, in place is allowed.
            unsafe {
                aws_lc_sys::EVP_EncryptInit_ex(
                    self.ctx,
                    std::ptr::null(),
                    std::ptr::null_mut(),
                    std::ptr::null(),
                    ivb.as_ptr(),
                );
                aws_lc_sys::EVP_EncryptUpdate(
                    self.ctx,
                    chunk.as_mut_ptr(),
                    &mut out_len,
                    chunk.as_ptr(),
                    i32::try_from(sector).unwrap(),
                );
            }
            iv += step;
        }
    }
}

impl Drop for AwsLcRaw {
    fn drop(&mut self) {
        // SAFETY: the context is ours and freed once.
        unsafe { aws_lc_sys::EVP_CIPHER_CTX_free(self.ctx) };
    }
}

/// OpenSSL 3 through the `openssl` crate, context reused, in place.
struct OpenSsl {
    ctx: openssl::cipher_ctx::CipherCtx,
}

impl OpenSsl {
    fn new(key: &[u8; 64]) -> Self {
        let mut ctx = openssl::cipher_ctx::CipherCtx::new().unwrap();
        ctx.encrypt_init(
            Some(openssl::cipher::Cipher::aes_256_xts()),
            Some(key),
            None,
        )
        .unwrap();
        OpenSsl { ctx }
    }

    fn encrypt(&mut self, first_iv: u64, step: u64, sector: usize, buf: &mut [u8]) {
        let mut iv = first_iv;
        for chunk in buf.chunks_exact_mut(sector) {
            let ivb = u128::from(iv).to_le_bytes();
            self.ctx.encrypt_init(None, None, Some(&ivb)).unwrap();
            let n = self.ctx.cipher_update_inplace(chunk, sector).unwrap();
            assert_eq!(n, sector);
            iv += step;
        }
    }
}

fn bench(c: &mut Criterion) {
    let key_bytes = raw_key();
    let mut tmp = key_bytes;
    let key = VolumeKey::take_from(&mut tmp).unwrap();
    for size in SECTORS {
        let sector = size.bytes();
        let step = size.iv_units();
        let engines: Vec<(BackendKind, XtsEngine)> = BackendKind::available()
            .iter()
            .map(|&k| {
                (
                    k,
                    XtsEngine::new(&key, size, BackendChoice::Force(k)).unwrap(),
                )
            })
            .collect();
        let mut aws = AwsLcRaw::new(&key_bytes);
        let mut ossl = OpenSsl::new(&key_bytes);
        let k1: &[u8; 32] = key_bytes[..32].try_into().unwrap();
        let k2: &[u8; 32] = key_bytes[32..].try_into().unwrap();
        let xts_mode = xts_mode::Xts128::new(Aes256::new(k1.into()), Aes256::new(k2.into()));

        for dir in ["encrypt", "decrypt"] {
            let mut group = c.benchmark_group(format!("xts-{dir}-{sector}"));
            group.warm_up_time(Duration::from_millis(500));
            group.measurement_time(Duration::from_millis(1500));
            group.sample_size(20);
            for request in REQUESTS {
                let mut buf = vec![0xA5u8; request];
                group.throughput(Throughput::Bytes(request as u64));
                for (kind, engine) in &engines {
                    group.bench_with_input(
                        BenchmarkId::new(kind.name(), request),
                        &request,
                        |b, _| {
                            b.iter(|| {
                                if dir == "encrypt" {
                                    engine
                                        .encrypt_sectors(SectorIndex(FIRST), black_box(&mut buf))
                                        .unwrap();
                                } else {
                                    engine
                                        .decrypt_sectors(SectorIndex(FIRST), black_box(&mut buf))
                                        .unwrap();
                                }
                            })
                        },
                    );
                }
                if dir == "encrypt" {
                    group.bench_with_input(
                        BenchmarkId::new("aws-lc-raw", request),
                        &request,
                        |b, _| {
                            b.iter(|| aws.encrypt(FIRST * step, step, sector, black_box(&mut buf)))
                        },
                    );
                    group.bench_with_input(
                        BenchmarkId::new("openssl", request),
                        &request,
                        |b, _| {
                            b.iter(|| ossl.encrypt(FIRST * step, step, sector, black_box(&mut buf)))
                        },
                    );
                    group.bench_with_input(
                        BenchmarkId::new("xts-mode", request),
                        &request,
                        |b, _| {
                            b.iter(|| {
                                xts_mode.encrypt_area(black_box(&mut buf), sector, 0, |i| {
                                    xts_mode::get_tweak_default(
                                        u128::from(FIRST * step) + i * u128::from(step),
                                    )
                                })
                            })
                        },
                    );
                }
            }
            group.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
