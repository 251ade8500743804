//! The kTLS start-up probe: asked once per process, before any shard starts.

use tls_kernel_offload::{self as ktls, Capability};

use crate::options::{KtlsMode, TlsRecords};
use crate::EngineError;

/// Probes the kernel once at startup (unless `--ktls off`), logs what it found and which
/// userspace record layer (`records`) carries what the kernel does not, and returns the
/// capability HBONE connections should use, `None` for userspace TLS. With `--ktls on` a
/// kernel without usable kTLS is an error.
pub fn startup(mode: KtlsMode, records: TlsRecords) -> Result<Option<Capability>, EngineError> {
    let userspace = match records {
        TlsRecords::Own => "userspace TLS: rustls for the handshake, then ringtun's record layer with its keys (--tls-records own)",
        TlsRecords::Rustls => "userspace rustls (--tls-records rustls)",
    };
    if mode == KtlsMode::Off {
        tracing::info!("kTLS off (--ktls off): HBONE connections use {userspace}");
        return Ok(None);
    }
    let cap = ktls::probe();
    if cap.is_available() {
        tracing::info!(
            ktls = %mode,
            "{cap}; HBONE connections hand their TLS record layer to the kernel after the handshake"
        );
        Ok(Some(cap))
    } else if mode == KtlsMode::On {
        Err(EngineError::KtlsUnavailable {
            reason: cap.to_string(),
        })
    } else {
        tracing::info!(ktls = %mode, "{cap}; HBONE connections use {userspace}");
        Ok(None)
    }
}
