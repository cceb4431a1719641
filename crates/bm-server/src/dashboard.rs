//! The web dashboard's pages, served by the HTTP gateway at `/`.
//!
//! The pages are plain ES modules and CSS in `crates/bm-server/dashboard/`, committed as
//! they run: there is no build step, so `cargo build` needs no Node.js and what is served
//! is what is reviewed. They are embedded in the binary (`include_str!`) and talk only to
//! the gateway's API (`/api/v1/...`), with the caller's bearer token: the dashboard can do
//! nothing its user could not do with bmctl.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// A file of the dashboard: its name under `/assets/`, its media type, its text.
struct Asset {
    name: &'static str,
    media_type: &'static str,
    text: &'static str,
}

/// Every file of the dashboard but the page itself.
const ASSETS: &[Asset] = &[
    Asset {
        name: "app.js",
        media_type: "text/javascript; charset=utf-8",
        text: include_str!("../dashboard/app.js"),
    },
    Asset {
        name: "api.js",
        media_type: "text/javascript; charset=utf-8",
        text: include_str!("../dashboard/api.js"),
    },
    Asset {
        name: "style.css",
        media_type: "text/css; charset=utf-8",
        text: include_str!("../dashboard/style.css"),
    },
];

/// The page: everything else is loaded from it.
const INDEX: &str = include_str!("../dashboard/index.html");

/// Only the dashboard's own files and API; no inline script, no framing by other sites.
const POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; \
    frame-ancestors 'none'; form-action 'none'";

/// The routes of the pages, for any state of the router they join.
pub(crate) fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { page(INDEX, "text/html; charset=utf-8") }),
        )
        .route("/assets/{name}", get(asset))
}

async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(a) => page(a.text, a.media_type),
        None => (StatusCode::NOT_FOUND, "no such file in the dashboard\n").into_response(),
    }
}

/// `text` as `media_type`, revalidated on every load (a new server version serves new
/// files at the same names), under the content security policy.
fn page(text: &'static str, media_type: &'static str) -> Response {
    let mut r = text.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(media_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every module the page or a module imports is served.
    #[test]
    fn every_imported_file_is_served() {
        let mut texts = vec![INDEX];
        texts.extend(ASSETS.iter().map(|a| a.text));
        for text in texts {
            for (at, _) in text.match_indices("/assets/") {
                let rest = &text[at + "/assets/".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
                    .collect();
                assert!(
                    ASSETS.iter().any(|a| a.name == name),
                    "{name} is referred to but not served"
                );
            }
            for (at, _) in text.match_indices("from './") {
                let rest = &text[at + "from './".len()..];
                let name: String = rest.chars().take_while(|c| *c != '\'').collect();
                assert!(
                    ASSETS.iter().any(|a| a.name == name),
                    "{name} is imported but not served"
                );
            }
        }
    }
}
