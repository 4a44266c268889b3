//! TLS to Postgres: `sslmode` and `sslrootcert` in `DOSSIER_DATABASE_URL`.
//!
//! The shared Postgres of the other tests may have no TLS, so each test here
//! starts a private one: Debian's server binaries (`/usr/lib/postgresql/*/bin`,
//! installed by scripts/services.sh), a cluster in a temporary directory, a
//! certificate authority and server certificate made here with rcgen, a free
//! port on 127.0.0.1. The test stops it and removes the directory when it ends;
//! the shared server is never touched.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dossier_eventlog::db::{self, DbError};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// `sslmode=require` and `prefer` talk TLS to a server whose certificate chains
/// to the `sslrootcert` file; without that file the system's roots do not
/// trust it, and without `sslmode` no TLS is attempted at all.
#[tokio::test]
async fn sslmode_require_and_prefer_use_tls_verified_against_sslrootcert() {
    let server = PrivatePostgres::start(Tls::On);
    let ca = server.ca_file().display().to_string();

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
    let server = PrivatePostgres::start(Tls::Off);

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

/// A Postgres server of one test: its own cluster, port and certificate.
struct PrivatePostgres {
    root: PathBuf,
    bin: PathBuf,
    port: u16,
    server: Child,
    /// The user the server runs as when the test runs as root (Postgres
    /// refuses to run as root).
    run_as: Option<(u32, u32)>,
}

impl PrivatePostgres {
    /// Creates the cluster, starts the server and waits until it accepts
    /// connections. With [`Tls::On`] the server takes TLS connections only.
    fn start(tls: Tls) -> Self {
        let bin = server_binaries();
        let run_as = postgres_user_if_root();
        let root = std::env::temp_dir().join(format!("dossier-pg-{}", uuid::Uuid::new_v4()));
        fs::create_dir(&root).unwrap();
        let data = root.join("data");
        let port = free_port();

        if tls == Tls::On {
            write_certificates(&root);
        }
        give_to(&root, run_as);
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--no-sync",
            ])
            .arg("--pgdata")
            .arg(&data);
        let output = as_user(&mut initdb, run_as, &root).output().unwrap();
        assert!(
            output.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let hba = match tls {
            Tls::On => {
                "hostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n"
            }
            Tls::Off => "host all all 127.0.0.1/32 trust\n",
        };
        fs::write(data.join("pg_hba.conf"), hba).unwrap();
        give_to(&data.join("pg_hba.conf"), run_as);

        let log = fs::File::create(root.join("server.log")).unwrap();
        let mut postgres = Command::new(bin.join("postgres"));
        postgres
            .arg("-D")
            .arg(&data)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", &format!("port={port}")])
            .args(["-c", &format!("unix_socket_directories={}", root.display())])
            .args(["-c", "fsync=off"])
            .args(["-c", if tls == Tls::On { "ssl=on" } else { "ssl=off" }]);
        if tls == Tls::On {
            postgres
                .args([
                    "-c",
                    &format!("ssl_cert_file={}", root.join("server.crt").display()),
                ])
                .args([
                    "-c",
                    &format!("ssl_key_file={}", root.join("server.key").display()),
                ]);
        }
        let server = as_user(&mut postgres, run_as, &root)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut this = Self {
            root,
            bin,
            port,
            server,
            run_as,
        };
        this.wait_until_ready();
        this
    }

    /// `postgres://postgres@127.0.0.1:<port>/<rest>`.
    fn url(&self, rest: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{rest}", self.port)
    }

    /// The PEM file of the CA that signed the server's certificate.
    fn ca_file(&self) -> PathBuf {
        self.root.join("ca.crt")
    }

    fn wait_until_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.server.try_wait().unwrap() {
                panic!(
                    "the private Postgres exited ({status}): {}",
                    fs::read_to_string(self.root.join("server.log")).unwrap_or_default()
                );
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .unwrap();
            if ready.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the private Postgres did not accept connections within a minute"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let mut stop = Command::new(self.bin.join("pg_ctl"));
        stop.args(["stop", "-m", "immediate", "-w", "-D"])
            .arg(self.root.join("data"));
        let stopped = as_user(&mut stop, self.run_as, &self.root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !stopped {
            let _ = self.server.kill();
        }
        let _ = self.server.wait();
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// The newest Debian server binaries.
fn server_binaries() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .expect("Postgres server binaries under /usr/lib/postgresql (scripts/services.sh installs them)")
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("an initdb under /usr/lib/postgresql/*/bin")
        .1
}

/// The uid and gid of the `postgres` user when this test runs as root.
fn postgres_user_if_root() -> Option<(u32, u32)> {
    // Linux: /proc/self belongs to the process's effective user.
    if fs::metadata("/proc/self").unwrap().uid() != 0 {
        return None;
    }
    let passwd = fs::read_to_string("/etc/passwd").unwrap();
    let line = passwd
        .lines()
        .find(|line| line.starts_with("postgres:"))
        .expect("a postgres user to run the private server as (Postgres refuses root)");
    let fields: Vec<&str> = line.split(':').collect();
    Some((fields[2].parse().unwrap(), fields[3].parse().unwrap()))
}

/// `command` run as `user` (if any), from `dir`.
fn as_user<'a>(command: &'a mut Command, user: Option<(u32, u32)>, dir: &Path) -> &'a mut Command {
    if let Some((uid, gid)) = user {
        command.uid(uid).gid(gid);
    }
    command.current_dir(dir)
}

/// Makes `path` (and, for a directory, what it holds) the server user's.
fn give_to(path: &Path, user: Option<(u32, u32)>) {
    let Some((uid, gid)) = user else { return };
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    if path.is_dir() {
        for entry in fs::read_dir(path).unwrap() {
            give_to(&entry.unwrap().path(), user);
        }
    }
}

/// A CA (`ca.crt`) and a server certificate for 127.0.0.1 and localhost
/// signed by it (`server.crt`, `server.key`, the key readable by its owner only,
/// as Postgres demands).
fn write_certificates(dir: &Path) {
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

    fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    fs::write(dir.join("server.crt"), cert.pem()).unwrap();
    let key_file = dir.join("server.key");
    fs::write(&key_file, key.serialize_pem()).unwrap();
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).unwrap();
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
