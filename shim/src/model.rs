//! The shim's task model: one sandbox (this shim process and its VM) holding containers,
//! each holding processes (the init, keyed "", and execs), with their states and exits.
//!
//! The model checks every request against the states (start twice, delete a running
//! process, exec in a stopped container…), calls the [`Guest`] with no lock held, records
//! what happened, and queues events in order on [`crate::events`]. A process's exit is
//! awaited by one task spawned when the process started, after its TaskStart was queued,
//! so TaskExit always follows TaskStart. Everything here is tested with a fake guest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use containerd_shim::api::Status;
use containerd_shim::protos::api::ProcessInfo;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::watch;

use crate::error::ShimError;
use crate::events::{Event, EventTx};
use crate::guest::{Guest, NewContainer, NewExec, Stdio};

/// The exit status of a process that could not start (as `docker run` reports a runtime
/// failure).
pub const EXIT_NOT_STARTED: u32 = 125;
/// The exit status when the guest could not tell how a process ended (its VM is gone).
pub const EXIT_UNKNOWN: u32 = 255;

/// How a process ended.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitInfo {
    pub status: u32,
    pub at: Timestamp,
}

fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The guest is creating it (containerd has no answer yet).
    Creating,
    Created,
    /// The guest is starting it.
    Starting,
    Running,
    Stopped,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Creating => "being created",
            Phase::Created => "created",
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Stopped => "stopped",
        }
    }
}

struct Proc {
    pid: u32,
    phase: Phase,
    stdio: Stdio,
    exit: watch::Sender<Option<ExitInfo>>,
}

impl Proc {
    fn new(stdio: Stdio) -> Self {
        Proc {
            pid: 0,
            phase: Phase::Creating,
            stdio,
            exit: watch::channel(None).0,
        }
    }

    fn exit_info(&self) -> Option<ExitInfo> {
        self.exit.borrow().clone()
    }
}

struct Container {
    bundle: String,
    procs: HashMap<String, Proc>,
}

/// What `State` answers.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcState {
    pub bundle: String,
    pub pid: u32,
    pub status: Status,
    pub stdio: Stdio,
    pub exit: Option<ExitInfo>,
}

pub struct Model<G: Guest> {
    guest: Arc<G>,
    containers: Mutex<HashMap<String, Container>>,
    events: EventTx,
}

fn exec_name(id: &str, exec: &str) -> String {
    if exec.is_empty() {
        format!("task {id}")
    } else {
        format!("exec {exec} of task {id}")
    }
}

impl<G: Guest> Model<G> {
    pub fn new(guest: Arc<G>, events: EventTx) -> Arc<Self> {
        Arc::new(Model {
            guest,
            containers: Mutex::new(HashMap::new()),
            events,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Container>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, event: Event) {
        // The forwarder only stops with the process.
        let _ = self.events.send(event);
    }

    /// The process `(id, exec)` of `all`, or NotFound.
    fn proc_mut<'a>(
        all: &'a mut HashMap<String, Container>,
        id: &str,
        exec: &str,
    ) -> Result<&'a mut Proc, ShimError> {
        let c = all
            .get_mut(id)
            .ok_or_else(|| ShimError::TaskNotFound(id.to_string()))?;
        c.procs
            .get_mut(exec)
            .filter(|p| p.phase != Phase::Creating)
            .ok_or_else(|| ShimError::ExecNotFound {
                id: id.to_string(),
                exec: exec.to_string(),
            })
    }

    /// When the init of `id` is still being created, asks the guest to cancel that and
    /// gives the error for `action`.
    fn cancel_if_creating(&self, id: &str, action: &'static str) -> Result<(), ShimError> {
        let creating = self
            .lock()
            .get(id)
            .and_then(|c| c.procs.get(""))
            .is_some_and(|p| p.phase == Phase::Creating);
        if !creating {
            return Ok(());
        }
        self.guest.cancel_create(id);
        Err(ShimError::WrongState {
            what: exec_name(id, ""),
            state: "being created (now cancelled)",
            action,
        })
    }

    fn check_exists(&self, id: &str) -> Result<(), ShimError> {
        let mut all = self.lock();
        Self::proc_mut(&mut all, id, "").map(|_| ())
    }

    pub async fn create(&self, c: NewContainer) -> Result<u32, ShimError> {
        {
            let mut all = self.lock();
            if all.contains_key(&c.id) {
                return Err(ShimError::AlreadyExists(format!("task {}", c.id)));
            }
            let mut procs = HashMap::new();
            procs.insert(String::new(), Proc::new(c.stdio.clone()));
            all.insert(
                c.id.clone(),
                Container {
                    bundle: c.bundle.clone(),
                    procs,
                },
            );
        }
        let created = self.guest.create(&c).await;
        let mut all = self.lock();
        let pid = match created {
            Ok(pid) => pid,
            Err(source) => {
                all.remove(&c.id);
                return Err(ShimError::Guest {
                    what: format!("create task {}", c.id),
                    source,
                });
            }
        };
        if let Some(p) = all.get_mut(&c.id).and_then(|c| c.procs.get_mut("")) {
            p.pid = pid;
            p.phase = Phase::Created;
        }
        self.emit(Event::Create(TaskCreate {
            container_id: c.id.clone(),
            bundle: c.bundle.clone(),
            rootfs: c.rootfs.clone(),
            io: Some(containerd_shim::protos::events::task::TaskIO {
                stdin: c.stdio.stdin.clone(),
                stdout: c.stdio.stdout.clone(),
                stderr: c.stdio.stderr.clone(),
                terminal: c.stdio.terminal,
                ..Default::default()
            })
            .into(),
            pid,
            ..Default::default()
        }));
        Ok(pid)
    }

    pub async fn start(self: &Arc<Self>, id: &str, exec: &str) -> Result<u32, ShimError> {
        {
            let mut all = self.lock();
            let p = Self::proc_mut(&mut all, id, exec)?;
            if p.phase != Phase::Created {
                return Err(ShimError::WrongState {
                    what: exec_name(id, exec),
                    state: p.phase.name(),
                    action: "start it",
                });
            }
            p.phase = Phase::Starting;
        }
        let started = self.guest.start(id, exec).await;
        let mut all = self.lock();
        let p = Self::proc_mut(&mut all, id, exec)?;
        let pid = match started {
            Ok(pid) => pid,
            Err(source) => {
                // The process ends without running, so that Wait and State still answer.
                let info = self.record_exit(id, exec, p, EXIT_NOT_STARTED);
                drop(all);
                log::info!(
                    "{} did not start; exit {}",
                    exec_name(id, exec),
                    info.status
                );
                return Err(ShimError::Guest {
                    what: format!("start {}", exec_name(id, exec)),
                    source,
                });
            }
        };
        if p.phase == Phase::Stopped {
            // Killed while starting: the exit is already recorded.
            return Ok(pid);
        }
        p.pid = pid;
        p.phase = Phase::Running;
        self.emit(if exec.is_empty() {
            Event::Start(TaskStart {
                container_id: id.to_string(),
                pid,
                ..Default::default()
            })
        } else {
            Event::ExecStarted(TaskExecStarted {
                container_id: id.to_string(),
                exec_id: exec.to_string(),
                pid,
                ..Default::default()
            })
        });
        drop(all);
        let model = self.clone();
        let (id, exec) = (id.to_string(), exec.to_string());
        tokio::spawn(async move {
            let status = match model.guest.wait(&id, &exec).await {
                Ok(status) => status,
                Err(e) => {
                    log::warn!("{}: {}", exec_name(&id, &exec), vmm::error_chain(&e));
                    EXIT_UNKNOWN
                }
            };
            let mut all = model.lock();
            if let Ok(p) = Self::proc_mut(&mut all, &id, &exec) {
                if p.phase != Phase::Stopped {
                    model.record_exit(&id, &exec, p, status);
                }
            }
        });
        Ok(pid)
    }

    /// Marks `p` stopped with `status` and queues TaskExit. Call with the lock held.
    fn record_exit(&self, id: &str, exec: &str, p: &mut Proc, status: u32) -> ExitInfo {
        let info = ExitInfo { status, at: now() };
        p.phase = Phase::Stopped;
        p.exit.send_replace(Some(info.clone()));
        self.emit(Event::Exit(TaskExit {
            container_id: id.to_string(),
            id: if exec.is_empty() { id } else { exec }.to_string(),
            pid: p.pid,
            exit_status: status,
            exited_at: Some(info.at.clone()).into(),
            ..Default::default()
        }));
        info
    }

    pub async fn exec(&self, id: &str, exec: &str, new: NewExec) -> Result<(), ShimError> {
        if exec.is_empty() {
            return Err(ShimError::InvalidArgument(
                "an exec needs an exec id".into(),
            ));
        }
        {
            let mut all = self.lock();
            let c = all
                .get_mut(id)
                .ok_or_else(|| ShimError::TaskNotFound(id.to_string()))?;
            let init = c.procs.get("").map_or(Phase::Creating, |p| p.phase);
            if init != Phase::Running {
                return Err(ShimError::WrongState {
                    what: format!("task {id}"),
                    state: init.name(),
                    action: "exec in it",
                });
            }
            if c.procs.contains_key(exec) {
                return Err(ShimError::AlreadyExists(exec_name(id, exec)));
            }
            c.procs
                .insert(exec.to_string(), Proc::new(new.stdio.clone()));
        }
        let result = self.guest.exec(id, exec, &new).await;
        let mut all = self.lock();
        let Some(c) = all.get_mut(id) else {
            return Err(ShimError::TaskNotFound(id.to_string()));
        };
        if let Err(source) = result {
            c.procs.remove(exec);
            return Err(ShimError::Guest {
                what: format!("add {}", exec_name(id, exec)),
                source,
            });
        }
        if let Some(p) = c.procs.get_mut(exec) {
            p.phase = Phase::Created;
        }
        self.emit(Event::ExecAdded(TaskExecAdded {
            container_id: id.to_string(),
            exec_id: exec.to_string(),
            ..Default::default()
        }));
        Ok(())
    }

    pub async fn kill(
        &self,
        id: &str,
        exec: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), ShimError> {
        if exec.is_empty() {
            self.cancel_if_creating(id, "signal it")?;
        }
        {
            let mut containers = self.lock();
            let p = Self::proc_mut(&mut containers, id, exec)?;
            match p.phase {
                Phase::Stopped if !all => {
                    return Err(ShimError::ProcessFinished(exec_name(id, exec)))
                }
                Phase::Created => {
                    // Killed before it started: it ends now, with the signal's status.
                    self.record_exit(id, exec, p, 128 + signal);
                }
                _ => {}
            }
        }
        self.guest
            .kill(id, exec, signal, all)
            .await
            .map_err(|source| ShimError::Guest {
                what: format!("signal {}", exec_name(id, exec)),
                source,
            })
    }

    pub async fn wait(&self, id: &str, exec: &str) -> Result<ExitInfo, ShimError> {
        let mut rx = {
            let mut all = self.lock();
            Self::proc_mut(&mut all, id, exec)?.exit.subscribe()
        };
        let info = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| ShimError::TaskNotFound(id.to_string()))?
            .clone();
        info.ok_or_else(|| ShimError::TaskNotFound(id.to_string()))
    }

    /// Deletes a stopped (or never started) process; for the init, the whole container.
    pub async fn delete(&self, id: &str, exec: &str) -> Result<(u32, ExitInfo), ShimError> {
        if exec.is_empty() {
            self.cancel_if_creating(id, "delete it")?;
        }
        let (pid, info) = {
            let mut all = self.lock();
            let p = Self::proc_mut(&mut all, id, exec)?;
            if !matches!(p.phase, Phase::Created | Phase::Stopped) {
                return Err(ShimError::WrongState {
                    what: exec_name(id, exec),
                    state: p.phase.name(),
                    action: "delete it",
                });
            }
            let info = p.exit_info().unwrap_or(ExitInfo {
                status: 0,
                at: now(),
            });
            let pid = p.pid;
            if exec.is_empty() {
                all.remove(id);
            } else if let Some(c) = all.get_mut(id) {
                c.procs.remove(exec);
            }
            (pid, info)
        };
        let deleted = self.guest.delete(id, exec).await;
        if exec.is_empty() {
            self.emit(Event::Delete(TaskDelete {
                container_id: id.to_string(),
                id: id.to_string(),
                pid,
                exit_status: info.status,
                exited_at: Some(info.at.clone()).into(),
                ..Default::default()
            }));
        }
        if let Err(e) = deleted {
            // The model forgot the process already; what the guest kept is logged.
            log::warn!("deleting {}: {}", exec_name(id, exec), vmm::error_chain(&e));
        }
        Ok((pid, info))
    }

    pub fn state(&self, id: &str, exec: &str) -> Result<ProcState, ShimError> {
        let mut all = self.lock();
        let bundle = all.get(id).map(|c| c.bundle.clone()).unwrap_or_default();
        let p = Self::proc_mut(&mut all, id, exec)?;
        Ok(ProcState {
            bundle,
            pid: p.pid,
            status: match p.phase {
                Phase::Creating | Phase::Created | Phase::Starting => Status::CREATED,
                Phase::Running => Status::RUNNING,
                Phase::Stopped => Status::STOPPED,
            },
            stdio: p.stdio.clone(),
            exit: p.exit_info(),
        })
    }

    /// The init's pid, when `id` exists.
    pub fn pid(&self, id: &str) -> Option<u32> {
        let mut all = self.lock();
        Self::proc_mut(&mut all, id, "").ok().map(|p| p.pid)
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn guest_err(what: String) -> impl FnOnce(crate::guest::GuestError) -> ShimError {
        move |source| ShimError::Guest { what, source }
    }

    pub async fn pids(&self, id: &str) -> Result<Vec<ProcessInfo>, ShimError> {
        self.check_exists(id)?;
        self.guest
            .pids(id)
            .await
            .map_err(Self::guest_err(format!("list the processes of task {id}")))
    }

    pub async fn stats(&self, id: &str) -> Result<Any, ShimError> {
        self.check_exists(id)?;
        self.guest
            .stats(id)
            .await
            .map_err(Self::guest_err(format!("read the statistics of task {id}")))
    }

    pub async fn update(&self, id: &str, resources: &Any) -> Result<(), ShimError> {
        self.check_exists(id)?;
        self.guest
            .update(id, resources)
            .await
            .map_err(Self::guest_err(format!("update task {id}")))
    }

    pub async fn resize_pty(&self, id: &str, exec: &str, w: u32, h: u32) -> Result<(), ShimError> {
        {
            let mut all = self.lock();
            Self::proc_mut(&mut all, id, exec)?;
        }
        self.guest
            .resize_pty(id, exec, w, h)
            .await
            .map_err(Self::guest_err(format!(
                "resize the terminal of {}",
                exec_name(id, exec)
            )))
    }

    pub async fn close_io(&self, id: &str, exec: &str) -> Result<(), ShimError> {
        {
            let mut all = self.lock();
            Self::proc_mut(&mut all, id, exec)?;
        }
        self.guest
            .close_io(id, exec)
            .await
            .map_err(Self::guest_err(format!(
                "close the stdin of {}",
                exec_name(id, exec)
            )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{self, EventRx};
    use crate::guest::GuestError;
    use async_trait::async_trait;
    use containerd_shim::protos::ttrpc::Code;
    use std::time::Duration;
    use tokio::sync::Notify;

    /// A guest whose processes exit when the test says so.
    #[derive(Default)]
    struct FakeGuest {
        calls: Mutex<Vec<String>>,
        exits: Mutex<HashMap<(String, String), u32>>,
        exited: Notify,
        fail_create: Mutex<Option<GuestError>>,
        fail_start: Mutex<bool>,
        next_pid: Mutex<u32>,
        /// Create waits for cancel_create, then fails with CANCELLED.
        hold_create: std::sync::atomic::AtomicBool,
        cancelled: Notify,
    }

    impl FakeGuest {
        fn call(&self, s: String) {
            self.calls.lock().unwrap().push(s);
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
        fn exit(&self, id: &str, exec: &str, status: u32) {
            self.exits
                .lock()
                .unwrap()
                .insert((id.into(), exec.into()), status);
            self.exited.notify_waiters();
        }
    }

    #[async_trait]
    impl Guest for FakeGuest {
        async fn create(&self, c: &NewContainer) -> Result<u32, GuestError> {
            self.call(format!("create {}", c.id));
            if let Some(e) = self.fail_create.lock().unwrap().take() {
                return Err(e);
            }
            if self.hold_create.load(std::sync::atomic::Ordering::SeqCst) {
                self.cancelled.notified().await;
                return Err(GuestError::Invalid("cancelled".into()));
            }
            let mut pid = self.next_pid.lock().unwrap();
            *pid += 1;
            Ok(100 + *pid)
        }
        fn cancel_create(&self, id: &str) {
            self.call(format!("cancel {id}"));
            self.cancelled.notify_waiters();
        }
        async fn start(&self, id: &str, exec: &str) -> Result<u32, GuestError> {
            self.call(format!("start {id}/{exec}"));
            if *self.fail_start.lock().unwrap() {
                return Err(GuestError::Agent {
                    code: Code::FAILED_PRECONDITION,
                    message: "exec nosuch: No such file or directory".into(),
                });
            }
            Ok(if exec.is_empty() { 101 } else { 200 })
        }
        async fn exec(&self, id: &str, exec: &str, _: &NewExec) -> Result<(), GuestError> {
            self.call(format!("exec {id}/{exec}"));
            Ok(())
        }
        async fn kill(
            &self,
            id: &str,
            exec: &str,
            signal: u32,
            all: bool,
        ) -> Result<(), GuestError> {
            self.call(format!("kill {id}/{exec} {signal} {all}"));
            if signal == 9 {
                self.exit(id, exec, 137);
            }
            Ok(())
        }
        async fn wait(&self, id: &str, exec: &str) -> Result<u32, GuestError> {
            loop {
                let notified = self.exited.notified();
                if let Some(s) = self.exits.lock().unwrap().get(&(id.into(), exec.into())) {
                    return Ok(*s);
                }
                notified.await;
            }
        }
        async fn delete(&self, id: &str, exec: &str) -> Result<(), GuestError> {
            self.call(format!("delete {id}/{exec}"));
            Ok(())
        }
        async fn pids(&self, _: &str) -> Result<Vec<ProcessInfo>, GuestError> {
            Ok(vec![ProcessInfo {
                pid: 101,
                ..Default::default()
            }])
        }
        async fn stats(&self, _: &str) -> Result<Any, GuestError> {
            Ok(Any::default())
        }
        async fn update(&self, _: &str, _: &Any) -> Result<(), GuestError> {
            Ok(())
        }
        async fn resize_pty(&self, _: &str, _: &str, _: u32, _: u32) -> Result<(), GuestError> {
            Ok(())
        }
        async fn close_io(&self, id: &str, exec: &str) -> Result<(), GuestError> {
            self.call(format!("close_io {id}/{exec}"));
            Ok(())
        }
    }

    fn setup() -> (Arc<Model<FakeGuest>>, Arc<FakeGuest>, EventRx) {
        let guest = Arc::new(FakeGuest::default());
        let (tx, rx) = events::channel();
        (Model::new(guest.clone(), tx), guest, rx)
    }

    fn container(id: &str) -> NewContainer {
        NewContainer {
            id: id.into(),
            bundle: format!("/run/bundles/{id}"),
            rootfs: Vec::new(),
            spec: serde_json::from_str(r#"{"ociVersion":"1.0.2"}"#).unwrap(),
            stdio: Stdio {
                stdout: format!("/fifo/{id}-stdout"),
                ..Default::default()
            },
        }
    }

    fn topics(rx: &mut EventRx) -> Vec<&'static str> {
        let mut out = Vec::new();
        while let Ok(e) = rx.try_recv() {
            out.push(e.topic().rsplit('/').next().unwrap_or(""));
        }
        out
    }

    async fn wait_exit(m: &Model<FakeGuest>, id: &str, exec: &str) -> ExitInfo {
        tokio::time::timeout(Duration::from_secs(5), m.wait(id, exec))
            .await
            .expect("wait timed out")
            .unwrap()
    }

    #[tokio::test]
    async fn lifecycle_create_start_exit_delete() {
        let (m, g, mut rx) = setup();
        assert_eq!(m.create(container("c1")).await.unwrap(), 101);
        assert_eq!(m.state("c1", "").unwrap().status, Status::CREATED);
        assert_eq!(m.start("c1", "").await.unwrap(), 101);
        assert_eq!(m.state("c1", "").unwrap().status, Status::RUNNING);
        g.exit("c1", "", 3);
        let exit = wait_exit(&m, "c1", "").await;
        assert_eq!(exit.status, 3);
        let st = m.state("c1", "").unwrap();
        assert_eq!(
            (st.status, st.exit.map(|e| e.status)),
            (Status::STOPPED, Some(3))
        );
        assert_eq!(m.delete("c1", "").await.unwrap().1.status, 3);
        assert!(m.is_empty());
        assert!(matches!(m.state("c1", ""), Err(ShimError::TaskNotFound(_))));
        assert_eq!(topics(&mut rx), ["create", "start", "exit", "delete"]);
        assert_eq!(g.calls(), ["create c1", "start c1/", "delete c1/"]);
    }

    #[tokio::test]
    async fn delete_during_create_cancels_it() {
        let (m, g, mut rx) = setup();
        g.hold_create
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let creating = tokio::spawn({
            let m = m.clone();
            async move { m.create(container("c1")).await }
        });
        while g.calls().is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let err = m.delete("c1", "").await.unwrap_err();
        assert_eq!(err.code(), Code::FAILED_PRECONDITION, "{err}");
        let created = tokio::time::timeout(Duration::from_secs(5), creating)
            .await
            .expect("create was not cancelled")
            .unwrap();
        assert!(created.is_err());
        assert!(m.is_empty());
        assert_eq!(g.calls(), ["create c1", "cancel c1"]);
        // Nothing was created, so nothing is published.
        assert!(topics(&mut rx).is_empty());
    }

    #[tokio::test]
    async fn exit_is_never_published_before_start() {
        // The guest reports the exit at once: TaskExit must still follow TaskStart.
        let (m, g, mut rx) = setup();
        m.create(container("c1")).await.unwrap();
        g.exit("c1", "", 0);
        m.start("c1", "").await.unwrap();
        wait_exit(&m, "c1", "").await;
        assert_eq!(topics(&mut rx), ["create", "start", "exit"]);
    }

    #[tokio::test]
    async fn execs_have_their_own_lifecycle() {
        let (m, g, mut rx) = setup();
        m.create(container("c1")).await.unwrap();
        let new = NewExec {
            spec: Any::default(),
            stdio: Stdio::default(),
        };
        // Not before the init runs.
        assert!(matches!(
            m.exec("c1", "e1", new.clone()).await,
            Err(ShimError::WrongState { .. })
        ));
        m.start("c1", "").await.unwrap();
        m.exec("c1", "e1", new.clone()).await.unwrap();
        assert!(matches!(
            m.exec("c1", "e1", new.clone()).await,
            Err(ShimError::AlreadyExists(_))
        ));
        assert_eq!(m.start("c1", "e1").await.unwrap(), 200);
        assert!(matches!(
            m.delete("c1", "e1").await,
            Err(ShimError::WrongState { .. })
        ));
        g.exit("c1", "e1", 7);
        assert_eq!(wait_exit(&m, "c1", "e1").await.status, 7);
        assert_eq!(m.state("c1", "").unwrap().status, Status::RUNNING);
        m.close_io("c1", "e1").await.unwrap();
        m.delete("c1", "e1").await.unwrap();
        assert!(matches!(
            m.state("c1", "e1"),
            Err(ShimError::ExecNotFound { .. })
        ));
        assert_eq!(
            topics(&mut rx),
            ["create", "start", "exec-added", "exec-started", "exit"]
        );
    }

    #[tokio::test]
    async fn kill_before_start_records_the_signal_and_wait_answers() {
        let (m, g, mut rx) = setup();
        m.create(container("c1")).await.unwrap();
        m.kill("c1", "", 15, false).await.unwrap();
        assert_eq!(wait_exit(&m, "c1", "").await.status, 128 + 15);
        assert!(matches!(
            m.start("c1", "").await,
            Err(ShimError::WrongState { .. })
        ));
        // A stopped process cannot be signalled again.
        assert!(matches!(
            m.kill("c1", "", 15, false).await,
            Err(ShimError::ProcessFinished(_))
        ));
        m.delete("c1", "").await.unwrap();
        assert_eq!(topics(&mut rx), ["create", "exit", "delete"]);
        assert_eq!(g.calls()[1], "kill c1/ 15 false");
    }

    #[tokio::test]
    async fn failed_start_ends_the_process() {
        let (m, g, mut rx) = setup();
        m.create(container("c1")).await.unwrap();
        *g.fail_start.lock().unwrap() = true;
        let err = m.start("c1", "").await.unwrap_err();
        assert_eq!(err.code(), Code::FAILED_PRECONDITION);
        assert!(vmm::error_chain(&err).contains("No such file"), "{err}");
        assert_eq!(wait_exit(&m, "c1", "").await.status, EXIT_NOT_STARTED);
        m.delete("c1", "").await.unwrap();
        assert_eq!(topics(&mut rx), ["create", "exit", "delete"]);
    }

    #[tokio::test]
    async fn failed_create_leaves_nothing() {
        let (m, g, mut rx) = setup();
        *g.fail_create.lock().unwrap() = Some(GuestError::Invalid("bad spec".into()));
        let err = m.create(container("c1")).await.unwrap_err();
        assert_eq!(err.code(), Code::INVALID_ARGUMENT);
        assert!(m.is_empty());
        assert!(topics(&mut rx).is_empty());
        // The id is free again.
        m.create(container("c1")).await.unwrap();
    }

    #[tokio::test]
    async fn running_tasks_are_not_deleted_and_ids_are_unique() {
        let (m, g, _rx) = setup();
        m.create(container("c1")).await.unwrap();
        assert!(matches!(
            m.create(container("c1")).await,
            Err(ShimError::AlreadyExists(_))
        ));
        m.start("c1", "").await.unwrap();
        let err = m.delete("c1", "").await.unwrap_err();
        assert_eq!(err.code(), Code::FAILED_PRECONDITION);
        m.kill("c1", "", 9, false).await.unwrap();
        assert_eq!(wait_exit(&m, "c1", "").await.status, 137);
        m.delete("c1", "").await.unwrap();
        assert!(!g.calls().is_empty());
    }

    #[tokio::test]
    async fn two_containers_are_independent() {
        let (m, g, _rx) = setup();
        m.create(container("a")).await.unwrap();
        m.create(container("b")).await.unwrap();
        m.start("a", "").await.unwrap();
        m.start("b", "").await.unwrap();
        g.exit("b", "", 1);
        assert_eq!(wait_exit(&m, "b", "").await.status, 1);
        assert_eq!(m.state("a", "").unwrap().status, Status::RUNNING);
        m.delete("b", "").await.unwrap();
        assert!(!m.is_empty());
        assert_eq!(m.pids("a").await.unwrap().len(), 1);
        assert!(matches!(m.pids("b").await, Err(ShimError::TaskNotFound(_))));
    }

    #[tokio::test]
    async fn unknown_ids_are_not_found() {
        let (m, _g, _rx) = setup();
        for err in [
            m.start("x", "").await.unwrap_err(),
            m.kill("x", "", 9, false).await.unwrap_err(),
            m.wait("x", "").await.unwrap_err(),
            m.delete("x", "").await.unwrap_err(),
            m.stats("x").await.unwrap_err(),
        ] {
            assert_eq!(err.code(), Code::NOT_FOUND, "{err}");
        }
        m.create(container("c1")).await.unwrap();
        assert_eq!(
            m.start("c1", "nosuch").await.unwrap_err().code(),
            Code::NOT_FOUND
        );
    }

    /// A pod's shim lives as long as the pod, and every container of the pod passes
    /// through its model: 1000 containers, each created, started, given an exec and
    /// deleted, may grow the model's heap by 1 MiB at most (what stays is the maps' and
    /// the event channel's capacity). On a current-thread runtime, so the model's tasks
    /// allocate on the thread whose heap is counted.
    #[test]
    fn a_thousand_containers_grow_the_heap_by_less_than_1_mib() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (m, g, mut rx) = setup();
            let new = NewExec {
                spec: Any::default(),
                stdio: Stdio::default(),
            };
            let cycle = |i: usize| {
                let (m, g, new) = (&m, &g, new.clone());
                async move {
                    let id = format!("c{i}");
                    m.create(container(&id)).await.unwrap();
                    m.start(&id, "").await.unwrap();
                    m.exec(&id, "e1", new).await.unwrap();
                    m.start(&id, "e1").await.unwrap();
                    g.exit(&id, "e1", 0);
                    wait_exit(m, &id, "e1").await;
                    m.delete(&id, "e1").await.unwrap();
                    g.exit(&id, "", 0);
                    wait_exit(m, &id, "").await;
                    m.delete(&id, "").await.unwrap();
                    // The fake guest's own records are not the model's.
                    g.calls.lock().unwrap().clear();
                    g.exits.lock().unwrap().clear();
                }
            };
            for i in 0..20 {
                cycle(i).await;
                topics(&mut rx);
            }
            let before = crate::test_heap::live();
            // The counter sees what this thread holds.
            let probe = vec![0u8; 4096];
            assert!(crate::test_heap::live() - before >= 4096);
            drop(probe);
            for i in 20..1020 {
                cycle(i).await;
                topics(&mut rx);
            }
            let growth = crate::test_heap::live() - before;
            kestrel_test_support::campaign(format_args!(
                "the shim's model: 1000 containers (with an exec each) grew its heap by {growth} bytes"
            ));
            assert!(m.is_empty());
            assert!(growth <= 1 << 20, "the heap grew by {growth} bytes");
        });
    }
}
