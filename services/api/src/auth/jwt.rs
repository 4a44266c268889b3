//! Bearer tokens: HS256 JSON Web Tokens (contract "Authentication"), issued and
//! verified with the `jsonwebtoken` crate.
//!
//! What we pin, and why:
//! - **HS256 only.** [`Validation`] lists HS256 alone, and the crate's crypto
//!   goes through [`HS256_ONLY`], our own provider on `ring` (the crypto library
//!   rustls already runs on): it builds nothing but an HMAC-SHA256 key, so even a
//!   mistake in the validation could not make another algorithm, `none` or a
//!   public key count. The crate is built without default features, so neither
//!   RustCrypto's RSA/EC stack nor aws-lc enters the tree.
//! - **`exp` is required**, and `nbf` is honoured when present, both with
//!   [`LEEWAY_SECS`] of leeway for clock skew between the machine that minted a
//!   token and the one checking it. (jsonwebtoken ≥ 10.3 refuses an `exp` or `nbf`
//!   of the wrong JSON type instead of ignoring it.)
//! - **Every rejection keeps its own [`AuthError`] variant** for the log, while
//!   the API answers all of them with the same 401 `unauthorized`.
//!
//! The time checks use the system clock (the crate has no other), so tests of
//! expiry build tokens relative to the current time.

use std::fmt;
use std::str::FromStr;
use std::sync::Once;

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::signature::{self, Signer, Verifier};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::hmac;
use serde::{Deserialize, Serialize};

/// How far `exp` and `nbf` may be off: tokens stay valid this many seconds
/// after their `exp`, and are valid this many seconds before their `nbf`. Small,
/// because it extends every token's life; enough for NTP-synchronised clocks.
pub const LEEWAY_SECS: u64 = 30;

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
/// non-empty `sub` and `tenant`, an `exp` that has not passed (give or take
/// [`LEEWAY_SECS`]), and a `customer` when the role is [`Role::Customer`].
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
    /// Not a JWT we can read: wrong shape, bad base64url, JSON that is not what
    /// a JWT holds, an algorithm name no JWT library knows (`none` among them),
    /// a critical header extension, or a registered claim of the wrong type.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The header names a known algorithm other than HS256.
    #[error("token algorithm {0} is not accepted (only HS256)")]
    UnsupportedAlgorithm(String),
    /// The signature does not match: forged, altered, or signed with another secret.
    #[error("token signature is invalid")]
    BadSignature,
    /// The token has no `exp` claim; we never accept tokens that live forever.
    #[error("token has no expiry (exp)")]
    MissingExpiry,
    /// The token's `exp` has passed (by more than the leeway).
    #[error("token has expired")]
    Expired,
    /// The token's `nbf` (not before) lies in the future (by more than the leeway).
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    /// The token names an audience (`aud`); ours never do, and a token meant
    /// for another service must not open this one.
    #[error("token is meant for another audience (aud)")]
    WrongAudience,
    /// A required claim (`sub`, `tenant` or `role`) is missing or empty.
    #[error("token claim {0} is missing or empty")]
    MissingClaim(&'static str),
    /// The `role` claim is not one of staff, customer, auditor, system.
    #[error("token role {0:?} is unknown")]
    UnknownRole(String),
    /// The role is `customer` but the token names no customer.
    #[error("token has role customer but no customer claim")]
    MissingCustomer,
    /// The token could not be checked at all (an empty secret, say): a fault
    /// of ours, not of the caller, but still no access.
    #[error("token could not be checked: {0}")]
    Unverifiable(String),
}

/// The payload as it arrives, before each rule is checked, so that a missing
/// claim gets its own error rather than a generic parse failure. (`exp` and
/// `nbf` are checked by jsonwebtoken; `exp` is read here to return it.)
#[derive(Deserialize)]
struct RawClaims {
    sub: Option<String>,
    tenant: Option<String>,
    role: Option<String>,
    customer: Option<String>,
    exp: Option<i64>,
    iat: Option<i64>,
}

/// Signs `claims` with `secret` into a compact HS256 JWT.
///
/// `issue` does not check the claims; [`verify`] does, so a token for an invalid
/// claim set (no customer for a customer, say) is refused when it is used.
///
/// # Panics
///
/// If `secret` is empty. Deliberate: the settings never hold an empty secret
/// (an empty `DOSSIER_JWT_SECRET` means the default), so this is a programming
/// error, and a token signed with nothing must never be printed.
pub fn issue(secret: &[u8], claims: &Claims) -> String {
    install_provider();
    let key = EncodingKey::from_secret(secret).expect("the JWT secret is not empty");
    // Deliberate panic: with our provider installed, HS256 signing of a struct
    // of strings and integers cannot fail.
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key)
        .expect("HS256 signs any claims")
}

/// Verifies `token` against `secret` and returns its claims.
///
/// jsonwebtoken checks the shape, the header (only HS256; no critical
/// extensions), the signature (in constant time, before the payload is
/// interpreted), `exp` (required) and `nbf` (if present) against the system
/// clock with [`LEEWAY_SECS`], and refuses any `aud`. Then this function
/// checks our claims: non-empty `sub` and `tenant`, a known `role`, and a
/// `customer` for the customer role.
pub fn verify(secret: &[u8], token: &str) -> Result<Claims, AuthError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(AuthError::Malformed("token is too long"));
    }
    install_provider();
    let key =
        DecodingKey::from_secret(secret).map_err(|e| AuthError::Unverifiable(e.to_string()))?;
    let raw = jsonwebtoken::decode::<RawClaims>(token, &key, &validation())
        .map_err(|error| rejection(token, error.into_kind()))?
        .claims;

    let exp = raw.exp.ok_or(AuthError::MissingExpiry)?;
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

/// HS256 only, `exp` required, `nbf` checked, the leeway of [`LEEWAY_SECS`].
fn validation() -> Validation {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_required_spec_claims(&["exp"]);
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.leeway = LEEWAY_SECS;
    validation
}

/// The [`AuthError`] for one of jsonwebtoken's refusals.
fn rejection(token: &str, kind: ErrorKind) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::MissingRequiredClaim(_) => AuthError::MissingExpiry,
        ErrorKind::InvalidAlgorithm | ErrorKind::UnsupportedAlgorithm => {
            // The header parsed (that is how the algorithm was known), so name
            // the algorithm for the log; it is one of the crate's fixed names.
            match jsonwebtoken::decode_header(token) {
                Ok(header) => AuthError::UnsupportedAlgorithm(format!("{:?}", header.alg)),
                Err(_) => AuthError::Malformed("the header names no usable algorithm"),
            }
        }
        ErrorKind::InvalidToken => AuthError::Malformed(
            "expected three dot-separated parts and a header without critical extensions",
        ),
        ErrorKind::Base64(_) => AuthError::Malformed("a part is not base64url"),
        ErrorKind::Utf8(_) => AuthError::Malformed("a part is not UTF-8"),
        ErrorKind::Json(_) => AuthError::Malformed(
            "the header or payload is not a JSON object of the expected shape \
             (or names an unknown algorithm)",
        ),
        ErrorKind::InvalidClaimFormat(claim) => match claim.as_str() {
            "exp" => AuthError::Malformed("exp is not a number of seconds"),
            "nbf" => AuthError::Malformed("nbf is not a number of seconds"),
            _ => AuthError::Malformed("a registered claim has the wrong type"),
        },
        // Key and provider faults (an empty secret, say); `ErrorKind` has no
        // `Display`, and these variants hold nothing secret.
        other => AuthError::Unverifiable(format!("{other:?}")),
    }
}

/// `None` for a missing or blank claim: an empty tenant must never match a
/// tenant's data.
fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

/// jsonwebtoken's crypto for this process: HMAC-SHA256 on `ring`, nothing else.
/// It never handles JWKs, so their helpers stay unimplemented.
static HS256_ONLY: CryptoProvider = CryptoProvider {
    signer_factory: hs256_signer,
    verifier_factory: hs256_verifier,
    key_utils: KeyUtils::new_unimplemented(),
};

/// Makes [`HS256_ONLY`] jsonwebtoken's provider, once per process, before its
/// first use (the crate has none of its own without its backend features).
fn install_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Err only if something else installed a provider first; the
        // validation still admits HS256 alone.
        let _ = HS256_ONLY.install_default();
    });
}

/// An HMAC-SHA256 key: signs and verifies HS256.
struct Hs256(hmac::Key);

impl Hs256 {
    fn for_algorithm(algorithm: &Algorithm, secret: &[u8]) -> jsonwebtoken::errors::Result<Self> {
        if *algorithm != Algorithm::HS256 {
            return Err(ErrorKind::UnsupportedAlgorithm.into());
        }
        Ok(Self(hmac::Key::new(hmac::HMAC_SHA256, secret)))
    }
}

fn hs256_signer(
    algorithm: &Algorithm,
    key: &EncodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtSigner>> {
    Ok(Box::new(Hs256::for_algorithm(algorithm, key.as_bytes())?))
}

fn hs256_verifier(
    algorithm: &Algorithm,
    key: &DecodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtVerifier>> {
    Ok(Box::new(Hs256::for_algorithm(
        algorithm,
        key.try_get_as_bytes()?,
    )?))
}

impl Signer<Vec<u8>> for Hs256 {
    fn try_sign(&self, message: &[u8]) -> Result<Vec<u8>, signature::Error> {
        Ok(hmac::sign(&self.0, message).as_ref().to_vec())
    }
}

impl Verifier<Vec<u8>> for Hs256 {
    /// In constant time, so timing reveals nothing about how much of a forged
    /// signature was right.
    fn verify(&self, message: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        hmac::verify(&self.0, message, signature).map_err(|_| signature::Error::new())
    }
}

impl JwtSigner for Hs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

impl JwtVerifier for Hs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use serde_json::json;

    const SECRET: &[u8] = b"test-secret-of-a-reasonable-length!!";

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    fn staff() -> Claims {
        Claims {
            sub: "user-1".into(),
            tenant: "tenant-a".into(),
            role: Role::Staff,
            customer: None,
            exp: now() + 3600,
            iat: Some(now()),
        }
    }

    fn b64(value: impl AsRef<[u8]>) -> String {
        URL_SAFE_NO_PAD.encode(value)
    }

    /// A token with any header and payload, correctly signed with [`SECRET`]
    /// (written by hand, so that it can say what jsonwebtoken would not).
    fn signed(header: serde_json::Value, payload: serde_json::Value) -> String {
        let input = format!("{}.{}", b64(header.to_string()), b64(payload.to_string()));
        let key = hmac::Key::new(hmac::HMAC_SHA256, SECRET);
        format!("{input}.{}", b64(hmac::sign(&key, input.as_bytes())))
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
        assert_eq!(verify(SECRET, &token).unwrap(), claims);

        let customer = Claims {
            role: Role::Customer,
            customer: Some("cust-42".into()),
            iat: None,
            ..staff()
        };
        let token = issue(SECRET, &customer);
        assert_eq!(verify(SECRET, &token).unwrap(), customer);
    }

    #[test]
    fn issued_token_has_the_standard_shape_and_a_signature_we_can_recompute() {
        let claims = staff();
        let token = issue(SECRET, &claims);
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
                   "exp": claims.exp, "iat": claims.iat})
        );
        // Interoperable: plain HMAC-SHA256 over the first two parts.
        let (input, signature) = token.rsplit_once('.').unwrap();
        let key = hmac::Key::new(hmac::HMAC_SHA256, SECRET);
        assert_eq!(signature, b64(hmac::sign(&key, input.as_bytes())));
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
            format!("{}.e30.AAAA", b64("not json")),
            // Header without alg.
            format!("{}.e30.AAAA", b64("{}")),
        ];
        for token in cases {
            assert!(
                matches!(verify(SECRET, &token), Err(AuthError::Malformed(_))),
                "{token:.60}: {:?}",
                verify(SECRET, &token)
            );
        }
        // Correctly signed, but the payload is not the claims object.
        let token = signed(hs256(), json!(["not", "an", "object"]));
        assert!(matches!(
            verify(SECRET, &token),
            Err(AuthError::Malformed(_))
        ));
        let token = signed(
            hs256(),
            json!({"sub": "u", "tenant": "t", "role": "staff", "exp": "tomorrow"}),
        );
        assert!(matches!(
            verify(SECRET, &token),
            Err(AuthError::Malformed(_))
        ));
        // Signature with padding is not base64url-without-padding.
        let padded = format!("{good}=");
        assert!(matches!(
            verify(SECRET, &padded),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn rejects_other_algorithms_including_none() {
        let payload = serde_json::to_value(staff()).unwrap();
        // Algorithms jsonwebtoken knows: named in the error.
        for alg in ["HS512", "HS384", "RS256", "ES256", "EdDSA"] {
            let token = signed(json!({"alg": alg, "typ": "JWT"}), payload.clone());
            assert_eq!(
                verify(SECRET, &token),
                Err(AuthError::UnsupportedAlgorithm(alg.into()))
            );
        }
        // Names no JWT library should know: the header does not parse.
        for alg in ["none", "None", "hs256"] {
            let token = signed(json!({"alg": alg, "typ": "JWT"}), payload.clone());
            assert!(
                matches!(verify(SECRET, &token), Err(AuthError::Malformed(_))),
                "{alg}"
            );
        }
        // The classic `alg: none` token with an empty signature.
        let unsigned = format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64(payload.to_string()));
        assert!(matches!(
            verify(SECRET, &unsigned),
            Err(AuthError::Malformed(_))
        ));
        // Critical extensions we do not implement.
        let crit = signed(json!({"alg": "HS256", "crit": ["exp"]}), payload);
        assert!(matches!(
            verify(SECRET, &crit),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn the_provider_signs_and_verifies_nothing_but_hs256() {
        let encoding = EncodingKey::from_secret(SECRET).unwrap();
        let decoding = DecodingKey::from_secret(SECRET).unwrap();
        for algorithm in [Algorithm::HS384, Algorithm::HS512, Algorithm::RS256] {
            assert!(
                hs256_signer(&algorithm, &encoding).is_err(),
                "{algorithm:?}"
            );
            assert!(
                hs256_verifier(&algorithm, &decoding).is_err(),
                "{algorithm:?}"
            );
        }
        assert!(hs256_signer(&Algorithm::HS256, &encoding).is_ok());
    }

    #[test]
    fn rejects_bad_signatures() {
        let token = issue(SECRET, &staff());
        assert_eq!(
            verify(b"another-secret", &token),
            Err(AuthError::BadSignature)
        );

        // A payload swapped for another tenant keeps the old signature.
        let (head, rest) = token.split_once('.').unwrap();
        let (_, sig) = rest.split_once('.').unwrap();
        let forged_payload = b64(serde_json::to_vec(&Claims {
            tenant: "tenant-b".into(),
            ..staff()
        })
        .unwrap());
        let forged = format!("{head}.{forged_payload}.{sig}");
        assert_eq!(verify(SECRET, &forged), Err(AuthError::BadSignature));

        // Truncated and empty signatures.
        // Three characters fewer keeps the base64url canonical (40 characters).
        let truncated = &token[..token.len() - 3];
        assert_eq!(verify(SECRET, truncated), Err(AuthError::BadSignature));
        let empty_sig = format!("{head}.{}.", rest.split_once('.').unwrap().0);
        assert_eq!(verify(SECRET, &empty_sig), Err(AuthError::BadSignature));
    }

    #[test]
    fn rejects_missing_and_past_expiry_with_a_small_leeway() {
        let no_exp = signed(hs256(), json!({"sub": "u", "tenant": "t", "role": "staff"}));
        assert_eq!(verify(SECRET, &no_exp), Err(AuthError::MissingExpiry));

        let long_gone = issue(
            SECRET,
            &Claims {
                exp: now() - 3600,
                ..staff()
            },
        );
        assert_eq!(verify(SECRET, &long_gone), Err(AuthError::Expired));
        let just_past_the_leeway = issue(
            SECRET,
            &Claims {
                exp: now() - LEEWAY_SECS as i64 - 5,
                ..staff()
            },
        );
        assert_eq!(
            verify(SECRET, &just_past_the_leeway),
            Err(AuthError::Expired)
        );
        // Within the leeway: a clock a few seconds behind still accepts it.
        let within_the_leeway = issue(
            SECRET,
            &Claims {
                exp: now() - 5,
                ..staff()
            },
        );
        assert!(verify(SECRET, &within_the_leeway).is_ok());
    }

    #[test]
    fn rejects_tokens_not_yet_valid() {
        let future = signed(
            hs256(),
            json!({"sub": "u", "tenant": "t", "role": "staff",
                   "exp": now() + 3600, "nbf": now() + 600}),
        );
        assert_eq!(verify(SECRET, &future), Err(AuthError::NotYetValid));
        let almost = signed(
            hs256(),
            json!({"sub": "u", "tenant": "t", "role": "staff",
                   "exp": now() + 3600, "nbf": now() + 5}),
        );
        assert!(verify(SECRET, &almost).is_ok());
        // The type confusion of CVE-2026-25537: a string nbf is refused, not ignored.
        let string_nbf = signed(
            hs256(),
            json!({"sub": "u", "tenant": "t", "role": "staff",
                   "exp": now() + 3600, "nbf": (now() + 600).to_string()}),
        );
        assert!(matches!(
            verify(SECRET, &string_nbf),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn rejects_tokens_for_another_audience() {
        let mut claims = serde_json::to_value(staff()).unwrap();
        claims["aud"] = json!("another-service");
        let token = signed(hs256(), claims);
        assert_eq!(verify(SECRET, &token), Err(AuthError::WrongAudience));
    }

    #[test]
    fn rejects_empty_or_missing_sub_and_tenant() {
        for (claim, value) in [("sub", ""), ("sub", "  "), ("tenant", ""), ("tenant", " ")] {
            let mut claims = serde_json::to_value(staff()).unwrap();
            claims[claim] = json!(value);
            let token = signed(hs256(), claims);
            assert_eq!(
                verify(SECRET, &token),
                Err(AuthError::MissingClaim(claim)),
                "{claim}={value:?}"
            );
        }
        for claim in ["sub", "tenant", "role"] {
            let mut claims = serde_json::to_value(staff()).unwrap();
            claims.as_object_mut().unwrap().remove(claim);
            let token = signed(hs256(), claims);
            assert_eq!(verify(SECRET, &token), Err(AuthError::MissingClaim(claim)));
        }
    }

    #[test]
    fn rejects_unknown_roles() {
        let mut claims = serde_json::to_value(staff()).unwrap();
        claims["role"] = json!("admin");
        let token = signed(hs256(), claims);
        assert_eq!(
            verify(SECRET, &token),
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
                verify(SECRET, &token),
                Err(AuthError::MissingCustomer),
                "{customer:?}"
            );
        }
    }

    #[test]
    fn an_empty_secret_verifies_nothing() {
        let token = issue(SECRET, &staff());
        assert!(matches!(
            verify(b"", &token),
            Err(AuthError::Unverifiable(_))
        ));
    }

    #[test]
    fn roles_parse_and_serialize_in_lowercase() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
            assert_eq!(serde_json::to_value(role).unwrap(), json!(role.as_str()));
        }
        assert_eq!("Staff".parse::<Role>(), Err(ParseRoleError("Staff".into())));
    }
}
