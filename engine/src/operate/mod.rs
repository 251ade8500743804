//! What operators see: the HTTP endpoints (metrics on 15020, readiness on 15021, the admin API
//! on 127.0.0.1:15000), what they render, and the live log filter.
//!
//! Nothing here knows the control thread or the shards: the endpoints ask for what they show
//! through [`admin::Admin`], which the control thread implements, so the data path and the
//! control side can grow without this folder importing them.

pub mod admin;
pub mod config_dump;
pub mod log_buffer;
pub mod log_format;
pub mod logging;
pub mod profile;
pub mod prometheus;
