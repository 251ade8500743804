//! The kernel's `tls12_crypto_info_*` structures (`include/uapi/linux/tls.h`), how rustls
//! secrets map onto them, and the socket options that install them.

use std::fmt;
use std::io;
use std::mem;
use std::os::fd::RawFd;

use rustls::ConnectionTrafficSecrets;

use crate::KtlsError;

// From include/uapi/linux/tls.h and include/linux/socket.h. Spelled out here rather than
// taken from `libc` so the values the crate depends on are reviewable in one place; the
// unit tests cross-check them against `libc`.
pub(crate) const SOL_TLS: libc::c_int = 282;
pub(crate) const TCP_ULP: libc::c_int = 31;
pub(crate) const TLS_TX: libc::c_int = 1;
pub(crate) const TLS_RX: libc::c_int = 2;
pub(crate) const TLS_SET_RECORD_TYPE: libc::c_int = 1;
pub(crate) const TLS_GET_RECORD_TYPE: libc::c_int = 2;
pub(crate) const TLS_1_3_VERSION: u16 = 0x0304;
pub(crate) const TLS_CIPHER_AES_GCM_128: u16 = 51;
pub(crate) const TLS_CIPHER_AES_GCM_256: u16 = 52;
pub(crate) const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;

/// Length of the TLS 1.3 per-record nonce base ("IV") rustls hands out.
const NONCE_LEN: usize = 12;
/// GCM: the kernel takes the first 4 nonce bytes as "salt" and the last 8 as "iv".
const GCM_SALT_LEN: usize = 4;

/// A TLS 1.3 AEAD the Linux kernel can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Cipher {
    /// `TLS_AES_128_GCM_SHA256`, kernel `TLS_CIPHER_AES_GCM_128`.
    Aes128Gcm,
    /// `TLS_AES_256_GCM_SHA384`, kernel `TLS_CIPHER_AES_GCM_256`.
    Aes256Gcm,
    /// `TLS_CHACHA20_POLY1305_SHA256`, kernel `TLS_CIPHER_CHACHA20_POLY1305`.
    Chacha20Poly1305,
}

impl Cipher {
    /// All ciphers, in the order [`crate::probe`] reports them.
    pub const ALL: [Cipher; 3] = [
        Cipher::Aes128Gcm,
        Cipher::Aes256Gcm,
        Cipher::Chacha20Poly1305,
    ];

    /// Short lowercase name for logs (`aes-128-gcm`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Cipher::Aes128Gcm => "aes-128-gcm",
            Cipher::Aes256Gcm => "aes-256-gcm",
            Cipher::Chacha20Poly1305 => "chacha20-poly1305",
        }
    }

    /// The kernel's `TLS_CIPHER_*` number.
    pub fn kernel_id(self) -> u16 {
        match self {
            Cipher::Aes128Gcm => TLS_CIPHER_AES_GCM_128,
            Cipher::Aes256Gcm => TLS_CIPHER_AES_GCM_256,
            Cipher::Chacha20Poly1305 => TLS_CIPHER_CHACHA20_POLY1305,
        }
    }

    /// The cipher for a kernel `TLS_CIPHER_*` number.
    pub fn from_kernel_id(id: u16) -> Option<Cipher> {
        Cipher::ALL.into_iter().find(|c| c.kernel_id() == id)
    }

    /// The cipher for a negotiated rustls TLS 1.3 suite (check [`crate::Capability`] with
    /// it before extracting secrets, so an unsupported suite can stay in userspace).
    pub fn from_suite(suite: rustls::CipherSuite) -> Option<Cipher> {
        match suite {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => Some(Cipher::Aes128Gcm),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => Some(Cipher::Aes256Gcm),
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => Some(Cipher::Chacha20Poly1305),
            _ => None,
        }
    }

    /// The cipher of extracted rustls secrets.
    pub fn of_secrets(secrets: &ConnectionTrafficSecrets) -> Option<Cipher> {
        match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { .. } => Some(Cipher::Aes128Gcm),
            ConnectionTrafficSecrets::Aes256Gcm { .. } => Some(Cipher::Aes256Gcm),
            ConnectionTrafficSecrets::Chacha20Poly1305 { .. } => Some(Cipher::Chacha20Poly1305),
            _ => None,
        }
    }

    pub(crate) fn key_len(self) -> usize {
        match self {
            Cipher::Aes128Gcm => 16,
            Cipher::Aes256Gcm | Cipher::Chacha20Poly1305 => 32,
        }
    }
}

impl fmt::Display for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which half of the connection a key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Sending (`TLS_TX`).
    Tx,
    /// Receiving (`TLS_RX`).
    Rx,
}

impl Direction {
    fn optname(self) -> libc::c_int {
        match self {
            Direction::Tx => TLS_TX,
            Direction::Rx => TLS_RX,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Tx => "TLS_TX",
            Direction::Rx => "TLS_RX",
        })
    }
}

/// `struct tls_crypto_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TlsCryptoInfo {
    pub(crate) version: u16,
    pub(crate) cipher_type: u16,
}

/// `struct tls12_crypto_info_aes_gcm_128` (40 bytes).
#[repr(C)]
#[derive(Default)]
pub(crate) struct AesGcm128Info {
    pub(crate) info: TlsCryptoInfo,
    pub(crate) iv: [u8; 8],
    pub(crate) key: [u8; 16],
    pub(crate) salt: [u8; 4],
    pub(crate) rec_seq: [u8; 8],
}

/// `struct tls12_crypto_info_aes_gcm_256` (56 bytes).
#[repr(C)]
#[derive(Default)]
pub(crate) struct AesGcm256Info {
    pub(crate) info: TlsCryptoInfo,
    pub(crate) iv: [u8; 8],
    pub(crate) key: [u8; 32],
    pub(crate) salt: [u8; 4],
    pub(crate) rec_seq: [u8; 8],
}

/// `struct tls12_crypto_info_chacha20_poly1305` (56 bytes; its `salt[0]` takes no space).
#[repr(C)]
#[derive(Default)]
pub(crate) struct Chacha20Poly1305Info {
    pub(crate) info: TlsCryptoInfo,
    pub(crate) iv: [u8; 12],
    pub(crate) key: [u8; 32],
    pub(crate) rec_seq: [u8; 8],
}

/// Key material for one direction, laid out for `setsockopt(SOL_TLS, TLS_TX/TLS_RX)`.
/// Zeroed on drop so keys do not linger in freed memory.
pub(crate) enum CryptoInfo {
    AesGcm128(AesGcm128Info),
    AesGcm256(AesGcm256Info),
    Chacha20Poly1305(Chacha20Poly1305Info),
}

/// How the kernel wants a 12-byte TLS 1.3 nonce base split: `(salt, iv)`.
///
/// GCM keeps the RFC 5288 TLS 1.2 naming: 4 bytes of implicit "salt" followed by 8 bytes
/// of "iv"; for TLS 1.3 the kernel rebuilds the 12-byte nonce as `salt || iv` and XORs
/// the record sequence number into it. ChaCha20-Poly1305 has no salt and takes all 12.
pub(crate) fn split_nonce(cipher: Cipher, nonce: &[u8; NONCE_LEN]) -> (&[u8], &[u8]) {
    match cipher {
        Cipher::Aes128Gcm | Cipher::Aes256Gcm => nonce.split_at(GCM_SALT_LEN),
        Cipher::Chacha20Poly1305 => (&nonce[..0], &nonce[..]),
    }
}

impl CryptoInfo {
    /// Lays out `key`, the 12-byte nonce base `iv` and the next record sequence number
    /// (big-endian, as the kernel counts it) for `cipher`.
    pub(crate) fn new(cipher: Cipher, key: &[u8], iv: &[u8], seq: u64) -> Result<Self, KtlsError> {
        if key.len() != cipher.key_len() {
            return Err(KtlsError::BadSecretLength {
                cipher,
                what: "key",
                got: key.len(),
                want: cipher.key_len(),
            });
        }
        let nonce: &[u8; NONCE_LEN] = iv.try_into().map_err(|_| KtlsError::BadSecretLength {
            cipher,
            what: "iv",
            got: iv.len(),
            want: NONCE_LEN,
        })?;
        let (salt, iv8) = split_nonce(cipher, nonce);
        let info = TlsCryptoInfo {
            version: TLS_1_3_VERSION,
            cipher_type: cipher.kernel_id(),
        };
        let rec_seq = seq.to_be_bytes();
        Ok(match cipher {
            Cipher::Aes128Gcm => {
                let mut c = AesGcm128Info {
                    info,
                    rec_seq,
                    ..Default::default()
                };
                c.key.copy_from_slice(key);
                c.salt.copy_from_slice(salt);
                c.iv.copy_from_slice(iv8);
                CryptoInfo::AesGcm128(c)
            }
            Cipher::Aes256Gcm => {
                let mut c = AesGcm256Info {
                    info,
                    rec_seq,
                    ..Default::default()
                };
                c.key.copy_from_slice(key);
                c.salt.copy_from_slice(salt);
                c.iv.copy_from_slice(iv8);
                CryptoInfo::AesGcm256(c)
            }
            Cipher::Chacha20Poly1305 => {
                let mut c = Chacha20Poly1305Info {
                    info,
                    rec_seq,
                    ..Default::default()
                };
                c.key.copy_from_slice(key);
                c.iv.copy_from_slice(iv8);
                CryptoInfo::Chacha20Poly1305(c)
            }
        })
    }

    /// From one half of `rustls::ExtractedSecrets`.
    pub(crate) fn from_secrets(
        seq: u64,
        secrets: &ConnectionTrafficSecrets,
    ) -> Result<Self, KtlsError> {
        let (cipher, key, iv) = secret_parts(secrets)?;
        CryptoInfo::new(cipher, key, iv, seq)
    }

    pub(crate) fn cipher(&self) -> Cipher {
        match self {
            CryptoInfo::AesGcm128(_) => Cipher::Aes128Gcm,
            CryptoInfo::AesGcm256(_) => Cipher::Aes256Gcm,
            CryptoInfo::Chacha20Poly1305(_) => Cipher::Chacha20Poly1305,
        }
    }

    /// The bytes passed to `setsockopt`.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            CryptoInfo::AesGcm128(c) => struct_bytes(c),
            CryptoInfo::AesGcm256(c) => struct_bytes(c),
            CryptoInfo::Chacha20Poly1305(c) => struct_bytes(c),
        }
    }
}

impl Drop for CryptoInfo {
    fn drop(&mut self) {
        let bytes = match self {
            CryptoInfo::AesGcm128(c) => struct_bytes_mut(c),
            CryptoInfo::AesGcm256(c) => struct_bytes_mut(c),
            CryptoInfo::Chacha20Poly1305(c) => struct_bytes_mut(c),
        };
        zeroize(bytes);
    }
}

/// The cipher, key and IV of one half of `rustls::ExtractedSecrets`.
pub(crate) fn secret_parts(
    secrets: &ConnectionTrafficSecrets,
) -> Result<(Cipher, &[u8], &[u8]), KtlsError> {
    let (cipher, key, iv) = match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key, iv),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (Cipher::Chacha20Poly1305, key, iv)
        }
        // `ConnectionTrafficSecrets` is non-exhaustive; a future AEAD the kernel may not know
        // lands here.
        _ => return Err(KtlsError::UnsupportedCipher("unknown AEAD".into())),
    };
    Ok((cipher, key.as_ref(), iv.as_ref()))
}

/// Overwrites with zeros in a way the optimiser may not elide (the memory is about to be
/// freed, which would otherwise make the writes dead stores).
pub(crate) fn zeroize(bytes: &mut [u8]) {
    for b in bytes.iter_mut() {
        // SAFETY: `b` is a valid, aligned, exclusive reference.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

/// Marker for the `#[repr(C)]` byte-array structs above: no padding, every bit pattern
/// valid, so viewing them as bytes (and writing bytes into them) is sound.
pub(crate) trait Pod: Sized {}
impl Pod for TlsCryptoInfo {}
impl Pod for AesGcm128Info {}
impl Pod for AesGcm256Info {}
impl Pod for Chacha20Poly1305Info {}

pub(crate) fn struct_bytes<T: Pod>(t: &T) -> &[u8] {
    // SAFETY: `T: Pod` is only implemented for padding-free repr(C) structs of integers
    // and byte arrays, so all `size_of::<T>()` bytes are initialised.
    unsafe { std::slice::from_raw_parts((t as *const T).cast::<u8>(), mem::size_of::<T>()) }
}

pub(crate) fn struct_bytes_mut<T: Pod>(t: &mut T) -> &mut [u8] {
    // SAFETY: as in `struct_bytes`; additionally any byte pattern is a valid `T`.
    unsafe { std::slice::from_raw_parts_mut((t as *mut T).cast::<u8>(), mem::size_of::<T>()) }
}

fn setsockopt_bytes(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    val: &[u8],
) -> io::Result<()> {
    let len = libc::socklen_t::try_from(val.len())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `val` is a live buffer of `len` bytes; the kernel only reads it.
    let rc = unsafe { libc::setsockopt(fd, level, name, val.as_ptr().cast(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Returns how many bytes the kernel wrote into `buf`.
fn getsockopt_bytes(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut len = libc::socklen_t::try_from(buf.len())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `buf` is a live, writable buffer of `len` bytes and `len` is a valid
    // in/out length.
    let rc = unsafe { libc::getsockopt(fd, level, name, buf.as_mut_ptr().cast(), &mut len) };
    if rc == 0 {
        Ok(len as usize)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Attaches the kernel's `tls` upper-layer protocol to a connected TCP socket.
///
/// Until TLS_TX/TLS_RX are set the socket still behaves as plain TCP, so this can be done
/// *before* extracting secrets from rustls: if it fails, the connection stays in
/// userspace. Calling it on a socket that already has the `tls` ULP is a no-op.
pub fn enable_ulp(fd: RawFd) -> Result<(), KtlsError> {
    match setsockopt_bytes(fd, libc::IPPROTO_TCP, TCP_ULP, b"tls") {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            // Already has a ULP: fine if it is ours.
            let mut name = [0u8; 16];
            let n = getsockopt_bytes(fd, libc::IPPROTO_TCP, TCP_ULP, &mut name)
                .map_err(KtlsError::ulp)?;
            let name = &name[..n.min(name.len())];
            let name = name.split(|&b| b == 0).next().unwrap_or_default();
            if name == b"tls" {
                Ok(())
            } else {
                Err(KtlsError::ulp(e))
            }
        }
        Err(e) => Err(KtlsError::ulp(e)),
    }
}

pub(crate) fn set_crypto_info(fd: RawFd, dir: Direction, info: &CryptoInfo) -> io::Result<()> {
    setsockopt_bytes(fd, SOL_TLS, dir.optname(), info.as_bytes())
}

/// What `getsockopt(SOL_TLS, TLS_TX/TLS_RX)` reports for one direction (keys left out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CryptoState {
    /// TLS version the kernel runs (0x0304 for TLS 1.3).
    pub version: u16,
    /// The cipher, if the kernel reported one this crate knows.
    pub cipher: Option<Cipher>,
    /// The kernel's `TLS_CIPHER_*` number.
    pub cipher_type: u16,
    /// Sequence number of the next record in this direction.
    pub rec_seq: u64,
}

/// Reads back the kernel's state for one direction: proof that offload is active.
///
/// Fails with `EBUSY` when no keys are installed in that direction, and with
/// `ENOPROTOOPT` when the socket has no `tls` ULP.
pub fn get_crypto_state(fd: RawFd, dir: Direction) -> io::Result<CryptoState> {
    // First ask for the bare header: the kernel accepts exactly that size for any cipher,
    // whereas the full struct must match the cipher's size exactly.
    let mut hdr = TlsCryptoInfo::default();
    let n = getsockopt_bytes(fd, SOL_TLS, dir.optname(), struct_bytes_mut(&mut hdr))?;
    if n != mem::size_of::<TlsCryptoInfo>() {
        return Err(io::Error::other(format!(
            "getsockopt({dir}) returned {n} bytes, expected {}",
            mem::size_of::<TlsCryptoInfo>()
        )));
    }
    let cipher = Cipher::from_kernel_id(hdr.cipher_type);
    let mut rec_seq = [0u8; 8];
    // The kernel copies the keys out along with the sequence number; wipe them at once.
    match cipher {
        Some(Cipher::Aes128Gcm) => {
            let mut c = AesGcm128Info::default();
            let r = getsockopt_bytes(fd, SOL_TLS, dir.optname(), struct_bytes_mut(&mut c));
            rec_seq = c.rec_seq;
            zeroize(struct_bytes_mut(&mut c));
            r?;
        }
        Some(Cipher::Aes256Gcm) => {
            let mut c = AesGcm256Info::default();
            let r = getsockopt_bytes(fd, SOL_TLS, dir.optname(), struct_bytes_mut(&mut c));
            rec_seq = c.rec_seq;
            zeroize(struct_bytes_mut(&mut c));
            r?;
        }
        Some(Cipher::Chacha20Poly1305) => {
            let mut c = Chacha20Poly1305Info::default();
            let r = getsockopt_bytes(fd, SOL_TLS, dir.optname(), struct_bytes_mut(&mut c));
            rec_seq = c.rec_seq;
            zeroize(struct_bytes_mut(&mut c));
            r?;
        }
        None => {}
    }
    Ok(CryptoState {
        version: hdr.version,
        cipher,
        cipher_type: hdr.cipher_type,
        rec_seq: u64::from_be_bytes(rec_seq),
    })
}

/// Both directions' kernel state, `(tx, rx)`; see [`get_crypto_state`].
pub fn get_tls_tx_rx(fd: RawFd) -> io::Result<(CryptoState, CryptoState)> {
    Ok((
        get_crypto_state(fd, Direction::Tx)?,
        get_crypto_state(fd, Direction::Rx)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_match_uapi() {
        // include/uapi/linux/tls.h: sizeof() of each struct as the kernel checks it in
        // do_tls_setsockopt_conf (a mismatch is EINVAL).
        assert_eq!(mem::size_of::<TlsCryptoInfo>(), 4);
        assert_eq!(mem::size_of::<AesGcm128Info>(), 40);
        assert_eq!(mem::size_of::<AesGcm256Info>(), 56);
        assert_eq!(mem::size_of::<Chacha20Poly1305Info>(), 56);
        assert_eq!(mem::align_of::<AesGcm128Info>(), 2);
        // The same sizes as libc's definitions of the same structs.
        assert_eq!(
            mem::size_of::<AesGcm128Info>(),
            mem::size_of::<libc::tls12_crypto_info_aes_gcm_128>()
        );
        assert_eq!(
            mem::size_of::<AesGcm256Info>(),
            mem::size_of::<libc::tls12_crypto_info_aes_gcm_256>()
        );
        assert_eq!(
            mem::size_of::<Chacha20Poly1305Info>(),
            mem::size_of::<libc::tls12_crypto_info_chacha20_poly1305>()
        );
    }

    #[test]
    fn field_offsets_match_uapi() {
        let c = AesGcm128Info::default();
        let base = &c as *const _ as usize;
        assert_eq!(&c.iv as *const _ as usize - base, 4);
        assert_eq!(&c.key as *const _ as usize - base, 12);
        assert_eq!(&c.salt as *const _ as usize - base, 28);
        assert_eq!(&c.rec_seq as *const _ as usize - base, 32);
        let c = AesGcm256Info::default();
        let base = &c as *const _ as usize;
        assert_eq!(&c.iv as *const _ as usize - base, 4);
        assert_eq!(&c.key as *const _ as usize - base, 12);
        assert_eq!(&c.salt as *const _ as usize - base, 44);
        assert_eq!(&c.rec_seq as *const _ as usize - base, 48);
        let c = Chacha20Poly1305Info::default();
        let base = &c as *const _ as usize;
        assert_eq!(&c.iv as *const _ as usize - base, 4);
        assert_eq!(&c.key as *const _ as usize - base, 16);
        assert_eq!(&c.rec_seq as *const _ as usize - base, 48);
    }

    #[test]
    fn constants_match_libc() {
        assert_eq!(SOL_TLS, libc::SOL_TLS);
        assert_eq!(TCP_ULP, libc::TCP_ULP);
        assert_eq!(TLS_TX, libc::TLS_TX);
        assert_eq!(TLS_RX, libc::TLS_RX);
        assert_eq!(TLS_SET_RECORD_TYPE, libc::TLS_SET_RECORD_TYPE);
        assert_eq!(TLS_GET_RECORD_TYPE, libc::TLS_GET_RECORD_TYPE);
        assert_eq!(TLS_1_3_VERSION, libc::TLS_1_3_VERSION);
        assert_eq!(TLS_CIPHER_AES_GCM_128, libc::TLS_CIPHER_AES_GCM_128);
        assert_eq!(TLS_CIPHER_AES_GCM_256, libc::TLS_CIPHER_AES_GCM_256);
        assert_eq!(
            TLS_CIPHER_CHACHA20_POLY1305,
            libc::TLS_CIPHER_CHACHA20_POLY1305
        );
    }

    fn nonce() -> [u8; 12] {
        std::array::from_fn(|i| 0xa0 + i as u8)
    }

    #[test]
    fn gcm_nonce_split_is_salt4_iv8() {
        let n = nonce();
        let (salt, iv) = split_nonce(Cipher::Aes128Gcm, &n);
        assert_eq!(salt, &[0xa0, 0xa1, 0xa2, 0xa3]);
        assert_eq!(iv, &[0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab]);
        assert_eq!(split_nonce(Cipher::Aes256Gcm, &n), (salt, iv));
    }

    #[test]
    fn chacha_nonce_is_all_iv() {
        let n = nonce();
        let (salt, iv) = split_nonce(Cipher::Chacha20Poly1305, &n);
        assert!(salt.is_empty());
        assert_eq!(iv, &n[..]);
    }

    #[test]
    fn aes128_layout_bytes() {
        let key: Vec<u8> = (0..16).collect();
        let info =
            CryptoInfo::new(Cipher::Aes128Gcm, &key, &nonce(), 0x0102_0304_0506_0708).unwrap();
        let b = info.as_bytes();
        assert_eq!(b.len(), 40);
        assert_eq!(&b[0..2], &0x0304u16.to_ne_bytes());
        assert_eq!(&b[2..4], &51u16.to_ne_bytes());
        assert_eq!(&b[4..12], &nonce()[4..]);
        assert_eq!(&b[12..28], &key[..]);
        assert_eq!(&b[28..32], &nonce()[..4]);
        assert_eq!(&b[32..40], &[1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn aes256_layout_bytes() {
        let key: Vec<u8> = (100..132).collect();
        let info = CryptoInfo::new(Cipher::Aes256Gcm, &key, &nonce(), 7).unwrap();
        let b = info.as_bytes();
        assert_eq!(b.len(), 56);
        assert_eq!(&b[2..4], &52u16.to_ne_bytes());
        assert_eq!(&b[4..12], &nonce()[4..]);
        assert_eq!(&b[12..44], &key[..]);
        assert_eq!(&b[44..48], &nonce()[..4]);
        assert_eq!(&b[48..56], &[0, 0, 0, 0, 0, 0, 0, 7]);
    }

    #[test]
    fn chacha_layout_bytes() {
        let key: Vec<u8> = (200..232).collect();
        let info = CryptoInfo::new(Cipher::Chacha20Poly1305, &key, &nonce(), u64::MAX - 1).unwrap();
        let b = info.as_bytes();
        assert_eq!(b.len(), 56);
        assert_eq!(&b[2..4], &54u16.to_ne_bytes());
        assert_eq!(&b[4..16], &nonce()[..]);
        assert_eq!(&b[16..48], &key[..]);
        assert_eq!(
            &b[48..56],
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]
        );
    }

    #[test]
    fn wrong_lengths_are_errors_not_panics() {
        let e = CryptoInfo::new(Cipher::Aes128Gcm, &[0; 32], &nonce(), 0)
            .err()
            .unwrap();
        assert!(matches!(
            e,
            KtlsError::BadSecretLength {
                what: "key",
                got: 32,
                want: 16,
                ..
            }
        ));
        let e = CryptoInfo::new(Cipher::Chacha20Poly1305, &[0; 32], &[0; 8], 0)
            .err()
            .unwrap();
        assert!(matches!(
            e,
            KtlsError::BadSecretLength {
                what: "iv",
                got: 8,
                want: 12,
                ..
            }
        ));
    }

    #[test]
    fn from_rustls_secrets() {
        let mut key = [0u8; 32];
        key.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        let secrets = ConnectionTrafficSecrets::Chacha20Poly1305 {
            key: rustls::crypto::cipher::AeadKey::from(key),
            iv: rustls::crypto::cipher::Iv::from(nonce()),
        };
        let info = CryptoInfo::from_secrets(3, &secrets).unwrap();
        assert_eq!(info.cipher(), Cipher::Chacha20Poly1305);
        assert_eq!(&info.as_bytes()[16..48], &key[..]);
        assert_eq!(Cipher::of_secrets(&secrets), Some(Cipher::Chacha20Poly1305));
    }

    #[test]
    fn cipher_ids_round_trip() {
        for c in Cipher::ALL {
            assert_eq!(Cipher::from_kernel_id(c.kernel_id()), Some(c));
        }
        assert_eq!(Cipher::from_kernel_id(53), None); // TLS_CIPHER_AES_CCM_128
        assert_eq!(
            Cipher::from_suite(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384),
            Some(Cipher::Aes256Gcm)
        );
        assert_eq!(
            Cipher::from_suite(rustls::CipherSuite::TLS13_AES_128_CCM_SHA256),
            None
        );
    }
}
