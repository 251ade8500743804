//! Finding out, once at startup, what this kernel's kTLS can do.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;

use crate::crypto_info::{enable_ulp, set_crypto_info, CryptoInfo};
use crate::error::errno_desc;
use crate::{Cipher, Direction, KtlsError};

/// Which directions the kernel accepted keys for, for one cipher.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Support {
    /// `setsockopt(SOL_TLS, TLS_TX)` accepted the cipher.
    pub tx: bool,
    /// `setsockopt(SOL_TLS, TLS_RX)` accepted the cipher.
    pub rx: bool,
}

impl Support {
    /// Both directions work, which is what [`crate::enable`] needs.
    pub fn both(self) -> bool {
        self.tx && self.rx
    }
}

/// Why kTLS cannot be used at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    /// The errno of the failing call, when there was one (`ENOENT`: no `tls` module).
    pub errno: Option<i32>,
    /// One line for the log: what failed and what it means.
    pub reason: String,
}

/// What [`probe`] found. `Display` gives a one-line summary for the startup log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    /// `None` when `setsockopt(TCP_ULP, "tls")` works; otherwise why it does not.
    pub unavailable: Option<Unavailable>,
    /// TLS 1.3 AES-128-GCM.
    pub aes_128_gcm: Support,
    /// TLS 1.3 AES-256-GCM.
    pub aes_256_gcm: Support,
    /// TLS 1.3 ChaCha20-Poly1305.
    pub chacha20_poly1305: Support,
    /// The kernel takes new keys on a socket that already has some (TLS 1.3 rekey, Linux
    /// 6.14 and later): a second `setsockopt(TLS_TX)` or `TLS_RX` with the same cipher is
    /// accepted instead of failing with `EBUSY`. Both directions came with the same kernel
    /// change, which also pauses decryption after a peer's KeyUpdate until the next RX key
    /// is set.
    pub rekey: bool,
}

impl Capability {
    fn unavailable(errno: Option<i32>, reason: String) -> Self {
        Capability {
            unavailable: Some(Unavailable { errno, reason }),
            aes_128_gcm: Support::default(),
            aes_256_gcm: Support::default(),
            chacha20_poly1305: Support::default(),
            rekey: false,
        }
    }

    /// What the kernel accepted for `cipher`.
    pub fn support(&self, cipher: Cipher) -> Support {
        match cipher {
            Cipher::Aes128Gcm => self.aes_128_gcm,
            Cipher::Aes256Gcm => self.aes_256_gcm,
            Cipher::Chacha20Poly1305 => self.chacha20_poly1305,
        }
    }

    fn support_mut(&mut self, cipher: Cipher) -> &mut Support {
        match cipher {
            Cipher::Aes128Gcm => &mut self.aes_128_gcm,
            Cipher::Aes256Gcm => &mut self.aes_256_gcm,
            Cipher::Chacha20Poly1305 => &mut self.chacha20_poly1305,
        }
    }

    /// Whether connections using `cipher` can be fully offloaded.
    pub fn can_offload(&self, cipher: Cipher) -> bool {
        self.unavailable.is_none() && self.support(cipher).both()
    }

    /// Whether a connection that negotiated `suite` can be fully offloaded; check this
    /// *before* extracting secrets so an unsupported connection stays in userspace.
    pub fn can_offload_suite(&self, suite: rustls::CipherSuite) -> bool {
        Cipher::from_suite(suite).is_some_and(|c| self.can_offload(c))
    }

    /// Whether at least one cipher can be fully offloaded.
    pub fn is_available(&self) -> bool {
        Cipher::ALL.into_iter().any(|c| self.can_offload(c))
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(u) = &self.unavailable {
            return write!(f, "kTLS unavailable: {}", u.reason);
        }
        f.write_str(if self.is_available() {
            "kTLS available:"
        } else {
            "kTLS unavailable (TLS ULP present but no TLS 1.3 cipher accepted):"
        })?;
        for (i, c) in Cipher::ALL.into_iter().enumerate() {
            let s = self.support(c);
            let what = match (s.tx, s.rx) {
                (true, true) => "tx+rx",
                (true, false) => "tx only",
                (false, true) => "rx only",
                (false, false) => "no",
            };
            write!(f, "{} {c} {what}", if i == 0 { "" } else { "," })?;
        }
        f.write_str(if self.rekey {
            "; kernel rekey: yes"
        } else {
            "; kernel rekey: no"
        })
    }
}

/// Connected loopback pair: the ULP and keys need an established TCP connection.
fn loopback_pair(listener: &TcpListener) -> io::Result<(TcpStream, TcpStream)> {
    let client = TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    Ok((client, server))
}

fn loopback_listener() -> io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .or_else(|_| TcpListener::bind(SocketAddr::from((Ipv6Addr::LOCALHOST, 0))))
}

/// Probes the running kernel: can a connected TCP socket take the `tls` ULP, and which
/// TLS 1.3 ciphers does it accept keys for, per direction?
///
/// Uses throwaway loopback connections with dummy all-zero keys (no data ever flows on
/// them), so it costs a few syscalls and one ephemeral port. Never panics: any failure
/// becomes [`Capability`]`::unavailable` with the reason. Run it once at startup, log its
/// `Display`, and consult [`Capability::can_offload_suite`] per connection.
pub fn probe() -> Capability {
    let listener = match loopback_listener() {
        Ok(l) => l,
        Err(e) => {
            return Capability::unavailable(
                e.raw_os_error(),
                format!(
                    "cannot probe: no loopback TCP listener ({}); is `lo` up in this network \
                     namespace?",
                    errno_desc(&e)
                ),
            )
        }
    };
    let mut cap = Capability {
        unavailable: None,
        aes_128_gcm: Support::default(),
        aes_256_gcm: Support::default(),
        chacha20_poly1305: Support::default(),
        rekey: false,
    };
    for cipher in Cipher::ALL {
        // A fresh pair per cipher: keys can be installed only once per direction (on
        // kernels without rekey support) and a failed attempt may leave state behind.
        let (client, _server) = match loopback_pair(&listener) {
            Ok(p) => p,
            Err(e) => {
                return Capability::unavailable(
                    e.raw_os_error(),
                    format!("cannot probe: loopback connect failed ({})", errno_desc(&e)),
                )
            }
        };
        let fd = client.as_raw_fd();
        if let Err(e) = enable_ulp(fd) {
            return match e {
                KtlsError::Ulp { source, hint } => Capability::unavailable(
                    source.raw_os_error(),
                    format!(
                        "setsockopt(TCP_ULP, \"tls\") failed with {}: {hint}",
                        errno_desc(&source)
                    ),
                ),
                e => Capability::unavailable(None, e.to_string()),
            };
        }
        let info = match CryptoInfo::new(cipher, &vec![0; cipher.key_len()], &[0; 12], 0) {
            Ok(i) => i,
            Err(e) => return Capability::unavailable(None, e.to_string()),
        };
        let s = cap.support_mut(cipher);
        s.tx = set_crypto_info(fd, Direction::Tx, &info).is_ok();
        s.rx = set_crypto_info(fd, Direction::Rx, &info).is_ok();
        let (tx, rx) = (s.tx, s.rx);
        // Keys again on the same socket: `EBUSY` before Linux 6.14, accepted where the
        // kernel can rekey. TX first: an RX key may be refused while no KeyUpdate from the
        // peer is pending, which would say nothing about the kernel.
        let again = (tx && set_crypto_info(fd, Direction::Tx, &info).is_ok())
            || (rx && set_crypto_info(fd, Direction::Rx, &info).is_ok());
        cap.rekey |= again;
        tracing::debug!(%cipher, tx, rx, rekey = again, "kTLS probe");
    }
    cap
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_lines() {
        let full = Support { tx: true, rx: true };
        let cap = Capability {
            unavailable: None,
            aes_128_gcm: full,
            aes_256_gcm: full,
            chacha20_poly1305: Support {
                tx: true,
                rx: false,
            },
            rekey: false,
        };
        assert_eq!(
            cap.to_string(),
            "kTLS available: aes-128-gcm tx+rx, aes-256-gcm tx+rx, chacha20-poly1305 tx only; kernel rekey: no"
        );
        assert!(cap.can_offload(Cipher::Aes256Gcm));
        assert!(!cap.can_offload(Cipher::Chacha20Poly1305));
        assert!(cap.can_offload_suite(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
        assert!(!cap.can_offload_suite(rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256));

        let none = Capability::unavailable(Some(libc::ENOENT), "no module".into());
        assert_eq!(none.to_string(), "kTLS unavailable: no module");
        assert!(!none.is_available());
    }

    /// On a host without kTLS (like the 6.18 dev box built without CONFIG_TLS) the probe
    /// must come back "unavailable" with the errno and an explanation, not panic; on a
    /// host with kTLS it must report AES-GCM both ways (every kTLS kernel since 5.1 has
    /// TLS 1.3 AES-128-GCM).
    #[test]
    fn probe_reports_reason_or_ciphers() {
        let cap = probe();
        eprintln!("{cap}");
        match &cap.unavailable {
            Some(u) => {
                assert!(u.errno.is_some(), "no errno in {u:?}");
                assert!(cap.to_string().starts_with("kTLS unavailable: "));
                if u.errno == Some(libc::ENOENT) {
                    assert!(u.reason.contains("ENOENT"), "{}", u.reason);
                    assert!(u.reason.contains("CONFIG_TLS"), "{}", u.reason);
                }
            }
            None => assert!(cap.can_offload(Cipher::Aes128Gcm), "{cap}"),
        }
    }
}
