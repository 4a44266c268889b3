//! A real headless Chromium for page tests, driven over WebDriver.
//!
//! [`Browser::start`] runs Debian's `/usr/bin/chromedriver` on a free port of
//! 127.0.0.1 and opens a session of `/usr/bin/chromium` in it, with a profile and
//! a download folder of its own; dropping the [`Browser`] ends the session (the
//! browser quits) and the driver, and removes both folders. Everything a page
//! test does goes through it in one line:
//!
//! ```ignore
//! let browser = Browser::start().await;
//! browser.goto(&app.url("/login")).await;
//! browser.fill("#email", "alice@example.com").await;
//! browser.click("button[type=submit]").await;
//! browser.wait_for_text("h1", "Files").await;
//! browser.check_page("staff-files").await; // a screenshot, then axe-core
//! ```
//!
//! Methods fail the test with what was being done, the page's URL and the start
//! of its text; waits go through [`crate::wait`], never a fixed sleep.
//!
//! `scripts/browser.sh` (part of `scripts/test.sh`) installs Chromium, its
//! driver and axe-core; without them [`Browser::start`] fails and says so, it
//! never skips.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use fantoccini::error::CmdError;
use fantoccini::{Client, ClientBuilder, Locator};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::wait::Wait;

pub use fantoccini::cookies::Cookie;
pub use fantoccini::elements::Element;

/// Debian's `chromium` package.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Debian's `chromium-driver` package: the WebDriver of that same Chromium build.
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Where `scripts/browser.sh` puts axe-core, relative to the workspace root.
pub const AXE_SCRIPT: &str = ".tools/axe/node_modules/axe-core/axe.min.js";
/// Overrides where [`Browser::screenshot`] saves its pictures.
pub const SCREENSHOTS_DIR_VAR: &str = "DOSSIER_SCREENSHOTS_DIR";

/// The viewport a [`Browser`] starts with: a laptop.
pub const DEFAULT_VIEWPORT: (u32, u32) = (1280, 900);

/// The name of the temporary folder of each [`Browser`], so that those a killed
/// test process left behind can be found and removed.
const TEMP_PREFIX: &str = "dossier-browser-";

/// Chromium's switches. Headless, as root (hence no sandbox), no GPU on our
/// machines. The rest keeps Chromium from calling Google's services (updates,
/// sync, field trials, QUIC probes): on a machine without a network those
/// connections are refused, which was seen to break page loads here.
/// `--disable-dev-shm-usage`: a container's /dev/shm may be tiny and Chromium
/// then crashes; Debian's launcher adds it only when its own check of /dev/shm
/// works, and that check is broken where findmnt prints two lines.
const CHROMIUM_SWITCHES: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
];

/// What to run `scripts/browser.sh` for, in every message about something missing.
fn missing(what: &str) -> String {
    format!(
        "{what} is missing: run scripts/browser.sh (it installs Chromium, chromedriver and axe-core)"
    )
}

/// The workspace root (this crate lives in `tests/`).
fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the test-support crate is a folder of the workspace")
}

/// Where screenshots go: `$DOSSIER_SCREENSHOTS_DIR`, else `screenshots/` in the
/// target folder the running test was built into (so a `CARGO_TARGET_DIR`
/// elsewhere is followed), else the workspace's `target/screenshots`.
pub fn screenshots_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(SCREENSHOTS_DIR_VAR).filter(|dir| !dir.is_empty()) {
        return PathBuf::from(dir);
    }
    // Cargo marks the root of every target folder with CACHEDIR.TAG; the test
    // binary sits a few levels below it (debug/deps, or <triple>/debug/deps).
    let target = std::env::current_exe().ok().and_then(|exe| {
        exe.ancestors()
            .find(|dir| dir.join("CACHEDIR.TAG").is_file())
            .map(Path::to_path_buf)
    });
    target
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("screenshots")
}

/// A file that [`Browser::wait_for_download`] found complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    /// Its name in the download folder (what `Content-Disposition` said).
    pub file_name: String,
    pub bytes: Vec<u8>,
}

/// Which download [`Browser::wait_for_download`] waits for: a file name, or a
/// predicate on file names (`|name| name.ends_with(".zip")`).
pub trait DownloadName {
    fn matches(&self, file_name: &str) -> bool;
}

impl DownloadName for &str {
    fn matches(&self, file_name: &str) -> bool {
        *self == file_name
    }
}

impl<F: Fn(&str) -> bool> DownloadName for F {
    fn matches(&self, file_name: &str) -> bool {
        self(file_name)
    }
}

/// One rule that axe-core found broken on a page, with where.
#[derive(Debug, Clone, Deserialize)]
pub struct Violation {
    /// The rule, e.g. `image-alt`.
    pub id: String,
    /// `minor`, `moderate`, `serious` or `critical`.
    pub impact: Option<String>,
    /// What the rule asks for, in a sentence.
    pub help: String,
    #[serde(rename = "helpUrl")]
    pub help_url: String,
    /// A CSS selector of each element that breaks it.
    pub targets: Vec<String>,
}

impl Violation {
    /// Serious and critical violations fail [`Browser::assert_accessible`].
    pub fn is_blocking(&self) -> bool {
        matches!(self.impact.as_deref(), Some("serious" | "critical"))
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {} [{}] <{}>",
            self.id,
            self.impact.as_deref().unwrap_or("no impact"),
            self.help,
            self.targets.join(", "),
            self.help_url
        )
    }
}

/// `/usr/bin/chromedriver` as a child process, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Driver {
    fn spawn(dir: &Path) -> Self {
        assert!(
            Path::new(CHROMEDRIVER).is_file(),
            "{}",
            missing(CHROMEDRIVER)
        );
        // chromedriver cannot be told port 0 and say which one it got, so take
        // a free one from the kernel and hand it over.
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|listener| listener.local_addr())
            .expect("a free port for chromedriver")
            .port();
        let log = dir.join("chromedriver.log");
        let out = std::fs::File::create(&log).expect("chromedriver's log file");
        let err = out.try_clone().expect("chromedriver's log file");
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {CHROMEDRIVER}: {e}"));
        Self { child, port, log }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The last lines chromedriver wrote, for a failure message.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Waits until `GET /status` says ready; fails at once if the driver exits.
    async fn wait_until_ready(&mut self) {
        let client = reqwest::Client::new();
        let status = format!("{}/status", self.url());
        let outcome = Wait::new(format!("{CHROMEDRIVER} to answer {status} with ready"))
            .interval(Duration::from_millis(20))
            .until(async || {
                if let Ok(Some(exit)) = self.child.try_wait() {
                    // Settled: waiting longer cannot help.
                    return Ok(Err(format!("chromedriver exited ({exit})")));
                }
                let body: Value = match client.get(&status).send().await {
                    Ok(response) => response.json().await.map_err(|e| e.to_string())?,
                    Err(e) => return Err(e.to_string()),
                };
                if body["value"]["ready"] == true {
                    Ok(Ok(()))
                } else {
                    Err(body.to_string())
                }
            })
            .await;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(exited)) => panic!("{exited}; its output:\n{}", self.log_tail()),
            Err(timed_out) => panic!("{timed_out}; its output:\n{}", self.log_tail()),
        }
    }

    /// Ends a WebDriver session from a destructor, where nothing can be
    /// awaited: one plain HTTP/1.1 request on a blocking socket. chromedriver
    /// answers once the browser has quit, so Chromium does not outlive the test
    /// (killing chromedriver alone leaves it running).
    fn delete_session(&self, session: &str) -> std::io::Result<()> {
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        write!(
            stream,
            "DELETE /session/{session} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )?;
        // The answer's head is enough (the browser has quit by then);
        // chromedriver keeps the connection open after it, whatever the
        // request's `Connection: close` says.
        let mut answer = Vec::new();
        let mut chunk = [0; 1024];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk)? {
                0 => break,
                n => answer.extend_from_slice(&chunk[..n]),
            }
        }
        Ok(())
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A headless Chromium session for one test. See the module documentation.
pub struct Browser {
    client: Client,
    session: Option<String>,
    downloads: PathBuf,
    uploads: PathBuf,
    driver: Driver,
    dir: PathBuf,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a fresh profile and
    /// download folder, at [`DEFAULT_VIEWPORT`].
    pub async fn start() -> Self {
        assert!(Path::new(CHROMIUM).is_file(), "{}", missing(CHROMIUM));
        crate::remove_old_temp_dirs(TEMP_PREFIX);
        let dir =
            std::env::temp_dir().join(format!("{TEMP_PREFIX}{}", uuid::Uuid::new_v4().simple()));
        let (profile, downloads, uploads) = (
            dir.join("profile"),
            dir.join("downloads"),
            dir.join("uploads"),
        );
        for folder in [&profile, &downloads, &uploads] {
            std::fs::create_dir_all(folder)
                .unwrap_or_else(|e| panic!("creating {}: {e}", folder.display()));
        }
        let mut driver = Driver::spawn(&dir);
        driver.wait_until_ready().await;

        let mut args: Vec<String> = CHROMIUM_SWITCHES.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": args,
                // chromedriver hands the download folder to headless Chromium
                // too; without prompt=false a download waits for a dialog.
                "prefs": {
                    "download.default_directory": downloads.display().to_string(),
                    "download.prompt_for_download": false,
                    "download.directory_upgrade": true,
                },
            },
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!("a JSON object")
        };
        // Plain HTTP to the local driver: no TLS stack needed.
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&driver.url())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "opening a Chromium session in {CHROMEDRIVER}: {e}; its output:\n{}",
                    driver.log_tail()
                )
            });
        let session = client.session_id().await.ok().flatten();
        let browser = Self {
            client,
            session,
            downloads,
            uploads,
            driver,
            dir,
        };
        browser
            .set_viewport(DEFAULT_VIEWPORT.0, DEFAULT_VIEWPORT.1)
            .await;
        browser
    }

    /// The fantoccini client, for what this type does not offer.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Loads `url` and waits for its `load` event.
    pub async fn goto(&self, url: &str) {
        let done = self.client.goto(url).await;
        self.ok(format!("opening {url}"), done).await;
    }

    /// The URL of the page shown.
    pub async fn current_url(&self) -> url::Url {
        let url = self.client.current_url().await;
        self.ok("reading the current URL", url).await
    }

    /// The element `css` finds now (the first one), failing if there is none.
    pub async fn find(&self, css: &str) -> Element {
        let element = self.client.find(Locator::Css(css)).await;
        self.ok(format!("finding `{css}`"), element).await
    }

    /// Waits until `css` finds an element (a page's script may add it) and
    /// answers the first one.
    pub async fn wait_for(&self, css: &str) -> Element {
        self.wait_until(&format!("`{css}` on the page"), async || {
            Ok(Ok(self.client.find(Locator::Css(css)).await?))
        })
        .await
    }

    /// Waits until an element that `css` finds contains `text` and answers it.
    pub async fn wait_for_text(&self, css: &str, text: &str) -> Element {
        self.wait_until(&format!("`{css}` with the text {text:?}"), async || {
            let mut seen = Vec::new();
            for element in self.client.find_all(Locator::Css(css)).await? {
                let shown = element.text().await?;
                if shown.contains(text) {
                    return Ok(Ok(element));
                }
                seen.push(shown);
            }
            Ok(Err(format!("{} element(s) with {seen:?}", seen.len())))
        })
        .await
    }

    /// Clicks what `css` finds, once it is there.
    pub async fn click(&self, css: &str) {
        let element = self.wait_for(css).await;
        let done = element.click().await;
        self.ok(format!("clicking `{css}`"), done).await;
    }

    /// Replaces the value of the field `css` finds (once it is there) with
    /// `text`, typed as a person would.
    pub async fn fill(&self, css: &str, text: &str) {
        let element = self.wait_for(css).await;
        let cleared = element.clear().await;
        self.ok(format!("clearing `{css}`"), cleared).await;
        let typed = element.send_keys(text).await;
        self.ok(format!("typing into `{css}`"), typed).await;
    }

    /// Chooses the option of value `value` in the `<select>` that `css`
    /// finds (once it is there), as a person picking it would.
    pub async fn choose(&self, css: &str, value: &str) {
        let element = self.wait_for(css).await;
        let chosen = element.select_by_value(value).await;
        self.ok(format!("choosing {value:?} in `{css}`"), chosen)
            .await;
    }

    /// Makes the page's viewport (what CSS media queries and screenshots see)
    /// `width` x `height` CSS pixels, e.g. 390 x 844 for a phone.
    pub async fn set_viewport(&self, width: u32, height: u32) {
        // WebDriver sizes the window, not the viewport; the two differ by
        // whatever frame the browser draws, so measure that once and add it.
        let sized = self.client.set_window_size(width, height).await;
        self.ok(format!("resizing the window to {width}x{height}"), sized)
            .await;
        let (inner_width, inner_height) = self.viewport().await;
        if (inner_width, inner_height) != (width, height) {
            let outer_width = (2 * width).saturating_sub(inner_width);
            let outer_height = (2 * height).saturating_sub(inner_height);
            let sized = self.client.set_window_size(outer_width, outer_height).await;
            self.ok(
                format!("resizing the window to {outer_width}x{outer_height}"),
                sized,
            )
            .await;
        }
        let now = self.viewport().await;
        assert_eq!(
            now,
            (width, height),
            "the viewport did not become {width}x{height}"
        );
    }

    async fn viewport(&self) -> (u32, u32) {
        let size = self
            .execute("return [window.innerWidth, window.innerHeight];", vec![])
            .await;
        serde_json::from_value(size.clone())
            .unwrap_or_else(|e| panic!("the viewport's size {size}: {e}"))
    }

    /// Chooses a file in the `<input type=file>` that `css` finds: writes
    /// `bytes` to a real file named `file_name` in this browser's folder and
    /// types its path into the input, which is how WebDriver picks files.
    /// Answers the file's path.
    pub async fn upload_file(&self, input_css: &str, file_name: &str, bytes: &[u8]) -> PathBuf {
        assert!(
            !file_name.is_empty() && !file_name.contains(['/', '\\']),
            "a file name without a folder: {file_name:?}"
        );
        // A folder per upload, so the same name can be uploaded again with
        // other bytes while an earlier form may still read the first file.
        let folder = self.uploads.join(uuid::Uuid::new_v4().simple().to_string());
        let path = folder.join(file_name);
        std::fs::create_dir_all(&folder)
            .and_then(|()| std::fs::write(&path, bytes))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        let input = self.wait_for(input_css).await;
        let chosen = input.send_keys(&path.display().to_string()).await;
        self.ok(
            format!("choosing {} in `{input_css}`", path.display()),
            chosen,
        )
        .await;
        path
    }

    /// Drops a file named `file_name` with `bytes` and type `mime` onto what
    /// `target_css` finds, the way a person dragging it from their desktop
    /// would be seen by the page's script: `dragenter`, `dragover` and `drop`
    /// events carrying a `DataTransfer` with that `File`. (WebDriver cannot
    /// drag from outside the page, so the events are made in the page.)
    pub async fn synthetic_drop(
        &self,
        target_css: &str,
        file_name: &str,
        bytes: &[u8],
        mime: &str,
    ) {
        const DROP: &str = r#"
            const [target, name, base64, type] = arguments;
            const raw = atob(base64);
            const bytes = new Uint8Array(raw.length);
            for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type }));
            for (const kind of ["dragenter", "dragover", "drop"]) {
                target.dispatchEvent(new DragEvent(kind, {
                    bubbles: true, cancelable: true, composed: true, dataTransfer: transfer,
                }));
            }
        "#;
        let target = self.wait_for(target_css).await;
        let target = serde_json::to_value(&target).expect("an element reference is JSON");
        let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
        self.execute(
            DROP,
            vec![target, json!(file_name), json!(encoded), json!(mime)],
        )
        .await;
    }

    /// Waits until a download named `file_name` (or whose name a predicate
    /// accepts) is complete in this browser's download folder, and answers
    /// it. The file is taken out of the folder, so a later download of the
    /// same name is waited for anew.
    pub async fn wait_for_download(&self, file_name: impl DownloadName) -> Download {
        let what = format!("a download in {}", self.downloads.display());
        let found = Wait::new(what)
            .until(async || {
                let names = download_names(&self.downloads);
                // Chromium writes into `<name>.crdownload` (or `Unconfirmed
                // <n>.crdownload`) and renames it to the final name when done;
                // it may create the final name empty before that, so a
                // download is done only when no `.crdownload` is left.
                let writing = names.iter().any(|name| name.ends_with(".crdownload"));
                let done = names
                    .iter()
                    .find(|name| !writing && file_name.matches(name));
                done.cloned().ok_or(names)
            })
            .await;
        let file_name = match found {
            Ok(name) => name,
            Err(timed_out) => panic!("{timed_out} ({})", self.whereabouts().await),
        };
        let path = self.downloads.join(&file_name);
        let bytes =
            std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let _ = std::fs::remove_file(&path);
        Download { file_name, bytes }
    }

    /// The cookies the browser holds for the page shown.
    pub async fn cookies(&self) -> Vec<Cookie<'static>> {
        let cookies = self.client.get_all_cookies().await;
        self.ok("reading the cookies", cookies).await
    }

    /// Runs `js` as the body of a function in the page (`arguments` holds
    /// `args`; an [`Element`] goes in as `serde_json::to_value(&element)`)
    /// and answers what it returns. The page's Content-Security-Policy does
    /// not apply to it.
    pub async fn execute(&self, js: &str, args: Vec<Value>) -> Value {
        let answer = self.client.execute(js, args).await;
        self.ok("running a script in the page", answer).await
    }

    /// Saves a PNG of the viewport as `<name>.png` in [`screenshots_dir`] and
    /// answers its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !name.starts_with('.');
        assert!(
            valid,
            "a screenshot name of letters, digits, - _ and .: {name:?}"
        );
        let png = self.client.screenshot().await;
        let png = self.ok(format!("taking the screenshot {name}"), png).await;
        let dir = screenshots_dir();
        let path = dir.join(format!("{name}.png"));
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&path, png))
            .unwrap_or_else(|e| panic!("saving {}: {e}", path.display()));
        eprintln!("screenshot {name}: {}", path.display());
        path
    }

    /// Every rule axe-core (injected into the page shown, whatever its
    /// Content-Security-Policy) finds broken there, of any impact.
    pub async fn accessibility_violations(&self) -> Vec<Violation> {
        const RUN: &str = r#"
            const done = arguments[arguments.length - 1];
            axe.run(document, { resultTypes: ["violations"] }).then(
                (results) => done({ violations: results.violations.map((v) => ({
                    id: v.id, impact: v.impact, help: v.help, helpUrl: v.helpUrl,
                    targets: v.nodes.map((node) => node.target.flat().join(" ")),
                })) }),
                (error) => done({ error: String((error && error.stack) || error) }),
            );
        "#;
        #[derive(Deserialize)]
        struct Answer {
            violations: Option<Vec<Violation>>,
            error: Option<String>,
        }
        let loaded = self.execute("return typeof window.axe;", vec![]).await;
        if loaded != "object" {
            // WebDriver runs scripts through the DevTools protocol, past the
            // page's CSP: a `<script>` tag would be refused by `script-src
            // 'self'`, this is not.
            self.execute(&axe_source(), vec![]).await;
        }
        let answer = self.client.execute_async(RUN, vec![]).await;
        let answer = self.ok("running axe-core", answer).await;
        let answer: Answer = serde_json::from_value(answer.clone())
            .unwrap_or_else(|e| panic!("axe-core's answer {answer}: {e}"));
        match answer {
            Answer {
                violations: Some(violations),
                ..
            } => violations,
            Answer { error, .. } => panic!(
                "axe-core failed on {}: {}",
                self.whereabouts().await,
                error.unwrap_or_default()
            ),
        }
    }

    /// Fails the test, listing each one, if axe-core finds a serious or critical
    /// violation on the page shown; `page_name` says which page in the message.
    /// Lesser ones are printed, not failed.
    pub async fn assert_accessible(&self, page_name: &str) {
        let violations = self.accessibility_violations().await;
        let (blocking, lesser): (Vec<_>, Vec<_>) = violations.iter().partition(|v| v.is_blocking());
        for violation in &lesser {
            eprintln!("axe-core on {page_name}, not failing: {violation}");
        }
        if !blocking.is_empty() {
            let list: Vec<String> = blocking.iter().map(|v| format!("  - {v}")).collect();
            panic!(
                "axe-core finds {} serious or critical violation(s) on {page_name} ({}):\n{}",
                blocking.len(),
                self.whereabouts().await,
                list.join("\n")
            );
        }
    }

    /// What every page test does with each page it shows: a screenshot named
    /// `page_name`, then [`Self::assert_accessible`]. Answers the screenshot.
    pub async fn check_page(&self, page_name: &str) -> PathBuf {
        let path = self.screenshot(page_name).await;
        self.assert_accessible(page_name).await;
        path
    }

    /// Waits (as [`crate::wait::eventually`] does) until `look` finds something
    /// (`Ok(Ok(found))`); `Ok(Err(seen))` is "not yet", and so are "no such
    /// element" and [`page_changed_under`] (a stale element). Any
    /// other error fails the test at once: waiting longer cannot mend a lost
    /// session or a bad selector.
    async fn wait_until<T>(
        &self,
        what: &str,
        mut look: impl AsyncFnMut() -> Result<Result<T, String>, CmdError>,
    ) -> T {
        let outcome = Wait::new(what)
            .until(async || match look().await {
                Ok(Ok(found)) => Ok(Ok(found)),
                Ok(Err(seen)) => Err(seen),
                Err(e) if e.is_no_such_element() || page_changed_under(&e) => Err(e.to_string()),
                Err(e) => Ok(Err(e)),
            })
            .await;
        match outcome {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => panic!("waiting for {what}: {e} ({})", self.whereabouts().await),
            Err(timed_out) => panic!("{timed_out} ({})", self.whereabouts().await),
        }
    }

    /// `value`, or a failure naming what was being done and where.
    async fn ok<T>(&self, doing: impl std::fmt::Display, value: Result<T, CmdError>) -> T {
        match value {
            Ok(value) => value,
            Err(e) => panic!("{doing}: {e} ({})", self.whereabouts().await),
        }
    }

    /// The page's URL and the start of its text, for failure messages; never
    /// fails itself (the session may be what broke).
    async fn whereabouts(&self) -> String {
        let url = match self.client.current_url().await {
            Ok(url) => url.to_string(),
            Err(e) => format!("no URL: {e}"),
        };
        let text = self
            .client
            .execute(
                "return document.body ? document.body.innerText : document.documentElement.outerHTML;",
                vec![],
            )
            .await;
        let text = match text {
            Ok(Value::String(text)) => text,
            Ok(other) => other.to_string(),
            Err(e) => format!("no text: {e}"),
        };
        let snippet: String = text.chars().take(400).collect();
        let more = if snippet.len() < text.len() {
            "…"
        } else {
            ""
        };
        format!("at {url}; the page shows: {snippet:?}{more}")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(session) = &self.session {
            let _ = self.driver.delete_session(session);
        }
        // The browser, which wrote into the folder, has quit; the driver is
        // killed when its field drops, right after this.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The file names in `dir`, sorted (none if it cannot be read).
fn download_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// axe-core's browser script, as `scripts/browser.sh` installed it.
fn axe_source() -> String {
    let path = workspace_root().join(AXE_SCRIPT);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{} ({}: {e})", missing("axe-core"), path.display()))
}

/// Whether `error` says the page changed under a look (a reload or a
/// navigation between finding an element and reading it): "not yet", like no
/// element. Chromium reports it as a stale element, or, when the node was
/// found in the document just replaced, as an inspector error that WebDriver
/// passes on as "unknown error".
fn page_changed_under(error: &CmdError) -> bool {
    error.is_stale_element_reference()
        || error
            .to_string()
            .contains("Node with given id does not belong to the document")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_serious_and_critical_violations_block() {
        let violation = |impact: Option<&str>| Violation {
            id: "rule".into(),
            impact: impact.map(str::to_owned),
            help: "help".into(),
            help_url: "https://example.invalid".into(),
            targets: vec!["#a".into()],
        };
        assert!(violation(Some("critical")).is_blocking());
        assert!(violation(Some("serious")).is_blocking());
        assert!(!violation(Some("moderate")).is_blocking());
        assert!(!violation(Some("minor")).is_blocking());
        assert!(!violation(None).is_blocking());
    }
}
