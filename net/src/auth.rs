//! Bearer tokens on every gRPC call: operators' calls to the coordinator carry the
//! operators' token, workers' calls to the coordinator and the coordinator's calls
//! to workers carry the workers' token (`authorization: Bearer <token>` metadata).

use std::sync::Arc;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// A channel whose calls carry a token.
pub type AuthChannel = InterceptedService<Channel, WithToken>;

/// Server side: lets a call through only when it carries `token`. `None` lets
/// every call through (a coordinator started with authentication off).
#[derive(Clone)]
pub struct RequireToken {
    token: Option<Arc<str>>,
    /// Which token is expected, for the error message (e.g. "SHOAL_TOKEN").
    name: &'static str,
}

impl RequireToken {
    pub fn new(token: Option<&str>, name: &'static str) -> RequireToken {
        RequireToken {
            token: token.map(Arc::from),
            name,
        }
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(want) = &self.token else {
            return Ok(req);
        };
        let Some(value) = req.metadata().get("authorization") else {
            return Err(Status::unauthenticated(format!(
                "this call needs a bearer token: set {} to the cluster's token",
                self.name
            )));
        };
        let given = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if same(given.as_bytes(), want.as_bytes()) {
            Ok(req)
        } else {
            Err(Status::unauthenticated(format!(
                "the bearer token is not valid here (check {})",
                self.name
            )))
        }
    }
}

/// Compares in time that depends only on the lengths.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Client side: adds the token to every call (nothing when there is none).
#[derive(Clone)]
pub struct WithToken(Option<MetadataValue<Ascii>>);

impl WithToken {
    /// Fails when the token cannot be sent as an HTTP header value.
    pub fn new(token: Option<&str>) -> Result<WithToken, String> {
        token
            .map(|t| {
                if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err("the token must be printable ASCII without spaces".to_string());
                }
                format!("Bearer {t}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| "the token must be printable ASCII without spaces".to_string())
            })
            .transpose()
            .map(WithToken)
    }
}

impl Interceptor for WithToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(token: Option<&str>) -> Request<()> {
        WithToken::new(token)
            .unwrap()
            .call(Request::new(()))
            .unwrap()
    }

    #[test]
    fn tokens_are_checked() {
        let mut open = RequireToken::new(None, "SHOAL_TOKEN");
        assert!(open.call(call(None)).is_ok());
        let mut guard = RequireToken::new(Some("s3cret"), "SHOAL_TOKEN");
        assert!(guard.call(call(Some("s3cret"))).is_ok());
        let missing = guard.call(call(None)).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        assert!(missing.message().contains("SHOAL_TOKEN"), "{missing}");
        let wrong = guard.call(call(Some("s3cre"))).unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(guard.call(call(Some("s3cret2"))).is_err());
        assert!(WithToken::new(Some("two words")).is_err());
        assert!(WithToken::new(Some("")).is_err());
        assert!(WithToken::new(Some("naïve")).is_err());
    }
}
