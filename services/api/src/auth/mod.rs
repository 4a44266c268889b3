//! Who is calling: the bearer token, checked on every request.
//!
//! A missing or bad token answers 401; a valid token whose role may not use an
//! endpoint answers 403. The tenant always comes from the token, never from
//! the URL, and a customer's id likewise (CONTRACT.md "Authentication").

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use dossier_domain::{Actor, CustomerId, TenantId};
pub mod jwt;

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
}

impl Caller {
    pub fn actor(&self) -> Actor {
        Actor::new(self.sub.clone())
    }

    pub fn context(&self) -> CommandContext {
        CommandContext::new(self.tenant.clone(), self.actor())
    }

    fn require(self, allowed: &[Role]) -> Result<Self, ApiError> {
        if allowed.contains(&self.role) {
            Ok(self)
        } else {
            Err(ApiError(AppError::Forbidden(format!(
                "the role {} may not use this endpoint",
                role_name(self.role)
            ))))
        }
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Staff => "staff",
        Role::Customer => "customer",
        Role::Auditor => "auditor",
        Role::System => "system",
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError(AppError::Unauthorized("missing bearer token".into())))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError(AppError::Unauthorized(
                    "the Authorization header must be `Bearer <token>`".into(),
                ))
            })?;
        let now = chrono::Utc::now().timestamp();
        let claims = jwt::verify(state.jwt_secret(), token.trim(), now)
            .map_err(|error| ApiError(AppError::Unauthorized(format!("invalid token: {error}"))))?;
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
