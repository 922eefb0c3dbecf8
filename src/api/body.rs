//! `JsonBody<T>`: a JSON request body parsed in one pass with serde, whatever its Content-Type.
//!
//! The old services parsed any body as JSON (so `curl -d '{…}'`, which sends a form content type,
//! worked) and browsers' `navigator.sendBeacon` sends JSON as `text/plain`; both keep working.
//! Parse errors name the field that is wrong (`adId: invalid type: …`). The schema in the OpenAPI
//! document is `T`'s, listed under `application/json` and `text/plain`.

use poem::{Request, RequestBody, http::StatusCode};
use poem_openapi::{
    ApiExtractor, ApiExtractorType, ExtractParamOptions,
    registry::{MetaMediaType, MetaRequest, MetaSchemaRef, Registry},
    types::Type,
};
use serde::de::DeserializeOwned;

/// The largest body a [`JsonBody`] reads; the front endpoint puts it into every request.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// A JSON request body of type `T`.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

fn bad_request(msg: String) -> poem::Error {
    poem::Error::from_string(msg, StatusCode::BAD_REQUEST)
}

/// Reads a whole body of at most `limit` bytes. poem's own `into_bytes_limit` zeroes a 4 KiB
/// buffer on every call and was a tenth of a tracking request's instructions; `Limited` over the
/// underlying body collects the frames without copying them through a buffer.
pub(crate) async fn read_limited(body: poem::Body, limit: usize) -> poem::Result<bytes::Bytes> {
    let too_large = || {
        poem::Error::from_string(
            format!("request body is larger than the {limit}-byte limit"),
            StatusCode::PAYLOAD_TOO_LARGE,
        )
    };
    let inner: http_body_util::combinators::BoxBody<bytes::Bytes, std::io::Error> = body.into();
    match http_body_util::BodyExt::collect(http_body_util::Limited::new(inner, limit)).await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(bad_request(format!("cannot read the request body: {e}"))),
    }
}

/// The OpenAPI request of a JSON body that is read whatever its Content-Type: listed under
/// `application/json` and `text/plain` (what `navigator.sendBeacon` sends).
pub(crate) fn json_or_text(description: &'static str, schema: fn() -> MetaSchemaRef) -> MetaRequest {
    MetaRequest {
        description: Some(description),
        content: vec![
            MetaMediaType { content_type: "application/json", schema: schema() },
            MetaMediaType { content_type: "text/plain", schema: schema() },
        ],
        required: true,
    }
}

/// Parses `bytes` as `T`, naming the offending field on error.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        None => return Err("request body is empty; send a JSON object".into()),
        // serde would read a struct from an array too; the API takes objects only.
        Some(b) if *b != b'{' && serde_json::from_slice::<serde_json::Value>(bytes).is_ok() => {
            return Err("request body must be a JSON object".into());
        }
        Some(_) => {}
    }
    // The fast path: plain serde. Only a failure pays for a second, path-tracking parse that
    // names the offending field.
    if let Ok(value) = serde_json::from_slice(bytes) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            format!("request body is not valid JSON: {inner}")
        } else if path == "." {
            format!("request body must be a JSON object: {inner}")
        } else if inner.to_string().starts_with("must be") {
            // Our field parsers word their errors to follow the field's name.
            format!("{path} {inner}")
        } else {
            format!("{path}: {inner}")
        }
    })?;
    de.end().map_err(|e| format!("request body has data after the JSON value: {e}"))?;
    Ok(value)
}

impl<'a, T: DeserializeOwned + Type + Send> ApiExtractor<'a> for JsonBody<T> {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::RequestObject];
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        T::register(registry);
    }

    fn request_meta() -> Option<MetaRequest> {
        Some(json_or_text("JSON; also accepted as text/plain (navigator.sendBeacon)", T::schema_ref))
    }

    async fn from_request(
        request: &'a Request,
        body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        let limit = request.data::<BodyLimit>().map_or(64 * 1024, |l| l.0);
        let bytes = read_limited(body.take()?, limit).await?;
        parse_json(&bytes).map(JsonBody).map_err(bad_request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Probe {
        #[serde(rename = "adId")]
        _ad_id: Option<String>,
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse_json::<Probe>(br#"{"adId": 5}"#).unwrap_err();
        assert!(e.starts_with("adId: invalid type: integer"), "{e}");
        let e = parse_json::<Probe>(b"{\"adId\": ").unwrap_err();
        assert!(e.starts_with("request body is not valid JSON"), "{e}");
        let e = parse_json::<Probe>(b"[1]").unwrap_err();
        assert!(e.starts_with("request body must be a JSON object"), "{e}");
        let e = parse_json::<Probe>(b"  ").unwrap_err();
        assert!(e.contains("empty"), "{e}");
        let e = parse_json::<Probe>(b"{} {}").unwrap_err();
        assert!(e.contains("after the JSON value"), "{e}");
    }
}
