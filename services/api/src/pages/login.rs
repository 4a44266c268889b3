//! Signing in and out of the pages: `POST /login` with a token (the same JWT
//! the API takes, issued by the tenant's identity system) starts a cookie
//! session; `POST /logout` ends it. While the service runs with the public
//! development secret, anyone can mint tokens anyway, so the sign-in page
//! also offers "sign in as" to try every role right after `dossier serve`.

use askama::Template;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use chrono::Utc;
use dossier_runtime::config::DEV_JWT_SECRET;
use serde::Deserialize;

use super::view::Chrome;
use super::{home_of, render, session_caller};
use crate::auth::jwt::{self, Claims, Role};
use crate::auth::{Caller, session};
use crate::state::AppState;

/// How long a "sign in as" session lasts.
const DEVELOPMENT_SESSION_SECS: i64 = 8 * 3600;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/login", get(login_page).post(login))
        .route("/login/as", post(login_as))
        .route("/logout", post(logout))
}

/// Whether the service signs tokens with the public development secret.
fn development_secret(app: &AppState) -> bool {
    app.jwt_secret() == DEV_JWT_SECRET.as_bytes()
}

/// `next` when it is a path of this site, else `None`: a sign-in link can
/// never send a person to another site (`//host`, `/\host` and schemes are
/// refused).
pub fn local_path(next: Option<&str>) -> Option<&str> {
    let next = next?;
    let local = next.starts_with('/')
        && !next.starts_with("//")
        && !next.starts_with("/\\")
        && !next.chars().any(|c| c.is_control());
    local.then_some(next)
}

/// `GET /`: the signed-in person's start page, or the sign-in page.
pub async fn home(State(app): State<AppState>, headers: HeaderMap) -> Redirect {
    match session_caller(&headers, &app) {
        Some(caller) => Redirect::to(home_of(caller.role)),
        None => Redirect::to("/login"),
    }
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    chrome: Chrome,
    next: String,
    error: Option<String>,
    development: bool,
}

#[derive(Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

async fn login_page(State(app): State<AppState>, Query(query): Query<LoginQuery>) -> Response {
    render(LoginPage {
        chrome: Chrome::anonymous(),
        next: local_path(query.next.as_deref()).unwrap_or("").to_owned(),
        error: None,
        development: development_secret(&app),
    })
}

/// The sign-in page again, saying why it did not work.
fn refused(app: &AppState, status: StatusCode, next: Option<&str>, why: String) -> Response {
    let mut response = render(LoginPage {
        chrome: Chrome::anonymous(),
        next: local_path(next).unwrap_or("").to_owned(),
        error: Some(why),
        development: development_secret(app),
    });
    *response.status_mut() = status;
    response
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
    next: Option<String>,
}

/// `POST /login`: checks the token as the API would, then keeps it in the
/// session cookie until it expires.
async fn login(
    State(app): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if !session::from_this_site(&headers) {
        return refused(
            &app,
            StatusCode::FORBIDDEN,
            None,
            "Sign-in from another site is refused.".into(),
        );
    }
    match Caller::from_token(app.jwt_secret(), form.token.trim()) {
        Ok(caller) => start_session(&headers, form.token.trim(), &caller, form.next.as_deref()),
        Err(error) => refused(
            &app,
            StatusCode::UNAUTHORIZED,
            form.next.as_deref(),
            format!("That token does not sign you in: {}", error.0),
        ),
    }
}

/// The session cookie for `caller`'s `token`, and the way on: `next` when it
/// is a page of this site, else the role's start page.
fn start_session(
    headers: &HeaderMap,
    token: &str,
    caller: &Caller,
    next: Option<&str>,
) -> Response {
    let cookie = session::start(headers, token, caller.expires_at - Utc::now().timestamp());
    let to = local_path(next).unwrap_or(home_of(caller.role));
    let mut response = Redirect::to(to).into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

#[derive(Deserialize)]
struct LoginAsForm {
    tenant: String,
    role: String,
    user: String,
    #[serde(default)]
    customer: String,
    next: Option<String>,
}

/// `POST /login/as`: only with the development secret; mints the token a
/// tenant's identity system would, and signs in with it.
async fn login_as(
    State(app): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<LoginAsForm>,
) -> Response {
    if !development_secret(&app) {
        return StatusCode::NOT_FOUND.into_response();
    }
    if !session::from_this_site(&headers) {
        return refused(
            &app,
            StatusCode::FORBIDDEN,
            None,
            "Sign-in from another site is refused.".into(),
        );
    }
    let role: Role = match form.role.parse() {
        Ok(role) => role,
        Err(_) => {
            return refused(
                &app,
                StatusCode::UNPROCESSABLE_ENTITY,
                form.next.as_deref(),
                format!("Unknown role {:?}.", form.role),
            );
        }
    };
    let now = Utc::now().timestamp();
    let customer = form.customer.trim();
    let claims = Claims {
        sub: form.user.trim().to_owned(),
        tenant: form.tenant.trim().to_owned(),
        role,
        customer: (role == Role::Customer && !customer.is_empty()).then(|| customer.to_owned()),
        exp: now + DEVELOPMENT_SESSION_SECS,
        iat: Some(now),
    };
    let token = jwt::issue(app.jwt_secret(), &claims);
    match Caller::from_token(app.jwt_secret(), &token) {
        Ok(caller) => start_session(&headers, &token, &caller, form.next.as_deref()),
        Err(error) => refused(
            &app,
            StatusCode::UNPROCESSABLE_ENTITY,
            form.next.as_deref(),
            format!("Cannot sign in as that: {}", error.0),
        ),
    }
}

/// `POST /logout`: ends the session and goes back to the sign-in page.
async fn logout(headers: HeaderMap) -> Response {
    if !session::from_this_site(&headers) {
        return StatusCode::FORBIDDEN.into_response();
    }
    let mut response = Redirect::to("/login").into_response();
    if let Ok(value) = HeaderValue::from_str(&session::end(&headers)) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::local_path;

    #[test]
    fn next_only_leads_to_a_path_of_this_site() {
        assert_eq!(local_path(Some("/app/audit?x=1")), Some("/app/audit?x=1"));
        for away in [
            "//evil.example/",
            "/\\evil.example",
            "https://evil.example/",
            "javascript:alert(1)",
            "app",
            "/a\nb",
        ] {
            assert_eq!(local_path(Some(away)), None, "{away:?}");
        }
        assert_eq!(local_path(None), None);
    }
}
