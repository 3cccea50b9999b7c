//! lymph RPC: wire format, the socket pair, request dispatch, the client.
//!
//! # Layout
//! - [`value`], [`wire`] — lymph's msgpack dialect and the frame envelope (from `chaos_api`)
//! - [`node`] — the ROUTER pair and its I/O thread; pings answered inline; the client side (`request`) (from
//!   `chaos_api`)
//! - [`server`] — turns requests into calls on [`Interface`]s, with lymph's built-in `lymph.*` methods
//! - [`client`] — calling services by name (ZooKeeper lookup) or endpoint (from `chaos_api`)
//! - [`access`] — who may connect: a ZAP handler checking peer addresses (`rpc.allowed_clients`) and CURVE keys
//!
//! Replies follow lymph's rules (`lymph/core/container.py handle_request`): unknown interface or method → NACK;
//! errors a person should read (bad arguments, refused targets, missing kernel features) → ERROR with a type name
//! and a message, which lymph clients raise as `RemoteError.<type>`.

pub(crate) mod access;
pub mod server;

use std::{future::Future, pin::Pin, sync::Arc};

pub use chaos_api::{ClientError, Kwargs, MethodInfo, RpcError, client, node, to_value, value, value::Value, wire};

/// A boxed, sendable future.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A lymph interface served by this node (e.g. `Chaos`).
pub(crate) trait Interface: Send + Sync + 'static {
    /// Interface (service) name.
    fn name(&self) -> &'static str;
    /// Methods, for `lymph.inspect` and dispatch.
    fn methods(&self) -> &'static [MethodInfo];
    /// Handles one call. `method` is one of [`Interface::methods`].
    fn call(self: Arc<Self>, method: &'static str, kwargs: Kwargs) -> BoxFuture<Result<Value, RpcError>>;
}
