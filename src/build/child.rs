//! `make` runs that never outlive `dynamos-build`, and what Ctrl-C or
//! SIGTERM does to a build.
//!
//! Each `make` runs in a process group of its own. It gets SIGKILL when the
//! tool dies (`PR_SET_PDEATHSIG`), and a guard process, waiting on a pipe
//! only the tool holds, kills the whole group when that pipe closes: the
//! sub-makes and compilers below `make` are not its children, and a
//! SIGKILLed tool can do nothing itself. Every process of the group also
//! holds the build lock's open file, so the next build cannot start while
//! any of them is still there.
//!
//! SIGINT and SIGTERM kill the running groups, wait until the patched
//! files are back out of the work tree, and exit with status 1.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, MutexGuard, Once};

/// Process groups of the `make` runs in progress, with their guards' pids.
static RUNNING: Mutex<Vec<(i32, i32)>> = Mutex::new(Vec::new());

/// Held while patched files are in the work tree.
static TREE_PATCHED: Mutex<()> = Mutex::new(());

/// Taken by whoever ends the process after an interrupt, never released.
static EXITING: Mutex<()> = Mutex::new(());

/// Write end of the pipe the signal handler reports signals on.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

/// The signal that interrupted the build, 0 while none has.
static INTERRUPTED: AtomicI32 = AtomicI32::new(0);

fn lock<T>(mutex: &'static Mutex<T>) -> MutexGuard<'static, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Held while the work tree has patched files in it: an interrupt waits
/// for it before the process exits.
pub fn tree_patched() -> MutexGuard<'static, ()> {
    lock(&TREE_PATCHED)
}

/// From now on SIGINT and SIGTERM stop the build cleanly. Idempotent.
pub fn stop_cleanly_on_interrupt() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let mut fds = [0; 2];
        // SAFETY: plain syscalls on fds we create; the handler only calls write(2).
        unsafe {
            if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
                return;
            }
            SIGNAL_PIPE.store(fds[1], Ordering::SeqCst);
            for signal in [libc::SIGINT, libc::SIGTERM] {
                let mut action: libc::sigaction = std::mem::zeroed();
                let handler: extern "C" fn(libc::c_int) = on_signal;
                action.sa_sigaction = handler as libc::sighandler_t;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(signal, &action, std::ptr::null_mut());
            }
        }
        let reader = fds[0];
        std::thread::spawn(move || {
            let mut signal = [0u8; 1];
            // SAFETY: reading one byte from our own pipe.
            while unsafe { libc::read(reader, signal.as_mut_ptr().cast(), 1) } != 1 {}
            let running = lock(&RUNNING);
            INTERRUPTED.store(i32::from(signal[0]), Ordering::SeqCst);
            for &(group, guard) in running.iter() {
                // SAFETY: signals to the groups and guards this process started.
                unsafe {
                    libc::kill(-group, libc::SIGKILL);
                    libc::kill(guard, libc::SIGKILL);
                }
            }
            drop(running);
            let _restored = tree_patched();
            exit_interrupted(i32::from(signal[0]));
        });
    });
}

extern "C" fn on_signal(signal: libc::c_int) {
    let byte = signal as u8;
    // SAFETY: write(2) is async-signal-safe; the pipe was set up before the handler.
    unsafe {
        libc::write(
            SIGNAL_PIPE.load(Ordering::Relaxed),
            (&byte as *const u8).cast(),
            1,
        );
    }
}

/// After the work tree is restored: if an interrupt stopped the build,
/// end the process as it asked instead of reporting the killed make.
pub fn exit_if_interrupted() {
    let signal = INTERRUPTED.load(Ordering::SeqCst);
    if signal != 0 {
        exit_interrupted(signal);
    }
}

/// End the process after an interrupt, once: the work tree is restored.
fn exit_interrupted(signal: i32) -> ! {
    let _only_once = lock(&EXITING);
    let name = if signal == libc::SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    };
    eprintln!("dynamos-build: interrupted by {name}: stopped the build and restored the work tree");
    std::process::exit(crate::error::exit::ERROR)
}

/// Run `cmd` to completion tied to this process, holding the build lock
/// when one is given (a build in a folder of its own needs none).
pub fn run(cmd: &mut Command, lock_fd: Option<RawFd>) -> io::Result<ExitStatus> {
    run_tied(cmd, lock_fd, |make| make.wait())
}

/// Run `cmd` to completion tied to this process the same way, without the
/// build lock, and collect its output (kbuild's listing of a folder).
pub fn output(cmd: &mut Command) -> io::Result<Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    run_tied(cmd, None, |make| {
        let read_all = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut data = Vec::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_end(&mut data);
                }
                data
            })
        };
        let stdout = read_all(make.stdout.take().map(|p| Box::new(p) as _));
        let stderr = read_all(make.stderr.take().map(|p| Box::new(p) as _));
        let status = make.wait()?;
        Ok(Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        })
    })
}

fn run_tied<T>(
    cmd: &mut Command,
    lock_fd: Option<RawFd>,
    finish: impl FnOnce(&mut Child) -> io::Result<T>,
) -> io::Result<T> {
    let parent = std::process::id();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The tool may have died before the line above took effect.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            // Inherited by everything make starts: the lock stays held until
            // the last of them is gone.
            if let Some(fd) = lock_fd {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut running = lock(&RUNNING);
    if INTERRUPTED.load(Ordering::SeqCst) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::Interrupted,
            "build interrupted",
        ));
    }
    let mut make = cmd.process_group(0).spawn()?;
    let group = make.id() as i32;
    let (mut guard, pipe) = match spawn_guard(group) {
        Ok(guard) => guard,
        Err(e) => {
            // SAFETY: the group was created just above by this process.
            unsafe { libc::kill(-group, libc::SIGKILL) };
            let _ = make.wait();
            return Err(e);
        }
    };
    running.push((group, guard.id() as i32));
    drop(running);
    let result = finish(&mut make);
    lock(&RUNNING).retain(|&(g, _)| g != group);
    // The guard goes before its pipe closes, so it never signals a group
    // id that may have been reused.
    let _ = guard.kill();
    let _ = guard.wait();
    drop(pipe);
    result
}

/// A shell waiting for end of file on a pipe whose write end (returned)
/// only this process holds, then killing `group`.
fn spawn_guard(group: i32) -> io::Result<(Child, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: creating a pipe; both ends are owned right after.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors from pipe2.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    debug_assert!(write.as_raw_fd() >= 0);
    let guard = Command::new("/bin/sh")
        .arg("-c")
        .arg(r#"while read -r line; do :; done; kill -9 -"$1""#)
        .arg("dynamos-make-guard")
        .arg(group.to_string())
        .stdin(Stdio::from(read))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own group: a Ctrl-C at the terminal must not take it first.
        .process_group(0)
        .spawn()?;
    Ok((guard, write))
}
