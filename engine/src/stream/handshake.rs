//! The start of every HBONE connection, one sequence for both ends: TLS handshake, the
//! peer's identity, [`establish`] (kTLS or userspace), HTTP/2 handshake.

use std::future::Future;
use std::io;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use monoio::net::tcp::stream_poll::TcpStreamPoll;
use ringtun_hbone::{HboneError, Identity};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};

use crate::options::TlsRecords;

use super::{establish, FlushTick, HandshakeIo, HboneIo, KeyBudget, OffloadError, StreamCtx};
use super::{Established, TlsPath};

/// Which step of the start of an HBONE connection failed. The TLS handshake and the switch
/// to kTLS each have [`StreamCtx::handshake_timeout`]; the HTTP/2 handshake has h2's own.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The TLS handshake failed (the peer refused ours, or we refused the peer).
    #[error("{0}")]
    Tls(io::Error),
    /// The TLS handshake did not finish in time.
    #[error("timed out after {0:?}")]
    TlsTimeout(Duration),
    /// The peer's certificate names no identity this end accepts.
    #[error("{0}")]
    Identity(HboneError),
    /// The connection was lost between the TLS handshake and its first HTTP/2 byte.
    #[error("{0}")]
    Establish(OffloadError),
    /// Switching to kTLS did not finish in time.
    #[error("switching to kTLS timed out after {0:?}")]
    EstablishTimeout(Duration),
    /// The HTTP/2 handshake failed.
    #[error("HTTP/2 handshake: {0}")]
    H2(h2::Error),
}

/// An HBONE connection ready for streams.
#[derive(Debug)]
pub struct Handshaken<H> {
    /// The HTTP/2 side: the client's request handle and connection, or the server's
    /// connection.
    pub h2: H,
    /// Who the peer is, from its certificate.
    pub peer: Identity,
    /// Poll the h2 connection through this (see [`FlushTick`]).
    pub tick: Rc<FlushTick>,
    /// How its records are carried.
    pub path: TlsPath,
    /// The TX key budget of an offloaded connection.
    pub budget: Option<Rc<KeyBudget>>,
}

/// What the client end of a connection runs h2 on.
pub type ClientH2 = (
    h2::client::SendRequest<Bytes>,
    h2::client::Connection<HboneIo, Bytes>,
);

/// What the server end of a connection runs h2 on.
pub type ServerH2 = h2::server::Connection<HboneIo, Bytes>;

/// Opens an HBONE connection over `tcp` (connected to `name`) as the TLS and HTTP/2 client.
pub async fn client(
    ctx: &Rc<StreamCtx>,
    connector: &TlsConnector,
    name: ServerName<'static>,
    tcp: TcpStreamPoll,
    identify: impl FnOnce(Option<&[CertificateDer<'_>]>) -> Result<Identity, HboneError>,
    h2: h2::client::Builder,
) -> Result<Handshaken<ClientH2>, HandshakeError> {
    run(
        ctx,
        || async move {
            connector
                .connect(name, corked(ctx, tcp))
                .await
                .map(TlsStream::from)
        },
        identify,
        |io| async move { h2.handshake::<_, Bytes>(io).await },
    )
    .await
}

/// Accepts an HBONE connection on `tcp` as the TLS and HTTP/2 server.
pub async fn server(
    ctx: &Rc<StreamCtx>,
    acceptor: &TlsAcceptor,
    tcp: TcpStreamPoll,
    identify: impl FnOnce(Option<&[CertificateDer<'_>]>) -> Result<Identity, HboneError>,
    h2: h2::server::Builder,
) -> Result<Handshaken<ServerH2>, HandshakeError> {
    run(
        ctx,
        || async move { acceptor.accept(corked(ctx, tcp)).await.map(TlsStream::from) },
        identify,
        |io| h2.handshake::<_, Bytes>(io),
    )
    .await
}

/// Corked when kTLS or ringtun's own record layer may follow, so the handshake never reads
/// past a TLS record.
fn corked(ctx: &StreamCtx, tcp: TcpStreamPoll) -> HandshakeIo {
    // Both the kernel and ringtun's own record layer take over from rustls at a record
    // boundary.
    HandshakeIo::new(tcp, ctx.ktls.is_some() || ctx.records == TlsRecords::Own)
}

/// The sequence both ends share. Each step's future is made where it is awaited (`tls`, like
/// `h2_handshake`, makes it): one passed in would be kept twice in this function's state,
/// once as the argument and once in the timeout around it, and that state is part of every
/// inbound connection's task for its whole life.
async fn run<T, H, F>(
    ctx: &Rc<StreamCtx>,
    tls: impl FnOnce() -> T,
    identify: impl FnOnce(Option<&[CertificateDer<'_>]>) -> Result<Identity, HboneError>,
    h2_handshake: impl FnOnce(HboneIo) -> F,
) -> Result<Handshaken<H>, HandshakeError>
where
    T: Future<Output = io::Result<TlsStream<HandshakeIo>>>,
    F: Future<Output = Result<H, h2::Error>>,
{
    let timeout = ctx.handshake_timeout;
    let tls = match monoio::time::timeout(timeout, tls()).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return Err(HandshakeError::Tls(e)),
        Err(_) => return Err(HandshakeError::TlsTimeout(timeout)),
    };
    let peer = identify(tls.get_ref().1.peer_certificates()).map_err(HandshakeError::Identity)?;
    // kTLS where possible, else rustls: the same h2 code runs on either.
    let Established {
        io,
        tick,
        path,
        budget,
    } = match monoio::time::timeout(timeout, establish(ctx, tls)).await {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => return Err(HandshakeError::Establish(e)),
        Err(_) => return Err(HandshakeError::EstablishTimeout(timeout)),
    };
    let h2 = h2_handshake(io).await.map_err(HandshakeError::H2)?;
    Ok(Handshaken {
        h2,
        peer,
        tick,
        path,
        budget,
    })
}
