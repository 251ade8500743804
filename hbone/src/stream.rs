//! Sending on an h2 stream without unbounded buffering.
//!
//! h2 accepts any amount of data in `send_data` and buffers what flow control does not allow yet.
//! A tunnel must not: a peer that stops reading would make us hold everything the client sends.
//! [`send_all`] waits for window capacity before handing bytes to h2, so at most one read buffer
//! per stream is ever queued.

use std::future::poll_fn;

use bytes::Bytes;
use h2::SendStream;

/// Sends `data` on `stream`, waiting for flow-control capacity; the bytes are handed to h2 in
/// pieces no larger than the window allows, without copying (`Bytes::split_to`).
pub async fn send_all(stream: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), h2::Error> {
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let cap = match poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(cap) => cap?,
            // The stream is gone (reset or closed by the peer); h2 reports why on poll_reset.
            None => return Err(closed_error(stream).await),
        };
        if cap == 0 {
            continue;
        }
        let chunk = data.split_to(cap.min(data.len()));
        stream.send_data(chunk, false)?;
    }
    Ok(())
}

async fn closed_error(stream: &mut SendStream<Bytes>) -> h2::Error {
    match poll_fn(|cx| stream.poll_reset(cx)).await {
        Ok(reason) => h2::Error::from(reason),
        Err(e) => e,
    }
}
