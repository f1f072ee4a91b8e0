use super::*;

use std::process::Command;

#[test]
fn levels_parse_and_unknown_ones_are_refused() {
    assert_eq!(
        "enforce".parse::<SeccompLevel>().unwrap(),
        SeccompLevel::Enforce
    );
    assert_eq!("log".parse::<SeccompLevel>().unwrap(), SeccompLevel::Log);
    assert_eq!("off".parse::<SeccompLevel>().unwrap(), SeccompLevel::Off);
    let e = "strict".parse::<SeccompLevel>().unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown seccomp level \"strict\" (expected enforce, log or off)"
    );
}

#[test]
fn every_program_compiles_at_every_level() {
    for level in [SeccompLevel::Enforce, SeccompLevel::Log] {
        for kind in [ThreadKind::Vcpu, ThreadKind::Vmm, ThreadKind::Device] {
            let p = program(kind, level).unwrap();
            assert!(p.len() > 20, "{kind:?}: {} instructions", p.len());
        }
    }
}

#[test]
fn the_report_names_the_call_and_the_thread() {
    let line = |thread, seccomp, nr| {
        let mut buf = StackBuf {
            buf: [0; 256],
            len: 0,
        };
        report(&mut buf, thread, seccomp, nr);
        String::from_utf8(buf.buf[..buf.len].to_vec()).unwrap()
    };
    assert_eq!(
        line(Some((ThreadKind::Vcpu as u8, 2)), true, libc::SYS_socket),
        "kestrel: seccomp: the vCPU 2 thread made a forbidden system call: socket (41); \
         the VMM stops (exit status 159)\n"
    );
    assert_eq!(
        line(Some((ThreadKind::Vmm as u8, 0)), true, libc::SYS_execve),
        "kestrel: seccomp: the VMM thread made a forbidden system call: execve (59); \
         the VMM stops (exit status 159)\n"
    );
    assert!(line(None, true, 100_000)
        .contains("a thread made a forbidden system call: unknown (100000)"));
    assert!(line(None, false, 0).contains("SIGSYS received from outside"));
}

const CHILD_ENV: &str = "KESTREL_SECCOMP_TEST_CASE";

/// What a confined thread does in the child process: allowed calls, then the forbidden one.
fn child_case(case: &str) {
    let (kind, level) = match case {
        "vcpu-socket" | "vcpu-open" => (ThreadKind::Vcpu, SeccompLevel::Enforce),
        "vmm-inet" | "vmm-exec-mmap" | "vmm-ioctl" => (ThreadKind::Vmm, SeccompLevel::Enforce),
        "disk-connect" => (ThreadKind::Device, SeccompLevel::Enforce),
        "log-socket" => (ThreadKind::Vcpu, SeccompLevel::Log),
        other => panic!("unknown case {other}"),
    };
    if let Ok(path) = std::env::var("KESTREL_SECCOMP_TEST_REPORT") {
        let f = std::fs::File::create(path).unwrap();
        report_to(std::os::fd::IntoRawFd::into_raw_fd(f));
    }
    let filters = Filters::new(level).unwrap();
    let confine = filters.confine(kind, 3);
    let case = case.to_string();
    std::thread::spawn(move || {
        confine().unwrap();
        // Allowed: memory, time, output, a UNIX socket on the VMM thread.
        let v: Vec<u8> = vec![7; 1 << 20];
        let _ = std::time::Instant::now();
        println!("confined: {} bytes", v.len());
        // SAFETY: plain syscalls with valid (or no) arguments; the test process ends here
        // or just after.
        unsafe {
            match case.as_str() {
                "vcpu-socket" | "log-socket" => {
                    libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                }
                "vcpu-open" => {
                    let fd = libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY);
                    let errno = *libc::__errno_location();
                    assert_eq!((fd, errno), (-1, libc::EACCES), "open on a confined thread");
                    let fd = libc::syscall(libc::SYS_open, c"/etc/passwd".as_ptr(), 0);
                    let errno = *libc::__errno_location();
                    assert_eq!(
                        (fd, errno),
                        (-1, libc::EACCES),
                        "open(2) on a confined thread"
                    );
                }
                "vmm-inet" => {
                    let ok = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                    assert!(ok >= 0, "an AF_UNIX socket is allowed");
                    libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                }
                "vmm-exec-mmap" => {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_EXEC,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    );
                }
                "vmm-ioctl" => {
                    libc::ioctl(1, libc::TIOCSTI, c"x".as_ptr());
                }
                "disk-connect" => {
                    libc::connect(-1, std::ptr::null(), 0);
                }
                _ => unreachable!(),
            }
        }
        println!("survived");
    })
    .join()
    .unwrap();
    // The unconfined main thread is not limited.
    std::fs::read("/proc/self/status").unwrap();
}

#[test]
#[ignore = "helper: run in a child process by a_forbidden_call_ends_the_process"]
fn seccomp_child() {
    if let Ok(case) = std::env::var(CHILD_ENV) {
        child_case(&case);
    }
}

fn run_child(case: &str, report: Option<&std::path::Path>) -> std::process::Output {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "seccomp::tests::seccomp_child",
        "--ignored",
        "--nocapture",
    ])
    .env(CHILD_ENV, case);
    if let Some(r) = report {
        cmd.env("KESTREL_SECCOMP_TEST_REPORT", r);
    }
    cmd.output().unwrap()
}

#[test]
fn a_forbidden_call_ends_the_process_and_says_which_call() {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/kestrel-seccomp").unwrap();
    let cases = [
        (
            "vcpu-socket",
            "the vCPU 3 thread made a forbidden system call: socket (41)",
        ),
        (
            "vmm-inet",
            "the VMM thread made a forbidden system call: socket (41)",
        ),
        (
            "vmm-exec-mmap",
            "the VMM thread made a forbidden system call: mmap (9)",
        ),
        (
            "vmm-ioctl",
            "the VMM thread made a forbidden system call: ioctl (16)",
        ),
        (
            "disk-connect",
            "the disk 3 thread made a forbidden system call: connect (42)",
        ),
    ];
    for (case, expected) in cases {
        let report = dir.as_path().join(format!("{case}.report"));
        let out = run_child(case, Some(&report));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(EXIT_STATUS),
            "{case}: {:?}\nstdout: {stdout}\nstderr: {stderr}",
            out.status
        );
        assert!(
            stdout.contains("confined: 1048576 bytes"),
            "{case}: allowed calls: {stdout}"
        );
        assert!(!stdout.contains("survived"), "{case}: {stdout}");
        assert!(stderr.contains(expected), "{case}: {stderr}");
        let recorded = std::fs::read_to_string(&report).unwrap();
        assert!(
            recorded.contains(expected),
            "{case}: report file: {recorded}"
        );
        assert!(
            recorded.ends_with("(exit status 159)\n"),
            "{case}: {recorded}"
        );
    }
}

#[test]
fn opening_a_file_fails_with_eacces_and_is_not_fatal() {
    let out = run_child("vcpu-open", None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stdout}\n{stderr}", out.status);
    assert!(stdout.contains("survived"), "{stdout}");
}

#[test]
fn at_log_level_a_call_outside_the_list_goes_through() {
    let out = run_child("log-socket", None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{:?}: {stdout}", out.status);
    assert!(stdout.contains("survived"), "{stdout}");
}
