"""Run an untrusted Python program (a model's HumanEval completion) in a confined subprocess.

What confines it, in layers (each one that this machine supports; `SandboxResult.layers` says
which were active for a run):

- always: a fresh temporary directory as its working directory (deleted afterwards), an
  environment of a few variables (HOME and TMPDIR point into that directory), `python -I -B`
  (no user site, no PYTHON* variables, no bytecode written), stdin closed, stdout / stderr to
  files capped by RLIMIT_FSIZE; resource limits: address space (RLIMIT_AS), CPU seconds
  (RLIMIT_CPU), open files, no core dumps, and a number of processes (RLIMIT_NPROC) for the
  uid it runs as; a wall-clock timeout after which its whole process group is killed.
- namespaces (`unshare`; unprivileged processes need user namespaces enabled): a new network
  namespace (only a loopback interface, down: no connection anywhere, localhost included) and
  a new PID namespace whose init is the program, so when it exits or the timeout kills the
  launcher every process it started dies with it, even one that left its process group.
- when started as root: the program runs as uid/gid 65534 (nobody), so it has no root
  privileges and RLIMIT_NPROC binds (the kernel does not apply it to root).
- Landlock (Linux 5.13+): writes only beneath its directory (and to /dev/null), anywhere else
  refused by the kernel (reads are not restricted); with Landlock ABI 4+ no TCP bind or
  connect; with ABI 6+ no signals to processes outside the sandbox and no abstract unix sockets.

What it does not prevent: reading any file the uid may read (the program can see the
filesystem, though it cannot send it anywhere without a network); using CPU and memory up to
the limits (RLIMIT_AS is per process, so the total is bounded by processes x limit); on a
machine without user namespaces or Landlock, the layers above that it lacks (then network
access and writes wherever the uid may write are possible: check `layers`). It is not a
security boundary against kernel exploits: run untrusted code at scale in a VM or gVisor.

The launcher is this file run as a script (`python -I -S eval/sandbox.py CONFIG`): it uses only
the standard library, applies the limits and namespaces, forks the program as the namespace's
init, applies Landlock there, and execs it.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

NOBODY = 65534
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
# Landlock syscalls (the same numbers on every architecture) and access bits (linux/landlock.h)
SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION, LANDLOCK_RULE_PATH_BENEATH = 1, 1
FS_WRITE_FILE, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 1, 1 << 14, 1 << 15
FS_WRITE_V1 = sum(1 << b for b in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write, remove, make_*
FS_REFER = 1 << 13
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX, SCOPE_SIGNAL = 1 << 0, 1 << 1


@dataclass
class SandboxResult:
    status: str  # "ok" (exit 0), "error" (non-zero exit or killed by a signal), "timeout"
    returncode: int | None
    seconds: float
    stdout: str  # the last few thousand characters
    stderr: str
    layers: list[str] = field(default_factory=list)  # the confinement that was active

    @property
    def passed(self) -> bool:
        return self.status == "ok"


def run_python(
    source: str,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    max_processes: int = 16,
    max_file_mb: int = 16,
    keep_chars: int = 4000,
) -> SandboxResult:
    """Run `source` as a Python program in the sandbox; never raises for what it does."""
    tmp = Path(tempfile.mkdtemp(prefix="sandbox-"))
    try:
        python = program_python()
        drop = os.geteuid() == 0 and _world_executable(python)
        if drop:
            os.chown(tmp, NOBODY, NOBODY)  # the program runs as nobody and writes here
        (tmp / "program.py").write_text(source, encoding="utf-8")
        config = {
            "dir": str(tmp), "python": python, "timeout_s": timeout_s,
            "memory_bytes": memory_mb << 20, "max_processes": max_processes,
            "file_bytes": max_file_mb << 20, "drop_to_nobody": drop,
        }
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp), "TMPDIR": str(tmp), "LANG": "C.UTF-8"}
        start = time.perf_counter()
        with open(tmp / "stdout", "wb") as out, open(tmp / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", __file__, json.dumps(config)],
                cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True,  # its own process group, killed as one on timeout
            )
            try:
                returncode: int | None = proc.wait(timeout=timeout_s)
                status = "ok" if returncode == 0 else "error"
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                proc.wait()
                returncode, status = None, "timeout"
            _kill_group(proc.pid)  # anything left in its group (the PID namespace is gone)
        seconds = time.perf_counter() - start
        layers_file = tmp / "layers.json"
        layers = json.loads(layers_file.read_text()) if layers_file.is_file() else []
        return SandboxResult(
            status, returncode, seconds, _tail(tmp / "stdout", keep_chars),
            _tail(tmp / "stderr", keep_chars), layers,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def program_python() -> str:
    """The interpreter the program runs on: this one, or (when this one sits where uid nobody
    cannot reach it, e.g. under /root) the system's python3. The programs need only the
    standard library."""
    if os.geteuid() != 0 or _world_executable(sys.executable):
        return sys.executable
    system = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    return system if system and _world_executable(system) else sys.executable


def _world_executable(path: str) -> bool:
    """Whether any user may run `path`: the file readable and executable by others, every
    directory above it searchable by others."""
    real = Path(os.path.realpath(path))
    try:
        if real.stat().st_mode & 0o005 != 0o005:
            return False
        return all(p.stat().st_mode & 0o001 for p in real.parents)
    except OSError:
        return False


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - n))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# The launcher (runs in the child, standard library only)
# ---------------------------------------------------------------------------------------------


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _try_unshare(libc, root: bool) -> list[str]:
    """New PID and network namespaces (with a user namespace when not root)."""
    flags = CLONE_NEWPID | CLONE_NEWNET | (0 if root else CLONE_NEWUSER)
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(flags) != 0:
        return []
    if not root:  # identity uid / gid maps, so the program sees its own ids (best effort)
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                           ("gid_map", f"{gid} {gid} 1")):
            try:
                Path(f"/proc/self/{name}").write_text(text)
            except OSError:
                pass
    return ["pid_namespace", "network_namespace"]


def _landlock(libc, directory: str) -> list[str]:
    """Allow writes only beneath `directory` (and /dev/null); deny TCP and outside signals."""
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    abi = syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                  ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    if abi < 1:
        return []
    fs = FS_WRITE_V1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0)
    fs |= FS_IOCTL_DEV if abi >= 5 else 0
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL if abi >= 6 else 0
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)  # struct landlock_ruleset_attr
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                      ctypes.c_uint32(0))
    if ruleset < 0:
        return []

    class PathBeneath(ctypes.Structure):  # struct landlock_path_beneath_attr (packed)
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    file_rights = FS_WRITE_FILE | (FS_TRUNCATE if abi >= 3 else 0) | (FS_IOCTL_DEV if abi >= 5 else 0)
    for path, rights in ((directory, fs), ("/dev/null", file_rights)):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = PathBeneath(rights, fd)
        ok = syscall(SYS_ADD_RULE, ruleset, ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                     ctypes.byref(rule), ctypes.c_uint32(0)) == 0
        os.close(fd)
        if not ok:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule({path})")
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if syscall(SYS_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    os.close(ruleset)
    return ["landlock_fs"] + (["landlock_tcp"] if net else []) + (["landlock_scope"] if scoped else [])


def _uid_process_count(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                count += entry.stat().st_uid == uid
            except OSError:
                pass
    return count


def _launch(config: dict) -> int:
    libc = _libc()
    root = config["drop_to_nobody"]
    limits = {
        resource.RLIMIT_AS: config["memory_bytes"],
        resource.RLIMIT_CPU: int(config["timeout_s"]) + 1,
        resource.RLIMIT_FSIZE: config["file_bytes"],
        resource.RLIMIT_NOFILE: 256,
        resource.RLIMIT_CORE: 0,
    }
    for kind, value in limits.items():
        resource.setrlimit(kind, (value, value))
    layers = ["rlimits", "temp_cwd", "isolated_env"] + _try_unshare(libc, root)
    layers_path = Path(config["dir"]) / "layers.json"
    pid = os.fork()  # in a new PID namespace this child is its init (pid 1)
    if pid == 0:
        try:
            if root:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                layers.append("uid_nobody")
            # The launcher dies (the timeout kills it): so does this init and its namespace.
            # Set after setuid, which clears it.
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() == 1:  # the launcher died before the line above
                os._exit(137)
            uid = os.getuid()
            # RLIMIT_NPROC counts every process of the uid: leave room above those running.
            nproc = _uid_process_count(uid) + config["max_processes"]
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
            layers.extend(_landlock(libc, config["dir"]))
            layers_path.write_text(json.dumps(layers))
            os.execv(config["python"], [config["python"], "-I", "-B", "program.py"])
        except BaseException as e:  # noqa: BLE001 - report and exit, never return to the caller
            os.write(2, f"sandbox launcher: {type(e).__name__}: {e}\n".encode())
            os._exit(126)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if status else 0


if __name__ == "__main__":
    code = _launch(json.loads(sys.argv[1]))
    sys.exit(code if code >= 0 else 128 - code)  # killed by signal N: 128 + N, as a shell
