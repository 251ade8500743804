//! A shard's control channel: messages (`ShardMsg`) from the control side, and a wake-up that
//! makes the shard's runtime look at them at once.
//!
//! The shard awaits one read on its end of a socket pair (on io_uring and on the epoll driver
//! alike); each send writes one byte to the other end after queueing the message. Messages are
//! rare (listeners, config, scrapes, pods), so the wake-up costs nothing while none is sent,
//! and the data path never touches anything another thread writes. Polling instead made every
//! message wait up to the poll period: a pod's ack waited for every shard's next tick.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use crossbeam_channel::{Receiver, SendError, Sender, TryRecvError};

/// The control side's handle on one shard: sending wakes it.
pub struct Tx<T> {
    tx: Sender<T>,
    /// The writing end of the wake-up pair; the shard sees EOF once every clone is gone.
    wake: Arc<OwnedFd>,
}

// Written out: a derive would ask `T: Clone`, which a message need not be.
impl<T> Clone for Tx<T> {
    fn clone(&self) -> Self {
        Tx {
            tx: self.tx.clone(),
            wake: self.wake.clone(),
        }
    }
}

impl<T> Tx<T> {
    /// Queues `msg` for the shard and wakes it; `Err` when the shard has stopped.
    pub fn send(&self, msg: T) -> Result<(), SendError<T>> {
        self.tx.send(msg)?;
        let byte = 1u8;
        // The message is queued before the byte is written, so the shard, which drains the
        // queue after every read, cannot miss it. A full socket buffer (EAGAIN) holds a wake-up
        // the shard has not read; a shard that is gone needs none. MSG_NOSIGNAL: no SIGPIPE.
        // SAFETY: one byte from a live stack variable to a socket this handle owns.
        unsafe {
            libc::send(
                self.wake.as_raw_fd(),
                std::ptr::addr_of!(byte).cast(),
                1,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        Ok(())
    }
}

/// The shard's end: the queue and the socket its runtime awaits.
pub struct Rx<T> {
    /// The queued messages.
    pub queue: Queue<T>,
    /// Readable when a message was sent since the last read; EOF when the control side is
    /// gone. Non-blocking, for either driver to register.
    pub wake: std::os::unix::net::UnixStream,
}

/// The messages queued for a shard.
pub struct Queue<T>(Receiver<T>);

impl<T> Queue<T> {
    /// Takes every queued message; `false` once the control side has gone away.
    pub fn drain(&self, mut each: impl FnMut(T)) -> bool {
        loop {
            match self.0.try_recv() {
                Ok(msg) => each(msg),
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }
}

/// A new channel to one shard.
pub fn channel<T>() -> io::Result<(Tx<T>, Rx<T>)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nothing else.
    let (shard_end, control_end) = unsafe {
        (
            std::os::unix::net::UnixStream::from_raw_fd(fds[0]),
            OwnedFd::from_raw_fd(fds[1]),
        )
    };
    let (tx, rx) = crossbeam_channel::unbounded();
    Ok((
        Tx {
            tx,
            wake: Arc::new(control_end),
        },
        Rx {
            queue: Queue(rx),
            wake: shard_end,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_send_queues_the_message_and_makes_the_shard_end_readable() {
        let (tx, rx) = channel::<&str>().expect("channel");
        let mut buf = [0u8; 8];
        let quiet = (&rx.wake).read(&mut buf);
        assert_eq!(
            quiet.map_err(|e| e.kind()),
            Err(io::ErrorKind::WouldBlock),
            "nothing sent, nothing to read"
        );
        tx.send("drain").expect("send");
        tx.clone().send("drain").expect("send");
        assert_eq!((&rx.wake).read(&mut buf).expect("woken"), 2);
        let mut got = 0;
        assert!(rx.queue.drain(|m| got += (m == "drain") as usize));
        assert_eq!(got, 2);
    }

    #[test]
    fn the_shard_end_sees_eof_and_disconnection_once_every_sender_is_gone() {
        let (tx, rx) = channel::<&str>().expect("channel");
        let other = tx.clone();
        drop(tx);
        other.send("drain").expect("send");
        drop(other);
        let mut buf = [0u8; 8];
        assert_eq!((&rx.wake).read(&mut buf).expect("the last wake-up"), 1);
        assert_eq!((&rx.wake).read(&mut buf).expect("then EOF"), 0);
        let mut got = 0;
        assert!(!rx.queue.drain(|_| got += 1), "disconnected");
        assert_eq!(got, 1, "what was queued before is still delivered");
    }

    #[test]
    fn a_send_to_a_stopped_shard_fails_without_a_signal() {
        let (tx, rx) = channel::<&str>().expect("channel");
        drop(rx);
        assert!(tx.send("drain").is_err());
    }
}
