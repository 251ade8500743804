//! The TLS settings a shard (or one of its pods) hands new HBONE handshakes, and their
//! replacement when the control side renews a certificate (`ShardMsg::Certificate`).
//!
//! A connection takes the current settings once, as it starts its handshake (an `Rc` clone: no
//! lock, no shared atomic); a renewal swaps what the next one takes. Connections already up
//! keep the certificate they were authenticated with, and so do pooled HBONE connections: as
//! in ztunnel, whose pool keys connections by identities and not by certificate, a pooled
//! connection made with the previous certificate keeps taking streams until it closes (idle
//! release or the peer). That is sound: the peer checked a certificate that was valid when it
//! was presented, and a renewal comes at half its life, not because it was revoked.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use crate::tls::TlsMaterial;

/// One certificate's TLS settings, as handshakes on this shard use them.
pub struct ShardTls {
    /// The material (certificate, key, roots) they were made of.
    pub material: Arc<TlsMaterial>,
    /// TLS acceptor for 15008.
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// TLS connector for outbound HBONE.
    pub connector: tokio_rustls::TlsConnector,
}

impl ShardTls {
    fn new(material: Arc<TlsMaterial>) -> Self {
        ShardTls {
            acceptor: tokio_rustls::TlsAcceptor::from(material.server.clone()),
            connector: tokio_rustls::TlsConnector::from(material.client.clone()),
            material,
        }
    }
}

/// The current [`ShardTls`] of one identity on one shard; replaced on renewal.
pub struct TlsSlot(RefCell<Rc<ShardTls>>);

impl TlsSlot {
    /// A slot holding `material`.
    pub fn new(material: Arc<TlsMaterial>) -> Self {
        TlsSlot(RefCell::new(Rc::new(ShardTls::new(material))))
    }

    /// What a handshake starting now uses.
    pub fn current(&self) -> Rc<ShardTls> {
        self.0.borrow().clone()
    }

    /// New handshakes use `material` from now on; the ones under way and the connections
    /// made keep what they took.
    pub fn replace(&self, material: Arc<TlsMaterial>) {
        *self.0.borrow_mut() = Rc::new(ShardTls::new(material));
    }
}
