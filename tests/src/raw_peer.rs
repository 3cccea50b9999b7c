//! Raw lymph peers: ZeroMQ ROUTER sockets driven by hand, for tests that send what a real client would not.

use std::time::Duration;

use chaos_test_support::{TimedOut, eventually};

/// How often an unroutable send is retried.
const RETRY: Duration = Duration::from_millis(10);

/// Sends `frames` to the peer named `peer` through `socket`, a ROUTER with `ROUTER_MANDATORY`: a message can only
/// leave once the peer's handshake is done, so the send is retried while the peer is unroutable (`EHOSTUNREACH`)
/// or the queue is full (`EAGAIN`). Whether it left within `timeout`.
///
/// # Errors
/// Any other send error.
pub fn send_routed(socket: &zmq::Socket, peer: &[u8], frames: &[Vec<u8>], timeout: Duration) -> zmq::Result<bool> {
    let sent = eventually("the peer to become routable", timeout, RETRY, || {
        let parts = std::iter::once(peer.to_vec()).chain(frames.iter().cloned());
        match socket.send_multipart(parts, zmq::DONTWAIT) {
            Ok(()) => Ok(true),
            Err(zmq::Error::EHOSTUNREACH | zmq::Error::EAGAIN) => Ok(false),
            Err(e) => Err(e),
        }
    });
    match sent {
        Ok(()) => Ok(true),
        Err(e) if e.is::<TimedOut>() => Ok(false),
        Err(e) => Err(e.downcast::<zmq::Error>().expect("only send errors stop the wait")),
    }
}
