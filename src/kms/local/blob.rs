//! The local KMS's wrapping format and key material: AES-256-GCM blobs, random material,
//! key ids.

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use zeroize::Zeroizing;

use super::super::store::{KeyRecord, Material, State};
use super::super::{Cause, EncryptionContext, KmsError};
use super::{AAD_LABEL, BLOB_MAGIC, LocalKms, arn};
use crate::codec::{hex_into, to_hex};

/// A fresh random key id (UUID version 4).
pub(super) fn new_uuid() -> String {
    let mut b = [0u8; 16];
    // getrandom failing leaves zeros; create_key's uniqueness check would catch a collision.
    let _ = getrandom::fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    format_uuid(&b)
}

/// `8-4-4-4-12` hex form of 16 bytes.
fn format_uuid(b: &[u8; 16]) -> String {
    let h = to_hex(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// The 16 bytes of a key id (zeroes for a malformed id, which then matches no key).
fn uuid_bytes(id: &str) -> [u8; 16] {
    let raw: String = id.chars().filter(|c| *c != '-').collect();
    let mut out = [0u8; 16];
    if !hex_into(&raw, &mut out) {
        out = [0; 16];
    }
    out
}

/// 32 bytes of fresh key material.
pub(super) fn random_material() -> Result<Zeroizing<[u8; 32]>, KmsError> {
    let mut m = Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut m[..]).map_err(|e| KmsError::Unavailable {
        operation: "GenerateRandom",
        cause: Cause::new(e),
    })?;
    Ok(m)
}

/// A stored material version, decoded into zeroizing memory.
fn material_bytes(m: &Material, operation: &'static str) -> Result<Zeroizing<[u8; 32]>, KmsError> {
    let mut out = Zeroizing::new([0u8; 32]);
    if hex_into(&m.hex, &mut out[..]) {
        Ok(out)
    } else {
        Err(KmsError::Unavailable {
            operation,
            cause: Cause::msg("stored key material is malformed"),
        })
    }
}

fn aad(key_id: &str, version: u32, context: &EncryptionContext) -> Vec<u8> {
    let mut a = AAD_LABEL.to_vec();
    a.extend_from_slice(key_id.as_bytes());
    a.extend_from_slice(&version.to_be_bytes());
    a.extend_from_slice(&context.canonical());
    a
}

/// A parsed local blob: magic, key id, material version, nonce, ciphertext and tag.
struct Blob<'a> {
    key_id: String,
    version: u32,
    nonce: [u8; 12],
    sealed: &'a [u8],
}

fn parse_blob(blob: &[u8]) -> Option<Blob<'_>> {
    if blob.len() < 4 + 16 + 4 + 12 + 16 || &blob[..4] != BLOB_MAGIC {
        return None;
    }
    let id: [u8; 16] = blob[4..20].try_into().ok()?;
    let version = u32::from_be_bytes(blob[20..24].try_into().ok()?);
    let nonce: [u8; 12] = blob[24..36].try_into().ok()?;
    Some(Blob {
        key_id: format_uuid(&id),
        version,
        nonce,
        sealed: &blob[36..],
    })
}

impl LocalKms {
    pub(super) fn seal(
        k: &KeyRecord,
        context: &EncryptionContext,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, KmsError> {
        let m = k.materials.last().ok_or_else(|| KmsError::InvalidState {
            operation: "Encrypt",
            key: arn(&k.id),
            state: "without key material".into(),
        })?;
        let material = material_bytes(m, "Encrypt")?;
        let cipher =
            Aes256Gcm::new_from_slice(&material[..]).map_err(|_| KmsError::Unavailable {
                operation: "Encrypt",
                cause: Cause::msg("stored key material has the wrong length"),
            })?;
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|e| KmsError::Unavailable {
            operation: "Encrypt",
            cause: Cause::new(e),
        })?;
        let mut sealed = plaintext.to_vec();
        let tag = cipher
            .encrypt_inout_detached(
                &Nonce::from(nonce),
                &aad(&k.id, m.version, context),
                sealed.as_mut_slice().into(),
            )
            .map_err(|_| KmsError::Unavailable {
                operation: "Encrypt",
                cause: Cause::msg("AES-GCM refused the input"),
            })?;
        let mut blob = BLOB_MAGIC.to_vec();
        blob.extend_from_slice(&uuid_bytes(&k.id));
        blob.extend_from_slice(&m.version.to_be_bytes());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&sealed);
        blob.extend_from_slice(&tag);
        Ok(blob)
    }

    pub(super) fn open_blob(
        state: &State,
        operation: &'static str,
        named: Option<&str>,
        blob: &[u8],
        context: &EncryptionContext,
    ) -> Result<(Zeroizing<Vec<u8>>, String), KmsError> {
        let b = parse_blob(blob).ok_or_else(|| KmsError::InvalidCiphertext {
            operation,
            key: named.map_or_else(|| "(unknown)".into(), arn),
            reason: "the ciphertext blob is not a local KMS blob or is truncated".into(),
        })?;
        if let Some(n) = named
            && n != b.key_id
        {
            return Err(KmsError::IncorrectKey {
                operation,
                key: arn(n),
            });
        }
        let k = Self::usable(state, operation, &b.key_id)?;
        let m = k
            .materials
            .iter()
            .find(|m| m.version == b.version)
            .ok_or_else(|| KmsError::InvalidCiphertext {
                operation,
                key: arn(&k.id),
                reason: format!("key material version {} does not exist", b.version),
            })?;
        let material = material_bytes(m, operation)?;
        let cipher =
            Aes256Gcm::new_from_slice(&material[..]).map_err(|_| KmsError::Unavailable {
                operation,
                cause: Cause::msg("stored key material has the wrong length"),
            })?;
        if b.sealed.len() < 16 {
            return Err(KmsError::InvalidCiphertext {
                operation,
                key: arn(&k.id),
                reason: "truncated".into(),
            });
        }
        let (body, tag) = b.sealed.split_at(b.sealed.len() - 16);
        let mut plain = Zeroizing::new(body.to_vec());
        let tag: [u8; 16] = tag.try_into().unwrap_or([0; 16]);
        cipher
            .decrypt_inout_detached(
                &Nonce::from(b.nonce),
                &aad(&k.id, b.version, context),
                plain.as_mut_slice().into(),
                &tag.into(),
            )
            .map_err(|_| KmsError::InvalidCiphertext {
                operation,
                key: arn(&k.id),
                reason: "the ciphertext is damaged or the encryption context does not match".into(),
            })?;
        Ok((plain, k.id.clone()))
    }
}
