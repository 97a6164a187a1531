//! A request over the gRPC message limit is RESOURCE_EXHAUSTED, as
//! docs/api.md and the CLI's exit statuses promise. tonic refuses such a
//! message from its 5-byte length prefix, before allocating, but answers
//! OUT_OF_RANGE; this layer rewrites that one answer (a trailers-only
//! response, since nothing was decoded) to RESOURCE_EXHAUSTED with a message
//! that names the limits. Every other response passes untouched.

use tonic::codegen::http::{HeaderValue, Response};

/// tonic's message for a request whose length prefix is over the limit.
const TONIC_OVERSIZE: &str = "Error, decoded message length too large";

/// The `grpc-status` of OUT_OF_RANGE and of RESOURCE_EXHAUSTED.
const OUT_OF_RANGE: &str = "11";
const RESOURCE_EXHAUSTED: &str = "8";

/// The layer for `Server::builder().layer(..)`: `max_message` is the
/// decoding limit set on the services, `max_value` the largest secret value.
pub fn layer(
    max_message: usize,
    max_value: usize,
) -> tower::util::MapResponseLayer<
    impl FnMut(Response<tonic::body::Body>) -> Response<tonic::body::Body> + Clone,
> {
    let message = format!(
        "the request is over the limit of {max_message} bytes for one message \
         (a secret value may have at most {max_value} bytes: max_secret_bytes)"
    );
    let header = HeaderValue::from_str(&message).ok();
    tower::util::MapResponseLayer::new(move |mut response: Response<tonic::body::Body>| {
        rewrite(&mut response, header.as_ref());
        response
    })
}

/// Rewrites tonic's OUT_OF_RANGE for an oversize request in place.
fn rewrite<B>(response: &mut Response<B>, message: Option<&HeaderValue>) {
    let headers = response.headers_mut();
    let oversize = headers
        .get("grpc-status")
        .is_some_and(|s| s == OUT_OF_RANGE)
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.starts_with(TONIC_OVERSIZE) || m.starts_with("Error,%20decoded"));
    if !oversize {
        return;
    }
    headers.insert("grpc-status", HeaderValue::from_static(RESOURCE_EXHAUSTED));
    if let Some(m) = message {
        headers.insert("grpc-message", m.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: &'static str, message: &'static str) -> Response<()> {
        let mut r = Response::new(());
        r.headers_mut()
            .insert("grpc-status", HeaderValue::from_static(status));
        r.headers_mut()
            .insert("grpc-message", HeaderValue::from_static(message));
        r
    }

    #[test]
    fn only_the_oversize_answer_is_rewritten() {
        let better = HeaderValue::from_static("over the limit");
        let mut r = response(
            "11",
            "Error, decoded message length too large: found 9 bytes",
        );
        rewrite(&mut r, Some(&better));
        assert_eq!(r.headers()["grpc-status"], "8");
        assert_eq!(r.headers()["grpc-message"], "over the limit");

        let mut other = response("11", "ttl_seconds: out of range");
        rewrite(&mut other, Some(&better));
        assert_eq!(other.headers()["grpc-status"], "11");
        let mut ok = response("0", "");
        rewrite(&mut ok, Some(&better));
        assert_eq!(ok.headers()["grpc-status"], "0");
    }
}
