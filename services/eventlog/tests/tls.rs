//! TLS to Postgres: `sslmode` and `sslrootcert` in `DOSSIER_DATABASE_URL`.
//!
//! The shared Postgres of the other tests may have no TLS, so each test here
//! starts a private one (the harness' `PrivatePostgres`) with a certificate
//! authority and server certificate made here with rcgen. The test stops it
//! and removes its directory when it ends; the shared server is never touched.

use std::fs;

use dossier_eventlog::db::{self, DbError};
use dossier_test_support::postgres::{PrivatePostgres, Setup};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// `sslmode=require` and `prefer` talk TLS to a server whose certificate chains
/// to the `sslrootcert` file; without that file the system's roots do not
/// trust it, and without `sslmode` no TLS is attempted at all.
#[tokio::test]
async fn sslmode_require_and_prefer_use_tls_verified_against_sslrootcert() {
    let server = private_postgres(Tls::On);
    let ca = server.path("ca.crt").display().to_string();

    // The database does not exist yet: it is created through the maintenance
    // connection, over TLS too (the server refuses anything else).
    for mode in ["require", "prefer"] {
        let url = server.url(&format!("dossier?sslmode={mode}&sslrootcert={ca}"));
        let pool = db::connect(&url, 1)
            .await
            .unwrap_or_else(|error| panic!("sslmode={mode}: {error}"));
        let client = pool.get().await.unwrap();
        let row = client
            .query_one(
                "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        assert!(row.get::<_, bool>("ssl"), "sslmode={mode}: not over TLS");
        assert!(
            row.get::<_, String>("version").starts_with("TLSv1."),
            "sslmode={mode}"
        );
    }

    // The test CA is not among the system's roots: the handshake is refused.
    let untrusted = db::connect(&server.url("dossier?sslmode=require"), 1)
        .await
        .expect_err("a certificate of an unknown CA is refused");
    let message = untrusted.to_string();
    assert!(matches!(untrusted, DbError::Connect { .. }), "{message}");
    assert!(message.contains("TLS"), "{message}");
    assert!(message.contains("certificate"), "{message}");

    // No sslmode: plain, as before TLS was supported; this server only takes TLS.
    let plain = db::connect(&server.url("dossier"), 1)
        .await
        .expect_err("the server refuses plain connections");
    assert!(
        plain.to_string().contains("no encryption"),
        "plain connection refused for another reason: {plain}"
    );
}

/// Against a server without TLS, `require` fails with a TLS error (not a
/// parse error), while `prefer` and no `sslmode` connect in plain text.
#[tokio::test]
async fn sslmode_require_fails_with_a_tls_error_when_the_server_has_no_tls() {
    let server = private_postgres(Tls::Off);

    let refused = db::connect(&server.url("dossier?sslmode=require"), 1)
        .await
        .expect_err("require needs TLS");
    let message = refused.to_string();
    assert!(matches!(refused, DbError::Connect { .. }), "{message}");
    assert!(message.contains("server does not support TLS"), "{message}");

    for query in ["dossier?sslmode=prefer", "dossier"] {
        let pool = db::connect(&server.url(query), 1)
            .await
            .unwrap_or_else(|error| panic!("{query}: {error}"));
        let ssl: bool = pool
            .get()
            .await
            .unwrap()
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(!ssl, "{query}");
    }
}

/// A CA file that cannot be read stops `connect` before any connection, with
/// an error that names the file.
#[tokio::test]
async fn an_unreadable_sslrootcert_is_reported_before_connecting() {
    let missing = "/nonexistent/dossier-ca.pem";
    // Port 1: nothing listens there, so reaching the network would fail differently.
    let url = format!("postgres://postgres@127.0.0.1:1/x?sslmode=require&sslrootcert={missing}");
    let error = db::connect(&url, 1).await.expect_err("no CA file, no TLS");
    assert!(matches!(error, DbError::TlsSetup(_)), "{error}");
    assert!(error.to_string().contains(missing), "{error}");

    let empty = std::env::temp_dir().join(format!("dossier-empty-{}.pem", uuid::Uuid::new_v4()));
    fs::write(&empty, "not a certificate\n").unwrap();
    let url = format!(
        "postgres://postgres@127.0.0.1:1/x?sslmode=require&sslrootcert={}",
        empty.display()
    );
    let error = db::connect(&url, 1)
        .await
        .expect_err("no certificate in the file");
    fs::remove_file(&empty).unwrap();
    assert!(matches!(error, DbError::TlsSetup(_)), "{error}");
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tls {
    On,
    Off,
}

/// A private server of one test (the harness'); with [`Tls::On`] it takes
/// TLS connections only, with a certificate signed by the CA in `ca.crt`.
fn private_postgres(tls: Tls) -> PrivatePostgres {
    let setup = match tls {
        Tls::Off => Setup::default(),
        Tls::On => {
            let (ca, cert, key) = certificates();
            Setup {
                files: vec![
                    ("ca.crt".to_owned(), ca.into_bytes()),
                    ("server.crt".to_owned(), cert.into_bytes()),
                    ("server.key".to_owned(), key.into_bytes()),
                ],
                settings: vec![
                    "ssl=on".to_owned(),
                    "ssl_cert_file={dir}/server.crt".to_owned(),
                    "ssl_key_file={dir}/server.key".to_owned(),
                ],
                hba: Some(
                    "hostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n"
                        .to_owned(),
                ),
            }
        }
    };
    PrivatePostgres::start_with(setup).expect("a private Postgres starts")
}

/// A CA and a server certificate for 127.0.0.1 and localhost signed by it, in
/// PEM: `(ca, server certificate, server key)`.
fn certificates() -> (String, String, String) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Dossier test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "dossier test postgres");
    let cert = params.signed_by(&key, &ca).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}
