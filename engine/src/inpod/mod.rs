//! In-pod mode, first step: ringtun's side of ZDS, the protocol in which istio-cni's node agent
//! hands a node proxy each pod's network namespace (istio/ztunnel's `proto/zds.proto`).
//!
//! - [`zds`]: the messages and their protobuf codec.
//! - [`session`]: the protocol's state machine, sans IO: a received packet in, the action for
//!   the control thread and the answer to send out. Every malformed or out-of-order message gets
//!   an error ack and leaves the session usable (ztunnel drops the connection on most of them,
//!   and exits on some).
//! - [`uds`]: the blocking `SOCK_SEQPACKET` client that connects to the agent (`INPOD_UDS`),
//!   says hello and receives each message with its SCM_RIGHTS fd.
//!
//! - [`manager`]: the pods' proxy states and metrics as ztunnel's workload manager shows them.
//!
//! Nothing here makes listeners: the control thread takes the [`session::Action`]s.

pub mod manager;
pub mod session;
pub mod uds;
pub mod zds;

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

/// Where istio-cni's node agent listens by default (`INPOD_UDS` overrides it).
pub const DEFAULT_INPOD_UDS: &str = "/var/run/ztunnel/ztunnel.sock";

/// Identifies a network namespace: the device and inode of its nsfs file, the same for every fd
/// and bind mount of that namespace (what `stat -L /proc/PID/ns/net` shows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NetnsId {
    /// `st_dev` of the nsfs file.
    pub dev: u64,
    /// `st_ino` of the nsfs file.
    pub ino: u64,
}

impl fmt::Display for NetnsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "net:[{}]", self.ino)
    }
}

/// An fd checked to be a network namespace, with its identity.
#[derive(Debug)]
pub struct NetnsFd {
    /// The namespace; `setns(fd, CLONE_NEWNET)` enters it.
    pub fd: OwnedFd,
    /// Which namespace it is.
    pub id: NetnsId,
}

/// Why an fd is not usable as a pod's network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsCheckError {
    /// fstat on it failed.
    #[error("cannot stat the fd: {0}")]
    Stat(std::io::Error),
    /// It is not a namespace file at all (`NS_GET_NSTYPE` refused).
    #[error("the fd is not a namespace ({0})")]
    NotNamespace(std::io::Error),
    /// It is a namespace of another kind (mount, pid, …).
    #[error("the fd is a namespace of type {0:#x}, not a network namespace")]
    OtherNamespace(i32),
}

/// `NS_GET_NSTYPE` = `_IO(0xb7, 0x3)` (linux/nsfs.h), available since Linux 4.11.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

impl NetnsFd {
    /// Checks that `fd` is a network namespace (`ioctl(NS_GET_NSTYPE)`) and reads its identity;
    /// on failure the fd is dropped (closed).
    pub fn check(fd: OwnedFd) -> Result<NetnsFd, NetnsCheckError> {
        let id = netns_id(fd.as_fd()).map_err(NetnsCheckError::Stat)?;
        // SAFETY: an argument-less ioctl on an fd we own; it reads nothing from user memory.
        let nstype = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
        if nstype < 0 {
            return Err(NetnsCheckError::NotNamespace(
                std::io::Error::last_os_error(),
            ));
        }
        if nstype != libc::CLONE_NEWNET {
            return Err(NetnsCheckError::OtherNamespace(nstype));
        }
        Ok(NetnsFd { fd, id })
    }
}

/// The identity (device, inode) of the file behind `fd`.
pub fn netns_id(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<NetnsId> {
    use std::os::unix::fs::MetadataExt;
    // A duplicate, closed at once: metadata needs a File, and the caller keeps its fd.
    let meta = std::fs::File::from(fd.try_clone_to_owned()?).metadata()?;
    Ok(NetnsId {
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_netns_passes_and_other_files_fail() {
        let own = std::fs::File::open("/proc/self/ns/net").expect("open own netns");
        let want = std::fs::metadata("/proc/self/ns/net").expect("stat");
        let checked = NetnsFd::check(own.into()).expect("own netns is a netns");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(checked.id.ino, want.ino());

        let null = std::fs::File::open("/dev/null").expect("open /dev/null");
        assert!(matches!(
            NetnsFd::check(null.into()),
            Err(NetnsCheckError::NotNamespace(_))
        ));
        let uts = std::fs::File::open("/proc/self/ns/uts").expect("open uts ns");
        assert!(matches!(
            NetnsFd::check(uts.into()),
            Err(NetnsCheckError::OtherNamespace(t)) if t == libc::CLONE_NEWUTS
        ));
    }
}
