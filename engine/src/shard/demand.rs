//! On-demand destinations (`XDS_ON_DEMAND`), on one shard: a connection to an address the
//! snapshot does not know asks istiod for it (through the xDS client's [`Demander`]) and is
//! parked until the control thread says istiod answered (`ShardMsg::Answered`, sent after the
//! config that carries the answer) or the wait is over; then it is routed by the snapshot in
//! force, as an unknown destination if the address is still not in it.
//!
//! Off (the default) this holds nothing and no connection waits. One thread: no atomics, no
//! locks; a demand leaves the shard only for an address no connection is already waiting for.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::net::IpAddr;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

use crate::xds::Demander;

/// How a wait for istiod ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// istiod answered (the address is in the snapshot now, or istiod does not know it).
    Answered,
    /// No answer within the wait.
    TimedOut,
    /// On-demand is off, or the xDS client has stopped.
    Off,
}

/// One parked connection.
#[derive(Default)]
struct Parked {
    answered: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

/// The shard's on-demand state: how to ask, and who waits for which address.
#[derive(Default)]
pub struct OnDemand {
    demander: RefCell<Option<Demander>>,
    /// Checked on every outbound connection, so off costs one read.
    on: Cell<bool>,
    parked: RefCell<HashMap<IpAddr, Vec<Rc<Parked>>>>,
}

impl OnDemand {
    /// Turns on-demand on, asking through `demander`.
    pub fn enable(&self, demander: Demander) {
        *self.demander.borrow_mut() = Some(demander);
        self.on.set(true);
    }

    /// Whether unknown destinations are asked for.
    pub fn is_on(&self) -> bool {
        self.on.get()
    }

    /// Connections parked right now.
    pub fn parked(&self) -> usize {
        self.parked.borrow().values().map(Vec::len).sum()
    }

    /// istiod answered `ips`: their parked connections go on.
    pub fn answered(&self, ips: &[IpAddr]) {
        let mut parked = self.parked.borrow_mut();
        for ip in ips {
            for p in parked.remove(ip).into_iter().flatten() {
                p.answered.set(true);
                if let Some(w) = p.waker.take() {
                    w.wake();
                }
            }
        }
    }

    /// Asks istiod for `ip` (unless a connection already waits for it) and waits for the
    /// answer, at most the configured wait.
    pub async fn ask(&self, ip: IpAddr) -> (Outcome, Duration) {
        let Some(wait) = self.demander.borrow().as_ref().map(|d| d.wait) else {
            return (Outcome::Off, Duration::ZERO);
        };
        let parked = Registration::new(self, ip);
        if parked.first {
            let asked = self.demander.borrow().as_ref().is_some_and(|d| d.ask(ip));
            if !asked {
                return (Outcome::Off, Duration::ZERO);
            }
        }
        let p = parked.parked.clone();
        let woken = poll_fn(move |cx| {
            if p.answered.get() {
                return Poll::Ready(());
            }
            *p.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        });
        match monoio::time::timeout(wait, woken).await {
            Ok(()) => (Outcome::Answered, wait),
            Err(_) => (Outcome::TimedOut, wait),
        }
    }
}

/// A connection's place among the parked; leaving it (answered, timed out or dropped) takes
/// it out.
struct Registration<'a> {
    on_demand: &'a OnDemand,
    ip: IpAddr,
    parked: Rc<Parked>,
    /// No other connection was waiting for this address: this one asks.
    first: bool,
}

impl<'a> Registration<'a> {
    fn new(on_demand: &'a OnDemand, ip: IpAddr) -> Self {
        let parked = Rc::new(Parked::default());
        let mut all = on_demand.parked.borrow_mut();
        let list = all.entry(ip).or_default();
        let first = list.is_empty();
        list.push(parked.clone());
        Registration {
            on_demand,
            ip,
            parked,
            first,
        }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut all = self.on_demand.parked.borrow_mut();
        if let Some(list) = all.get_mut(&self.ip) {
            list.retain(|p| !Rc::ptr_eq(p, &self.parked));
            if list.is_empty() {
                all.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_runtime<T>(f: impl std::future::Future<Output = T>) -> T {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn connections_to_one_address_ask_once_and_go_on_when_answered_or_timed_out() {
        let vip: IpAddr = "10.96.0.10".parse().expect("ip");
        let other: IpAddr = "10.96.0.99".parse().expect("ip");
        let od = Rc::new(OnDemand::default());
        on_runtime(async {
            assert_eq!(od.ask(vip).await.0, Outcome::Off, "off by default");
            let (demander, mut asked) = Demander::channel(Duration::from_millis(200));
            od.enable(demander);
            let a = monoio::spawn({
                let od = od.clone();
                async move { od.ask(vip).await.0 }
            });
            let b = monoio::spawn({
                let od = od.clone();
                async move { od.ask(vip).await.0 }
            });
            monoio::time::sleep(Duration::from_millis(10)).await;
            assert_eq!(od.parked(), 2);
            assert_eq!(asked.try_recv().ok(), Some(vip));
            assert!(asked.try_recv().is_err(), "asked once for both");
            od.answered(&[vip]);
            assert_eq!((a.await, b.await), (Outcome::Answered, Outcome::Answered));
            assert_eq!(od.ask(other).await.0, Outcome::TimedOut);
            assert_eq!(od.parked(), 0, "a connection that timed out is not kept");
            assert_eq!(asked.try_recv().ok(), Some(other));
        });
    }
}
