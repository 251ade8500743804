//! The record layer the kernel would run, in userspace: TLS 1.3 records sealed and opened
//! with the keys [`crate::try_extract`] took from rustls, for kernels without kTLS.
//!
//! Why not stay on rustls after the handshake: its buffered API copies every received byte
//! three times before the caller sees it (into its deframer buffer in 4 KiB steps, out of it
//! into a plaintext queue, out of that into the caller's buffer) and moves the unread tail of
//! its deframer buffer after each record; a bulk receiver spent as much time in `memmove` as
//! in AES-GCM. Here the cipher reads a record where the socket put it and writes its
//! plaintext into the reader's buffer ([`RecordKeys::open_into`]), and reads the writer's
//! bytes where they are and writes the ciphertext into the send buffer
//! ([`RecordKeys::seal`]); small records and ChaCha20 are copied once and worked on in place.
//! The handshake, certificates and key schedule stay rustls'.
//!
//! Sans-IO: [`RecordKeys`] seals and opens one direction's records (RFC 8446 section 5.2: the
//! nonce is the IV XOR the record's sequence number, the additional data the record header,
//! the content type the last non-zero byte of the inner plaintext), [`record_len`] frames the
//! input. What a record that is not application data means (close_notify, tickets,
//! KeyUpdate) is the caller's, with [`crate::classify`] and [`crate::parse_handshake`], as on
//! an offloaded socket. Checked against rustls itself (tests below).

use std::fmt;
use std::mem::MaybeUninit;

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::ConnectionTrafficSecrets;

use crate::crypto_info::{secret_parts, zeroize};
use crate::gcm::GcmCipher;
use crate::record::{
    ALERT_BAD_RECORD_MAC, ALERT_RECORD_OVERFLOW, ALERT_UNEXPECTED_MESSAGE,
    CONTENT_APPLICATION_DATA, MAX_RECORD_PLAINTEXT,
};
use crate::{Cipher, KtlsError, TrafficSecret};

/// TLS record header: type, legacy version, length.
pub const HEADER_LEN: usize = 5;
/// The AEAD tag every TLS 1.3 cipher suite appends.
pub const TAG_LEN: usize = 16;
/// The most a record may carry beyond its plaintext (RFC 8446 section 5.2: 2^14 + 256).
const MAX_EXPANSION: usize = 256;
/// The largest record on the wire: header, inner plaintext (content and its type byte, up to
/// 2^14 + 256 with padding) and tag, as the peer may send it.
pub const MAX_RECORD: usize = HEADER_LEN + MAX_RECORD_PLAINTEXT + MAX_EXPANSION;
/// What a record we seal adds to its payload: header, content type byte, tag.
pub const OVERHEAD: usize = HEADER_LEN + 1 + TAG_LEN;
/// Records at least this long are sealed from the writer's slices and opened into the
/// reader's buffer ([`GcmCipher`]); shorter ones are copied and sealed or opened in place,
/// where the copy is cheap and aws-lc's one-shot AEAD has less to set up per record than its
/// streaming one.
const STREAM_MIN: usize = 2048;

/// One direction's record protection: an AEAD key, its IV and the next record's sequence
/// number.
pub struct RecordKeys {
    cipher: Cipher,
    key: LessSafeKey,
    /// The same key in aws-lc's streaming AES-GCM, which seals and opens without a copy.
    gcm: Option<GcmCipher>,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl fmt::Debug for RecordKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordKeys")
            .field("cipher", &self.cipher)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl Drop for RecordKeys {
    fn drop(&mut self) {
        zeroize(&mut self.iv);
    }
}

/// Why a received record could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// The outer content type is not application data (TLS 1.3 encrypts every record after
    /// the handshake), or the legacy version is not 0x0303.
    BadHeader,
    /// The length field is over 2^14 + 256, or too short to hold a tag.
    Oversized,
    /// Authentication failed: corrupt, forged or out of sequence.
    Decrypt,
    /// The inner plaintext is all padding (no content type).
    NoContentType,
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OpenError::BadHeader => "a TLS record with an unencrypted content type or a wrong version after the handshake",
            OpenError::Oversized => "a TLS record longer than 2^14 + 256 bytes or shorter than its tag",
            OpenError::Decrypt => "a TLS record failed authentication (corrupt, forged or out of sequence)",
            OpenError::NoContentType => "a TLS record with no content type (all padding)",
        })
    }
}

impl std::error::Error for OpenError {}

impl OpenError {
    /// The TLS alert that tells the peer (RFC 8446 section 6.2).
    pub fn alert(self) -> u8 {
        match self {
            OpenError::BadHeader | OpenError::NoContentType => ALERT_UNEXPECTED_MESSAGE,
            OpenError::Oversized => ALERT_RECORD_OVERFLOW,
            OpenError::Decrypt => ALERT_BAD_RECORD_MAC,
        }
    }
}

/// The length of the record that starts `buf` (header included), once its header is there;
/// `Err` for a header no TLS 1.3 peer sends after the handshake.
pub fn record_len(buf: &[u8]) -> Result<Option<usize>, OpenError> {
    let Some(h) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    if h[0] != CONTENT_APPLICATION_DATA || h[1] != 3 || h[2] != 3 {
        return Err(OpenError::BadHeader);
    }
    let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
    if len > MAX_RECORD_PLAINTEXT + MAX_EXPANSION || len <= TAG_LEN {
        return Err(OpenError::Oversized);
    }
    Ok(Some(HEADER_LEN + len))
}

/// aws-lc-rs' AEAD for `cipher`.
fn algorithm(cipher: Cipher) -> &'static aead::Algorithm {
    match cipher {
        Cipher::Aes128Gcm => &aead::AES_128_GCM,
        Cipher::Aes256Gcm => &aead::AES_256_GCM,
        Cipher::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
    }
}

/// The content type of an opened record and its content's length, the inner plaintext being
/// `head` followed by `tail` (RFC 8446 section 5.4: the content, its type byte, then zero
/// padding, at most 2^14 + 1 bytes in all).
fn content_of(head: &[u8], tail: &[u8]) -> Result<(u8, usize), OpenError> {
    if head.len() + tail.len() > MAX_RECORD_PLAINTEXT + 1 {
        return Err(OpenError::Oversized);
    }
    // The content type is the last non-zero byte; zeros after it are padding.
    match tail.iter().rposition(|&b| b != 0) {
        Some(i) => Ok((tail[i], head.len() + i)),
        None => match head.iter().rposition(|&b| b != 0) {
            Some(i) => Ok((head[i], i)),
            None => Err(OpenError::NoContentType),
        },
    }
}

/// The nonce of record `seq` (the IV XOR the sequence number), moving `seq` on.
fn next_nonce(iv: &[u8; NONCE_LEN], seq: &mut u64) -> [u8; NONCE_LEN] {
    let mut n = *iv;
    for (b, s) in n[NONCE_LEN - 8..].iter_mut().zip(seq.to_be_bytes()) {
        *b ^= s;
    }
    *seq += 1;
    n
}

impl RecordKeys {
    /// One direction of extracted secrets: `seq` is the next record's number there.
    pub fn from_secrets(seq: u64, secrets: &ConnectionTrafficSecrets) -> Result<Self, KtlsError> {
        let (cipher, key, iv) = secret_parts(secrets)?;
        Self::new(cipher, key, iv, seq)
    }

    /// The keys a traffic secret yields, from record 0 (after a KeyUpdate).
    pub fn from_traffic_secret(secret: &TrafficSecret) -> Result<Self, KtlsError> {
        let (mut key, mut iv) = secret.crypto_keys();
        let keys = Self::new(secret.cipher(), &key, &iv, 0);
        zeroize(&mut key);
        zeroize(&mut iv);
        keys
    }

    fn new(cipher: Cipher, key: &[u8], iv: &[u8], seq: u64) -> Result<Self, KtlsError> {
        let alg = algorithm(cipher);
        let bad = |what, got, want| KtlsError::BadSecretLength {
            cipher,
            what,
            got,
            want,
        };
        let iv: [u8; NONCE_LEN] = iv.try_into().map_err(|_| bad("IV", iv.len(), NONCE_LEN))?;
        let gcm = GcmCipher::new(cipher, key);
        let key = UnboundKey::new(alg, key).map_err(|_| bad("key", key.len(), alg.key_len()))?;
        Ok(RecordKeys {
            cipher,
            key: LessSafeKey::new(key),
            gcm,
            iv,
            seq,
        })
    }

    /// The cipher.
    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// Records sealed or opened with these keys so far (the next record's sequence number).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    fn nonce_bytes(&mut self) -> [u8; NONCE_LEN] {
        next_nonce(&self.iv, &mut self.seq)
    }

    fn nonce(&mut self) -> Nonce {
        Nonce::assume_unique_for_key(self.nonce_bytes())
    }

    /// Appends one record of `content_type` carrying `parts` (together at most
    /// [`MAX_RECORD_PLAINTEXT`] bytes) to `out`. With AES-GCM the cipher reads the parts and
    /// writes the ciphertext into `out` ([`GcmCipher`]); otherwise the parts are copied in
    /// once and encrypted where they lie.
    pub fn seal(&mut self, content_type: u8, parts: &[&[u8]], out: &mut Vec<u8>) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        debug_assert!(len <= MAX_RECORD_PLAINTEXT);
        let wire = (len + 1 + TAG_LEN) as u16;
        out.reserve(len + OVERHEAD);
        let start = out.len();
        let [w0, w1] = wire.to_be_bytes();
        let header = [CONTENT_APPLICATION_DATA, 3, 3, w0, w1];
        out.extend_from_slice(&header);
        let nonce = self.nonce_bytes();
        if let Some(gcm) = self.gcm.as_mut().filter(|_| len >= STREAM_MIN) {
            let body = &mut out.spare_capacity_mut()[..len + 1 + TAG_LEN];
            if gcm.seal(&nonce, &header, parts, content_type, body) {
                // SAFETY: a successful seal wrote all `len + 1 + TAG_LEN` bytes.
                unsafe { out.set_len(start + HEADER_LEN + len + 1 + TAG_LEN) };
                return;
            }
        }
        for p in parts {
            out.extend_from_slice(p);
        }
        out.push(content_type);
        let nonce = Nonce::assume_unique_for_key(nonce);
        let (header, body) = out[start..].split_at_mut(HEADER_LEN);
        let header: [u8; HEADER_LEN] = [header[0], header[1], header[2], header[3], header[4]];
        // Infallible for in-range lengths: the only error is a plaintext over the AEAD's limit.
        let tag = match self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), body)
        {
            Ok(tag) => tag,
            Err(_) => unreachable!("a TLS record is far below every AEAD's length limit"),
        };
        out.extend_from_slice(tag.as_ref());
    }

    /// Opens the whole record `record` (header included, as long as [`record_len`] said) in
    /// place: its content type and where its content lies in `record`.
    pub fn open(&mut self, record: &mut [u8]) -> Result<(u8, std::ops::Range<usize>), OpenError> {
        let (header, body) = record.split_at_mut(HEADER_LEN);
        let header: [u8; HEADER_LEN] = [header[0], header[1], header[2], header[3], header[4]];
        let nonce = self.nonce();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(header), body)
            .map_err(|_| OpenError::Decrypt)?;
        let (content_type, len) = content_of(&[], plain)?;
        Ok((content_type, HEADER_LEN..HEADER_LEN + len))
    }

    /// Opens the whole record `record` (header included, as long as [`record_len`] said)
    /// with as much of its plaintext as fits written into `out` and the rest opened in place:
    /// the content is `out[..front]` followed by `record[rest]`. Nothing in `out` may be used
    /// unless this returns `Ok`. Short records, a reader with little room (under 1 KiB: not
    /// worth the streaming cipher's set-up) and ciphers other than AES-GCM are opened in place
    /// only (`front` is 0), as [`RecordKeys::open`] does.
    pub fn open_into(
        &mut self,
        record: &mut [u8],
        out: &mut [MaybeUninit<u8>],
    ) -> Result<Opened, OpenError> {
        let inner = record.len().saturating_sub(HEADER_LEN + TAG_LEN);
        let Some(gcm) = self
            .gcm
            .as_mut()
            .filter(|_| inner >= STREAM_MIN && out.len() >= STREAM_MIN / 2)
        else {
            let (content_type, rest) = self.open(record)?;
            return Ok(Opened {
                content_type,
                front: 0,
                rest,
            });
        };
        let front = out.len().min(inner);
        let (header, body) = record.split_at_mut(HEADER_LEN);
        let (ciphertext, tag) = body.split_at_mut(inner);
        let (head, tail) = ciphertext.split_at_mut(front);
        let tag: &[u8; TAG_LEN] = match (&*tag).try_into() {
            Ok(tag) => tag,
            Err(_) => return Err(OpenError::Oversized),
        };
        let nonce = next_nonce(&self.iv, &mut self.seq);
        let out = &mut out[..front];
        if !gcm.open(&nonce, header, head, out, tail, tag) {
            return Err(OpenError::Decrypt);
        }
        // SAFETY: a successful open wrote all of `out`.
        let out: &[u8] = unsafe { &*(out as *const [MaybeUninit<u8>] as *const [u8]) };
        let (content_type, at) = content_of(out, tail)?;
        Ok(Opened {
            content_type,
            front: at.min(front),
            rest: HEADER_LEN + front..HEADER_LEN + at.max(front),
        })
    }
}

/// A record [`RecordKeys::open_into`] opened: its content is the first `front` bytes of the
/// reader's buffer followed by `rest` of the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The inner content type.
    pub content_type: u8,
    /// Content bytes written at the start of the reader's buffer.
    pub front: usize,
    /// Where the rest of the content lies in the record.
    pub rest: std::ops::Range<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{CONTENT_ALERT, CONTENT_HANDSHAKE};
    use crate::rekey::tests::handshake;
    use crate::{try_extract, Handoff, SecretLog};
    use std::io::{Read, Write};
    use std::sync::Arc;

    /// A finished in-memory rustls handshake (secret extraction on, no tickets).
    fn pair(cipher: Cipher) -> (rustls::Connection, rustls::Connection) {
        let (c, s, _) = handshake(cipher, &Arc::new(SecretLog::default()));
        (c, s)
    }

    /// One direction's key material, kept so a test can rebuild the same keys.
    struct Raw(Cipher, Vec<u8>, Vec<u8>, u64);

    impl Raw {
        fn of(seq: u64, secrets: &ConnectionTrafficSecrets) -> Raw {
            let (cipher, key, iv) = secret_parts(secrets).expect("a known AEAD");
            Raw(cipher, key.to_vec(), iv.to_vec(), seq)
        }

        fn keys(&self) -> RecordKeys {
            RecordKeys::new(self.0, &self.1, &self.2, self.3).expect("keys")
        }
    }

    /// (tx, rx) of a finished connection.
    fn extracted(conn: impl Into<rustls::Connection>) -> (Raw, Raw) {
        match try_extract(conn).expect("extract") {
            Handoff::Ready(x) => {
                // The extraction path and the raw rebuild agree.
                RecordKeys::from_secrets(x.secrets.tx.0, &x.secrets.tx.1).expect("tx");
                (
                    Raw::of(x.secrets.tx.0, &x.secrets.tx.1),
                    Raw::of(x.secrets.rx.0, &x.secrets.rx.1),
                )
            }
            Handoff::NeedsFlush(_) => panic!("nothing should be pending"),
        }
    }

    /// Opens every record in `wire`, returning (type, content) pairs.
    fn open_all(keys: &mut RecordKeys, mut wire: Vec<u8>) -> Result<Vec<(u8, Vec<u8>)>, OpenError> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < wire.len() {
            let len = record_len(&wire[at..])?.expect("a whole header");
            let (ty, range) = keys.open(&mut wire[at..at + len])?;
            out.push((ty, wire[at + range.start..at + range.end].to_vec()));
            at += len;
        }
        Ok(out)
    }

    #[test]
    fn records_rustls_sends_open_here_and_records_sealed_here_open_in_rustls() {
        for suite in Cipher::ALL {
            let (c, mut s) = pair(suite);
            // rustls → ours: a few records, the first sizes at the record limit's edges.
            let sizes = [1usize, MAX_RECORD_PLAINTEXT, MAX_RECORD_PLAINTEXT + 1, 3000];
            let sent: Vec<u8> = (0..sizes.iter().sum::<usize>())
                .map(|i| (i * 7) as u8)
                .collect();
            s.writer().write_all(&sent).expect("write");
            let mut wire = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut wire).expect("write_tls");
            }
            let (c_tx, c_rx) = extracted(c);
            let (mut c_tx, mut c_rx) = (c_tx.keys(), c_rx.keys());
            let records = open_all(&mut c_rx, wire).expect("open");
            assert!(records.iter().all(|(t, _)| *t == CONTENT_APPLICATION_DATA));
            let got: Vec<u8> = records.into_iter().flat_map(|(_, d)| d).collect();
            assert_eq!(got, sent, "{suite:?}");
            // ours → rustls: parts spanning a record, then a close_notify alert.
            let mut wire = Vec::new();
            c_tx.seal(
                CONTENT_APPLICATION_DATA,
                &[b"head", &sent[..1000]],
                &mut wire,
            );
            c_tx.seal(
                CONTENT_APPLICATION_DATA,
                &[&sent[..MAX_RECORD_PLAINTEXT]],
                &mut wire,
            );
            // Big enough for the streaming seal, from several slices (an h2 head and payloads).
            let parts: [&[u8]; 3] = [b"frame head", &sent[..5000], &sent[7000..9001]];
            c_tx.seal(CONTENT_APPLICATION_DATA, &parts, &mut wire);
            c_tx.seal(CONTENT_ALERT, &[&[1, 0]], &mut wire);
            // Read as it comes: rustls holds at most a few records' plaintext unread.
            let (mut got, mut closed) = (Vec::new(), false);
            let mut rd = &wire[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).expect("read_tls");
                s.process_new_packets().expect("rustls accepts our records");
                let mut buf = [0u8; 4096];
                loop {
                    match s.reader().read(&mut buf) {
                        Ok(0) => {
                            closed = true;
                            break;
                        }
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("reading what rustls opened: {e}"),
                    }
                }
            }
            assert!(closed, "clean close_notify");
            let mut want = b"head".to_vec();
            want.extend_from_slice(&sent[..1000]);
            want.extend_from_slice(&sent[..MAX_RECORD_PLAINTEXT]);
            want.extend(parts.concat());
            assert_eq!(got, want, "{suite:?}");
            assert_eq!(c_tx.seq(), 4);
        }
    }

    /// The AES suites get the streaming sealer: a key it refused would fall back to copying
    /// without any other sign.
    #[test]
    fn aes_keys_seal_without_copying_first() {
        for (cipher, key_len) in [(Cipher::Aes128Gcm, 16), (Cipher::Aes256Gcm, 32)] {
            let keys =
                RecordKeys::new(cipher, &vec![1u8; key_len], &[2u8; NONCE_LEN], 0).expect("keys");
            assert!(keys.gcm.is_some(), "{cipher:?} seals after a copy");
        }
        let chacha = RecordKeys::new(Cipher::Chacha20Poly1305, &[1u8; 32], &[2u8; NONCE_LEN], 0)
            .expect("keys");
        assert!(chacha.gcm.is_none());
    }

    /// A record as a peer may send it: `content`, its type, then `pad` zeros, sealed as
    /// record 0 by aws-lc-rs' one-shot AEAD.
    fn padded_record(
        cipher: Cipher,
        key: &[u8],
        iv: &[u8; NONCE_LEN],
        content: &[u8],
        ty: u8,
        pad: usize,
    ) -> Vec<u8> {
        let mut inner = content.to_vec();
        inner.push(ty);
        inner.resize(inner.len() + pad, 0);
        let [w0, w1] = ((inner.len() + TAG_LEN) as u16).to_be_bytes();
        let header = [CONTENT_APPLICATION_DATA, 3, 3, w0, w1];
        let key = LessSafeKey::new(UnboundKey::new(algorithm(cipher), key).expect("key"));
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(*iv),
            Aad::from(header),
            &mut inner,
        )
        .expect("seal");
        let mut record = header.to_vec();
        record.extend(inner);
        record
    }

    /// However much room the reader's buffer has, opening into it gives the record's
    /// content as opening in place does, in two pieces, with padding cut anywhere; with AES
    /// the part that fits really goes there (a silent fallback would fail here).
    #[test]
    fn open_into_gives_the_content_in_two_pieces_for_any_room() {
        let content: Vec<u8> = (0..16_384).map(|i| (i * 13 + i / 256 + 1) as u8).collect();
        for cipher in Cipher::ALL {
            let key = vec![5u8; cipher.key_len()];
            let iv = [6u8; NONCE_LEN];
            for (len, pad, ty) in [
                (2100, 0, CONTENT_APPLICATION_DATA),
                (5000, 300, CONTENT_APPLICATION_DATA),
                (16_384, 0, CONTENT_APPLICATION_DATA),
                (3000, 200, CONTENT_HANDSHAKE),
                (100, 0, CONTENT_APPLICATION_DATA),
            ] {
                let content = &content[..len];
                let wire = padded_record(cipher, &key, &iv, content, ty, pad);
                let inner = len + 1 + pad;
                for room in [
                    0,
                    1,
                    1023,
                    1024,
                    len - 1,
                    len,
                    len + 1,
                    len + 1 + pad / 2,
                    inner,
                    inner + 9,
                ] {
                    let mut record = wire.clone();
                    let mut keys = RecordKeys::new(cipher, &key, &iv, 0).expect("keys");
                    let mut out = vec![MaybeUninit::new(0xAAu8); room];
                    let opened = keys.open_into(&mut record, &mut out).expect("opens");
                    assert_eq!(
                        opened.content_type, ty,
                        "{cipher:?} {len} {pad} room {room}"
                    );
                    let mut got: Vec<u8> = out[..opened.front]
                        .iter()
                        // SAFETY: `front` bytes were written.
                        .map(|b| unsafe { b.assume_init() })
                        .collect();
                    got.extend_from_slice(&record[opened.rest.clone()]);
                    assert_eq!(got, content, "{cipher:?} {len} {pad} room {room}");
                    let direct = cipher != Cipher::Chacha20Poly1305
                        && inner >= STREAM_MIN
                        && room >= STREAM_MIN / 2;
                    let want_front = if direct { room.min(len) } else { 0 };
                    assert_eq!(
                        opened.front, want_front,
                        "{cipher:?} {len} {pad} room {room}"
                    );
                    assert_eq!(keys.seq(), 1);
                }
            }
        }
    }

    /// A flipped bit before or after the cut, or a record that is all padding, is refused
    /// whichever way it is opened.
    #[test]
    fn open_into_refuses_what_open_refuses() {
        let content = vec![7u8; 6000];
        for cipher in Cipher::ALL {
            let key = vec![8u8; cipher.key_len()];
            let iv = [9u8; NONCE_LEN];
            let wire = padded_record(cipher, &key, &iv, &content, CONTENT_APPLICATION_DATA, 0);
            for (bit_at, room) in [
                (HEADER_LEN + 10, 4000),
                (HEADER_LEN + 5000, 4000),
                (wire.len() - 1, 100),
            ] {
                let mut record = wire.clone();
                record[bit_at] ^= 4;
                let mut keys = RecordKeys::new(cipher, &key, &iv, 0).expect("keys");
                let mut out = vec![MaybeUninit::new(0u8); room];
                assert_eq!(
                    keys.open_into(&mut record, &mut out),
                    Err(OpenError::Decrypt),
                    "{cipher:?} byte {bit_at}"
                );
            }
            let empty = padded_record(cipher, &key, &iv, &[], 0, 3000);
            for room in [0, 10, 2000, 5000] {
                let mut keys = RecordKeys::new(cipher, &key, &iv, 0).expect("keys");
                let mut out = vec![MaybeUninit::new(1u8); room];
                assert_eq!(
                    keys.open_into(&mut empty.clone(), &mut out),
                    Err(OpenError::NoContentType),
                    "{cipher:?} room {room}"
                );
            }
        }
    }

    #[test]
    fn tampered_replayed_or_malformed_records_are_refused() {
        let (c, s) = pair(Cipher::Aes128Gcm);
        let mut tx = extracted(s).0.keys();
        let rx = extracted(c).1;
        let mut wire = Vec::new();
        tx.seal(CONTENT_APPLICATION_DATA, &[b"hello"], &mut wire);
        tx.seal(CONTENT_HANDSHAKE, &[&[4, 0, 0, 0]], &mut wire);
        let first = HEADER_LEN + 5 + 1 + TAG_LEN;
        assert_eq!(record_len(&wire).expect("header"), Some(first));
        assert_eq!(record_len(&wire[..4]).expect("short"), None);

        // One flipped bit anywhere fails authentication, and so does a record out of order.
        for bit in [0usize, 3 * 8 + 1, (first - 1) * 8] {
            let mut bad = wire[..first].to_vec();
            bad[bit / 8] ^= 1 << (bit % 8);
            let mut keys = rx.keys();
            let r = record_len(&bad).and_then(|_| keys.open(&mut bad));
            assert!(r.is_err(), "bit {bit}: {r:?}");
        }
        let mut keys = rx.keys();
        let mut second = wire[first..].to_vec();
        assert_eq!(
            keys.open(&mut second),
            Err(OpenError::Decrypt),
            "skipped a record"
        );
        let mut keys = rx.keys();
        let (ty, range) = keys.open(&mut wire[..first]).expect("first");
        assert_eq!(
            (ty, &wire[range]),
            (CONTENT_APPLICATION_DATA, &b"hello"[..])
        );
        let (ty, range) = keys.open(&mut wire[first..]).expect("second");
        assert_eq!(
            (ty, &wire[first..][range]),
            (CONTENT_HANDSHAKE, &[4, 0, 0, 0][..])
        );

        assert_eq!(
            record_len(&[CONTENT_ALERT, 3, 3, 0, 2]),
            Err(OpenError::BadHeader)
        );
        assert_eq!(record_len(&[23, 3, 1, 0, 20]), Err(OpenError::BadHeader));
        assert_eq!(record_len(&[23, 3, 3, 0x41, 1]), Err(OpenError::Oversized));
        assert_eq!(record_len(&[23, 3, 3, 0, 16]), Err(OpenError::Oversized));
        assert_eq!(
            record_len(&[23, 3, 3, 0x41, 0]).expect("max"),
            Some(MAX_RECORD)
        );
    }
}
