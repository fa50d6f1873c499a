//! Requests that do not wait: on a remote store (an upstream NBD export) a whole-sector read
//! or write is sent upstream and the calling task moves on. A read's reply is decrypted on
//! the thread that received it, in place, in the buffer it was received in, which the
//! caller's buffer takes over ([`ReadBuffer`]: no copy); a write is encrypted by the caller
//! (the bytes are hot in its cache: it just received them) and acknowledged from the thread
//! that received the upstream's reply. No thread sits blocked on the round trip, which on the
//! proxy path cost two thread switches per 4 KiB read and a blocking-pool thread per 1 MiB
//! read or write (BENCHMARKING.md). Anything this path cannot do (an unaligned request, a dead
//! connection, an upstream error, a withdrawn key, a panic) goes back to the caller, which does
//! it the waiting way: that retries, reconnects and reports the error.

use std::ops::DerefMut;
use std::sync::Arc;

use super::locks::Pin;
use super::{EncryptedVolume, VolumeError};
use crate::storage::{ReadBuffer, WriteData};

/// How a submitted write ended ([`EncryptedVolume::submit_write`]).
pub enum Written<B> {
    /// The store acknowledged it.
    Done,
    /// Not started: the plaintext, untouched, for [`EncryptedVolume::write`].
    Declined(B),
    /// Failed before anything was sent (the key was withdrawn).
    Failed(VolumeError),
    /// Encrypted but not acknowledged (the store refused it, failed it or lost its
    /// connection): write the ciphertext the waiting way, [`Ciphertext::write`].
    Pending(Ciphertext<B>),
}

/// The ciphertext of a submitted write that was not acknowledged: [`Ciphertext::write`]
/// writes it (it must not be encrypted twice). Its stripes stay pinned until it is written or
/// dropped.
pub struct Ciphertext<B> {
    volume: Arc<EncryptedVolume>,
    offset: u64,
    data: Arc<B>,
    /// Durable before `write` returns (the client asked for `FUA`).
    fua: bool,
    pin: Pin,
}

impl<B: std::ops::Deref<Target = [u8]>> Ciphertext<B> {
    /// Writes the ciphertext where it belongs (blocking: in pieces, retrying, reconnecting and
    /// reporting as every waiting write does), under its pin, not the stripe locks (a
    /// read-modify-write holding one waits for this pin); with `FUA`, then flushed, as a
    /// waiting `FUA` write is. Never on the store's reply reader thread, which this would
    /// wait for.
    pub fn write(self) -> Result<(), VolumeError> {
        self.volume.store_sealed(self.offset, &self.data)?;
        self.volume.finish(self.fua)
    }
}

impl<B> Drop for Ciphertext<B> {
    fn drop(&mut self) {
        self.volume.locks.unpin(&self.pin);
    }
}

impl EncryptedVolume {
    /// Starts reading `out.len()` plaintext bytes at `offset` into `out` without waiting.
    /// `done` runs exactly once, on another thread or (when the read cannot start) at once on
    /// this one: `Ok(out)` decrypted, or `Err(out)` for "read it with [`read`](Self::read)".
    pub fn submit_read<B, F>(self: &Arc<Self>, offset: u64, mut out: B, done: F)
    where
        B: ReadBuffer + Send + 'static,
        F: FnOnce(Result<B, B>) + Send + 'static,
    {
        let len = out.len();
        let sector = self.sector();
        let aligned = offset.is_multiple_of(sector) && (len as u64).is_multiple_of(sector);
        if len == 0 || !aligned || self.check(offset, len as u64).is_err() {
            return done(Err(out));
        }
        let first = offset / sector;
        let me = Arc::clone(self);
        let finish = Box::new(move |data: Option<&mut Vec<u8>>| {
            let Some(src) = data else {
                return done(Err(out));
            };
            let decrypted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                crate::faults::panic_point(offset);
                if out.take_over(src) {
                    me.decrypt_in_place(first, &mut out)
                } else {
                    me.decrypt_from(first, src, &mut out)
                }
            }));
            match decrypted {
                Ok(Ok(())) => done(Ok(out)),
                // The waiting read meets the same failure (a withdrawn key) or panic, and
                // answers it as every other request does.
                Ok(Err(_)) | Err(_) => done(Err(out)),
            }
        });
        if let Err(finish) = self
            .storage
            .submit_read(self.config.data_offset + offset, len, finish)
        {
            finish(None);
        }
    }

    /// Encrypts whole-sector plaintext `data` for `offset` in place and starts writing it
    /// without waiting (remote stores only). `done` runs exactly once: on another thread with
    /// [`Written::Done`] or [`Written::Pending`], or at once on this one with
    /// [`Written::Declined`] (the plaintext: write it with [`write`](Self::write)) or
    /// [`Written::Failed`]. Its stripes are pinned, not locked, while it is in flight. With
    /// `fua` the store is asked to acknowledge only durable data (`FUA` passes through to an
    /// upstream that offers it; one that does not declines, and the waiting way flushes).
    pub fn submit_write<B, F>(self: &Arc<Self>, offset: u64, mut data: B, fua: bool, done: F)
    where
        B: DerefMut<Target = [u8]> + Send + Sync + 'static,
        F: FnOnce(Written<B>) + Send + 'static,
    {
        let len = data.len() as u64;
        let sector = self.sector();
        let aligned = offset.is_multiple_of(sector) && len.is_multiple_of(sector);
        let usable = len > 0
            && aligned
            && self.store_is_remote()
            && self.check_writable().is_ok()
            && self.check(offset, len).is_ok();
        let Some(pin) = usable
            .then(|| self.locks.try_pin(offset / sector, len / sector))
            .flatten()
        else {
            return done(Written::Declined(data));
        };
        // A withdrawn key fails before the engine touches a byte; one withdrawn while this
        // was encrypted sends nothing under the destroyed key's name. A panic costs this
        // write an error (its plaintext is half encrypted: nothing is written) and nothing
        // else, as on every other path.
        let sealed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            crate::faults::panic_point(offset);
            self.seal_aligned(offset, &mut data, |buf, encrypt| encrypt(0, buf))
                .map(drop)
        }))
        .unwrap_or_else(|panic| {
            let what = crate::faults::panic_message(&*panic);
            tracing::error!(
                offset,
                len,
                panic = what,
                "request panicked (a submitted write): answered EIO; the server carries on"
            );
            Err(VolumeError::Io(std::io::Error::other("internal error")))
        })
        .and_then(|()| {
            if self.is_withdrawn() {
                Err(VolumeError::Withdrawn)
            } else {
                Ok(())
            }
        });
        if let Err(e) = sealed {
            self.locks.unpin(&pin);
            return done(Written::Failed(e));
        }
        let data = Arc::new(data);
        let sent = Ciphertext {
            volume: Arc::clone(self),
            offset,
            data: Arc::clone(&data),
            fua,
            pin,
        };
        let finish = Box::new(move |acked: Option<&mut Vec<u8>>| {
            if acked.is_some() {
                drop(sent);
                done(Written::Done);
            } else {
                done(Written::Pending(sent));
            }
        });
        let shared: WriteData = data;
        if let Err(finish) =
            self.storage
                .submit_write(self.config.data_offset + offset, shared, fua, finish)
        {
            finish(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::crypto::{BackendChoice, SectorSize, VolumeKey, XtsEngine};
    use crate::storage::Storage;
    use crate::upstream::NbdStore;
    use crate::upstream::fake::writes::payload;
    use crate::upstream::fake::{SIZE, Script, serve};
    use crate::volume::VolumeConfig;

    /// A volume over the scripted upstream (`script`), its data 4 KiB in.
    fn remote_volume(script: Script) -> (Arc<NbdStore>, Arc<EncryptedVolume>) {
        let (uri, _) = serve(script);
        let store = Arc::new(NbdStore::open(&uri).unwrap());
        let mut raw: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(29) ^ 0x33).collect();
        let key = VolumeKey::take_from(&mut raw).unwrap();
        let engine = XtsEngine::new(&key, SectorSize::S512, BackendChoice::Auto).unwrap();
        let config = VolumeConfig {
            size: SIZE - 4096,
            sector_size: SectorSize::S512,
            discards: false,
            read_only: false,
            data_offset: 4096,
        };
        let volume = EncryptedVolume::new(Box::new(Arc::clone(&store)), engine, config).unwrap();
        (store, Arc::new(volume))
    }

    /// A submitted read is decrypted where the upstream's reply was received: the caller's
    /// buffer comes back holding the receive buffer's allocation (no copy), the plaintext is
    /// right (all-zero ciphertext reads as zeroes), and the caller's own allocation went to
    /// the store for its next read, so neither side allocates per read.
    #[test]
    fn a_submitted_read_is_decrypted_in_the_buffer_it_was_received_in() {
        let (store, volume) = remote_volume(Script::RefuseLargeDf);
        let len = 64 * 1024;
        let plain = payload(5, len);
        volume.write(65536, &mut plain.clone(), false).unwrap();
        // The last 4 KiB as never written (or discarded): zeroes in the export.
        store
            .write_at(&[0u8; 4096], 4096 + 65536 + len as u64 - 4096)
            .unwrap();
        let mut want = plain.clone();
        want[len - 4096..].fill(0);
        let (tx, rx) = mpsc::channel();
        let mut mine = Vec::new();
        for _ in 0..2 {
            let out = vec![0xA5u8; len];
            mine.push(out.as_ptr() as usize);
            let tx = tx.clone();
            volume.submit_read(65536, out, move |read: Result<Vec<u8>, Vec<u8>>| {
                let _ = tx.send(read);
            });
            let back = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            let back = back.expect("the read was not handed back");
            assert!(
                back == want,
                "the plaintext, zeroes where the export is zero"
            );
            mine.push(back.as_ptr() as usize);
        }
        let [first_out, first_back, _, second_back] = mine[..] else {
            unreachable!()
        };
        assert_ne!(
            first_back, first_out,
            "the receive buffer came back, not a copy"
        );
        assert_eq!(
            second_back, first_out,
            "the store received the next read into the buffer it was given in exchange"
        );
    }

    /// A volume's submitted write that the upstream refuses comes back as its ciphertext; written
    /// again as it is, the volume reads the plaintext (it was not encrypted twice), and the export
    /// holds no plaintext.
    #[test]
    fn a_volume_resends_the_ciphertext_of_a_failed_submitted_write() {
        let (store, volume) = remote_volume(Script::FailFirstWrite);
        let plain = payload(3, 1 << 20);
        let (tx, rx) = mpsc::channel();
        for round in ["refused", "acknowledged"] {
            let tx = tx.clone();
            // Runs on the reply reader thread, which must not wait for a reply itself: the resend
            // is made here.
            volume.submit_write(65536, plain.clone(), false, move |w: Written<Vec<u8>>| {
                let _ = tx.send(w);
            });
            let outcome = match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
                Written::Done => Ok(()),
                Written::Pending(again) => Err(again.write().map_err(|e| e.to_string())),
                Written::Declined(_) => Err(Err("declined".into())),
                Written::Failed(e) => Err(Err(e.to_string())),
            };
            match round {
                "refused" => assert_eq!(outcome, Err(Ok(())), "resent after the refusal"),
                _ => assert_eq!(outcome, Ok(()), "acknowledged at once"),
            }
            let mut back = vec![0u8; plain.len()];
            volume.read(65536, &mut back).unwrap();
            assert!(back == plain, "{round}: the plaintext reads back");
            let mut stored = vec![0u8; plain.len()];
            store.read_at(&mut stored, 4096 + 65536).unwrap();
            assert!(
                stored
                    .chunks(512)
                    .zip(plain.chunks(512))
                    .all(|(c, p)| c != p),
                "{round}: no sector of plaintext in the export"
            );
        }
    }
}
