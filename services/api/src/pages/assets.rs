//! The pages' style sheet, script and icon, built into the binary: a page needs
//! nothing from another host and no build step (CONTRACT.md "Browser").

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::state::AppState;

const STYLE: &str = include_str!("../../assets/dossier.css");
const SCRIPT: &str = include_str!("../../assets/dossier.js");
const PAPERCLIP: &str = include_str!("../../assets/paperclip.svg");

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/assets/dossier.css",
            get(|| asset("text/css; charset=utf-8", STYLE)),
        )
        .route(
            "/assets/dossier.js",
            get(|| asset("text/javascript; charset=utf-8", SCRIPT)),
        )
        .route(
            "/assets/paperclip.svg",
            get(|| asset("image/svg+xml", PAPERCLIP)),
        )
}

/// An asset, revalidated by the browser on each page load (`no-cache`): a new
/// release is picked up at once, and the files are small.
async fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}
