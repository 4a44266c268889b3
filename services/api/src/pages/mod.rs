//! The browser's doors: sign-in, the staff console (`/app`) and the customer
//! portal (`/portal`), server-rendered HTML over the same read models as the
//! JSON API.
//!
//! A page only reads. Everything a page changes it changes by calling the
//! JSON API from the browser with the session cookie (`assets/dossier.js`):
//! the same endpoint, command path, rules, events and audit entries as any
//! other client, checked against cross-site forgery in [`crate::auth`]. So
//! there is one way to upload, rename or delete, and the pages cannot drift
//! from the API. Without script a person can still read, filter, page and
//! download; the forms that change things need it.
//!
//! Every page goes out with [`security_headers`]: a Content-Security-Policy
//! that allows only this site's own script, style and images (no inline
//! script), and no framing. Templates are askama's: checked at compile time,
//! and every value is HTML-escaped unless a template says otherwise (none
//! does).

pub mod assets;
pub mod console;
pub mod login;
pub mod portal;
pub mod view;

use askama::Template;
use axum::Router;
use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;

use crate::auth::Caller;
use crate::auth::jwt::Role;
use crate::auth::session;
use crate::error::{ApiError, AppError};
use crate::state::AppState;

/// Every page's route.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(login::home))
        .merge(login::routes())
        .merge(assets::routes())
        .merge(console::routes())
        .merge(portal::routes())
}

/// The policy every answer carries. Pages load script, style and images from
/// this site only and talk only to it; forms post only to it; nothing may
/// frame a page (clickjacking). API answers carry it too: a downloaded HTML
/// file opened in the browser can run nothing either.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; \
     base-uri 'none'; frame-ancestors 'none'";

/// Adds the security headers to every answer.
pub async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("same-origin"),
        ),
    ] {
        headers.entry(name).or_insert(value);
    }
    response
}

/// A rendered page, or the error page when the template cannot render.
pub fn render(page: impl Template) -> Response {
    match page.render() {
        Ok(html) => Html(html).into_response(),
        Err(error) => {
            tracing::error!(%error, "a page template failed to render");
            PageError::from(ApiError(AppError::Internal(
                "a page failed to render".into(),
            )))
            .into_response()
        }
    }
}

/// Why a page cannot be shown: a person is sent to sign in, or sees what
/// went wrong in words, with the status the API would answer.
#[derive(Debug)]
pub enum PageError {
    /// No valid session: sign in, then come back to `next`.
    SignIn { next: String },
    /// Anything else, as the API would classify it.
    Api(ApiError),
}

impl From<ApiError> for PageError {
    fn from(error: ApiError) -> Self {
        Self::Api(error)
    }
}

impl From<dossier_domain::ValidationError> for PageError {
    fn from(error: dossier_domain::ValidationError) -> Self {
        Self::Api(ApiError::from(error))
    }
}

impl From<dossier_projections::files::QueryError> for PageError {
    fn from(error: dossier_projections::files::QueryError) -> Self {
        Self::Api(ApiError(AppError::Unavailable(error.to_string())))
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    chrome: view::Chrome,
    status: u16,
    title: &'static str,
    message: String,
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let error = match self {
            Self::SignIn { next } => {
                return Redirect::to(&format!("/login?next={}", view::query_value(&next)))
                    .into_response();
            }
            Self::Api(error) => error,
        };
        let status = error.status();
        let title = match status {
            StatusCode::NOT_FOUND => "Not found",
            StatusCode::FORBIDDEN => "Not allowed",
            StatusCode::UNPROCESSABLE_ENTITY => "Not understood",
            StatusCode::SERVICE_UNAVAILABLE => "Unavailable",
            _ => "Something went wrong",
        };
        let message = match &error.0 {
            AppError::NotFound => "There is nothing here, or it is not yours to see.".to_owned(),
            AppError::Unavailable(_) | AppError::OutcomeUnknown(_) => {
                "A service Dossier needs is not answering. Try again in a moment.".to_owned()
            }
            AppError::Internal(_) => {
                "Dossier failed to show this page. The service log says why.".to_owned()
            }
            other => other.to_string(),
        };
        let page = ErrorPage {
            chrome: view::Chrome::anonymous(),
            status: status.as_u16(),
            title,
            message,
        };
        match page.render() {
            Ok(html) => (status, Html(html)).into_response(),
            Err(_) => error.into_response(),
        }
    }
}

/// The signed-in person of a page request: the session cookie (or, for
/// scripts and the benchmark, the bearer header) read as the API reads it.
/// A page sends anyone without a valid session to sign in.
pub struct Viewer(pub Caller);

impl FromRequestParts<AppState> for Viewer {
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, PageError> {
        match Caller::from_request_parts(parts, state).await {
            Ok(caller) => Ok(Self(caller)),
            Err(ApiError(AppError::Unauthorized(_))) => Err(PageError::SignIn {
                next: parts
                    .uri
                    .path_and_query()
                    .map_or("/".to_owned(), |p| p.as_str().to_owned()),
            }),
            Err(other) => Err(other.into()),
        }
    }
}

impl Viewer {
    /// The viewer, if its role is one of `allowed`; else the 403 page.
    pub fn only(self, allowed: &[Role]) -> Result<Caller, PageError> {
        Ok(self.0.require(allowed)?)
    }
}

/// Where a signed-in person starts.
pub fn home_of(role: Role) -> &'static str {
    match role {
        Role::Staff | Role::System => "/app",
        Role::Auditor => "/app/audit",
        Role::Customer => "/portal",
    }
}

/// Whether a request's session cookie names a valid session (for `/` and `/login`).
pub fn session_caller(parts_headers: &axum::http::HeaderMap, state: &AppState) -> Option<Caller> {
    session::token(parts_headers)
        .and_then(|token| Caller::from_token(state.jwt_secret(), token).ok())
}
