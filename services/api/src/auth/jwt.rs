//! Bearer tokens: HS256 JSON Web Tokens, issued and verified here with `hmac`,
//! `sha2` and `base64` (contract "Authentication").
//!
//! We write the few lines of JWT ourselves instead of pulling in a JWT crate: only
//! HS256 is ever accepted, so the classic JWT attacks (`alg: none`, algorithm
//! confusion with a public key) have nothing to work with, and every rejection
//! has its own [`AuthError`] variant for the log while the API answers all of them
//! with the same 401.
//!
//! [`verify`] takes the current time as an argument so that expiry is tested
//! without a clock; it applies no leeway (we issue the tokens; a caller that must
//! accept clock skew can pass a slightly earlier `now_unix`).

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The only algorithm we issue and accept.
const ALGORITHM: &str = "HS256";

/// Longer tokens are rejected before any decoding, so a huge header costs
/// nothing. Ours are a few hundred bytes.
const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Who the caller is to Dossier; decides which endpoints answer (contract
/// "Authentication"). Serialized in lowercase, as in the token's `role` claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A tenant's employee: the staff endpoints.
    Staff,
    /// A tenant's customer: the portal, limited to the token's `customer` claim.
    Customer,
    /// Reads the audit trail and the raw event log.
    Auditor,
    /// Another system acting on a tenant's behalf.
    System,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 4] = [Role::Staff, Role::Customer, Role::Auditor, Role::System];

    /// The claim value: `staff`, `customer`, `auditor` or `system`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Staff => "staff",
            Role::Customer => "customer",
            Role::Auditor => "auditor",
            Role::System => "system",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one of [`Role`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: expected staff, customer, auditor or system")]
pub struct ParseRoleError(pub String);

impl FromStr for Role {
    type Err = ParseRoleError;

    /// Exact, lowercase names only: the same rule as in a token, so the CLI
    /// cannot mint a role that verification would refuse.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == s)
            .ok_or_else(|| ParseRoleError(s.to_owned()))
    }
}

/// The claims of a verified token. A `Claims` returned by [`verify`] always has a
/// non-empty `sub` and `tenant`, an `exp` in the future, and a `customer` when the
/// role is [`Role::Customer`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id (recorded as the actor of commands).
    pub sub: String,
    /// The tenant every request of this token is confined to.
    pub tenant: String,
    /// What the caller may do.
    pub role: Role,
    /// The customer id; required for [`Role::Customer`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    /// Expiry, in seconds since the Unix epoch; the token is invalid from then on.
    pub exp: i64,
    /// When the token was issued, in seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
}

/// Why a token was refused. The API answers every variant with 401
/// `unauthorized`; the variant is for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Not a JWT: wrong shape, bad base64url, or JSON that is not what a JWT holds.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The header names another algorithm than HS256 (including `none`).
    #[error("token algorithm {0:?} is not accepted (only HS256)")]
    UnsupportedAlgorithm(String),
    /// The signature does not match: forged, altered, or signed with another secret.
    #[error("token signature is invalid")]
    BadSignature,
    /// The token has no `exp` claim; we never accept tokens that live forever.
    #[error("token has no expiry (exp)")]
    MissingExpiry,
    /// The token's `exp` has passed.
    #[error("token expired at {exp} (now {now})")]
    Expired {
        /// The token's `exp`.
        exp: i64,
        /// The time it was checked against.
        now: i64,
    },
    /// The token's `nbf` (not before) lies in the future.
    #[error("token is not valid before {nbf} (now {now})")]
    NotYetValid {
        /// The token's `nbf`.
        nbf: i64,
        /// The time it was checked against.
        now: i64,
    },
    /// A required claim (`sub`, `tenant` or `role`) is missing or empty.
    #[error("token claim {0} is missing or empty")]
    MissingClaim(&'static str),
    /// The `role` claim is not one of staff, customer, auditor, system.
    #[error("token role {0:?} is unknown")]
    UnknownRole(String),
    /// The role is `customer` but the token names no customer.
    #[error("token has role customer but no customer claim")]
    MissingCustomer,
}

/// The JOSE header we write and read.
#[derive(Serialize, Deserialize)]
struct Header {
    alg: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
    /// Present only to be refused: RFC 7515 requires rejecting a token whose
    /// critical extensions we do not understand, and we understand none.
    #[serde(default, skip_serializing)]
    crit: Option<serde_json::Value>,
}

/// The payload as it arrives, before each rule is checked, so that a missing
/// claim gets its own error rather than a generic parse failure.
#[derive(Deserialize)]
struct RawClaims {
    sub: Option<String>,
    tenant: Option<String>,
    role: Option<String>,
    customer: Option<String>,
    exp: Option<i64>,
    iat: Option<i64>,
    nbf: Option<i64>,
}

/// Signs `claims` with `secret` into a compact HS256 JWT.
///
/// `issue` does not check the claims; [`verify`] does, so a token for an invalid
/// claim set (no customer for a customer, say) is refused when it is used.
pub fn issue(secret: &[u8], claims: &Claims) -> String {
    let header = Header {
        alg: Some(ALGORITHM.to_owned()),
        typ: Some("JWT".to_owned()),
        crit: None,
    };
    // Deliberate panics: serializing structs of strings and integers to JSON
    // cannot fail.
    let header = serde_json::to_vec(&header).expect("a JWT header serializes");
    let payload = serde_json::to_vec(claims).expect("JWT claims serialize");
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let signature = mac(secret, &signing_input).finalize().into_bytes();
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// Verifies `token` against `secret` at time `now_unix` (seconds since the Unix
/// epoch) and returns its claims.
///
/// Checks, in order: shape and size, the header's algorithm (only HS256), the
/// signature (in constant time), then the claims: `exp` present and after
/// `now_unix`, `nbf` (if present) not after it, non-empty `sub` and `tenant`, a
/// known `role`, and a `customer` for the customer role. The payload is not
/// interpreted before the signature has been checked.
pub fn verify(secret: &[u8], token: &str, now_unix: i64) -> Result<Claims, AuthError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(AuthError::Malformed("token is too long"));
    }
    let mut parts = token.split('.');
    let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed("expected three dot-separated parts"));
    };

    let header: Header = decode_json(header_b64, "header")?;
    match header.alg.as_deref() {
        Some(ALGORITHM) => {}
        Some(other) => {
            // Cap what we echo: the value is attacker-chosen and ends up in logs.
            let shown: String = other.chars().take(16).collect();
            return Err(AuthError::UnsupportedAlgorithm(shown));
        }
        None => return Err(AuthError::Malformed("header has no alg")),
    }
    if header.crit.is_some() {
        return Err(AuthError::Malformed("header has critical extensions"));
    }

    let signature = URL_SAFE_NO_PAD
        .decode(signature_b64)
        .map_err(|_| AuthError::Malformed("signature is not base64url"))?;
    let signing_input_len = header_b64.len() + 1 + payload_b64.len();
    // `verify_slice` compares in constant time, so timing reveals nothing about
    // how much of a forged signature was right.
    mac(secret, &token[..signing_input_len])
        .verify_slice(&signature)
        .map_err(|_| AuthError::BadSignature)?;

    let raw: RawClaims = decode_json(payload_b64, "payload")?;
    let exp = raw.exp.ok_or(AuthError::MissingExpiry)?;
    if now_unix >= exp {
        return Err(AuthError::Expired { exp, now: now_unix });
    }
    if let Some(nbf) = raw.nbf
        && now_unix < nbf
    {
        return Err(AuthError::NotYetValid { nbf, now: now_unix });
    }
    let sub = non_empty(raw.sub).ok_or(AuthError::MissingClaim("sub"))?;
    let tenant = non_empty(raw.tenant).ok_or(AuthError::MissingClaim("tenant"))?;
    let role = non_empty(raw.role).ok_or(AuthError::MissingClaim("role"))?;
    let role = role
        .parse::<Role>()
        .map_err(|ParseRoleError(name)| AuthError::UnknownRole(name.chars().take(32).collect()))?;
    let customer = non_empty(raw.customer);
    if role == Role::Customer && customer.is_none() {
        return Err(AuthError::MissingCustomer);
    }

    Ok(Claims {
        sub,
        tenant,
        role,
        customer,
        exp,
        iat: raw.iat,
    })
}

/// The token of an `Authorization: Bearer <token>` header value, or `None` when
/// the value uses another scheme or carries no token. The scheme name is
/// case-insensitive (RFC 7235).
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn mac(secret: &[u8], signing_input: &str) -> HmacSha256 {
    // Deliberate panic: HMAC takes keys of any length, so `new_from_slice`
    // cannot fail for it.
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(signing_input.as_bytes());
    mac
}

fn decode_json<T: for<'de> Deserialize<'de>>(
    part: &str,
    which: &'static str,
) -> Result<T, AuthError> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| {
        AuthError::Malformed(match which {
            "header" => "header is not base64url",
            _ => "payload is not base64url",
        })
    })?;
    serde_json::from_slice(&bytes).map_err(|_| {
        AuthError::Malformed(match which {
            "header" => "header is not a JSON object of the expected shape",
            _ => "payload is not a JSON object of the expected shape",
        })
    })
}

/// `None` for a missing or blank claim: an empty tenant must never match a
/// tenant's data.
fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &[u8] = b"test-secret-of-a-reasonable-length!!";
    const NOW: i64 = 1_800_000_000;

    fn staff() -> Claims {
        Claims {
            sub: "user-1".into(),
            tenant: "tenant-a".into(),
            role: Role::Staff,
            customer: None,
            exp: NOW + 3600,
            iat: Some(NOW),
        }
    }

    /// A token with any header and payload, correctly signed with [`SECRET`].
    fn signed(header: serde_json::Value, payload: serde_json::Value) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(payload.to_string())
        );
        let sig = mac(SECRET, &input).finalize().into_bytes();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    fn hs256() -> serde_json::Value {
        json!({"alg": "HS256", "typ": "JWT"})
    }

    #[test]
    fn round_trip() {
        let claims = staff();
        let token = issue(SECRET, &claims);
        assert_eq!(token.split('.').count(), 3);
        assert!(!token.contains('='), "no padding: {token}");
        assert_eq!(verify(SECRET, &token, NOW).unwrap(), claims);

        let customer = Claims {
            role: Role::Customer,
            customer: Some("cust-42".into()),
            iat: None,
            ..staff()
        };
        let token = issue(SECRET, &customer);
        assert_eq!(verify(SECRET, &token, NOW).unwrap(), customer);
    }

    #[test]
    fn issued_token_has_the_standard_shape() {
        let token = issue(SECRET, &staff());
        let mut parts = token.split('.');
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts.next().unwrap()).unwrap())
                .unwrap();
        assert_eq!(header, json!({"alg": "HS256", "typ": "JWT"}));
        let payload: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts.next().unwrap()).unwrap())
                .unwrap();
        assert_eq!(
            payload,
            json!({"sub": "user-1", "tenant": "tenant-a", "role": "staff",
                   "exp": NOW + 3600, "iat": NOW})
        );
    }

    #[test]
    fn rejects_malformed_tokens() {
        let good = issue(SECRET, &staff());
        let (head, _) = good.split_once('.').unwrap();
        let cases = [
            String::new(),
            "abc".into(),
            "a.b".into(),
            format!("{good}.extra"),
            format!("{head}.e30.s!g"),
            "!!!.e30.sig".into(),
            "x".repeat(MAX_TOKEN_LEN + 1),
            // Valid base64url, but the header is not JSON.
            format!("{}.e30.AAAA", URL_SAFE_NO_PAD.encode("not json")),
            // Header without alg.
            format!("{}.e30.AAAA", URL_SAFE_NO_PAD.encode("{}")),
        ];
        for token in cases {
            assert!(
                matches!(verify(SECRET, &token, NOW), Err(AuthError::Malformed(_))),
                "{token:.60}"
            );
        }
        // Correctly signed, but the payload is not the claims object.
        let token = signed(hs256(), json!(["not", "an", "object"]));
        assert!(matches!(
            verify(SECRET, &token, NOW),
            Err(AuthError::Malformed(_))
        ));
        let token = signed(hs256(), json!({"sub": "u", "exp": "tomorrow"}));
        assert!(matches!(
            verify(SECRET, &token, NOW),
            Err(AuthError::Malformed(_))
        ));
        // Signature with padding is not base64url-without-padding.
        let padded = format!("{good}=");
        assert!(matches!(
            verify(SECRET, &padded, NOW),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn rejects_other_algorithms_including_none() {
        let payload = serde_json::to_value(staff()).unwrap();
        for alg in ["none", "None", "HS512", "RS256", "hs256"] {
            let token = signed(json!({"alg": alg, "typ": "JWT"}), payload.clone());
            assert_eq!(
                verify(SECRET, &token, NOW),
                Err(AuthError::UnsupportedAlgorithm(alg.into()))
            );
        }
        // The classic `alg: none` token with an empty signature.
        let unsigned = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(payload.to_string())
        );
        assert_eq!(
            verify(SECRET, &unsigned, NOW),
            Err(AuthError::UnsupportedAlgorithm("none".into()))
        );
        let crit = signed(json!({"alg": "HS256", "crit": ["b64"]}), payload);
        assert!(matches!(
            verify(SECRET, &crit, NOW),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn rejects_bad_signatures() {
        let token = issue(SECRET, &staff());
        assert_eq!(
            verify(b"another-secret", &token, NOW),
            Err(AuthError::BadSignature)
        );

        // A payload swapped for another tenant keeps the old signature.
        let (_, rest) = token.split_once('.').unwrap();
        let (_, sig) = rest.split_once('.').unwrap();
        let (head, _) = token.split_once('.').unwrap();
        let forged_payload = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&Claims {
                tenant: "tenant-b".into(),
                ..staff()
            })
            .unwrap(),
        );
        let forged = format!("{head}.{forged_payload}.{sig}");
        assert_eq!(verify(SECRET, &forged, NOW), Err(AuthError::BadSignature));

        // Truncated and empty signatures.
        // Three characters fewer keeps the base64url canonical (40 characters).
        let truncated = &token[..token.len() - 3];
        assert_eq!(verify(SECRET, truncated, NOW), Err(AuthError::BadSignature));
        let empty_sig = format!("{head}.{}.", rest.split_once('.').unwrap().0);
        assert_eq!(
            verify(SECRET, &empty_sig, NOW),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn rejects_missing_and_past_expiry() {
        let no_exp = signed(hs256(), json!({"sub": "u", "tenant": "t", "role": "staff"}));
        assert_eq!(verify(SECRET, &no_exp, NOW), Err(AuthError::MissingExpiry));

        let token = issue(
            SECRET,
            &Claims {
                exp: NOW,
                ..staff()
            },
        );
        assert_eq!(
            verify(SECRET, &token, NOW),
            Err(AuthError::Expired { exp: NOW, now: NOW })
        );
        assert!(verify(SECRET, &token, NOW - 1).is_ok());
    }

    #[test]
    fn rejects_tokens_not_yet_valid() {
        let token = signed(
            hs256(),
            json!({"sub": "u", "tenant": "t", "role": "staff", "exp": NOW + 60, "nbf": NOW + 10}),
        );
        assert_eq!(
            verify(SECRET, &token, NOW),
            Err(AuthError::NotYetValid {
                nbf: NOW + 10,
                now: NOW
            })
        );
        assert!(verify(SECRET, &token, NOW + 10).is_ok());
    }

    #[test]
    fn rejects_empty_or_missing_sub_and_tenant() {
        for (claim, value) in [("sub", ""), ("sub", "  "), ("tenant", ""), ("tenant", " ")] {
            let mut claims = serde_json::to_value(staff()).unwrap();
            claims[claim] = json!(value);
            let token = signed(hs256(), claims);
            assert_eq!(
                verify(SECRET, &token, NOW),
                Err(AuthError::MissingClaim(claim)),
                "{claim}={value:?}"
            );
        }
        for claim in ["sub", "tenant", "role"] {
            let mut claims = serde_json::to_value(staff()).unwrap();
            claims.as_object_mut().unwrap().remove(claim);
            let token = signed(hs256(), claims);
            assert_eq!(
                verify(SECRET, &token, NOW),
                Err(AuthError::MissingClaim(claim))
            );
        }
    }

    #[test]
    fn rejects_unknown_roles() {
        let mut claims = serde_json::to_value(staff()).unwrap();
        claims["role"] = json!("admin");
        let token = signed(hs256(), claims);
        assert_eq!(
            verify(SECRET, &token, NOW),
            Err(AuthError::UnknownRole("admin".into()))
        );
    }

    #[test]
    fn rejects_customer_role_without_customer() {
        for customer in [None, Some(""), Some(" ")] {
            let mut claims = serde_json::to_value(Claims {
                role: Role::Customer,
                ..staff()
            })
            .unwrap();
            if let Some(customer) = customer {
                claims["customer"] = json!(customer);
            }
            let token = signed(hs256(), claims);
            assert_eq!(
                verify(SECRET, &token, NOW),
                Err(AuthError::MissingCustomer),
                "{customer:?}"
            );
        }
    }

    #[test]
    fn roles_parse_and_serialize_in_lowercase() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
            assert_eq!(serde_json::to_value(role).unwrap(), json!(role.as_str()));
        }
        assert_eq!("Staff".parse::<Role>(), Err(ParseRoleError("Staff".into())));
    }

    #[test]
    fn bearer_token_extracts_the_token() {
        assert_eq!(bearer_token("Bearer abc.def.ghi"), Some("abc.def.ghi"));
        assert_eq!(bearer_token("bearer   abc"), Some("abc"));
        assert_eq!(bearer_token("Basic dXNlcjpwYXNz"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token(""), None);
    }
}
