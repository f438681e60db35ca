//! How shoal's processes talk safely and are watched: bearer tokens on every gRPC
//! call ([`auth`]), TLS on every connection ([`tls`]), and the HTTP endpoints of
//! every long-running process (/healthz, /readyz, /metrics; [`http`]).

pub mod auth;
pub mod http;
pub mod tls;
