//! Following a peer's TLS 1.3 KeyUpdate on an offloaded socket (Linux 6.14 and later).
//!
//! The kernel surfaces a KeyUpdate as a handshake record (content type 22, message type 24)
//! through the `TLS_GET_RECORD_TYPE` control message, like any other non-data record. A
//! kernel with rekey support (`Capability::rekey`) then pauses decryption: every read fails
//! with `EKEYEXPIRED` until userspace installs the peer's next key with `setsockopt(TLS_RX)`.
//! Older kernels (6.1 in `deploy/vm`) keep decrypting with the old key, so the next record
//! fails authentication (`EBADMSG`) and a second `TLS_RX` fails with `EBUSY`: there the only
//! clean answer is to close the connection ([`crate::KtlsError::KeyUpdate`]).
//!
//! The next key needs the peer's current *traffic secret*, not the key and IV rustls hands
//! out in `ExtractedSecrets`: RFC 8446 section 7.2,
//! `secret_N+1 = HKDF-Expand-Label(secret_N, "traffic upd", "", Hash.length)`, then section
//! 7.3, `key = HKDF-Expand-Label(secret, "key", "", key_length)` and
//! `iv = HKDF-Expand-Label(secret, "iv", "", 12)`. [`SecretLog`] collects the first
//! application traffic secrets of each handshake through rustls' `KeyLog` hook (keyed by the
//! ClientHello's random, see [`client_random`]); [`Rekey`] holds a connection's pair and
//! derives (sans-IO: [`TrafficSecret::next`], [`TrafficSecret::crypto_keys`]); [`follow_key_update`]
//! does the socket part.
//!
//! The derivation is checked against rustls itself (unit tests), the socket part in the VM on
//! both kernels `deploy/vm` boots (6.1, and 6.16 from `fetch-kernel.sh`); the kernel calls
//! follow `Documentation/networking/tls.rst`
//! ("TLS 1.3 Key Updates") and the kernel selftests (`tools/testing/selftests/net/tls.c`,
//! `rekey_*`): the KeyUpdate is sent with the old TX key, then the new TX key is set; the new
//! keys start at record sequence 0.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::os::fd::RawFd;
use std::sync::{Arc, LazyLock, Mutex};

use aws_lc_rs::hkdf;

use crate::crypto_info::{set_crypto_info, zeroize, CryptoInfo};
use crate::record::{send_record, CONTENT_HANDSHAKE, HANDSHAKE_KEY_UPDATE};
use crate::{Cipher, Direction, KtlsError};

/// The longest TLS 1.3 hash in use (SHA-384).
const MAX_HASH: usize = 48;
const NONCE_LEN: usize = 12;

/// The rustls `KeyLog` labels of the first application traffic secrets (RFC 8446 section
/// 7.1, NSS key log names).
const CLIENT_TRAFFIC_SECRET_0: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_TRAFFIC_SECRET_0: &str = "SERVER_TRAFFIC_SECRET_0";

/// A KeyUpdate handshake message (RFC 8446 section 4.6.3): type 24, length 1, and whether
/// the receiver must update its own sending key too.
pub fn key_update_message(update_requested: bool) -> [u8; 5] {
    [HANDSHAKE_KEY_UPDATE, 0, 0, 1, u8::from(update_requested)]
}

/// Hash length of a cipher's TLS 1.3 suite: SHA-384 for AES-256-GCM, SHA-256 otherwise.
fn hash_len(cipher: Cipher) -> usize {
    match cipher {
        Cipher::Aes256Gcm => 48,
        Cipher::Aes128Gcm | Cipher::Chacha20Poly1305 => 32,
    }
}

fn hkdf_alg(cipher: Cipher) -> hkdf::Algorithm {
    match cipher {
        Cipher::Aes256Gcm => hkdf::HKDF_SHA384,
        Cipher::Aes128Gcm | Cipher::Chacha20Poly1305 => hkdf::HKDF_SHA256,
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// `HKDF-Expand-Label(secret, label, "", out.len())` (RFC 8446 section 7.1).
fn expand_label(cipher: Cipher, secret: &[u8], label: &[u8], out: &mut [u8]) {
    let len = (out.len() as u16).to_be_bytes();
    let full_len = [(6 + label.len()) as u8];
    let info: [&[u8]; 5] = [&len, &full_len, b"tls13 ", label, &[0]];
    let prk = hkdf::Prk::new_less_safe(hkdf_alg(cipher), secret);
    // Lengths here are at most 48 bytes, far below HKDF's 255 * Hash.length limit, so
    // neither call can fail.
    if let Ok(okm) = prk.expand(&info, Len(out.len())) {
        let _ = okm.fill(out);
    }
}

/// One direction's TLS 1.3 application traffic secret; zeroed on drop.
#[derive(Clone)]
pub struct TrafficSecret {
    cipher: Cipher,
    bytes: [u8; MAX_HASH],
}

impl fmt::Debug for TrafficSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrafficSecret")
            .field("cipher", &self.cipher)
            .finish_non_exhaustive()
    }
}

impl Drop for TrafficSecret {
    fn drop(&mut self) {
        zeroize(&mut self.bytes);
    }
}

impl TrafficSecret {
    /// A secret of `cipher`'s suite; its length must be the suite's hash length.
    pub fn new(cipher: Cipher, secret: &[u8]) -> Result<Self, KtlsError> {
        let want = hash_len(cipher);
        if secret.len() != want {
            return Err(KtlsError::BadSecretLength {
                cipher,
                what: "traffic secret",
                got: secret.len(),
                want,
            });
        }
        let mut bytes = [0; MAX_HASH];
        bytes[..want].copy_from_slice(secret);
        Ok(TrafficSecret { cipher, bytes })
    }

    /// The secret's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..hash_len(self.cipher)]
    }

    /// The cipher it keys.
    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// The secret after one KeyUpdate: `HKDF-Expand-Label(secret, "traffic upd", "",
    /// Hash.length)` (RFC 8446 section 7.2).
    pub fn next(&self) -> TrafficSecret {
        let mut bytes = [0; MAX_HASH];
        let n = hash_len(self.cipher);
        expand_label(
            self.cipher,
            self.as_bytes(),
            b"traffic upd",
            &mut bytes[..n],
        );
        TrafficSecret {
            cipher: self.cipher,
            bytes,
        }
    }

    /// The record protection key and 12-byte IV it yields (RFC 8446 section 7.3); the caller
    /// zeroes them when done (`crypto_info` does).
    pub fn crypto_keys(&self) -> (Vec<u8>, [u8; NONCE_LEN]) {
        let mut key = vec![0; self.cipher.key_len()];
        let mut iv = [0; NONCE_LEN];
        expand_label(self.cipher, self.as_bytes(), b"key", &mut key);
        expand_label(self.cipher, self.as_bytes(), b"iv", &mut iv);
        (key, iv)
    }

    /// The kernel's crypto info for this secret's keys, starting at record 0.
    pub(crate) fn crypto_info(&self) -> Result<CryptoInfo, KtlsError> {
        let (mut key, mut iv) = self.crypto_keys();
        let info = CryptoInfo::new(self.cipher, &key, &iv, 0);
        zeroize(&mut key);
        zeroize(&mut iv);
        info
    }
}

/// The ClientHello's random from the first bytes a TLS client sends (the record header, the
/// handshake header, the legacy version, then 32 bytes of random): what rustls' `KeyLog` keys
/// a connection's secrets by. `None` when `first` is not the start of a ClientHello record or
/// is shorter than 43 bytes.
pub fn client_random(first: &[u8]) -> Option<[u8; 32]> {
    const HANDSHAKE_CLIENT_HELLO: u8 = 1;
    if first.len() < 43 || first[0] != CONTENT_HANDSHAKE || first[5] != HANDSHAKE_CLIENT_HELLO {
        return None;
    }
    first[11..43].try_into().ok()
}

/// Both first application traffic secrets of one handshake, as rustls logged them.
#[derive(Default)]
struct Pair {
    client: Option<Vec<u8>>,
    server: Option<Vec<u8>>,
}

impl Drop for Pair {
    fn drop(&mut self) {
        for s in [&mut self.client, &mut self.server].into_iter().flatten() {
            zeroize(s);
        }
    }
}

/// A rustls `KeyLog` that keeps only the first application traffic secrets, by ClientHello
/// random, until [`SecretLog::take`] claims them for an offloaded connection.
///
/// Bounded: handshakes whose secrets are never claimed (connections kept in userspace, or
/// lost before the switch) are forgotten oldest first once [`SecretLog::CAPACITY`] are held.
#[derive(Default)]
pub struct SecretLog {
    held: Mutex<Held>,
}

/// The secrets by ClientHello random, and the randoms in the order they came.
type Held = (HashMap<[u8; 32], Pair>, VecDeque<[u8; 32]>);

impl fmt::Debug for SecretLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let held = self.held.lock().map(|h| h.0.len()).unwrap_or_default();
        f.debug_struct("SecretLog").field("held", &held).finish()
    }
}

impl SecretLog {
    /// How many handshakes' secrets are held at most.
    pub const CAPACITY: usize = 4096;

    /// The process's one log: rustls configs are rebuilt when certificates rotate, and every
    /// one of them must log where the offloaded connection will look.
    pub fn global() -> Arc<SecretLog> {
        static LOG: LazyLock<Arc<SecretLog>> = LazyLock::new(Arc::default);
        LOG.clone()
    }

    /// Drops the secrets of the handshake whose ClientHello carried `random` (a connection
    /// that stays on userspace rustls, which rekeys by itself).
    pub fn forget(&self, random: &[u8; 32]) {
        if let Ok(mut held) = self.held.lock() {
            held.0.remove(random);
        }
    }

    /// Claims the secrets of the handshake whose ClientHello carried `random`, for the end
    /// that is the client (`is_client`) or the server, as a [`Rekey`].
    pub fn take(&self, random: &[u8; 32], cipher: Cipher, is_client: bool) -> Option<Rekey> {
        let pair = {
            let mut held = self.held.lock().ok()?;
            held.0.remove(random)?
        };
        let client = TrafficSecret::new(cipher, pair.client.as_deref()?).ok()?;
        let server = TrafficSecret::new(cipher, pair.server.as_deref()?).ok()?;
        Some(if is_client {
            Rekey::new(server, client)
        } else {
            Rekey::new(client, server)
        })
    }
}

impl rustls::KeyLog for SecretLog {
    fn will_log(&self, label: &str) -> bool {
        label == CLIENT_TRAFFIC_SECRET_0 || label == SERVER_TRAFFIC_SECRET_0
    }

    fn log(&self, label: &str, client_random: &[u8], secret: &[u8]) {
        let Ok(random) = <[u8; 32]>::try_from(client_random) else {
            return;
        };
        let Ok(mut held) = self.held.lock() else {
            return;
        };
        let (map, order) = &mut *held;
        if !map.contains_key(&random) {
            while map.len() >= Self::CAPACITY {
                match order.pop_front() {
                    Some(old) => drop(map.remove(&old)),
                    None => break,
                }
            }
            order.push_back(random);
        }
        let pair = map.entry(random).or_default();
        let slot = match label {
            CLIENT_TRAFFIC_SECRET_0 => &mut pair.client,
            SERVER_TRAFFIC_SECRET_0 => &mut pair.server,
            _ => return,
        };
        *slot = Some(secret.to_vec());
        // Claimed entries leave `order` behind; keep it from growing past the map by much.
        if order.len() > 2 * Self::CAPACITY {
            order.retain(|r| map.contains_key(r));
        }
    }
}

/// An offloaded connection's current traffic secrets, to follow KeyUpdates.
#[derive(Debug)]
pub struct Rekey {
    rx: TrafficSecret,
    tx: TrafficSecret,
    updates: u64,
}

/// What following one peer KeyUpdate takes (sans-IO; [`follow_key_update`] applies it).
pub struct KeyUpdatePlan {
    /// The peer's next keys, for `TLS_RX`.
    rx: CryptoInfo,
    /// When the peer asked for it: our KeyUpdate message (sent under the old TX key) and our
    /// next keys, for `TLS_TX` after it.
    reply: Option<([u8; 5], CryptoInfo)>,
}

impl Rekey {
    /// From the peer's (`rx`) and our (`tx`) current application traffic secrets.
    pub fn new(rx: TrafficSecret, tx: TrafficSecret) -> Self {
        Rekey { rx, tx, updates: 0 }
    }

    /// The peer's current secret.
    pub fn rx(&self) -> &TrafficSecret {
        &self.rx
    }

    /// Our current secret.
    pub fn tx(&self) -> &TrafficSecret {
        &self.tx
    }

    /// Moves the peer's secret on: it sent a KeyUpdate, which a userspace record layer
    /// followed with the next secret's keys.
    pub fn advance_rx(&mut self) {
        self.rx = self.rx.next();
        self.updates += 1;
    }

    /// Moves our secret on: a userspace record layer sent our KeyUpdate and seals with the
    /// next secret's keys from now on.
    pub fn advance_tx(&mut self) {
        self.tx = self.tx.next();
    }

    /// KeyUpdates followed so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Moves to the next secrets for a peer KeyUpdate and says what to install and send:
    /// the peer's next RX key; and, if it set `update_requested`, our KeyUpdate (with
    /// `update_not_requested`, RFC 8446 section 4.6.3) and our next TX key.
    pub fn on_peer_key_update(
        &mut self,
        update_requested: bool,
    ) -> Result<KeyUpdatePlan, KtlsError> {
        self.rx = self.rx.next();
        let rx = self.rx.crypto_info()?;
        let reply = if update_requested {
            self.tx = self.tx.next();
            Some((key_update_message(false), self.tx.crypto_info()?))
        } else {
            None
        };
        self.updates += 1;
        Ok(KeyUpdatePlan { rx, reply })
    }
}

/// Follows a peer KeyUpdate on an offloaded socket whose kernel can rekey (Linux 6.14+,
/// `Capability::rekey`): installs the peer's next key (`TLS_RX`, which lets the paused
/// receive side go on) and, when `update_requested`, sends our KeyUpdate under the old TX key
/// and then installs our next TX key. Returns whether our TX key changed.
///
/// A failure leaves the connection unusable: close it. A full send buffer for the 5-byte
/// KeyUpdate record is reported as such (`WouldBlock` inside [`KtlsError::Io`]) and also
/// means closing: retrying after the RX key moved would derive twice.
pub fn follow_key_update(
    fd: RawFd,
    rekey: &mut Rekey,
    update_requested: bool,
) -> Result<bool, KtlsError> {
    let plan = rekey.on_peer_key_update(update_requested)?;
    let cipher = rekey.rx.cipher();
    set_crypto_info(fd, Direction::Rx, &plan.rx).map_err(|source| KtlsError::CryptoRejected {
        direction: Direction::Rx,
        cipher,
        source,
    })?;
    let Some((msg, tx)) = plan.reply else {
        return Ok(false);
    };
    send_record(fd, CONTENT_HANDSHAKE, &msg).map_err(|source| KtlsError::Io {
        context: "sending our KeyUpdate",
        source,
    })?;
    set_crypto_info(fd, Direction::Tx, &tx).map_err(|source| KtlsError::CryptoRejected {
        direction: Direction::Tx,
        cipher,
        source,
    })?;
    Ok(true)
}

/// Starts a KeyUpdate of our own on an offloaded socket whose kernel can rekey (Linux 6.14+):
/// sends KeyUpdate (RFC 8446 section 4.6.3; `update_requested` asks the peer to move its key
/// too, its answer then comes to [`follow_key_update`]) under the current TX key, then
/// installs our next TX key.
///
/// Our secret moves only once both steps succeeded; a failure after the record went out
/// leaves the connection unusable: close it.
pub fn send_key_update(
    fd: RawFd,
    rekey: &mut Rekey,
    update_requested: bool,
) -> Result<(), KtlsError> {
    let next = rekey.tx.next();
    let info = next.crypto_info()?;
    send_record(fd, CONTENT_HANDSHAKE, &key_update_message(update_requested)).map_err(
        |source| KtlsError::Io {
            context: "sending our KeyUpdate",
            source,
        },
    )?;
    set_crypto_info(fd, Direction::Tx, &info).map_err(|source| KtlsError::CryptoRejected {
        direction: Direction::Tx,
        cipher: next.cipher(),
        source,
    })?;
    rekey.tx = next;
    Ok(())
}

#[cfg(test)]
#[path = "rekey_tests.rs"]
pub(crate) mod tests;
