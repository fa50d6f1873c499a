//! Byte-level reading and writing (big-endian), shared by the NBD wire format and the volume
//! header. Pure. Reading never panics: running out of bytes is an error value.

/// What was wrong with bytes received from a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the structure needs.
    #[error("message truncated: needed {needed} more bytes")]
    Truncated {
        /// Bytes still missing.
        needed: usize,
    },
    /// More bytes than the structure has.
    #[error("{0} unexpected bytes after the message")]
    Trailing(usize),
    /// A magic number was wrong.
    #[error("bad magic {got:#x}, expected {want:#x}")]
    BadMagic {
        /// What arrived.
        got: u64,
        /// What the spec requires.
        want: u64,
    },
    /// A string was not UTF-8.
    #[error("a name or query is not valid UTF-8")]
    NotUtf8,
    /// A string exceeded the spec's 4096-byte limit.
    #[error("a string of {0} bytes exceeds the 4096-byte limit")]
    StringTooLong(usize),
}

/// The spec's limit on names, descriptions and queries.
pub const MAX_STRING: usize = 4096;

/// A cursor over received bytes.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads from `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Takes `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                needed: n - self.buf.len(),
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    /// A big-endian u16.
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    /// A big-endian u32.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// A big-endian u64.
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A string of `len` bytes (UTF-8, at most [`MAX_STRING`]).
    pub fn string(&mut self, len: usize) -> Result<String, DecodeError> {
        if len > MAX_STRING {
            return Err(DecodeError::StringTooLong(len));
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::NotUtf8)
    }

    /// A string preceded by its u32 length.
    pub fn string32(&mut self) -> Result<String, DecodeError> {
        let len = self.u32()?;
        self.string(usize::try_from(len).unwrap_or(usize::MAX))
    }

    /// Succeeds only if every byte was read.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing(self.buf.len()))
        }
    }
}

/// Appends big-endian values to a buffer.
pub trait Put {
    /// Appends a u16.
    fn put_u16(&mut self, v: u16);
    /// Appends a u32.
    fn put_u32(&mut self, v: u32);
    /// Appends a u64.
    fn put_u64(&mut self, v: u64);
    /// Appends a string preceded by its u32 length.
    fn put_string32(&mut self, s: &str);
}

impl Put for Vec<u8> {
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_string32(&mut self, s: &str) {
        // Strings we send are bounded by MAX_STRING, far below u32::MAX.
        self.put_u32(u32::try_from(s.len()).unwrap_or(u32::MAX));
        self.extend_from_slice(s.as_bytes());
    }
}

/// Constant-time equality of two byte strings of equal length (false on different lengths):
/// no timing hint about how many leading bytes matched.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// Decodes exactly `out.len()` bytes of hex from `s` into `out` (no allocation, so secret
/// material can be decoded straight into protected or zeroizing memory). False on any other
/// length or a non-hex digit; `out` may then hold partial output, which the caller wipes.
pub fn hex_into(s: &str, out: &mut [u8]) -> bool {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let s = s.as_bytes();
    if s.len() != out.len() * 2 {
        return false;
    }
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        match (nibble(pair[0]), nibble(pair[1])) {
            (Some(h), Some(l)) => *o = (h << 4) | l,
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_roundtrips_and_refuses_bad_input() {
        let data = [0u8, 1, 0xab, 0xff];
        let h = to_hex(&data);
        assert_eq!(h, "0001abff");
        let mut out = [0u8; 4];
        assert!(hex_into(&h.to_uppercase(), &mut out));
        assert_eq!(out, data);
        assert!(!hex_into("0001abf", &mut out));
        assert!(!hex_into("0001abfg", &mut out));
    }
}
