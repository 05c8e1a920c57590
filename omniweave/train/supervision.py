"""What keeps a run's processes in order: one run per output folder, workers that die with
their launcher, and worker errors handed to the launcher to print once.

``omniweave train --nproc N`` is the torchrun agent itself (``launcher.py``). It passes
its workers ``OMNIWEAVE_ERROR_DIR``: the first worker of an attempt to fail for a known
reason (a user mistake, a stop) writes its message there, and the launcher prints that one
line instead of torchrun's failure report.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback

ERROR_DIR = "OMNIWEAVE_ERROR_DIR"
LOCK_FILE = ".omniweave.lock"
PR_SET_PDEATHSIG = 1


def under_launcher() -> bool:
    """Whether this process is a worker started by ``omniweave train --nproc``."""
    return bool(os.environ.get(ERROR_DIR))


# One run per output folder.


@contextlib.contextmanager
def output_lock(output_dir: str):
    """Hold an exclusive lock on ``output_dir`` (created if need be) for the block; a live
    holder is a one-line ValueError naming it, a dead one's lock is taken over with a note."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"train.output_dir '{output_dir}' is a file; give a folder.")
    path = os.path.join(output_dir, LOCK_FILE)
    try:
        os.makedirs(output_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise ValueError(
            f"train.output_dir '{output_dir}' is not writable ({error.strerror})."
        ) from None
    try:
        previous = os.read(fd, 200).decode(errors="replace").strip()
        if not _lock(fd, previous):
            raise ValueError(
                f"train.output_dir '{output_dir}' is in use by another run ({previous}); "
                "wait for it to end, stop it, or choose another output_dir."
            )
        if previous:
            print(f"omniweave: took over {path} from {previous}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # any exit this process sees leaves no holder behind
    finally:
        os.close(fd)  # releases the lock


def _lock(fd: int, holder: str) -> bool:
    """flock ``fd``; where the file system has no flock, judge by the recorded holder (a live
    process on this host keeps it)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    host, _, pid = holder.partition(", pid ")
    return not (host == f"host {socket.gethostname()}" and pid.isdigit() and _alive(int(pid)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Workers die with their launcher.


def parent_death_signal() -> None:
    """Have Linux SIGKILL this process when its parent dies (elsewhere: nothing)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def data_worker_init(rank_pid: int, *_) -> None:
    """A data-loading worker leaves its rank's process group, so a signal for the group
    (torchrun's SIGTERM on shutdown) is the rank's to act on (finish the step, save); the
    worker dies with its rank instead. Signals sent to the worker itself (the DataLoader's
    own shutdown) still reach it. The worker is a child of a fork server, not of its rank
    (``loader.worker_context``), so it watches the rank ``rank_pid``. The server is in the
    rank's group and ends on its SIGTERM; the worker then finishes the step it prepares."""
    os.setpgid(0, 0)
    _die_after(lambda: _wait_for_exit(rank_pid))


def _wait_for_exit(pid: int) -> None:
    """Return once process ``pid`` has ended: on Linux as soon as it exits (unreaped, a
    zombie, counts as ended), elsewhere once it is gone."""
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfd: not Linux, or before 5.3
        while _alive(pid):
            time.sleep(1.0)
        return
    select.select([handle], [], [])


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (``parent_death_signal``), and watch the
    parent from a thread too (it may have died before the signal was set)."""
    parent = os.getppid()
    parent_death_signal()

    def parent_gone() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)

    _die_after(parent_gone)


def _die_after(wait) -> None:
    """SIGKILL this process once ``wait()`` returns, waited for in a thread."""

    def watch() -> None:
        wait()
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="omniweave-parent-watch", daemon=True).start()


# Worker errors, printed once by the launcher.


def _error_file() -> str:
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return os.path.join(os.environ[ERROR_DIR], f"error-{attempt}.json")


def report_to_launcher(line: str, exit_code: int) -> bool:
    """Under the launcher, record ``line`` as this attempt's error unless a rank did first;
    True when the launcher will print it (so this process stays quiet)."""
    if not under_launcher():
        return False
    try:
        fd = os.open(_error_file(), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return True
    with os.fdopen(fd, "w") as f:
        json.dump({"line": line, "exit_code": exit_code}, f)
    return True


def another_rank_reported() -> bool:
    """Whether a rank of this attempt already reported an error (this one's failure is then
    most likely its echo: a closed connection)."""
    return under_launcher() and os.path.exists(_error_file())


def lost_a_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another rank's process is gone."""
    return isinstance(error, RuntimeError) and any(
        gone in str(error) for gone in ("Connection closed by peer", "Connection reset by peer")
    )


def reported_error(folder: str) -> dict | None:
    """The last attempt's reported error (``line``, ``exit_code``), if any."""
    names = [n for n in os.listdir(folder) if n.startswith("error-") and n.endswith(".json")]
    if not names:
        return None
    newest = max(names, key=lambda n: int(n[len("error-") : -len(".json")]))
    with open(os.path.join(folder, newest)) as f:
        return json.load(f)


def log_traceback(output_dir: str | None) -> None:
    """Write the current exception's traceback to ``output_dir/logs/error_rank{R}.txt``."""
    if not output_dir or not os.path.isdir(output_dir):
        return
    logs = os.path.join(output_dir, "logs")
    with contextlib.suppress(OSError):
        os.makedirs(logs, exist_ok=True)
        with open(os.path.join(logs, f"error_rank{os.environ.get('RANK', '0')}.txt"), "w") as f:
            f.write(traceback.format_exc())
