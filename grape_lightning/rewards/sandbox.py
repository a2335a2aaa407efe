"""An OS-level sandbox for untrusted programs (model output), built from Linux namespaces.

A program runs as

    unshare --mount --net --pid --ipc --uts --cgroup --fork [--user --map-root-user]
      sh SETUP            # pid 1 of the new PID namespace: builds the new root, then waits
        setpriv ...       # drops every capability (and, when started by root, becomes nobody)
          prlimit ...     # address space, CPU seconds, file size, processes, open files
            PROGRAM

- **No network**: a new network namespace has only a loopback interface, and it is down.
- **No view of the trainer**: a new PID namespace (the trainer's processes, and so its
  ``/proc/<pid>/environ``, do not exist there) and an empty environment.
- **Nothing writable but its own directory**: the new root is a tmpfs holding read-only bind
  mounts of ``/usr`` and the Python installation, a private ``/tmp``, a few device nodes and
  the program's fresh working directory ``/sandbox``; the old root is detached. The tmpfs is
  remounted read-only before the program starts.
- **Limits**: rlimits on address space, CPU seconds, file size, processes and open files. When
  the trainer runs as root the program runs as ``nobody``, since the kernel never applies the
  process limit to root.
- **Nothing left behind**: pid 1 is the setup shell, not the program, so the program cannot
  outlive it; when pid 1 ends, the kernel kills every process of the namespace. At the time
  limit the whole process group is killed, and ``unshare --kill-child`` takes pid 1 with it.

A non-root trainer needs unprivileged user namespaces (``unshare --user``), which most Linux
distributions allow; :func:`sandbox_unavailable` says why not where they are refused.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534
SANDBOX_DIRECTORY = "/sandbox"  # the program's working directory, as the program sees it
_DEVICES = ("null", "zero", "full", "random", "urandom")


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed program."""

    memory_mb: int = 1024
    """Address-space limit (RLIMIT_AS) in MiB."""
    cpu_seconds: int = 10
    """CPU-time limit (RLIMIT_CPU); the wall-clock limit is the caller's ``timeout``."""
    file_size_mb: int = 16
    """Largest file the program may write (RLIMIT_FSIZE), its captured output included."""
    processes: int = 32
    """Processes and threads the program may have at once (RLIMIT_NPROC)."""
    open_files: int = 64
    """Open file descriptors (RLIMIT_NOFILE)."""
    tmp_mb: int = 64
    """Size of the program's private ``/tmp``."""


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None
    """The program's exit status; None when it was killed at the time limit."""
    output: str
    """Its standard output and error: the first 4 KiB and the last 60 KiB."""


def read_only_paths() -> list[str]:
    """What the program may read: ``/usr`` and the Python installation running the trainer
    (its base prefix and, for a virtual environment, the environment), nothing else."""
    paths: list[str] = []
    for path in ("/usr", sys.base_prefix, sys.prefix, *_real_top_level_dirs()):
        path = os.path.realpath(path)
        if not any(path == p or path.startswith(p + "/") for p in paths):
            paths = [p for p in paths if not p.startswith(path + "/")] + [path]
    return paths


def _real_top_level_dirs() -> list[str]:
    """/bin, /lib, ... where they are directories of their own rather than links into /usr."""
    return [f"/{name}" for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32") if os.path.isdir(f"/{name}") and not os.path.islink(f"/{name}")]


# pid 1 of the new namespaces. Arguments: new root, working directory, tmp size (MiB), then the
# read-only paths up to "--", then the command that drops privileges and runs the program.
_SETUP = r"""
set -eu
root=$1; work=$2; tmp_mb=$3; shift 3
mount -t tmpfs -o mode=0755,size=16m,nosuid,nodev sandbox "$root"
while [ "$1" != "--" ]; do
  mkdir -p "$root$1"
  mount --bind "$1" "$root$1"
  mount -o remount,bind,ro,nosuid,nodev "$root$1"
  shift
done
shift
for name in bin sbin lib lib32 lib64 libx32; do
  if [ -L "/$name" ]; then ln -s "$(readlink "/$name")" "$root/$name"; fi
done
mkdir -p "$root/dev" "$root/proc" "$root/tmp" "$root/sandbox" "$root/old-root"
for device in DEVICES; do
  touch "$root/dev/$device"
  mount --bind "/dev/$device" "$root/dev/$device"
done
mount -t tmpfs -o mode=1777,size="${tmp_mb}m",nosuid,nodev tmp "$root/tmp"
mount --bind "$work" "$root/sandbox"
mount -t proc -o nosuid,nodev,noexec proc "$root/proc" 2>/dev/null || true
cd "$root"
pivot_root . old-root
umount -l /old-root
rmdir /old-root
mount -o remount,bind,ro,nosuid,nodev /
cd /sandbox
set +e
"$@"
exit $?
""".replace("DEVICES", " ".join(_DEVICES))


def _unshare_command() -> list[str]:
    command = ["unshare", "--mount", "--net", "--pid", "--ipc", "--uts", "--cgroup", "--fork", "--kill-child"]
    if os.geteuid() != 0:
        command += ["--user", "--map-root-user"]
    return command


def _drop_privileges_command() -> list[str]:
    """Every capability gone and no way to regain one; when started by root, also ``nobody``."""
    setpriv = ["setpriv", "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all"]
    if os.geteuid() == 0:
        setpriv += [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    return setpriv


def _limits_command(limits: SandboxLimits) -> list[str]:
    mib = 1024 * 1024
    return [
        "prlimit", f"--as={limits.memory_mb * mib}", f"--cpu={limits.cpu_seconds}", f"--fsize={limits.file_size_mb * mib}",
        f"--nproc={limits.processes}", f"--nofile={limits.open_files}", "--core=0",
    ]


def run_sandboxed(argv: list[str], stdin: bytes, timeout: float, limits: SandboxLimits = SandboxLimits(), sandboxed: bool = True) -> SandboxResult:
    """Run ``argv`` (absolute paths under :func:`read_only_paths`) in the sandbox, from a fresh
    working directory, feeding it ``stdin``; kill it and everything it started after ``timeout``
    seconds. ``sandboxed=False`` runs it with the same limits, directory and empty environment
    but without the namespaces: only for programs the user trusts."""
    with tempfile.TemporaryDirectory(prefix="grape-sandbox-", ignore_cleanup_errors=True) as scratch:
        scratch_path = Path(scratch)
        work, new_root, output_path = scratch_path / "work", scratch_path / "root", scratch_path / "output"
        work.mkdir()
        new_root.mkdir()
        if sandboxed and os.geteuid() == 0:
            os.chown(work, NOBODY, NOBODY)
        if sandboxed:
            command = [
                *_unshare_command(), "sh", "-c", _SETUP, "sandbox-setup", str(new_root), str(work), str(limits.tmp_mb),
                *read_only_paths(), "--", "env", "-i", *_drop_privileges_command(), *_limits_command(limits), *argv,
            ]
            cwd = scratch
        else:
            command = ["env", "-i", *_limits_command(limits), *argv]
            cwd = str(work)
        with open(output_path, "wb") as output:
            process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT, cwd=cwd,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, start_new_session=True,
            )
            try:
                process.communicate(stdin, timeout=timeout)
                returncode: int | None = process.returncode
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                _kill_group(process)
        return SandboxResult(returncode, _head_and_tail(output_path))


def _head_and_tail(path: Path, head: int = 4096, tail: int = 61440) -> str:
    """The output's first ``head`` and last ``tail`` bytes (all of it when shorter)."""
    size = path.stat().st_size
    with open(path, "rb") as output:
        if size <= head + tail:
            return output.read().decode("utf-8", "replace")
        first = output.read(head)
        output.seek(size - tail)
        return (first + b"\n[...]\n" + output.read()).decode("utf-8", "replace")


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL to the process group, then wait for ``unshare`` and for its child, pid 1 of the
    namespace: the kernel kills the namespace's processes before pid 1 is gone, so after this
    nothing the program started is running, and its directory can be removed."""
    namespace_init = _children(process.pid)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in namespace_init) and time.monotonic() < deadline:
        time.sleep(0.01)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie's namespace is already empty)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@functools.lru_cache(maxsize=None)
def sandbox_unavailable() -> str | None:
    """None when the sandbox works here; otherwise why not (checked once per process by running
    a trivial program in it)."""
    missing = [tool for tool in ("unshare", "setpriv", "prlimit", "mount", "umount", "pivot_root") if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None]
    if missing:
        return f"missing {', '.join(missing)} (util-linux)"
    if sys.platform != "linux":
        return f"the sandbox needs Linux namespaces; this is {sys.platform}"
    result = run_sandboxed([sys.executable, "-I", "-c", "import sys; sys.stdout.write(sys.stdin.read())"], b"sandbox works", timeout=30)
    if result.returncode == 0 and result.output == "sandbox works":
        return None
    hint = "" if os.geteuid() == 0 else " (unprivileged user namespaces may be disabled: see `sysctl kernel.unprivileged_userns_clone` or `kernel.apparmor_restrict_unprivileged_userns`)"
    return f"a Linux-namespace sandbox could not be set up{hint}: exit status {result.returncode}, output {result.output.strip()[-500:]!r}"
