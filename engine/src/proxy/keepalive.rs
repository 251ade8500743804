//! HTTP/2 PING keepalive on HBONE connections, as ztunnel's: once a connection has been up for
//! the interval, a PING every interval; a peer that leaves one unanswered for the timeout is
//! dead and its connection is closed, so pooled streams stop going to it and nothing waits on
//! it forever (the kernel may keep a dead peer's TCP connection open for many minutes).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use crate::options::Keepalive;

/// A connection's keepalive, run as a task of its own: the connection's driver, polled on
/// every frame, only reads a flag here (polling a timer on every poll of the driver cost 6% of
/// the CPU per request in rr16). Dropping it (the connection ended) stops the task at its next
/// wake-up.
pub struct Watch {
    state: Option<Rc<State>>,
}

#[derive(Default)]
struct State {
    dead: RefCell<Option<String>>,
    waker: Cell<Option<Waker>>,
    closed: Cell<bool>,
}

impl Watch {
    /// Starts pinging the peer through `ping` (none: h2 gave no handle, or `ka` is off).
    pub fn spawn(ping: Option<h2::PingPong>, ka: Keepalive) -> Watch {
        let Some(ping) = ping.filter(|_| !ka.interval.is_zero()) else {
            return Watch { state: None };
        };
        let state = Rc::new(State::default());
        let task_state = state.clone();
        monoio::spawn(async move {
            if let Some(why) = pings(ping, ka, &task_state).await {
                *task_state.dead.borrow_mut() = Some(why);
                if let Some(w) = task_state.waker.take() {
                    w.wake();
                }
            }
        });
        Watch { state: Some(state) }
    }

    /// Ready with why once the peer is considered dead; otherwise the calling task is woken
    /// when it is.
    pub fn poll_dead(&self, cx: &mut Context<'_>) -> Poll<String> {
        let Some(state) = &self.state else {
            return Poll::Pending;
        };
        if let Some(why) = state.dead.borrow_mut().take() {
            return Poll::Ready(why);
        }
        let w = state.waker.take();
        state.waker.set(match w {
            Some(w) if w.will_wake(cx.waker()) => Some(w),
            _ => Some(cx.waker().clone()),
        });
        Poll::Pending
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(state) = &self.state {
            state.closed.set(true);
            state.waker.take();
        }
    }
}

/// Pings until the peer stops answering (`Some(why)`) or the connection ended (`None`).
async fn pings(mut ping: h2::PingPong, ka: Keepalive, state: &State) -> Option<String> {
    loop {
        monoio::time::sleep(ka.interval).await;
        if state.closed.get() {
            return None;
        }
        match monoio::time::timeout(ka.timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) if state.closed.get() => return None,
            Ok(Err(e)) => return Some(format!("PING failed: {e}")),
            Err(_) if state.closed.get() => return None,
            Err(_) => return Some(format!("no answer to a PING within {:?}", ka.timeout)),
        }
    }
}
