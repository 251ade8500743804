//! Which record layer carries a connection, as the access log names it.

use std::fmt;

use tls_kernel_offload::Cipher;

/// Which record layer carries an HBONE connection, per direction: the access log's
/// `tls=… ktls.tx=… ktls.rx=… tls.cipher=…`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsPath {
    /// The kernel encrypts what we send.
    pub ktls_tx: bool,
    /// The kernel decrypts what we receive.
    pub ktls_rx: bool,
    /// The negotiated cipher suite.
    pub cipher: Option<Cipher>,
}

impl TlsPath {
    /// Userspace rustls both ways, with the suite the handshake negotiated.
    pub fn userspace(cipher: Option<Cipher>) -> TlsPath {
        TlsPath {
            ktls_tx: false,
            ktls_rx: false,
            cipher,
        }
    }

    /// `ktls`, `userspace`, or `ktls-tx` / `ktls-rx` for a half-offloaded connection.
    pub fn name(self) -> &'static str {
        match (self.ktls_tx, self.ktls_rx) {
            (true, true) => "ktls",
            (false, false) => "userspace",
            (true, false) => "ktls-tx",
            (false, true) => "ktls-rx",
        }
    }
}

impl fmt::Display for TlsPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tls={} ktls.tx={} ktls.rx={} tls.cipher={}",
            self.name(),
            self.ktls_tx,
            self.ktls_rx,
            self.cipher.map_or("-", Cipher::name)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_names() {
        assert_eq!(
            TlsPath::userspace(None).to_string(),
            "tls=userspace ktls.tx=false ktls.rx=false tls.cipher=-"
        );
        let both = TlsPath {
            ktls_tx: true,
            ktls_rx: true,
            cipher: Some(Cipher::Aes128Gcm),
        };
        assert_eq!(
            both.to_string(),
            "tls=ktls ktls.tx=true ktls.rx=true tls.cipher=aes-128-gcm"
        );
    }
}
