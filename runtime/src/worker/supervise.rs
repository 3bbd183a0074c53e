//! The station's side of a run worker: start it, feed it the job, turn what it reports into
//! steps for the station (audit entries, progress), and end it: at its own end, at the setup
//! deadline, at the run's wall-clock deadline plus a short grace (SIGKILL, whatever host call
//! it is in), or when the station asks (audit volume). What the worker writes is untrusted:
//! frames are size-checked before they are read and the station validates every message again.

use super::protocol::{self, Confinement, Finished, MAX_JSON, ProtocolError, Report, Request};
use crate::sandbox::{CallRecord, Outcome};
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The hidden subcommand of `amicus` that runs a worker.
pub const SUBCOMMAND: &str = "__run-worker";

/// The argument that tells a worker its station's pid (`--station-pid=N`, after the
/// subcommand): the worker's environment stays empty but for what it needs.
pub const PARENT_ARG: &str = "--station-pid=";

/// How long after the deadline a worker may take to stop by itself before it is killed.
pub const GRACE: Duration = Duration::from_millis(750);

/// Most of the worker's stderr the station keeps (for the run's local log).
const STDERR_CAP: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("starting the run worker {program}: {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the run worker's program: {0}")]
    Program(std::io::Error),
}

/// How to start a worker: a program and its arguments.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl WorkerCommand {
    /// This executable, with the hidden subcommand (the `amicus` binary dispatches it). On
    /// Linux the running binary itself (`/proc/self/exe`): a daemon whose file was replaced by
    /// an upgrade still starts workers of its own version, whose engine matches its cache.
    pub fn current() -> Result<WorkerCommand, WorkerError> {
        let own = Path::new("/proc/self/exe");
        let program = if cfg!(target_os = "linux") && own.exists() {
            own.to_path_buf()
        } else {
            std::env::current_exe().map_err(WorkerError::Program)?
        };
        Ok(WorkerCommand {
            program,
            args: vec![
                SUBCOMMAND.into(),
                format!("{PARENT_ARG}{}", std::process::id()).into(),
            ],
        })
    }
}

/// What one worker is given.
pub struct Spawn<'a> {
    pub command: &'a WorkerCommand,
    pub request: &'a Request,
    /// The blobs that follow the job (models, then the round's global weights).
    pub blobs: Vec<std::sync::Arc<Vec<u8>>>,
    /// An empty private directory: the worker's working directory.
    pub workdir: &'a Path,
    /// The most setup (reading the job, loading the index) may take.
    pub setup: Duration,
    /// The run's wall-clock limit, counted from the worker's `Ready`.
    pub wall: Duration,
    /// Caps on what the station reads back.
    pub log_cap: u64,
    pub output_total: u64,
    pub update_max: u64,
    /// Largest compilation a compile worker may hand back.
    pub compiled_max: u64,
}

/// What the station hears while the worker runs.
#[derive(Debug)]
pub enum Step {
    Ready(Confinement),
    Progress(f32, String),
    /// A capability call started: capability, call, detail.
    Calling(String, String, String),
    Call(CallRecord),
}

/// A run's end as the worker reported it, with its blobs.
#[derive(Debug)]
pub struct FinishedRun {
    pub report: Finished,
    pub stdout: Vec<u8>,
    pub outputs: Vec<(String, Vec<u8>)>,
    /// The fp32 `amicus_fl::wire` update, when there is one.
    pub update: Option<Vec<u8>>,
}

/// How the worker process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    Unknown,
}

/// Why the station ended the worker itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// Not ready within the setup time.
    Setup,
    /// Past the wall-clock deadline plus the grace.
    Deadline,
    /// The station asked (the step callback refused), with its reason.
    Station(String),
    /// The worker broke the protocol.
    Protocol(String),
    /// The station is shutting down ([`interrupt_runs`]).
    Shutdown,
}

/// Set once the station process is shutting down and its runs may no longer finish.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Stop every run's worker in this process now, and any started later: the station is shutting
/// down (its daemon got SIGTERM and the grace for runs in flight is over). Each such run ends
/// with the outcome `interrupted`, audited like any other end. There is no way back: the
/// process is about to exit.
pub fn interrupt_runs() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether [`interrupt_runs`] was called.
pub fn runs_interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Everything the station knows once the worker is gone.
#[derive(Debug)]
pub struct WorkerEnd {
    pub finished: Option<FinishedRun>,
    /// A compile worker's compilation.
    pub compiled: Option<Vec<u8>>,
    /// The component is not a train (reported by the worker).
    pub refused: Option<String>,
    pub setup_failed: Option<String>,
    pub stopped: Option<Stopped>,
    pub exit: Exit,
    pub confinement: Option<Confinement>,
    /// Highest resident set seen (the worker's own report, or the station's samples).
    pub peak_rss_bytes: u64,
    /// CPU seconds the worker used (user + system), from the kernel.
    pub cpu: Duration,
    pub stderr: Vec<u8>,
    /// From start to `Ready` (process start, job, index, confinement).
    pub setup_time: Duration,
    /// From `Ready` to the end.
    pub run_time: Duration,
}

/// Messages from the reader thread.
enum Msg {
    Report(Report),
    Finished(Box<FinishedRun>),
    Compiled(Vec<u8>),
    End(Option<ProtocolError>),
}

/// Start a worker, feed it, and follow it to its end. `on_step` sees every step in order; an
/// `Err(reason)` from it ends the worker at once (`Stopped::Station`).
pub fn supervise(
    spawn: Spawn<'_>,
    on_step: &mut dyn FnMut(Step) -> Result<(), String>,
) -> Result<WorkerEnd, WorkerError> {
    let started = Instant::now();
    let mut child = Command::new(&spawn.command.program)
        .args(&spawn.command.args)
        .env_clear()
        .env("MALLOC_ARENA_MAX", "2")
        .env("AMICUS_ORT_LIB", amicus_kernels::library_path())
        .current_dir(spawn.workdir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| WorkerError::Spawn {
            program: spawn.command.program.clone(),
            source,
        })?;
    let pid = child.id();
    let pidfd = pidfd_open(pid);

    let writer = {
        let mut stdin = child.stdin.take();
        let job = serde_json::to_vec(spawn.request).unwrap_or_default();
        let blobs = spawn.blobs.clone();
        std::thread::spawn(move || {
            let Some(w) = stdin.as_mut() else { return };
            let mut frame = Vec::with_capacity(job.len() + 9);
            frame.push(b'J');
            frame.extend_from_slice(&(job.len() as u64).to_le_bytes());
            frame.extend_from_slice(&job);
            if std::io::Write::write_all(w, &frame).is_err() {
                return;
            }
            for b in &blobs {
                if protocol::write_blob(w, b).is_err() {
                    return;
                }
            }
        })
    };
    let stderr = {
        let mut err = child.stderr.take();
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let Some(r) = err.as_mut() else { return kept };
            let mut buf = [0u8; 8192];
            loop {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let room = STDERR_CAP.saturating_sub(kept.len());
                        kept.extend_from_slice(&buf[..n.min(room)]);
                    }
                }
            }
            kept
        })
    };
    let (tx, rx) = mpsc::sync_channel::<Msg>(64);
    let reader = {
        let out = child.stdout.take();
        let caps = Caps {
            log: spawn.log_cap,
            output_total: spawn.output_total,
            update: spawn.update_max,
            compiled: spawn.compiled_max,
        };
        std::thread::spawn(move || {
            let Some(mut r) = out else {
                let _ = tx.send(Msg::End(None));
                return;
            };
            loop {
                let msg = match read_message(&mut r, caps) {
                    Ok(m) => m,
                    Err(ProtocolError::Closed) => Msg::End(None),
                    Err(e) => Msg::End(Some(e)),
                };
                let end = matches!(msg, Msg::End(_) | Msg::Finished(_) | Msg::Compiled(_));
                if tx.send(msg).is_err() || end {
                    return;
                }
            }
        })
    };

    let mut end = WorkerEnd {
        finished: None,
        compiled: None,
        refused: None,
        setup_failed: None,
        stopped: None,
        exit: Exit::Unknown,
        confinement: None,
        peak_rss_bytes: 0,
        cpu: Duration::ZERO,
        stderr: Vec::new(),
        setup_time: Duration::ZERO,
        run_time: Duration::ZERO,
    };
    let mut ready_at: Option<Instant> = None;
    let mut deadline = started + spawn.setup;
    loop {
        if runs_interrupted() {
            end.stopped = Some(Stopped::Shutdown);
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            end.stopped = Some(if ready_at.is_some() {
                Stopped::Deadline
            } else {
                Stopped::Setup
            });
            break;
        }
        let wait = (deadline - now).min(Duration::from_millis(25));
        let msg = match rx.recv_timeout(wait) {
            Ok(m) => m,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                end.peak_rss_bytes = end.peak_rss_bytes.max(sample_rss(pid));
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let step = match msg {
            Msg::Report(Report::Ready { confinement }) if ready_at.is_none() => {
                let now = Instant::now();
                ready_at = Some(now);
                end.setup_time = now - started;
                deadline = now + spawn.wall + GRACE;
                end.confinement = Some(confinement.clone());
                Step::Ready(confinement)
            }
            Msg::Report(Report::Progress { fraction, message }) if ready_at.is_some() => {
                Step::Progress(fraction, message)
            }
            Msg::Report(Report::Call { call }) if ready_at.is_some() => Step::Call(call),
            Msg::Report(Report::Calling {
                capability,
                call,
                detail,
            }) if ready_at.is_some() => Step::Calling(capability, call, detail),
            Msg::Report(Report::Refused { reason }) if ready_at.is_some() => {
                end.refused = Some(reason);
                break;
            }
            Msg::Report(Report::SetupFailed { reason }) if ready_at.is_none() => {
                end.setup_failed = Some(reason);
                break;
            }
            Msg::Finished(f) if ready_at.is_some() => {
                end.finished = Some(*f);
                break;
            }
            Msg::Compiled(bytes) if ready_at.is_some() => {
                end.compiled = Some(bytes);
                break;
            }
            Msg::End(None) => break,
            Msg::End(Some(e)) => {
                end.stopped = Some(Stopped::Protocol(e.to_string()));
                break;
            }
            Msg::Report(other) => {
                end.stopped = Some(Stopped::Protocol(format!(
                    "unexpected report {}",
                    report_name(&other)
                )));
                break;
            }
            Msg::Finished(_) | Msg::Compiled(_) => {
                end.stopped = Some(Stopped::Protocol("finished before it was ready".into()));
                break;
            }
        };
        if let Err(reason) = on_step(step) {
            end.stopped = Some(Stopped::Station(reason));
            break;
        }
    }
    end.peak_rss_bytes = end.peak_rss_bytes.max(sample_rss(pid));
    // A worker that finished exits at once; give it until its deadline (at least a moment).
    let until = if end.stopped.is_some() {
        Instant::now()
    } else {
        deadline.max(Instant::now() + Duration::from_millis(500))
    };
    if !wait_exit(pid, pidfd.as_ref(), until) {
        kill(pid);
    }
    let (exit, cpu) = reap(pid);
    end.exit = exit;
    end.cpu = cpu;
    drop(rx);
    let _ = reader.join();
    let _ = writer.join();
    end.stderr = stderr.join().unwrap_or_default();
    if let Some(f) = &end.finished {
        end.peak_rss_bytes = end.peak_rss_bytes.max(f.report.peak_rss_bytes);
    }
    end.run_time = ready_at.map_or(Duration::ZERO, |r| r.elapsed());
    drop(child);
    Ok(end)
}

fn report_name(r: &Report) -> &'static str {
    match r {
        Report::Ready { .. } => "ready",
        Report::Progress { .. } => "progress",
        Report::Call { .. } => "call",
        Report::Calling { .. } => "calling",
        Report::Refused { .. } => "refused",
        Report::Compiled => "compiled",
        Report::Finished(_) => "finished",
        Report::SetupFailed { .. } => "setup-failed",
    }
}

/// What the station reads back at most.
#[derive(Clone, Copy)]
struct Caps {
    log: u64,
    output_total: u64,
    update: u64,
    compiled: u64,
}

/// One message from the worker: a report, or a `Finished` (or `Compiled`) with its blobs read
/// under the caps.
fn read_message(r: &mut impl Read, caps: Caps) -> Result<Msg, ProtocolError> {
    let (log_cap, output_total, update_max) = (caps.log, caps.output_total, caps.update);
    let report: Report = protocol::read_json(r, MAX_JSON.min(log_cap.saturating_add(1 << 20)))?;
    if let Report::Compiled = report {
        let bytes = protocol::read_blob(r, caps.compiled)?;
        expect_end(r)?;
        return Ok(Msg::Compiled(bytes));
    }
    let Report::Finished(report) = report else {
        return Ok(Msg::Report(report));
    };
    let stdout = protocol::read_blob(r, log_cap)?;
    let mut outputs = Vec::with_capacity(report.outputs.len().min(1024));
    let mut total: u64 = 0;
    for name in &report.outputs {
        let data = protocol::read_blob(r, output_total.saturating_sub(total))?;
        total = total.saturating_add(data.len() as u64);
        outputs.push((name.clone(), data));
    }
    let update = match report.update {
        Some(_) => Some(protocol::read_blob(r, update_max)?),
        None => None,
    };
    expect_end(r)?;
    Ok(Msg::Finished(Box::new(FinishedRun {
        report,
        stdout,
        outputs,
        update,
    })))
}

/// Nothing may follow the end: a worker that says more than it announced is broken.
fn expect_end(r: &mut impl Read) -> Result<(), ProtocolError> {
    let mut probe = [0u8; 1];
    loop {
        match r.read(&mut probe) {
            Ok(0) => return Ok(()),
            Ok(_) => return Err(ProtocolError::Malformed("data after the end".into())),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// The outcome of a run the worker did not finish normally.
pub fn outcome_of_failure(end: &WorkerEnd, wall: Duration) -> Outcome {
    let stderr = String::from_utf8_lossy(&end.stderr);
    match &end.stopped {
        Some(Stopped::Deadline) => return Outcome::WallClockExceeded(wall),
        Some(Stopped::Setup) => {
            return Outcome::Crashed("the worker did not get ready in time".into());
        }
        Some(Stopped::Station(reason)) => return Outcome::LimitExceeded(reason.clone()),
        Some(Stopped::Shutdown) => {
            return Outcome::Interrupted("the station shut down during the run".into());
        }
        Some(Stopped::Protocol(reason)) => {
            return Outcome::Crashed(format!("the worker broke the protocol: {reason}"));
        }
        None => {}
    }
    let limit = end.confinement.as_ref().map_or(0, |c| c.memory_limit_bytes);
    let out_of_memory = stderr.contains("memory allocation of")
        || stderr.contains("bad_alloc")
        || stderr.contains("Failed to allocate memory");
    match end.exit {
        Exit::Signal(sig) if sig == libc::SIGXCPU => Outcome::CpuTimeExceeded,
        Exit::Signal(sig) if sig == libc::SIGABRT && out_of_memory => Outcome::MemoryLimit(
            format!("the run's worker reached its memory limit of {limit} bytes"),
        ),
        Exit::Signal(sig) if sig == libc::SIGKILL => Outcome::Crashed(
            "the worker was killed (SIGKILL: the kernel's out-of-memory killer, or an operator)"
                .into(),
        ),
        Exit::Signal(sig) => Outcome::Crashed(format!(
            "the worker was killed by signal {sig} ({})",
            signal_name(sig)
        )),
        Exit::Code(code) => {
            // A panic's message is the line after "panicked at …".
            let lines: Vec<&str> = stderr.lines().collect();
            let first = lines
                .iter()
                .position(|l| l.contains("panicked") || l.starts_with("amicus run worker"))
                .and_then(|i| lines.get(i..lines.len().min(i + 2)))
                .map(|l| l.join(" "))
                .unwrap_or_default()
                .chars()
                .take(500)
                .collect::<String>();
            if let Some(reason) = &end.setup_failed {
                Outcome::Crashed(format!("the worker could not set up: {reason}"))
            } else if first.is_empty() {
                Outcome::Crashed(format!(
                    "the worker exited with status {code} before finishing"
                ))
            } else {
                Outcome::Crashed(format!("the worker exited with status {code}: {first}"))
            }
        }
        Exit::Unknown => Outcome::Crashed("the worker ended without a report".into()),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGABRT => "SIGABRT",
        libc::SIGSYS => "SIGSYS",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGTERM => "SIGTERM",
        _ => "other",
    }
}

/// The worker's resident-set peak so far, from `/proc/<pid>/status` (0 when gone).
fn sample_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| super::confine::status_field(&s, "VmHWM:"))
        .unwrap_or(0)
}

#[cfg(target_os = "linux")]
fn pidfd_open(pid: u32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(not(target_os = "linux"))]
fn pidfd_open(_pid: u32) -> Option<std::os::fd::OwnedFd> {
    None
}

/// Wait until the process exits or `until` passes; true if it exited (it is not reaped).
fn wait_exit(pid: u32, pidfd: Option<&std::os::fd::OwnedFd>, until: Instant) -> bool {
    use std::os::fd::AsRawFd;
    loop {
        let now = Instant::now();
        if let Some(fd) = pidfd {
            let left = until.saturating_duration_since(now);
            let mut p = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut p, 1, ms) };
            if n > 0 {
                return true;
            }
            if n == 0 {
                return false;
            }
            // EINTR: try again.
            continue;
        }
        let mut status = 0;
        // SAFETY: WNOWAIT|WNOHANG peeks at the child's state without reaping it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        let _ = &mut status;
        // SAFETY: si_pid is valid to read after waitid filled the struct.
        if r == 0 && unsafe { info.si_pid() } != 0 {
            return true;
        }
        if now >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn kill(pid: u32) {
    // SAFETY: signalling our own child, which has not been reaped (the pid is still ours).
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// Reap the worker: how it ended and the CPU it used.
fn reap(pid: u32) -> (Exit, Duration) {
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain data the kernel fills.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = loop {
        // SAFETY: waiting for our own child, once.
        let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut usage) };
        if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        break r;
    };
    if r != pid as libc::pid_t {
        return (Exit::Unknown, Duration::ZERO);
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    let cpu = tv(usage.ru_utime) + tv(usage.ru_stime);
    let exit = if libc::WIFEXITED(status) {
        Exit::Code(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Exit::Signal(libc::WTERMSIG(status))
    } else {
        Exit::Unknown
    };
    (exit, cpu)
}
