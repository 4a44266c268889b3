//! Who is calling: the bearer token or the session cookie holding one,
//! checked on every request.
//!
//! A missing or bad token answers 401; a valid token whose role may not use an
//! endpoint answers 403. The tenant always comes from the token, never from
//! the URL, and a customer's id likewise (CONTRACT.md "Authentication").
//!
//! A browser's pages call the same endpoints with the session cookie
//! ([`session`]) instead of the header. A cookie travels with every request
//! the browser makes to this site, also one a page of another site starts, so
//! an unsafe request that is authenticated by the cookie alone must come from
//! a page of this site ([`session::from_this_site`]), or it is refused with 403.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use dossier_domain::{Actor, CustomerId, TenantId};
pub mod jwt;
pub mod session;

use jwt::Role;

use crate::commands::CommandContext;
use crate::error::{ApiError, AppError};
use crate::state::AppState;

/// The verified caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub sub: String,
    pub tenant: TenantId,
    pub role: Role,
    /// Set exactly when `role` is `customer`.
    pub customer: Option<CustomerId>,
    /// The token's `exp` (seconds since the Unix epoch): a session lasts until then.
    pub expires_at: i64,
    /// The receipt key of the request's `Idempotency-Key` while the request
    /// holds it (`crate::http::idempotency`): its command's events carry it
    /// (and those of its earlier commands a key derived from it).
    pub idempotency_key: Option<String>,
}

impl Caller {
    pub fn actor(&self) -> Actor {
        Actor::new(self.sub.clone())
    }

    /// The context of the request's command: with the request's idempotency
    /// key, if it has one, so that the command's receipt is written with its
    /// events. A request runs at most one command with it; the other
    /// commands of a request that runs several take
    /// [`Self::context_without_key`].
    pub fn context(&self) -> CommandContext {
        let ctx = self.context_without_key();
        match &self.idempotency_key {
            Some(key) => ctx.with_idempotency_key(key.clone()),
            None => ctx,
        }
    }

    /// The context of a command that does not carry the request's key.
    pub fn context_without_key(&self) -> CommandContext {
        CommandContext::new(self.tenant.clone(), self.actor())
    }

    /// The receipt key of one earlier command of a request that runs
    /// several (a message's file, `part` "file"): the request's key with
    /// `#part`, so that a retry after a crash between the commands finds
    /// what the earlier one recorded. `None` without an idempotency key.
    pub fn part_key(&self, part: &str) -> Option<String> {
        let key = self.idempotency_key.as_ref()?;
        Some(format!("{key}#{part}"))
    }

    /// The context of the command of `part` (see [`Self::part_key`]).
    pub fn part_context(&self, part: &str) -> CommandContext {
        let ctx = self.context_without_key();
        match self.part_key(part) {
            Some(key) => ctx.with_idempotency_key(key),
            None => ctx,
        }
    }

    pub fn require(self, allowed: &[Role]) -> Result<Self, ApiError> {
        if allowed.contains(&self.role) {
            Ok(self)
        } else {
            Err(ApiError(AppError::Forbidden(format!(
                "the role {} may not use this endpoint",
                self.role
            ))))
        }
    }
}

/// The token of an `Authorization` header value of the `Bearer` scheme, or
/// `None` for another scheme or no token. The scheme name is case-insensitive
/// and is followed by whitespace (RFC 9110 section 11.1, RFC 6750 section 2.1).
fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization
        .trim()
        .split_once(|c: char| c.is_ascii_whitespace())?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = match parts.headers.get(axum::http::header::AUTHORIZATION) {
            Some(header) => header.to_str().ok().and_then(bearer_token).ok_or_else(|| {
                ApiError(AppError::Unauthorized(
                    "the Authorization header must be `Bearer <token>`".into(),
                ))
            })?,
            None => {
                let token = session::token(&parts.headers).ok_or_else(|| {
                    ApiError(AppError::Unauthorized("missing bearer token".into()))
                })?;
                if !parts.method.is_safe() && !session::from_this_site(&parts.headers) {
                    return Err(ApiError(AppError::Forbidden(
                        "a request from another site may not change anything here".into(),
                    )));
                }
                token
            }
        };
        let mut caller = Self::from_token(state.jwt_secret(), token)?;
        caller.idempotency_key = parts
            .extensions
            .get::<crate::http::idempotency::IdempotencyHandle>()
            .and_then(|handle| handle.receipt_key());
        Ok(caller)
    }
}

impl Caller {
    /// The caller a token names, or 401 when it is not a valid token of ours.
    pub fn from_token(secret: &[u8], token: &str) -> Result<Self, ApiError> {
        let claims = jwt::verify(secret, token).map_err(|error| {
            // Every refusal answers the same 401; the log says which it was.
            tracing::info!(%error, "refused a token");
            ApiError(AppError::Unauthorized(format!("invalid token: {error}")))
        })?;
        let tenant = TenantId::parse(&claims.tenant).map_err(|_| {
            ApiError(AppError::Unauthorized(
                "invalid token: malformed tenant claim".into(),
            ))
        })?;
        let customer = match (claims.role, claims.customer.as_deref()) {
            (Role::Customer, Some(raw)) => Some(CustomerId::parse(raw).map_err(|_| {
                ApiError(AppError::Unauthorized(
                    "invalid token: malformed customer claim".into(),
                ))
            })?),
            (Role::Customer, None) => {
                return Err(ApiError(AppError::Unauthorized(
                    "invalid token: a customer token needs a customer claim".into(),
                )));
            }
            _ => None,
        };
        Ok(Self {
            sub: claims.sub,
            tenant,
            role: claims.role,
            customer,
            expires_at: claims.exp,
            idempotency_key: None,
        })
    }
}

/// Staff and upstream systems: the staff endpoints.
pub struct Staff(pub Caller);

impl FromRequestParts<AppState> for Staff {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        caller.require(&[Role::Staff, Role::System]).map(Self)
    }
}

/// Staff and auditors: reading the audit trail.
pub struct StaffOrAuditor(pub Caller);

impl FromRequestParts<AppState> for StaffOrAuditor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        caller
            .require(&[Role::Staff, Role::System, Role::Auditor])
            .map(Self)
    }
}

/// Auditors: the raw event log.
pub struct Auditor(pub Caller);

impl FromRequestParts<AppState> for Auditor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        caller.require(&[Role::Auditor]).map(Self)
    }
}

/// A customer in the portal, with its own customer id from the token.
pub struct PortalCustomer {
    pub caller: Caller,
    pub customer: CustomerId,
}

impl FromRequestParts<AppState> for PortalCustomer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state)
            .await?
            .require(&[Role::Customer])?;
        let customer = caller.customer.clone().ok_or_else(|| {
            ApiError(AppError::Unauthorized(
                "a customer token needs a customer claim".into(),
            ))
        })?;
        Ok(Self { caller, customer })
    }
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn bearer_token_takes_the_scheme_in_any_case() {
        for value in [
            "Bearer abc.def.ghi",
            "bearer abc.def.ghi",
            "BEARER abc.def.ghi",
            "bEaReR   abc.def.ghi ",
            "Bearer\tabc.def.ghi",
        ] {
            assert_eq!(bearer_token(value), Some("abc.def.ghi"), "{value:?}");
        }
        for value in [
            "Basic dXNlcjpwYXNz",
            "Bearer ",
            "Bearer",
            "Bearerabc.def.ghi",
            "",
        ] {
            assert_eq!(bearer_token(value), None, "{value:?}");
        }
    }
}
