//! A private containerd for tests (docs/containerd.md §1).
//!
//! [`Containerd::builder`]`().shim(path).start_or_skip()` starts Debian's containerd 1.6
//! with its own root, state, sockets and CNI configuration in a fresh temporary directory:
//! config version 2, `debug` log level (shim logs reach containerd's log), the `kestrel`
//! CRI runtime handler (`io.containerd.kestrel.v2`), a bridge CNI network and
//! `restrict_oom_score_adj = true`. Directories given to [`Builder::path_prepend`] (and the
//! directory holding the [`Builder::shim`] link) are prepended to the **daemon's** `PATH`,
//! where containerd looks up `containerd-shim-kestrel-v2`. `start` returns once
//! `ctr version` answers.
//!
//! Every `ctr` call runs under a timeout ([`Containerd::ctr`]: 60 s,
//! [`Containerd::ctr_with_timeout`]), because a shim that never answers `Wait` or never
//! closes a FIFO hangs `ctr` forever (docs/containerd.md, pitfall 7). A call that times out
//! is killed; its `Output` has the signal status and a note at the end of stderr.
//!
//! Dropping the fixture first removes every task (`ctr task kill -s SIGKILL`, `task rm -f`)
//! and container left in any namespace, so shims clean up their own state even after a
//! failed test; then it stops containerd (SIGTERM, SIGKILL after 10 s), kills (SIGKILL)
//! the shims it started — any process with an argument under the fixture's directory,
//! such as `-address <dir>/containerd.sock` — and whatever still runs in a bundle there,
//! removes their sockets in `/run/containerd/s`, unmounts what is left mounted under the
//! directory and deletes it. When the test is panicking the tail of containerd's log is
//! printed first; `KESTREL_KEEP_CONTAINERD=1` keeps the directory.
//!
//! [`ConsoleFifo`] captures the stdout of detached tasks: `ctr run -d --log-uri <fifo>`
//! hands the shim the FIFO's path as the task's stdout (a path without a URI scheme is a
//! FIFO to containerd's shims).

use std::ffi::{CString, OsStr, OsString};
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The namespace [`Containerd::ctr`] uses (`ctr -n`).
pub const NAMESPACE: &str = "kestrel-test";
/// The kestrel runtime as `ctr run --runtime` takes it.
pub const KESTREL_RUNTIME: &str = "io.containerd.kestrel.v2";
/// Timeout of [`Containerd::ctr`].
pub const CTR_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `start` waits for `ctr version` to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the fixture could not start.
#[derive(Debug)]
pub enum StartError {
    /// `containerd` or `ctr` is not on `PATH`.
    NotInstalled(&'static str),
    /// Setting up the directory or spawning the daemon failed.
    Io(String, io::Error),
    /// The daemon exited or never answered; the message ends with its log's tail.
    NotReady(String),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::NotInstalled(what) => write!(f, "{what} not installed"),
            StartError::Io(what, e) => write!(f, "{what}: {e}"),
            StartError::NotReady(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for StartError {}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> StartError {
    let what = what.into();
    move |e| StartError::Io(what, e)
}

/// `name` on `PATH`, if it is there.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// True when Debian's `containerd` and `ctr` are installed.
pub fn installed() -> bool {
    which("containerd").is_some() && which("ctr").is_some()
}

/// Options for [`Containerd`].
#[derive(Debug, Default)]
pub struct Builder {
    path_prepend: Vec<PathBuf>,
    shim: Option<PathBuf>,
    env: Vec<(OsString, OsString)>,
}

impl Builder {
    /// Prepends `dir` to the daemon's `PATH` (earlier calls come first).
    pub fn path_prepend(mut self, dir: impl Into<PathBuf>) -> Self {
        self.path_prepend.push(dir.into());
        self
    }

    /// Makes `binary` the daemon's `containerd-shim-kestrel-v2` (a symlink in the fixture's
    /// `bin/`, which goes first on the daemon's `PATH`), whatever the file is called.
    pub fn shim(mut self, binary: impl Into<PathBuf>) -> Self {
        self.shim = Some(binary.into());
        self
    }

    /// Sets an environment variable of the daemon (and so of the shims it starts).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Starts the daemon; see the module docs.
    pub fn start(self) -> Result<Containerd, StartError> {
        let containerd = which("containerd").ok_or(StartError::NotInstalled("containerd"))?;
        let ctr = which("ctr").ok_or(StartError::NotInstalled("ctr"))?;
        let dir = make_temp_dir().map_err(io_err("create the fixture directory"))?;
        // From here on, Drop cleans up whatever exists.
        let mut fixture = Containerd {
            dir: dir.clone(),
            socket: dir.join("containerd.sock"),
            ctr,
            child: None,
        };
        for sub in [
            "root", "state", "bin", "cni/conf", "cni/ipam", "opt", "logs",
        ] {
            fs::create_dir_all(dir.join(sub))
                .map_err(io_err(format!("create {}/{sub}", dir.display())))?;
        }
        fs::write(dir.join("config.toml"), config_toml(&dir))
            .map_err(io_err("write config.toml"))?;
        fs::write(
            dir.join("cni/conf/10-kestrel-test.conflist"),
            cni_conflist(&dir),
        )
        .map_err(io_err("write the CNI configuration"))?;
        if let Some(shim) = &self.shim {
            let shim = fs::canonicalize(shim).map_err(io_err(format!("{}", shim.display())))?;
            std::os::unix::fs::symlink(&shim, dir.join("bin").join(crate::SHIM_NAME))
                .map_err(io_err("link the shim into bin/"))?;
        }
        let mut path = vec![dir.join("bin")];
        path.extend(self.path_prepend.iter().cloned());
        path.extend(
            std::env::var_os("PATH").map_or_else(Vec::new, |p| std::env::split_paths(&p).collect()),
        );
        let path = std::env::join_paths(path).map_err(|e| {
            StartError::Io(
                "build PATH".into(),
                io::Error::new(io::ErrorKind::InvalidInput, e),
            )
        })?;

        let log = fs::File::create(fixture.log_path()).map_err(io_err("create the log"))?;
        let log2 = log.try_clone().map_err(io_err("dup the log"))?;
        let mut cmd = Command::new(&containerd);
        cmd.arg("--config")
            .arg(dir.join("config.toml"))
            .env("PATH", path)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: a ^C of the test run does not reach it first.
            .process_group(0);
        fixture.child = Some(
            cmd.spawn()
                .map_err(io_err(format!("spawn {}", containerd.display())))?,
        );

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = fixture.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(StartError::NotReady(format!(
                        "containerd exited with {status} during start-up; log:\n{}",
                        fixture.log_tail(40)
                    )));
                }
            }
            let out = fixture.ctr_in("", &["version"], Duration::from_secs(5));
            if out.status.success() {
                return Ok(fixture);
            }
            if Instant::now() > deadline {
                return Err(StartError::NotReady(format!(
                    "`ctr version` did not answer within {READY_TIMEOUT:?}: {}\nlog:\n{}",
                    String::from_utf8_lossy(&out.stderr).trim(),
                    fixture.log_tail(40)
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// [`Builder::start`], except that a missing containerd prints
    /// `skipped: containerd not installed` and gives `None`. Other failures panic.
    pub fn start_or_skip(self) -> Option<Containerd> {
        match self.start() {
            Ok(c) => Some(c),
            Err(StartError::NotInstalled(_)) => {
                kestrel_test_support::skip("containerd not installed");
                None
            }
            Err(e) => panic!("cannot start the test containerd: {e}"),
        }
    }
}

/// A running private containerd; see the module docs.
#[derive(Debug)]
pub struct Containerd {
    dir: PathBuf,
    socket: PathBuf,
    ctr: PathBuf,
    child: Option<Child>,
}

impl Containerd {
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The fixture's directory (config, root, state, sockets, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// containerd's gRPC socket (CRI is served on it too).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// containerd's `root` (content store, snapshots, per-container `work` dirs).
    pub fn root_dir(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// containerd's `state` (bundles under `io.containerd.runtime.v2.task/<ns>/<id>`).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The bundle directory of task `id` in [`NAMESPACE`].
    pub fn bundle_dir(&self, id: &str) -> PathBuf {
        self.state_dir()
            .join("io.containerd.runtime.v2.task")
            .join(NAMESPACE)
            .join(id)
    }

    /// The daemon's stdout and stderr (with the shims' logs at debug level).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("logs").join("containerd.log")
    }

    /// The daemon's log.
    pub fn log(&self) -> String {
        fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `n` lines of the daemon's log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines
            .get(lines.len().saturating_sub(n)..)
            .unwrap_or_default()
            .join("\n")
    }

    /// The daemon's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `ctr -a <socket> -n kestrel-test ARGS` with a 60 s timeout.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_with_timeout(args, CTR_TIMEOUT)
    }

    /// `ctr -a <socket> -n kestrel-test ARGS`, killed after `timeout`.
    pub fn ctr_with_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        self.ctr_in(NAMESPACE, args, timeout)
    }

    /// `ctr -a <socket> [-n NAMESPACE] ARGS` (no `-n` for an empty namespace), killed after
    /// `timeout`.
    pub fn ctr_in(&self, namespace: &str, args: &[&str], timeout: Duration) -> Output {
        let mut cmd = Command::new(&self.ctr);
        cmd.arg("-a").arg(&self.socket);
        if !namespace.is_empty() {
            cmd.arg("-n").arg(namespace);
        }
        cmd.args(args);
        run_with_timeout(cmd, timeout)
    }

    /// Starts `ctr -a <socket> -n kestrel-test ARGS` in the background (stdout and stderr
    /// captured); for a `ctr run` that another thread interrupts with `ctr task kill`.
    pub fn ctr_spawn(&self, args: &[&str]) -> Background {
        let mut cmd = Command::new(&self.ctr);
        cmd.arg("-a")
            .arg(&self.socket)
            .arg("-n")
            .arg(NAMESPACE)
            .args(args);
        Background::spawn(cmd)
    }

    /// `ctr ARGS` that must succeed; returns its stdout, panics with both streams otherwise.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        if !out.status.success() {
            panic!("`ctr {}` failed: {}", args.join(" "), describe(&out));
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ctr image import IMAGE_TAR` into `namespace` (the image names itself, see
    /// tests/images/mkoci.py); panics on failure.
    pub fn import(&self, image_tar: &Path, namespace: &str) {
        let tar = image_tar.to_string_lossy();
        let out = self.ctr_in(
            namespace,
            &["image", "import", &tar],
            Duration::from_secs(300),
        );
        if !out.status.success() {
            panic!(
                "`ctr -n {namespace} image import {tar}` failed: {}",
                describe(&out)
            );
        }
    }

    /// IDs of the tasks in [`NAMESPACE`] with their status (`ctr task ls`).
    pub fn tasks(&self) -> Vec<(String, String)> {
        self.ctr_ok(&["task", "ls"])
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Some(((*f.first()?).to_owned(), (*f.get(2)?).to_owned()))
            })
            .collect()
    }

    /// IDs of the containers in [`NAMESPACE`] (`ctr container ls -q`).
    pub fn containers(&self) -> Vec<String> {
        self.ctr_ok(&["container", "ls", "-q"])
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The status of task `id` (`RUNNING`, `STOPPED`, ...), `None` without such a task.
    pub fn task_status(&self, id: &str) -> Option<String> {
        self.tasks()
            .into_iter()
            .find(|(t, _)| t == id)
            .map(|(_, s)| s)
    }

    /// Polls until task `id` is `STOPPED` or gone; false on timeout.
    pub fn wait_task_stopped(&self, id: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            match self.task_status(id) {
                None => return true,
                Some(s) if s == "STOPPED" => return true,
                Some(_) if Instant::now() > deadline => return false,
                Some(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }

    /// The shims (and anything else) started for this daemon: processes with an argument
    /// under the fixture's directory (`-address <dir>/containerd.sock`, `-bundle ...`).
    pub fn shim_processes(&self) -> Vec<Process> {
        let dir = self.dir.as_os_str().as_bytes();
        processes()
            .into_iter()
            .filter(|p| Some(p.pid) != self.pid())
            .filter(|p| {
                p.args
                    .iter()
                    .any(|a| a.as_bytes().starts_with(dir) || contains(a.as_bytes(), dir))
            })
            .collect()
    }

    /// The kestrel shim serving task `id` (a `containerd-shim-kestrel-v2` process of this
    /// daemon with `-id <id>` and no `start`/`delete` action).
    pub fn kestrel_shim_pid(&self, id: &str) -> Option<u32> {
        self.shim_processes()
            .into_iter()
            .find(|p| {
                let name = p
                    .args
                    .first()
                    .map(|a| Path::new(a).file_name().unwrap_or_default().to_owned());
                let is_kestrel = name.as_deref() == Some(OsStr::new(crate::SHIM_NAME))
                    || p.exe.as_ref().and_then(|e| e.file_name())
                        == Some(OsStr::new(crate::SHIM_NAME));
                let has_id = p
                    .args
                    .windows(2)
                    .any(|w| matches!(w, [a, b] if a == "-id" && b == id));
                let action = p.args.last().is_some_and(|a| a == "start" || a == "delete");
                is_kestrel && has_id && !action
            })
            .map(|p| p.pid)
    }

    /// Removes every task and container through containerd, so shims clean up after
    /// themselves (overlays, sockets) even when a test failed half-way. Best effort.
    fn remove_all(&self) {
        let quick = Duration::from_secs(30);
        let list = |ns: &str, args: &[&str]| -> Vec<String> {
            let out = self.ctr_in(ns, args, quick);
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_owned)
                .collect()
        };
        for ns in list("", &["namespaces", "ls", "-q"]) {
            for line in list(&ns, &["task", "ls"]).iter().skip(1) {
                if let Some(id) = line.split_whitespace().next() {
                    self.ctr_in(&ns, &["task", "kill", "-s", "SIGKILL", id], quick);
                    self.ctr_in(&ns, &["task", "rm", "-f", id], quick);
                }
            }
            for id in list(&ns, &["container", "ls", "-q"]) {
                self.ctr_in(&ns, &["container", "rm", &id], quick);
            }
        }
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn kill_leftovers(&self) {
        let dir = self.dir.as_os_str().as_bytes();
        let mut killed = Vec::new();
        for p in processes() {
            let in_dir = p.args.iter().any(|a| contains(a.as_bytes(), dir))
                || p.cwd.as_ref().is_some_and(|c| c.starts_with(&self.dir));
            if !in_dir || p.pid == std::process::id() {
                continue;
            }
            signal(p.pid, libc::SIGKILL);
            killed.push(p.pid);
            // Rust shims take their socket as `-socket unix:///run/containerd/s/<hash>`.
            if let Some(sock) = p
                .args
                .windows(2)
                .find(|w| w.first().is_some_and(|a| a == "-socket"))
                .and_then(|w| w.get(1))
            {
                let sock = sock.to_string_lossy();
                let sock = sock.strip_prefix("unix://").unwrap_or(&sock);
                if sock.starts_with("/run/containerd/s/") {
                    let _ = fs::remove_file(sock);
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while killed.iter().any(|pid| alive(*pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The socket a shim v2 serving `id` in `namespace` listens on: containerd 1.6 and the
    /// Rust shim crate both use `/run/containerd/s/<sha256(<grpc socket>/<ns>/<id>)>`.
    pub fn shim_socket(&self, namespace: &str, id: &str) -> PathBuf {
        let key = self.socket.join(namespace).join(id);
        let digest = Sha256::digest(key.as_os_str().as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        PathBuf::from("/run/containerd/s").join(hex)
    }

    /// Removes the sockets of shims that died without removing them (killed shims): for
    /// every task this daemon logged (`.../io.containerd.runtime.v2.task/<ns>/<id>`), a
    /// socket that exists and refuses connections.
    fn remove_stale_shim_sockets(&self) {
        const MARK: &str = "io.containerd.runtime.v2.task/";
        let log = self.log();
        let mut tasks = std::collections::BTreeSet::new();
        for (i, _) in log.match_indices(MARK) {
            let rest = log.get(i + MARK.len()..).unwrap_or_default();
            let end = rest
                .find(|c: char| c.is_whitespace() || c == '"' || c == '\\')
                .unwrap_or(rest.len());
            let mut parts = rest.get(..end).unwrap_or_default().split('/');
            if let (Some(ns), Some(id)) = (parts.next(), parts.next()) {
                if !ns.is_empty() && !id.is_empty() {
                    tasks.insert((ns.to_owned(), id.to_owned()));
                }
            }
        }
        for (ns, id) in tasks {
            let sock = self.shim_socket(&ns, &id);
            if sock.exists() && std::os::unix::net::UnixStream::connect(&sock).is_err() {
                let _ = fs::remove_file(&sock);
            }
        }
    }

    fn unmount_leftovers(&self) {
        let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        let mut points: Vec<PathBuf> = mountinfo
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(unescape_mount_path)
            .filter(|p| p.starts_with(&self.dir))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for p in points {
            if let Ok(c) = CString::new(p.as_os_str().as_bytes()) {
                // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- containerd log ({}), last 80 lines ----\n{}\n----",
                self.log_path().display(),
                self.log_tail(80)
            );
        }
        if self
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
        {
            self.remove_all();
        }
        self.stop();
        self.kill_leftovers();
        self.remove_stale_shim_sockets();
        self.unmount_leftovers();
        if std::env::var_os("KESTREL_KEEP_CONTAINERD").is_some_and(|v| v == "1") {
            eprintln!("containerd fixture kept in {}", self.dir.display());
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!(
                "cannot remove the containerd fixture {}: {e}",
                self.dir.display()
            );
        }
    }
}

fn config_toml(dir: &Path) -> String {
    let w = dir.display();
    format!(
        r#"version = 2
root  = "{w}/root"
state = "{w}/state"

[grpc]
  address = "{w}/containerd.sock"
[ttrpc]
  address = "{w}/containerd.sock.ttrpc"
[debug]
  address = "{w}/debug.sock"
  level = "debug"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "localhost/pause:1"
    restrict_oom_score_adj = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kestrel]
        runtime_type = "io.containerd.kestrel.v2"
        pod_annotations       = ["io.kestrel.*"]
        container_annotations = ["io.kestrel.*"]
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kestrel.options]
          ConfigPath = "/etc/kestrel/config.toml"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir  = "/usr/lib/cni"
      conf_dir = "{w}/cni/conf"
  [plugins."io.containerd.internal.v1.opt"]
    path = "{w}/opt"
"#
    )
}

fn cni_conflist(dir: &Path) -> String {
    format!(
        r#"{{ "cniVersion": "1.0.0", "name": "kestrel-test",
  "plugins": [ {{ "type": "bridge", "bridge": "kestrelbr0", "isGateway": true, "ipMasq": false,
                 "ipam": {{ "type": "host-local", "ranges": [[{{"subnet": "10.88.0.0/16"}}]], "routes": [{{"dst": "0.0.0.0/0"}}],
                           "dataDir": "{}/cni/ipam" }} }} ] }}
"#,
        dir.display()
    )
}

/// A fresh directory `$TMPDIR/kestrel-containerd-<pid>-<n>` (short: socket paths in it
/// must stay under 108 bytes).
fn make_temp_dir() -> io::Result<PathBuf> {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let base = std::env::temp_dir();
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("kestrel-containerd-{}-{n}", std::process::id()));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `ctr` failures for panic messages: exit status and both streams.
pub fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes no pointers; a stale pid at worst gets ESRCH.
    unsafe { libc::kill(pid, sig) };
}

/// True while `/proc/<pid>` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Sends SIGKILL to `pid` (for tests that kill a shim) and waits up to 5 s until it is gone.
/// Each thread of process `pid`: its name and its seccomp mode (`Seccomp:` in its status:
/// 0 none, 2 filtered).
pub fn thread_seccomp(pid: u32) -> Vec<(String, u32)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut threads: Vec<(String, u32)> = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|status| {
            let field = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_default()
            };
            (
                field("Name:"),
                field("Seccomp:").parse().unwrap_or(u32::MAX),
            )
        })
        .collect();
    threads.sort();
    threads
}

/// Asserts that the threads serving the guest in process `pid` (`vcpu*`, `vmm`,
/// `kestrel-blk*`) are under a seccomp filter and the shim's own threads are not (KVM's
/// own kernel threads, `kvm-*`, inherit the vCPU thread's filter and are not ours).
pub fn assert_guest_threads_confined(pid: u32) {
    let threads: Vec<_> = thread_seccomp(pid)
        .into_iter()
        .filter(|(n, _)| !n.starts_with("kvm-"))
        .collect();
    let serving = |n: &str| n.starts_with("vcpu") || n == "vmm" || n.starts_with("kestrel-blk");
    assert!(
        threads.iter().any(|(n, _)| n.starts_with("vcpu"))
            && threads.iter().any(|(n, _)| n == "vmm"),
        "no vCPU or VMM thread in {pid}: {threads:?}"
    );
    for (name, mode) in &threads {
        let expected = if serving(name) { 2 } else { 0 };
        assert_eq!(*mode, expected, "thread {name} of {pid}: {threads:?}");
    }
}

pub fn kill9(pid: u32) -> bool {
    signal(pid, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn unescape_mount_path(field: &str) -> PathBuf {
    // mountinfo escapes space, tab, newline and backslash as \ooo
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|o| c == b'\\' && o.iter().all(|d| (b'0'..=b'7').contains(d)));
        if let Some(o) = octal {
            let v = o.iter().fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(c);
            i += 1;
        }
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

/// A process as seen in `/proc`.
#[derive(Debug, Clone)]
pub struct Process {
    pub pid: u32,
    pub args: Vec<OsString>,
    pub exe: Option<PathBuf>,
    pub cwd: Option<PathBuf>,
}

/// Every process whose `/proc/<pid>` we can read (kernel threads have no arguments and
/// are left out).
pub fn processes() -> Vec<Process> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let e = e.ok()?;
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(e.path().join("cmdline")).ok()?;
            if cmdline.is_empty() {
                return None;
            }
            let args = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| OsStr::from_bytes(a).to_owned())
                .collect();
            Some(Process {
                pid,
                args,
                exe: fs::read_link(e.path().join("exe")).ok(),
                cwd: fs::read_link(e.path().join("cwd")).ok(),
            })
        })
        .collect()
}

/// Runs `cmd` with captured output; kills it after `timeout` (then the status is
/// "signal 9" and stderr ends with a note).
pub fn run_with_timeout(cmd: Command, timeout: Duration) -> Output {
    let mut bg = Background::spawn(cmd);
    match bg.wait_timeout(timeout) {
        Some(out) => out,
        None => {
            let mut out = bg.kill();
            out.stderr.extend_from_slice(
                format!("\n[fixture: killed after the {timeout:?} timeout]\n").as_bytes(),
            );
            out
        }
    }
}

/// Captured output of a child, readable while it runs.
#[derive(Debug, Clone, Default)]
pub struct Captured(Arc<(Mutex<Vec<u8>>, Condvar)>);

impl Captured {
    fn reader(&self, mut from: impl Read + Send + 'static) -> std::thread::JoinHandle<()> {
        let buf = self.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                match from.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => buf.push(chunk.get(..n).unwrap_or_default()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        })
    }

    fn push(&self, data: &[u8]) {
        let (m, cv) = &*self.0;
        m.lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(data);
        cv.notify_all();
    }

    /// Everything so far.
    pub fn bytes(&self) -> Vec<u8> {
        self.0 .0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Everything so far, as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }

    /// Waits until `needle` was captured; false after `timeout`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.0;
        let mut buf = m.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if contains(&buf, needle.as_bytes()) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            buf = cv
                .wait_timeout(buf, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A child process with stdout and stderr captured by threads.
#[derive(Debug)]
pub struct Background {
    child: Child,
    pub stdout: Captured,
    pub stderr: Captured,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Background {
    /// Spawns `cmd` (stdin null); panics if it cannot be spawned.
    pub fn spawn(mut cmd: Command) -> Self {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        let stdout = Captured::default();
        let stderr = Captured::default();
        let mut readers = Vec::new();
        if let Some(o) = child.stdout.take() {
            readers.push(stdout.reader(o));
        }
        if let Some(e) = child.stderr.take() {
            readers.push(stderr.reader(e));
        }
        Background {
            child,
            stdout,
            stderr,
            readers,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the exit; `None` if it still runs.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<Output> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(self.finish(status)),
                Ok(None) if Instant::now() >= deadline => return None,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("waiting for {}: {e}", self.child.id()),
            }
        }
    }

    /// Kills the child (SIGKILL) and returns what it wrote.
    pub fn kill(mut self) -> Output {
        let _ = self.child.kill();
        let status = self
            .child
            .wait()
            .unwrap_or_else(|_| ExitStatus::from_raw(9));
        self.finish(status)
    }

    fn finish(&mut self, status: ExitStatus) -> Output {
        // The pipes may stay open in grandchildren; give the readers a moment only.
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        Output {
            status,
            stdout: self.stdout.bytes(),
            stderr: self.stderr.bytes(),
        }
    }
}

/// A FIFO whose content is captured by a thread: pass [`ConsoleFifo::path`] as
/// `ctr run -d --log-uri <path>` and the shim writes the task's stdout (the VM console)
/// into it. The reader opens the FIFO blocking, so it waits for the shim, and reads until
/// the shim closes it. Mind that a guest's serial console ends lines with CR LF.
#[derive(Debug)]
pub struct ConsoleFifo {
    path: PathBuf,
    output: Captured,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ConsoleFifo {
    /// Makes the FIFO `path` (mode 0600) and starts the reader; panics on failure.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let c = CString::new(path.as_os_str().as_bytes())
            .unwrap_or_else(|_| panic!("{} contains NUL", path.display()));
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
            panic!("mkfifo {}: {}", path.display(), io::Error::last_os_error());
        }
        let output = Captured::default();
        let out = output.clone();
        let p = path.clone();
        let thread = std::thread::spawn(move || {
            if let Ok(f) = fs::File::open(&p) {
                let _ = out.reader(f).join();
            }
        });
        ConsoleFifo {
            path,
            output,
            thread: Some(thread),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn output(&self) -> &Captured {
        &self.output
    }

    pub fn text(&self) -> String {
        self.output.text()
    }

    /// Waits until `needle` appeared; false after `timeout`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        self.output.wait_for(needle, timeout)
    }
}

impl Drop for ConsoleFifo {
    fn drop(&mut self) {
        // A reader still blocked in open() (nobody ever opened the FIFO for writing) is
        // released by a writer that opens and closes at once.
        if let Some(t) = self.thread.take() {
            if !t.is_finished() {
                let _ = fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&self.path);
            }
        }
        let _ = fs::remove_file(&self.path);
    }
}
