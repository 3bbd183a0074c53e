//! How a run worker confines itself, in this order, before the train starts:
//!
//! 1. **Landlock** (filesystem, TCP, signals and abstract sockets): the worker may read only
//!    the archive (when `imaging` is granted) and the ONNX Runtime library's folder (when
//!    `kernels` is; plus the system's libraries and GPU device files when the policy lets models
//!    run on CUDA); it may write nowhere, bind or connect no TCP port, signal no process outside
//!    itself and reach no abstract UNIX socket. Applied by the only thread there is, so every
//!    thread the worker starts later inherits it (the count is recorded).
//! 2. **Resource limits**: the data segment (`RLIMIT_DATA`: every private writable mapping,
//!    which is every allocation of wasmtime, ONNX Runtime, oxigraph and the codecs) at the
//!    worker's baseline plus the run's memory and a small slack; CPU seconds; the size of any
//!    file it writes (only wasmtime's in-memory image files; Landlock denies every path), no
//!    core dumps, few file descriptors.
//! 3. **Capabilities** dropped (when the station runs as root), `no_new_privs` set.
//! 4. **seccomp**: no sockets, no `execve`, no new processes (only threads), no `ptrace`, no
//!    mounts or namespaces, no kernel keyrings, BPF, io_uring, module loading, and no way to
//!    change another process's limits or send it a signal.
//!
//! Each step is best effort where the kernel lacks the feature, and what held is reported in the
//! `worker-started` audit entry and by `amicus station show`. Linux only: on other systems the
//! worker still runs in its own process, killed at the deadline, and says it is not confined.

use super::protocol::Confinement;
use std::path::PathBuf;

/// What the worker may read once the train runs.
#[derive(Debug, Clone, Default)]
pub struct FsGrants {
    /// Read (and list) beneath these.
    pub read: Vec<PathBuf>,
    /// Read and map executable beneath these (shared libraries loaded late).
    pub read_exec: Vec<PathBuf>,
    /// Read and write these device files (GPU drivers).
    pub devices: Vec<PathBuf>,
}

/// The Landlock ABI the running kernel offers (0: none).
pub fn landlock_abi() -> i64 {
    #[cfg(target_os = "linux")]
    {
        const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
        // SAFETY: the version query takes no pointers (NULL, 0) and has no side effect.
        let v = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<libc::c_void>(),
                0usize,
                LANDLOCK_CREATE_RULESET_VERSION,
            )
        };
        v.max(0)
    }
    #[cfg(not(target_os = "linux"))]
    {
        0
    }
}

/// Threads of this process now.
pub fn threads() -> u32 {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count() as u32)
        .unwrap_or(0)
}

/// Names of this process's threads (for the worker's log when more than one exists).
pub fn thread_names() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.flatten()
        .map(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        })
        .collect()
}

/// Apply the filesystem, network and scope rules to this thread (and the threads it starts).
#[cfg(target_os = "linux")]
pub fn landlock(grants: &FsGrants) -> String {
    use landlock::{
        ABI, Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
        Scope, path_beneath_rules,
    };
    // ABI 6 (Linux 6.12): every filesystem right including device ioctls, TCP bind/connect,
    // and the signal and abstract-socket scopes. Older kernels enforce what they know.
    let abi = ABI::V6;
    let kernel = landlock_abi();
    let applied = (|| {
        Ruleset::default()
            .handle_access(AccessFs::from_all(abi))?
            .handle_access(AccessNet::from_all(abi))?
            .scope(Scope::from_all(abi))?
            .create()?
            .add_rules(path_beneath_rules(
                &grants.read,
                AccessFs::ReadFile | AccessFs::ReadDir,
            ))?
            .add_rules(path_beneath_rules(
                &grants.read_exec,
                AccessFs::from_read(abi),
            ))?
            .add_rules(path_beneath_rules(
                &grants.devices,
                AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev,
            ))?
            .restrict_self()
    })();
    match applied {
        Ok(status) => match status.ruleset {
            RulesetStatus::FullyEnforced => format!("enforced (ABI {kernel})"),
            RulesetStatus::PartiallyEnforced => format!("partially enforced (ABI {kernel})"),
            RulesetStatus::NotEnforced => {
                format!("not enforced: the kernel has no Landlock (ABI {kernel})")
            }
        },
        Err(e) => format!("not enforced: {e}"),
    }
}

#[cfg(not(target_os = "linux"))]
pub fn landlock(_grants: &FsGrants) -> String {
    "not enforced: not Linux".into()
}

/// Set the worker's resource limits (soft and hard, so they cannot be raised again).
#[cfg(target_os = "linux")]
pub fn set_limits(data_bytes: u64, cpu_seconds: u64) -> Result<(), String> {
    let set = |resource, soft: u64, hard: u64, name: &str| {
        let limit = libc::rlimit {
            rlim_cur: soft as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        };
        // SAFETY: setrlimit reads the struct passed by reference and nothing else.
        if unsafe { libc::setrlimit(resource, &limit) } != 0 {
            return Err(format!("{name}: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    };
    set(libc::RLIMIT_DATA, data_bytes, data_bytes, "RLIMIT_DATA")?;
    set(
        libc::RLIMIT_CPU,
        cpu_seconds,
        cpu_seconds.saturating_add(1),
        "RLIMIT_CPU",
    )?;
    // wasmtime keeps a module's memory images in memfd files (not paths: Landlock does not
    // see them, and their pages are shared memory, outside RLIMIT_DATA); bound their size by
    // the same figure. Files on disk cannot be written at all (Landlock).
    set(libc::RLIMIT_FSIZE, data_bytes, data_bytes, "RLIMIT_FSIZE")?;
    set(libc::RLIMIT_CORE, 0, 0, "RLIMIT_CORE")?;
    set(libc::RLIMIT_NOFILE, 256, 256, "RLIMIT_NOFILE")?;
    set(libc::RLIMIT_MSGQUEUE, 0, 0, "RLIMIT_MSGQUEUE")?;
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub fn set_limits(_data_bytes: u64, _cpu_seconds: u64) -> Result<(), String> {
    Err("resource limits are set on Linux only".into())
}

/// Drop every capability (bounding, ambient, effective, permitted, inheritable) and set
/// `no_new_privs`. True when the process holds no capability afterwards.
#[cfg(target_os = "linux")]
pub fn drop_capabilities() -> bool {
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        for cap in 0..64 {
            libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
        }
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [Data::default(); 2];
    // SAFETY: capset reads a version-3 header and two data structs, as declared above.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    rc == 0 && !holds_capabilities()
}

#[cfg(not(target_os = "linux"))]
pub fn drop_capabilities() -> bool {
    false
}

/// Whether this process holds any effective or permitted capability.
pub fn holds_capabilities() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status.lines().any(|l| {
        (l.starts_with("CapEff:") || l.starts_with("CapPrm:"))
            && l.split_whitespace()
                .nth(1)
                .is_some_and(|v| !v.trim_start_matches('0').is_empty())
    })
}

/// Install the syscall filter on every thread of the process.
#[cfg(target_os = "linux")]
pub fn seccomp() -> String {
    match seccomp_filters() {
        Ok(filters) => {
            for f in &filters {
                if let Err(e) = seccompiler::apply_filter_all_threads(f) {
                    return format!("not enforced: {e}");
                }
            }
            "enforced".into()
        }
        Err(e) => format!("not enforced: {e}"),
    }
}

#[cfg(not(target_os = "linux"))]
pub fn seccomp() -> String {
    "not enforced: not Linux".into()
}

/// The filters: `clone3` answers ENOSYS (the C library then uses `clone`, whose flags the
/// second filter can inspect); everything in the deny list answers EPERM, so a library that
/// tries fails cleanly instead of killing the worker.
#[cfg(target_os = "linux")]
fn seccomp_filters() -> Result<Vec<seccompiler::BpfProgram>, String> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond,
        SeccompFilter, SeccompRule, TargetArch,
    };
    use std::collections::BTreeMap;
    let arch = if cfg!(target_arch = "x86_64") {
        TargetArch::x86_64
    } else if cfg!(target_arch = "aarch64") {
        TargetArch::aarch64
    } else {
        return Err("no syscall filter for this architecture".into());
    };
    let e = |e: seccompiler::BackendError| e.to_string();
    let own = std::process::id() as u64;
    // Whole syscalls, whatever their arguments.
    #[allow(unused_mut)]
    let mut denied: Vec<i64> = vec![
        libc::SYS_socket,
        libc::SYS_connect,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_accept,
        libc::SYS_accept4,
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_process_madvise,
        libc::SYS_kcmp,
        libc::SYS_pidfd_open,
        libc::SYS_pidfd_getfd,
        libc::SYS_pidfd_send_signal,
        libc::SYS_tkill,
        libc::SYS_setpriority,
        libc::SYS_setrlimit,
        libc::SYS_kexec_load,
        libc::SYS_reboot,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_mount_setattr,
        libc::SYS_open_tree,
        libc::SYS_move_mount,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_acct,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_setuid,
        libc::SYS_setgid,
        libc::SYS_setreuid,
        libc::SYS_setregid,
        libc::SYS_setresuid,
        libc::SYS_setresgid,
        libc::SYS_setfsuid,
        libc::SYS_setfsgid,
        libc::SYS_setgroups,
        libc::SYS_capset,
        libc::SYS_personality,
        libc::SYS_quotactl,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_mknodat,
        libc::SYS_syslog,
        libc::SYS_vhangup,
        libc::SYS_memfd_secret,
    ];
    #[cfg(target_arch = "x86_64")]
    denied.extend([
        libc::SYS_fork,
        libc::SYS_vfork,
        libc::SYS_iopl,
        libc::SYS_ioperm,
        libc::SYS_mknod,
        libc::SYS_kexec_file_load,
    ]);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        denied.into_iter().map(|nr| (nr, Vec::new())).collect();
    let rule = |conds: Vec<Cond>| SeccompRule::new(conds).map_err(e);
    let cond = |arg: u8, op: Op, value: u64| Cond::new(arg, Len::Qword, op, value).map_err(e);
    // clone: threads only (CLONE_THREAD set), never a new process.
    rules.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            Op::MaskedEq(libc::CLONE_THREAD as u64),
            0,
        )?])?],
    );
    // Signals only to itself: kill/tgkill/rt_sig*queueinfo with another pid are refused
    // (pid 0 and negative pids address process groups, the station's among them).
    for nr in [
        libc::SYS_kill,
        libc::SYS_tgkill,
        libc::SYS_rt_sigqueueinfo,
        libc::SYS_rt_tgsigqueueinfo,
    ] {
        rules.insert(nr, vec![rule(vec![cond(0, Op::Ne, own)?])?]);
    }
    // socketpair: a connected pair of UNIX sockets inside the process (the async runtime that
    // wasmtime's WASI uses for blocking calls makes one for its signal driver); nothing else.
    rules.insert(
        libc::SYS_socketpair,
        vec![rule(vec![cond(0, Op::Ne, libc::AF_UNIX as u64)?])?],
    );
    // prlimit64 may read this process's limits, never set any (pid 0, new limit NULL).
    rules.insert(
        libc::SYS_prlimit64,
        vec![
            rule(vec![cond(0, Op::Ne, 0)?])?,
            rule(vec![cond(2, Op::Ne, 0)?])?,
        ],
    );
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(e)?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(e)?;
    Ok(vec![
        clone3.try_into().map_err(e)?,
        deny.try_into().map_err(e)?,
    ])
}

/// `VmData` (private writable mappings) or `VmHWM` (peak resident set) of this process, bytes.
pub fn status_field(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// What a station's kernel offers a run worker, for `amicus station show` and the README.
pub fn describe_kernel() -> Confinement {
    let abi = landlock_abi();
    Confinement {
        landlock: if abi >= 6 {
            format!("available (ABI {abi}: files, TCP, signals)")
        } else if abi >= 4 {
            format!("partial (ABI {abi}: files and TCP; no signal scoping)")
        } else if abi >= 1 {
            format!("partial (ABI {abi}: files only)")
        } else {
            "not available (kernel without Landlock)".into()
        },
        seccomp: if cfg!(target_os = "linux") {
            "available".into()
        } else {
            "not available".into()
        },
        ..Confinement::default()
    }
}
