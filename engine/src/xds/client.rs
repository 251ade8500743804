//! The Delta ADS client: one thread with a current-thread tokio runtime of its own (control
//! traffic, never on a shard). It keeps one stream to istiod, answers every response at once
//! (ACK, or NACK naming what was refused), and hands the control thread what changed (a
//! [`Delta`]) once both types are synced: the changes held back until then come in the first
//! one, and those of a stream that broke are kept for the next. A broken stream is reopened with backoff (10 ms
//! doubling to 15 s, as ztunnel), resubscribing with what is already held.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crossbeam_channel::{Receiver, Sender};
use tonic::codec::ProstCodec;

use super::error::XdsError;
use super::node::XdsOptions;
use super::proto::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, DELTA_ADS_PATH};
use super::session::{Session, ADDRESS_TYPE, TYPES};
use super::status::{Answered, SharedXdsStatus, Termination, XdsStatus};
use crate::config::Delta;

/// ztunnel's first retry delay.
const INITIAL_BACKOFF: Duration = Duration::from_millis(10);
/// ztunnel's longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// ztunnel's limit on one response (a large mesh's first push).
const MAX_MESSAGE: usize = 200 << 20;

/// Changes from istiod, to apply in order to the config in force (the first one to an empty
/// config).
#[derive(Clone, Debug)]
pub struct XdsUpdate {
    /// Workloads, services and policies put or removed, keyed by xDS name.
    pub delta: Delta,
}

/// The running client, seen from the control thread.
pub struct XdsHandle {
    /// Changes, oldest first; the first one comes once both types are synced.
    pub updates: Receiver<XdsUpdate>,
    /// What the client has seen, kept current by its thread.
    pub status: SharedXdsStatus,
}

/// Starts the client on its own thread.
pub fn spawn(opts: XdsOptions) -> Result<XdsHandle, XdsError> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let status = Arc::new(Mutex::new(XdsStatus::new(&opts.endpoint.url, &TYPES)));
    let shared = Arc::clone(&status);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(XdsError::Thread)?;
    std::thread::Builder::new()
        .name("ringtun-xds".into())
        .spawn(move || runtime.block_on(run(opts, tx, shared)))
        .map_err(XdsError::Thread)?;
    Ok(XdsHandle {
        updates: rx,
        status,
    })
}

/// How a stream ended without an error.
enum Ended {
    /// istiod closed it: reconnect at once.
    Closed,
    /// Nobody takes updates any more: stop.
    Unwanted,
}

/// Records on the shared status (a poisoned lock only loses figures).
fn record(status: &SharedXdsStatus, f: impl FnOnce(&mut XdsStatus)) {
    if let Ok(mut s) = status.lock() {
        f(&mut s);
    }
}

async fn run(opts: XdsOptions, tx: Sender<XdsUpdate>, status: SharedXdsStatus) {
    let mut session = Session::new(opts.node.node());
    let mut pending = Delta::default();
    let mut backoff = INITIAL_BACKOFF;
    tracing::info!(
        address = %opts.endpoint.url,
        node = %session_node_id(&opts),
        "connecting to the control plane"
    );
    loop {
        let mut answered = false;
        let ended = stream_once(
            &opts,
            &mut session,
            &mut pending,
            &tx,
            &status,
            &mut answered,
        )
        .await;
        let established = status.lock().map(|s| s.is_connected()).unwrap_or(false);
        let why = match &ended {
            Ok(_) => Termination::Complete,
            Err(_) if established => Termination::Error,
            Err(_) => Termination::ConnectionError,
        };
        record(&status, |s| s.disconnected(why));
        match ended {
            Ok(Ended::Unwanted) => return,
            Ok(Ended::Closed) => {
                tracing::info!("xDS stream closed by the control plane; reconnecting");
                backoff = INITIAL_BACKOFF;
                continue;
            }
            Err(e) => {
                if answered {
                    backoff = INITIAL_BACKOFF;
                }
                tracing::warn!(error = %e, retry_in = ?backoff, "xDS stream failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

fn session_node_id(opts: &XdsOptions) -> String {
    opts.node.node().id
}

async fn stream_once(
    opts: &XdsOptions,
    session: &mut Session,
    pending: &mut Delta,
    tx: &Sender<XdsUpdate>,
    status: &SharedXdsStatus,
    answered: &mut bool,
) -> Result<Ended, XdsError> {
    let channel = opts.endpoint.connect().await?;
    let (req_tx, req_rx) = tokio::sync::mpsc::unbounded_channel::<DeltaDiscoveryRequest>();
    for r in session.initial_requests() {
        tracing::debug!(
            type_url = r.type_url,
            known = r.initial_resource_versions.len(),
            "xDS subscribe"
        );
        let _ = req_tx.send(r);
    }
    let outbound =
        futures_util::stream::unfold(
            req_rx,
            |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
        );
    let mut request = tonic::Request::new(outbound);
    opts.endpoint.authorize(&mut request)?;
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_MESSAGE);
    grpc.ready()
        .await
        .map_err(|e| XdsError::Connect(super::channel::error_chain(&e)))?;
    let codec = ProstCodec::<DeltaDiscoveryRequest, DeltaDiscoveryResponse>::default();
    let path = http::uri::PathAndQuery::from_static(DELTA_ADS_PATH);
    let mut responses = grpc.streaming(request, path, codec).await?.into_inner();
    tracing::info!(address = %opts.endpoint.url, "xDS stream established");
    record(status, |s| s.connected(SystemTime::now()));
    while let Some(resp) = responses.message().await? {
        *answered = true;
        let (type_url, nonce) = (resp.type_url.clone(), resp.nonce.clone());
        let version = resp.system_version_info.clone();
        let (added, removed) = (resp.resources.len(), resp.removed_resources.len());
        // What ztunnel counts as a message's size: its resources' encoded values.
        let bytes = resp
            .resources
            .iter()
            .filter_map(|r| r.resource.as_ref())
            .map(|a| a.value.len() as u64)
            .sum();
        let mut handled = session.handle(resp);
        pending.append(std::mem::take(&mut handled.delta));
        let (workloads, services, policies) = session.counts();
        let held = if type_url == ADDRESS_TYPE {
            workloads + services
        } else {
            policies
        };
        record(status, |s| {
            s.received(&type_url, bytes);
            s.answered(
                Answered {
                    type_url: &type_url,
                    version: &version,
                    nonce: &nonce,
                    resources: held,
                    rejected: handled.rejected.iter().map(|r| r.name.clone()).collect(),
                    nack: handled.nack(),
                },
                SystemTime::now(),
            )
        });
        match handled.nack() {
            Some(error) => tracing::error!(
                type_url,
                nonce,
                added,
                removed,
                error,
                "xDS response refused (NACK); the previous state of those resources stays"
            ),
            None => tracing::debug!(type_url, nonce, added, removed, "xDS response applied"),
        }
        if req_tx.send(handled.reply).is_err() {
            return Ok(Ended::Closed);
        }
        if session.synced() && (!pending.is_empty() || handled.synced_now) {
            let (workloads, services, policies) = session.counts();
            let changes = pending.len();
            tracing::debug!(workloads, services, policies, changes, "xDS config changed");
            let delta = std::mem::take(pending);
            if tx.send(XdsUpdate { delta }).is_err() {
                return Ok(Ended::Unwanted);
            }
        }
    }
    Ok(Ended::Closed)
}
