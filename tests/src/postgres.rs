//! A private PostgreSQL server for tests that must stop or restart Postgres
//! (fault tests): its own data directory under the temporary directory, its own
//! port, Debian's server binaries. The machine's shared server is never touched.
//!
//! `initdb` and `postgres` refuse to run as root, so as root (CI) they run as
//! the `postgres` user through `runuser`, on a directory handed to that user.
//! A [`Setup`] adds what a test needs beyond the defaults (TLS: certificate
//! files, `ssl` settings and a `pg_hba.conf` of its own).

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What a private server has beyond the defaults (trust for every local
/// connection, no TLS).
#[derive(Debug, Clone, Default)]
pub struct Setup {
    /// Files written into the server's directory ([`PrivatePostgres::path`])
    /// before it starts, readable by their owner only (as Postgres demands of
    /// a key): `(name, contents)`.
    pub files: Vec<(String, Vec<u8>)>,
    /// Server settings, `name=value`; `{dir}` stands for the server's
    /// directory (`ssl_cert_file={dir}/server.crt`).
    pub settings: Vec<String>,
    /// A `pg_hba.conf` in place of `initdb`'s.
    pub hba: Option<String>,
}

/// A running private server; stopped and removed on drop.
#[derive(Debug)]
pub struct PrivatePostgres {
    bin: PathBuf,
    root: PathBuf,
    port: u16,
    settings: Vec<String>,
}

impl PrivatePostgres {
    /// `initdb` into a fresh directory and start the server on a free port.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(Setup::default())
    }

    /// [`Self::start`], with `setup` in place before the server first starts.
    pub fn start_with(setup: Setup) -> anyhow::Result<Self> {
        let bin = server_binaries()?;
        let root =
            std::env::temp_dir().join(format!("dossier-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&root)?;
        for (name, contents) in &setup.files {
            let file = root.join(name);
            std::fs::write(&file, contents)?;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
        }
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = root.display().to_string();
        let settings = setup
            .settings
            .iter()
            .map(|setting| setting.replace("{dir}", &dir))
            .collect();
        let server = Self {
            bin,
            root,
            port,
            settings,
        };
        server.give_to_owner(&server.root)?;
        server.as_owner(server.bin.join("initdb"), |c| {
            c.arg("-D").arg(server.data()).args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ]);
        })?;
        if let Some(hba) = &setup.hba {
            let file = server.data().join("pg_hba.conf");
            std::fs::write(&file, hba)?;
            server.give_to_owner(&file)?;
        }
        server.start_again()?;
        Ok(server)
    }

    /// `name` in the server's directory (a file of its [`Setup`]).
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// A URL for database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Stops the server the way an operator's restart does (`-m fast`: clients
    /// are disconnected, nothing committed is lost).
    pub fn stop(&self) -> anyhow::Result<()> {
        self.pg_ctl(&["stop", "-w", "-m", "fast"])
    }

    /// Starts the stopped server again on the same port and directory.
    pub fn start_again(&self) -> anyhow::Result<()> {
        let mut options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c max_connections=200",
            self.port,
            self.root.display()
        );
        for setting in &self.settings {
            options.push_str(" -c ");
            options.push_str(setting);
        }
        let log = self.root.join("postgres.log");
        self.as_owner(self.bin.join("pg_ctl"), |c| {
            c.arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(&log)
                .args(["-o", &options, "-w", "start"]);
        })
    }

    fn data(&self) -> PathBuf {
        self.root.join("data")
    }

    fn pg_ctl(&self, args: &[&str]) -> anyhow::Result<()> {
        self.as_owner(self.bin.join("pg_ctl"), |c| {
            c.arg("-D").arg(self.data()).args(args);
        })
    }

    /// Hands `path` (and what it holds) to the server's user when the tests
    /// run as root.
    fn give_to_owner(&self, path: &Path) -> anyhow::Result<()> {
        if is_root() {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(path))?;
        }
        Ok(())
    }

    fn as_owner(&self, program: PathBuf, args: impl FnOnce(&mut Command)) -> anyhow::Result<()> {
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        args(&mut command);
        run(&mut command)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["stop", "-w", "-m", "immediate"]);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command.output()?;
    anyhow::ensure!(
        output.status.success(),
        "{command:?} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// The newest `/usr/lib/postgresql/<version>/bin` with `initdb` in it.
fn server_binaries() -> anyhow::Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")?
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            Path::new(&bin.join("initdb"))
                .exists()
                .then_some((version, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| anyhow::anyhow!("no PostgreSQL server binaries under /usr/lib/postgresql (scripts/services.sh installs them)"))
}
