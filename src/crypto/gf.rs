//! Tweak arithmetic in GF(2^128) for XTS (IEEE 1619-2018 §5.2).
//!
//! A tweak is held as a `u128` read little-endian from its 16 bytes, so that byte 0 is the
//! least significant. Multiplying by the primitive element α is a left shift by one bit; the bit
//! shifted out of position 127 is folded back with the reduction polynomial
//! x^128 + x^7 + x^2 + x + 1 (0x87). The fold uses a mask derived from that bit, never a branch,
//! so the running time does not depend on the (secret) tweak value.

/// The low bits of the XTS reduction polynomial x^128 + x^7 + x^2 + x + 1.
const REDUCTION: u128 = 0x87;

/// Returns `t · α` in GF(2^128), in constant time.
#[inline(always)]
pub fn mul_alpha(t: u128) -> u128 {
    // Arithmetic shift smears bit 127 across the word: all ones if it was set, else zero.
    let carry_mask = ((t as i128) >> 127) as u128;
    (t << 1) ^ (carry_mask & REDUCTION)
}

/// Reads a tweak from its 16 bytes (little-endian, as XTS defines it).
#[inline(always)]
pub fn from_block(b: &[u8; 16]) -> u128 {
    u128::from_le_bytes(*b)
}

/// Writes a tweak back to 16 bytes.
#[inline(always)]
pub fn to_block(t: u128) -> [u8; 16] {
    t.to_le_bytes()
}

/// The plain64 IV for a 512-byte-unit sector number: the number, little-endian, zero-padded.
#[inline(always)]
pub fn plain64_iv(iv_sector: u64) -> [u8; 16] {
    u128::from(iv_sector).to_le_bytes()
}

/// Eight consecutive tweaks `t·α^0 … t·α^7`, held as separate low and high 64-bit halves so
/// that each half of all eight fits one vector register. [`Lanes8::step8`] multiplies every
/// lane by α^8, which yields the next eight tweaks of the sequence with no dependency between
/// lanes: the serial doubling chain is cut eightfold.
#[derive(Clone, Copy, Default)]
pub struct Lanes8 {
    lo: [u64; 8],
    hi: [u64; 8],
}

impl Lanes8 {
    /// Lanes `t·α^i` for `i` in `0..8`.
    #[inline(always)]
    #[allow(clippy::cast_possible_truncation)] // splitting a u128 into its two halves
    pub fn consecutive(t: u128) -> Self {
        let mut lanes = Lanes8::default();
        let mut x = t;
        for i in 0..8 {
            lanes.lo[i] = x as u64;
            lanes.hi[i] = (x >> 64) as u64;
            x = mul_alpha(x);
        }
        lanes
    }

    /// Multiplies every lane by α^8, in constant time.
    ///
    /// `t·x^8 = (t << 8) + v·x^128` with `v = t >> 120`, and `x^128 ≡ x^7 + x^2 + x + 1`, so
    /// the bits shifted out fold back as the carry-less product `v·0x87 =
    /// v ⊕ v≪1 ⊕ v≪2 ⊕ v≪7` (at most 15 bits: no second reduction). Shifts by constants
    /// only: no branch and no table indexed by tweak bits.
    #[inline(always)]
    pub fn step8(&mut self) {
        for i in 0..8 {
            let (lo, hi) = (self.lo[i], self.hi[i]);
            let v = hi >> 56;
            self.hi[i] = (hi << 8) | (lo >> 56);
            self.lo[i] = (lo << 8) ^ v ^ (v << 1) ^ (v << 2) ^ (v << 7);
        }
    }

    /// Writes the eight tweaks as little-endian `(low, high)` word pairs, the in-memory order
    /// of 16-byte blocks.
    #[inline(always)]
    pub fn store(&self, out: &mut [u64; 16]) {
        for i in 0..8 {
            out[2 * i] = self.lo[i];
            out[2 * i + 1] = self.hi[i];
        }
    }

    /// Lane `i` as a tweak.
    pub fn get(&self, i: usize) -> u128 {
        u128::from(self.lo[i]) | (u128::from(self.hi[i]) << 64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::cast_possible_truncation)]
    fn lanes8_step8_continues_the_doubling_sequence() {
        let mut t = 0xfedc_ba98_7654_3210_0123_4567_89ab_cdefu128;
        for _ in 0..200 {
            let mut lanes = Lanes8::consecutive(t);
            let mut expect = t;
            for round in 0..5 {
                let mut words = [0u64; 16];
                lanes.store(&mut words);
                for i in 0..8 {
                    assert_eq!(lanes.get(i), expect, "round {round} lane {i}");
                    assert_eq!(words[2 * i], expect as u64);
                    assert_eq!(words[2 * i + 1], (expect >> 64) as u64);
                    expect = mul_alpha(expect);
                }
                lanes.step8();
            }
            t = t.rotate_left(7) ^ 0x9e37_79b9_7f4a_7c15;
        }
    }

    /// Reference doubling, written bytewise with a branch, straight from IEEE 1619 §5.2.
    fn mul_alpha_bytewise(t: [u8; 16]) -> [u8; 16] {
        let mut out = [0u8; 16];
        let mut carry = 0u8;
        for j in 0..16 {
            out[j] = (t[j] << 1) | carry;
            carry = t[j] >> 7;
        }
        if carry == 1 {
            out[0] ^= 0x87;
        }
        out
    }

    #[test]
    fn mul_alpha_matches_ieee1619_bytewise_definition() {
        let mut state = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210u128;
        for _ in 0..10_000 {
            // xorshift-style mixing gives high and low bits of every pattern.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let bytes = to_block(state);
            assert_eq!(
                to_block(mul_alpha(from_block(&bytes))),
                mul_alpha_bytewise(bytes)
            );
        }
    }

    #[test]
    fn mul_alpha_top_bit_folds_into_reduction() {
        assert_eq!(mul_alpha(1u128 << 127), 0x87);
        assert_eq!(mul_alpha(1), 2);
    }

    #[test]
    fn plain64_iv_is_little_endian_zero_padded() {
        let iv = plain64_iv(0x0102_0304_0506_0708);
        assert_eq!(iv, [8, 7, 6, 5, 4, 3, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
    }
}
