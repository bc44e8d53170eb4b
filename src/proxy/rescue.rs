//! Refusals: why a request was not served as asked, classified once where it happens, and
//! [`rescue`], the one place that turns a refusal into an HTTP status with a JSON body naming
//! the problem and the request id.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use std::time::Duration;

use super::inbound::{HostError, TargetError};
use super::ratelimit::Decision;
use super::request_body::BodyFault;
use super::server::{Body, CLIENT_CLOSED_REQUEST};
use super::server::{RATELIMIT, RATELIMIT_POLICY};
use crate::crd::gateway::KeyScope;
use crate::entities::keys::KeyFormatError;

/// Why a request was not served as asked. Classified where it happens.
#[derive(Debug)]
pub enum Refusal {
    MissingKey,
    /// Different keys (in two fields, or a bearer token and an `X-API-Key`): which one counts
    /// would depend on who reads the request.
    SeveralKeys,
    BadKey(KeyFormatError),
    UnknownKey,
    RevokedKey,
    ExpiredKey,
    GraceEnded,
    NoRoute,
    ScopeForbidden(KeyScope),
    NoTier,
    NoCredential,
    CredentialUnavailable {
        byok: bool,
    },
    RateLimited(Decision),
    BreakerOpen {
        retry_after_ms: u64,
    },
    UpstreamTimeout(Duration),
    UpstreamUnreachable,
    UpstreamBadResponse,
    BodyTooLarge,
    /// A method the gateway or the route does not forward; the value is the `Allow` field.
    MethodNotAllowed(HeaderValue),
    BadTarget(TargetError),
    BadHost(HostError),
    /// The client's request body failed: never the upstream's failure.
    ClientBody(BodyFault),
    Internal(&'static str),
}

impl Refusal {
    /// The caller's credentials were refused (401, counted as an auth failure).
    pub fn is_auth(&self) -> bool {
        matches!(
            self,
            Self::MissingKey
                | Self::SeveralKeys
                | Self::BadKey(_)
                | Self::UnknownKey
                | Self::RevokedKey
                | Self::ExpiredKey
                | Self::GraceEnded
        )
    }

    /// Stable machine-readable code (also the access log's error_code).
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingKey => "missing_api_key",
            Self::SeveralKeys => "several_api_keys",
            Self::BadKey(_) => "malformed_api_key",
            Self::UnknownKey => "unknown_api_key",
            Self::RevokedKey => "revoked_api_key",
            Self::ExpiredKey => "expired_api_key",
            Self::GraceEnded => "rotated_api_key",
            Self::NoRoute => "no_route",
            Self::ScopeForbidden(_) => "scope_forbidden",
            Self::NoTier => "no_rate_limit_tier",
            Self::NoCredential => "no_upstream_credential",
            Self::CredentialUnavailable { .. } => "upstream_credential_unavailable",
            Self::RateLimited(_) => "rate_limited",
            Self::BreakerOpen { .. } => "upstream_circuit_open",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::UpstreamUnreachable => "upstream_unreachable",
            Self::UpstreamBadResponse => "upstream_bad_response",
            Self::BodyTooLarge => "body_too_large",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::BadTarget(_) => "invalid_request_target",
            Self::BadHost(_) => "invalid_host",
            Self::ClientBody(BodyFault::Malformed) => "malformed_request_body",
            Self::ClientBody(BodyFault::TimedOut) => "request_body_timeout",
            Self::ClientBody(BodyFault::Closed) => "client_closed_request",
            Self::Internal(_) => "internal_error",
        }
    }
}

/// The one place refusals become responses.
pub fn rescue(refusal: &Refusal, request_id: &str) -> Response<Body> {
    let (status, message): (StatusCode, String) = match refusal {
        Refusal::MissingKey => (StatusCode::UNAUTHORIZED, "an API key is required: send it as `Authorization: Bearer <key>` or `X-API-Key: <key>`".into()),
        Refusal::SeveralKeys => (StatusCode::UNAUTHORIZED, "send one API key: this request carries different ones (in Authorization and X-API-Key, or one of them twice)".into()),
        Refusal::BadKey(e) => (StatusCode::UNAUTHORIZED, e.to_string()),
        Refusal::UnknownKey => (StatusCode::UNAUTHORIZED, "the API key is not valid".into()),
        Refusal::RevokedKey => (StatusCode::UNAUTHORIZED, "the API key was revoked; create a new one".into()),
        Refusal::ExpiredKey => (StatusCode::UNAUTHORIZED, "the API key has expired; create a new one".into()),
        Refusal::GraceEnded => (StatusCode::UNAUTHORIZED, "the API key was rotated and its grace period has ended; use the new key".into()),
        Refusal::NoRoute => (StatusCode::NOT_FOUND, "no API is served at this path".into()),
        Refusal::ScopeForbidden(KeyScope::Test) => (StatusCode::FORBIDDEN, "this API accepts live keys only; a test key cannot call it".into()),
        Refusal::ScopeForbidden(KeyScope::Live) => (StatusCode::FORBIDDEN, "this API accepts test keys only".into()),
        Refusal::NoTier => (StatusCode::INTERNAL_SERVER_ERROR, "no rate-limit tier applies to this key; the gateway operator must set one".into()),
        Refusal::CredentialUnavailable { byok: true } => (StatusCode::SERVICE_UNAVAILABLE, "your org's own upstream credential (BYOK) for this API cannot be used: it could not be read, or the API's upstream moved to another server since it was written; write it again in the console, which shows where it will be sent".into()),
        Refusal::CredentialUnavailable { byok: false } => (StatusCode::SERVICE_UNAVAILABLE, "this API's upstream credential cannot be loaded; its seller must write it again (the gateway's log says why)".into()),
        Refusal::NoCredential => (StatusCode::FORBIDDEN, "this API needs an upstream credential and none is set for your org; add your own (BYOK)".into()),
        Refusal::RateLimited(d) => {
            let (s, w) = d.blocked.unwrap_or((super::ratelimit::Subject::Key, super::ratelimit::Window::Burst10s));
            (StatusCode::TOO_MANY_REQUESTS, format!("rate limit exceeded: the {} {} limit; retry after {}s", s.label(), w.label(), d.retry_after_secs))
        }
        Refusal::BreakerOpen { .. } => (StatusCode::SERVICE_UNAVAILABLE, "the upstream API is failing and calls to it are paused; retry later".into()),
        Refusal::UpstreamTimeout(t) => (StatusCode::GATEWAY_TIMEOUT, format!("the upstream API did not answer within {}ms", t.as_millis())),
        Refusal::UpstreamUnreachable => (StatusCode::BAD_GATEWAY, "the upstream API could not be reached".into()),
        Refusal::UpstreamBadResponse => (StatusCode::BAD_GATEWAY, "the upstream API sent a response that is not valid HTTP/1.1".into()),
        Refusal::BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "the request body is too large for this API".into()),
        Refusal::MethodNotAllowed(allow) => (StatusCode::METHOD_NOT_ALLOWED, format!("this method is not forwarded here; use one of: {}", allow.to_str().unwrap_or_default())),
        Refusal::BadTarget(e) => (StatusCode::BAD_REQUEST, e.to_string()),
        Refusal::BadHost(e) => (StatusCode::BAD_REQUEST, e.to_string()),
        Refusal::ClientBody(BodyFault::Malformed) => (StatusCode::BAD_REQUEST, "the request body is not validly framed (chunked encoding)".into()),
        Refusal::ClientBody(BodyFault::TimedOut) => (StatusCode::REQUEST_TIMEOUT, "the request body stopped arriving; send it without long pauses".into()),
        Refusal::ClientBody(BodyFault::Closed) => (CLIENT_CLOSED_REQUEST, "the client closed the connection before the request body ended".into()),
        Refusal::Internal(what) => (StatusCode::INTERNAL_SERVER_ERROR, format!("internal error: {what}")),
    };
    let body =
        serde_json::json!({"error": message, "code": refusal.code(), "request_id": request_id});
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    match refusal {
        r if r.is_auth() => {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"apitree\""),
            );
        }
        Refusal::RateLimited(d) => {
            h.insert(header::RETRY_AFTER, HeaderValue::from(d.retry_after_secs));
            insert_str(h, RATELIMIT_POLICY, &d.policy_header());
            insert_str(h, RATELIMIT, &d.ratelimit_header());
        }
        Refusal::MethodNotAllowed(allow) => {
            h.insert(header::ALLOW, allow.clone());
        }
        Refusal::BreakerOpen { retry_after_ms } => {
            h.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_ms.div_ceil(1000).max(1)),
            );
        }
        _ => {}
    }
    resp
}

pub(crate) fn insert_str(h: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

pub(crate) fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}
