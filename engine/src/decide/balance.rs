//! Which endpoint of a service a connection goes to, as ztunnel's `load_balance` picks it:
//! the service's `loadBalancer` routing preferences ranked against the source workload
//! (`Strict`: every listed scope must match; `Failover`: the best-matching endpoints first),
//! then a random choice weighted by each endpoint's `capacity`.
//!
//! Health and target ports are settled when the config is indexed (see
//! [`Snapshot::endpoints`](crate::config::Snapshot::endpoints)); this step only ranks and draws.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::{Endpoints, LoadBalancer, LoadBalancerMode, LoadBalancerScope, Workload};

/// The random source endpoint choices draw from: one per shard, seeded from the OS, or from a
/// fixed seed where a test needs the same draws twice.
#[derive(Debug)]
pub struct Balancer {
    rng: StdRng,
}

impl Default for Balancer {
    fn default() -> Self {
        Balancer {
            rng: StdRng::from_entropy(),
        }
    }
}

impl Balancer {
    /// A balancer whose draws are fixed by `seed`.
    pub fn seeded(seed: u64) -> Self {
        Balancer {
            rng: StdRng::seed_from_u64(seed),
        }
    }
}

/// Whether `w` matches the source on `scope` (ztunnel compares the strings as they are, so two
/// empty zones match).
fn matches(scope: LoadBalancerScope, src: &Workload, w: &Workload) -> bool {
    match scope {
        LoadBalancerScope::Region => src.locality.region == w.locality.region,
        LoadBalancerScope::Zone => src.locality.zone == w.locality.zone,
        LoadBalancerScope::Subzone => src.locality.subzone == w.locality.subzone,
        LoadBalancerScope::Node => src.node == w.node,
        LoadBalancerScope::Cluster => src.cluster_id == w.cluster_id,
        LoadBalancerScope::Network => src.network == w.network,
    }
}

/// How many of `lb`'s routing preferences, from the first, `w` matches the source on; `None`
/// where the mode is `Strict` and it does not match them all. Without a source nothing
/// matches.
fn rank(lb: &LoadBalancer, src: Option<&Workload>, w: &Workload) -> Option<usize> {
    let prefs = &lb.routing_preferences;
    let rank = src.map_or(0, |src| {
        prefs
            .iter()
            .take_while(|&&scope| matches(scope, src, w))
            .count()
    });
    (lb.mode != LoadBalancerMode::Strict || rank == prefs.len()).then_some(rank)
}

/// Whether ztunnel would consider `w` at all: it needs an address (an IP or a hostname), or,
/// on another network than the source, a network gateway to be reached through.
fn reachable(src: Option<&Workload>, w: &Workload) -> bool {
    if !w.workload_ips.is_empty() || !w.hostname.is_empty() {
        return true;
    }
    let in_network = src.is_none_or(|s| s.network == w.network);
    !in_network && w.network_gateway.is_some()
}

/// The endpoint a connection from `src` takes among `eps` under `lb`, or `None` when none may
/// (no endpoint, none matching a `Strict` preference, or the best-ranked ones all of capacity
/// 0). Endpoints of the best rank are drawn with probability proportional to their capacity,
/// as ztunnel's `choose_weighted`; a capacity-0 endpoint is never drawn, and ztunnel does not
/// fall back to a lower rank when the best one has no capacity, so neither does this.
pub fn pick<'a>(
    lb: Option<&LoadBalancer>,
    src: Option<&Workload>,
    eps: Endpoints<'a>,
    bal: &mut Balancer,
) -> Option<(&'a Workload, u16)> {
    let ranked = lb.filter(|lb| lb.mode != LoadBalancerMode::Standard);
    if ranked.is_none() && eps.is_uniform() {
        // Every endpoint is eligible with the same weight: the same draw, without the passes.
        if eps.is_empty() {
            return None;
        }
        return eps.get(bal.rng.gen_range(0..eps.len()));
    }
    let rank_of = |w: &Workload| -> Option<usize> {
        if !reachable(src, w) {
            return None;
        }
        ranked.map_or(Some(0), |lb| rank(lb, src, w))
    };
    // Two passes over the slice, no allocation: the best rank and its total capacity, then
    // the draw.
    let mut best: Option<usize> = None;
    let mut total: u64 = 0;
    for (w, _) in eps.iter() {
        let Some(r) = rank_of(w) else { continue };
        match best {
            Some(b) if r < b => continue,
            Some(b) if r == b => total += u64::from(w.capacity),
            _ => {
                best = Some(r);
                total = u64::from(w.capacity);
            }
        }
    }
    let best = best?;
    if total == 0 {
        return None;
    }
    let mut at = bal.rng.gen_range(0..total);
    for (w, port) in eps.iter() {
        if rank_of(w) != Some(best) {
            continue;
        }
        let c = u64::from(w.capacity);
        if at < c {
            return Some((w, port));
        }
        at -= c;
    }
    None
}
