//! The `portable` backend: our own XTS over the `aes` crate's block cipher.
//!
//! `aes` picks AES-NI, VAES-256, VAES-512 (x86_64) or ARMv8 AES (aarch64) at run time through
//! `cpufeatures`, and hands us its backend inside the `target_feature` function it selected. We
//! run the whole XTS pass there (the closure types below), so that the tweak XORs are compiled
//! with the same vector features as the cipher.
//!
//! Why this is fast:
//! * **Batching across sectors.** XTS blocks are independent once their tweaks are known, so
//!   the data is processed in 64-block (1 KiB) batches regardless of sector boundaries. The
//!   VAES-512 backend only reaches full speed on 64-block calls; with 512-byte sectors a batch
//!   holds two sectors.
//! * **Initial tweaks in batches.** `E_K2(IV)` for up to [`GROUP_SECTORS`] sectors is one
//!   parallel call.
//! * **Wide XOR, branch-free doubling** (see [`super::gf`]).
//! * **One pass.** The out-of-place variant fuses the copy into the first XOR.
//!
//! The key schedules live in a [`LockedBox`]; the `aes` crate's `zeroize` feature wipes them on
//! drop, and the box wipes its whole mapping after that.

use aes::cipher::{
    Block, BlockCipherDecBackend, BlockCipherDecClosure, BlockCipherDecrypt, BlockCipherEncBackend,
    BlockCipherEncClosure, BlockCipherEncrypt, BlockSizeUser, KeyInit, ParBlocksSizeUser,
    consts::U16, typenum::Unsigned,
};
use aes::{Aes256, Aes256Enc};

use super::gf;
use super::locked::{LockedBox, Protection};
use super::{CryptoError, SectorRun};

/// Sectors whose initial tweaks are computed in one batch.
const GROUP_SECTORS: usize = 64;
/// Blocks processed per XOR–encrypt–XOR batch (1 KiB, the VAES-512 batch size).
const BATCH_BLOCKS: usize = 64;

struct Schedules {
    /// K1: data key, both directions.
    data: Aes256,
    /// K2: tweak key, encryption only.
    tweak: Aes256Enc,
}

/// XTS-AES-256 on the `aes` crate.
pub struct PortableXts {
    schedules: LockedBox<Schedules>,
}

impl PortableXts {
    /// Expands both halves of a 512-bit key into locked memory.
    ///
    /// It does not check that the halves differ: [`super::VolumeKey`] does, and the IEEE 1619
    /// vectors with equal halves need this backend to accept them.
    pub fn new(k1: &[u8; 32], k2: &[u8; 32]) -> Result<Self, CryptoError> {
        let schedules = LockedBox::new_with(|slot| {
            slot.write(Schedules {
                data: Aes256::new(k1.into()),
                tweak: Aes256Enc::new(k2.into()),
            });
        })?;
        super::scrub_stack();
        Ok(PortableXts { schedules })
    }

    /// What the OS granted for the pages that hold the key schedules.
    pub fn protection(&self) -> Protection {
        self.schedules.protection()
    }

    /// Encrypts (or decrypts) `run`, whose buffers the caller has validated.
    pub fn process(&self, run: SectorRun<'_, '_>, encrypt: bool) {
        let SectorRun {
            first_iv_sector,
            iv_step,
            sector_bytes,
            src,
            dst,
        } = run;
        let blocks_per_sector = sector_bytes / 16;
        let dst_blocks = as_blocks_mut(dst);
        let src_blocks: Option<&[[u8; 16]]> = src.map(as_blocks);
        let sectors = dst_blocks.len() / blocks_per_sector;

        let mut done = 0usize;
        let mut iv_sector = first_iv_sector;
        while done < sectors {
            let n = (sectors - done).min(GROUP_SECTORS);
            let mut tweaks = [Block::<Aes256Enc>::default(); GROUP_SECTORS];
            for t in tweaks.iter_mut().take(n) {
                *t = gf::plain64_iv(iv_sector).into();
                iv_sector = iv_sector.wrapping_add(iv_step);
            }
            self.schedules.tweak.encrypt_blocks(&mut tweaks[..n]);
            let mut initial = [0u128; GROUP_SECTORS];
            for (i, t) in initial.iter_mut().zip(tweaks.iter()).take(n) {
                *i = gf::from_block(&(*t).into());
            }

            let range = done * blocks_per_sector..(done + n) * blocks_per_sector;
            let job = Job {
                dst: &mut dst_blocks[range.clone()],
                src: src_blocks.map(|s| &s[range]),
                initial: &initial[..n],
                blocks_per_sector,
            };
            if encrypt {
                self.schedules.data.encrypt_with_backend(job);
            } else {
                self.schedules.data.decrypt_with_backend(job);
            }
            done += n;
        }
        // The `aes` crate's backends copy (broadcast) the round keys into their stack frames,
        // below this one, and do not wipe them: wipe that stack area before returning.
        super::scrub_stack();
    }
}

/// One group of whole sectors and their initial tweaks, run inside the cipher's backend.
struct Job<'a> {
    dst: &'a mut [[u8; 16]],
    src: Option<&'a [[u8; 16]]>,
    initial: &'a [u128],
    blocks_per_sector: usize,
}

impl BlockSizeUser for Job<'_> {
    type BlockSize = U16;
}

/// Walks the tweak sequence across sector boundaries: α-doubling within a sector (eight lanes
/// at a time, [`gf::Lanes8`]), the next initial tweak at the start of each new sector.
struct TweakWalk<'a> {
    initial: &'a [u128],
    sector: usize,
    in_sector: usize,
    lanes: gf::Lanes8,
    blocks_per_sector: usize,
}

impl<'a> TweakWalk<'a> {
    fn new(initial: &'a [u128], blocks_per_sector: usize) -> Self {
        TweakWalk {
            initial,
            sector: 0,
            in_sector: 0,
            lanes: gf::Lanes8::consecutive(initial.first().copied().unwrap_or(0)),
            blocks_per_sector,
        }
    }

    /// Fills `out` with the tweaks of the next `out.len() / 2` blocks, as (low, high) words.
    ///
    /// Every run handed here is a multiple of 8 blocks: sectors are at least 32 blocks and
    /// batches start on sector boundaries and hold 64 blocks.
    #[inline(always)]
    fn fill(&mut self, out: &mut [u64]) {
        let blocks = out.len() / 2;
        let mut filled = 0;
        while filled < blocks {
            let take = (self.blocks_per_sector - self.in_sector).min(blocks - filled);
            debug_assert_eq!(take % 8, 0);
            for words in out[2 * filled..2 * (filled + take)].chunks_exact_mut(16) {
                if let Ok(words) = <&mut [u64; 16]>::try_from(words) {
                    self.lanes.store(words);
                }
                self.lanes.step8();
            }
            filled += take;
            self.in_sector += take;
            if self.in_sector == self.blocks_per_sector {
                self.sector += 1;
                self.in_sector = 0;
                let next = self.initial.get(self.sector).copied().unwrap_or(0);
                self.lanes = gf::Lanes8::consecutive(next);
            }
        }
    }
}

/// `dst = src ^ tw` (or `dst ^= tw` in place), 64 bits at a time so the compiler can use the
/// widest vector XOR the backend's target features allow.
#[inline(always)]
fn xor_in(dst: &mut [[u8; 16]], src: Option<&[[u8; 16]]>, tw: &[u64]) {
    match src {
        Some(src) => {
            let (d, _) = dst.as_flattened_mut().as_chunks_mut::<8>();
            let (s, _) = src.as_flattened().as_chunks::<8>();
            for ((d, s), t) in d.iter_mut().zip(s).zip(tw) {
                *d = (u64::from_le_bytes(*s) ^ t).to_le_bytes();
            }
        }
        None => xor_out(dst, tw),
    }
}

#[inline(always)]
fn xor_out(dst: &mut [[u8; 16]], tw: &[u64]) {
    let (d, _) = dst.as_flattened_mut().as_chunks_mut::<8>();
    for (d, t) in d.iter_mut().zip(tw) {
        *d = (u64::from_le_bytes(*d) ^ t).to_le_bytes();
    }
}

/// The cipher step of one batch, for whichever direction the backend implements.
trait BatchCipher: ParBlocksSizeUser + BlockSizeUser<BlockSize = U16> {
    fn par(&self, blocks: &mut [Block<Self>]);
    fn one(&self, block: &mut Block<Self>);
}

struct Enc<'b, B>(&'b B);
struct Dec<'b, B>(&'b B);

impl<B: ParBlocksSizeUser<BlockSize = U16>> ParBlocksSizeUser for Enc<'_, B> {
    type ParBlocksSize = B::ParBlocksSize;
}
impl<B: BlockSizeUser<BlockSize = U16>> BlockSizeUser for Enc<'_, B> {
    type BlockSize = U16;
}
impl<B: ParBlocksSizeUser<BlockSize = U16>> ParBlocksSizeUser for Dec<'_, B> {
    type ParBlocksSize = B::ParBlocksSize;
}
impl<B: BlockSizeUser<BlockSize = U16>> BlockSizeUser for Dec<'_, B> {
    type BlockSize = U16;
}

impl<B: BlockCipherEncBackend<BlockSize = U16>> BatchCipher for Enc<'_, B> {
    #[inline(always)]
    fn par(&self, blocks: &mut [Block<Self>]) {
        if let Ok(p) = blocks.try_into() {
            self.0.encrypt_par_blocks_inplace(p);
        } else {
            self.0.encrypt_tail_blocks_inplace(blocks);
        }
    }
    #[inline(always)]
    fn one(&self, block: &mut Block<Self>) {
        self.0.encrypt_block_inplace(block);
    }
}

impl<B: BlockCipherDecBackend<BlockSize = U16>> BatchCipher for Dec<'_, B> {
    #[inline(always)]
    fn par(&self, blocks: &mut [Block<Self>]) {
        if let Ok(p) = blocks.try_into() {
            self.0.decrypt_par_blocks_inplace(p);
        } else {
            self.0.decrypt_tail_blocks_inplace(blocks);
        }
    }
    #[inline(always)]
    fn one(&self, block: &mut Block<Self>) {
        self.0.decrypt_block_inplace(block);
    }
}

impl Job<'_> {
    #[inline(always)]
    fn run<C: BatchCipher>(self, cipher: &C) {
        let par = C::ParBlocksSize::USIZE;
        let mut walk = TweakWalk::new(self.initial, self.blocks_per_sector);
        let mut tw = [0u64; 2 * BATCH_BLOCKS];
        let mut offset = 0;
        let total = self.dst.len();
        while offset < total {
            let n = (total - offset).min(BATCH_BLOCKS);
            let tw = &mut tw[..2 * n];
            walk.fill(tw);
            let dst = &mut self.dst[offset..offset + n];
            xor_in(dst, self.src.map(|s| &s[offset..offset + n]), tw);
            let blocks = Block::<C>::cast_slice_from_core_mut(dst);
            let mut chunks = blocks.chunks_exact_mut(par);
            for chunk in &mut chunks {
                cipher.par(chunk);
            }
            let rest = chunks.into_remainder();
            if rest.len() == 1 {
                cipher.one(&mut rest[0]);
            } else if !rest.is_empty() {
                cipher.par(rest);
            }
            xor_out(dst, tw);
            offset += n;
        }
    }
}

impl BlockCipherEncClosure for Job<'_> {
    #[inline(always)]
    fn call<B: BlockCipherEncBackend<BlockSize = U16>>(self, backend: &B) {
        self.run(&Enc(backend));
    }
}

impl BlockCipherDecClosure for Job<'_> {
    #[inline(always)]
    fn call<B: BlockCipherDecBackend<BlockSize = U16>>(self, backend: &B) {
        self.run(&Dec(backend));
    }
}

fn as_blocks_mut(buf: &mut [u8]) -> &mut [[u8; 16]] {
    let (blocks, rest) = buf.as_chunks_mut::<16>();
    debug_assert!(rest.is_empty(), "caller validated whole sectors");
    blocks
}

fn as_blocks(buf: &[u8]) -> &[[u8; 16]] {
    let (blocks, rest) = buf.as_chunks::<16>();
    debug_assert!(rest.is_empty(), "caller validated whole sectors");
    blocks
}
