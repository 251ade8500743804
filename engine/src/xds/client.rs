//! The Delta ADS client: one thread with a current-thread tokio runtime of its own (control
//! traffic, never on a shard). It keeps one stream to istiod, answers every response at once
//! (ACK, or NACK naming what was refused), and hands the control thread what changed (a
//! [`Delta`]) once both types are synced: the changes held back until then come in the first
//! one, and those of a stream that broke are kept for the next. A broken stream is reopened with backoff (10 ms
//! doubling to 15 s, as ztunnel), resubscribing with what is already held.
//!
//! With on-demand addresses the shards ask for unknown destinations through a [`Demander`]:
//! each address is asked for on the open stream at once (or on the next one, whose first
//! request names it), and the update that answers it names it in [`XdsUpdate::answered`].

use std::net::IpAddr;
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
    /// On-demand addresses istiod answered (with `delta` applied, found or not).
    pub answered: Vec<IpAddr>,
    /// Whether `delta` is due as a new config even if empty (the first sync); otherwise an
    /// empty one only carries answers.
    pub config_due: bool,
}

/// Asks the client for addresses on demand; cheap to clone, usable from any thread.
#[derive(Clone, Debug)]
pub struct Demander {
    tx: tokio::sync::mpsc::UnboundedSender<IpAddr>,
    /// How long a connection waits for the answer (`XDS_ON_DEMAND_TIMEOUT`).
    pub wait: Duration,
}

impl Demander {
    /// A demander waiting `wait` for answers, and the end the client reads its demands from.
    pub fn channel(wait: Duration) -> (Demander, tokio::sync::mpsc::UnboundedReceiver<IpAddr>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (Demander { tx, wait }, rx)
    }

    /// Asks istiod for `ip`; `false` when the client has stopped.
    pub fn ask(&self, ip: IpAddr) -> bool {
        self.tx.send(ip).is_ok()
    }
}

/// The running client, seen from the control thread.
pub struct XdsHandle {
    /// Changes, oldest first; the first one comes once both types are synced.
    pub updates: Receiver<XdsUpdate>,
    /// What the client has seen, kept current by its thread.
    pub status: SharedXdsStatus,
    /// Where shards ask for unknown destinations, when on-demand is on.
    pub demander: Option<Demander>,
}

/// Starts the client on its own thread.
pub fn spawn(opts: XdsOptions) -> Result<XdsHandle, XdsError> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let status = Arc::new(Mutex::new(XdsStatus::new(&opts.endpoint.url, &TYPES)));
    let shared = Arc::clone(&status);
    let (demander, demand_rx) = Demander::channel(opts.on_demand.unwrap_or_default());
    let demander = opts.on_demand.map(|_| demander);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(XdsError::Thread)?;
    std::thread::Builder::new()
        .name("ringtun-xds".into())
        .spawn(move || runtime.block_on(run(opts, tx, shared, demand_rx)))
        .map_err(XdsError::Thread)?;
    Ok(XdsHandle {
        updates: rx,
        status,
        demander,
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

/// What a stream hands on: changes and answers not yet sent to the control thread.
#[derive(Default)]
struct Pending {
    delta: Delta,
    answered: Vec<IpAddr>,
}

async fn run(
    opts: XdsOptions,
    tx: Sender<XdsUpdate>,
    status: SharedXdsStatus,
    demands: tokio::sync::mpsc::UnboundedReceiver<IpAddr>,
) {
    let mut session = Session::new(opts.node.node());
    if opts.on_demand.is_some() {
        session = session.on_demand("");
    }
    // Off: never read, so no demand is taken from a sender nobody has.
    let mut demands = opts.on_demand.map(|_| demands);
    let mut pending = Pending::default();
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
            &mut demands,
        )
        .await;
        let established = status.lock().map(|s| s.is_connected()).unwrap_or(false);
        let why = match &ended {
            Ok(_) => Termination::Complete,
            Err(e) if e.is_reconnect() => Termination::Reconnect,
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
            Err(e) if e.is_reconnect() => {
                // As ztunnel: a routine end, not a failure; back to the first backoff.
                tracing::debug!(error = %e, "xDS stream ended; reconnecting");
                backoff = INITIAL_BACKOFF;
                tokio::time::sleep(backoff).await;
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

/// The next address a shard asks for; never, when on-demand is off or nobody can ask.
async fn next_demand(demands: &mut Option<tokio::sync::mpsc::UnboundedReceiver<IpAddr>>) -> IpAddr {
    if let Some(rx) = demands {
        if let Some(ip) = rx.recv().await {
            return ip;
        }
        *demands = None;
    }
    std::future::pending().await
}

async fn stream_once(
    opts: &XdsOptions,
    session: &mut Session,
    pending: &mut Pending,
    tx: &Sender<XdsUpdate>,
    status: &SharedXdsStatus,
    answered: &mut bool,
    demands: &mut Option<tokio::sync::mpsc::UnboundedReceiver<IpAddr>>,
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
    loop {
        // Both branches are cancel-safe: a demand is taken whole, a response read whole.
        let resp = tokio::select! {
            ip = next_demand(demands) => {
                if let Some(req) = session.demand(ip) {
                    tracing::debug!(name = ?req.resource_names_subscribe, "xDS on-demand request");
                    if req_tx.send(req).is_err() {
                        return Ok(Ended::Closed);
                    }
                }
                continue;
            }
            msg = responses.message() => match msg? {
                Some(resp) => resp,
                None => return Ok(Ended::Closed),
            },
        };
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
        pending.delta.append(std::mem::take(&mut handled.delta));
        pending.answered.append(&mut handled.answered);
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
        let config_due = !pending.delta.is_empty() || handled.synced_now;
        if session.synced() && (config_due || !pending.answered.is_empty()) {
            let (workloads, services, policies) = session.counts();
            let changes = pending.delta.len();
            let answers = pending.answered.len();
            tracing::debug!(
                workloads,
                services,
                policies,
                changes,
                answers,
                "xDS config changed"
            );
            let Pending { delta, answered } = std::mem::take(pending);
            let update = XdsUpdate {
                delta,
                answered,
                config_due,
            };
            if tx.send(update).is_err() {
                return Ok(Ended::Unwanted);
            }
        }
    }
}
