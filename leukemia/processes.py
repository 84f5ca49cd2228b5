"""Which process owns what: tokens that outlive pid reuse, and children that stop with a parent.

A process token is ``host:pid:start``, where ``start`` is the process's start time in clock
ticks (``/proc/<pid>/stat``), so a later process that reuses the pid does not pass for it. Runs
and temporary folders record the token of the process that made them; another process can then
prove that its maker is gone.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

PARENT_ENV = "LEUKEMIA_PARENT_PROCESS"


def process_start(pid: int) -> str | None:
    """A token that tells a process from a later one with the same pid, or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:  # no /proc (not Linux): the pid alone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "alive"
    # Field 22 (start time in clock ticks) follows the parenthesised command name; a zombie
    # (state Z) has exited.
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]


def token(pid: int | None = None) -> str:
    """``host:pid:start`` of ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{process_start(pid)}"


def is_gone(owner: str) -> bool:
    """Whether the process of ``owner`` (a ``token``) has ended. Only a process of this host can
    be checked: for any other host, or a malformed token, the answer is False."""
    try:
        host, pid, start = owner.rsplit(":", 2)
        pid_number = int(pid)
    except ValueError:
        return False
    return host == socket.gethostname() and process_start(pid_number) != start


@contextlib.contextmanager
def children_stop_with_me():
    """Within the block, child ``leukemia`` commands (``stop_when_parent_dies``) stop when this
    process dies, even by SIGKILL, whatever processes lie between (``mlflow run``, a shell)."""
    previous = os.environ.get(PARENT_ENV)
    os.environ[PARENT_ENV] = token()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = previous


def stop_when_parent_dies(interval: float = 1.0, grace: float = 10.0, every: float = 5.0) -> None:
    """When ``PARENT_ENV`` names a process, interrupt this one (KeyboardInterrupt: a training
    run ends KILLED with its resume command) once that process is gone, again every ``every``
    seconds while it lingers, and exit after ``grace`` seconds, saying where it was stuck.

    The grace is short because an interrupt can land inside one of MLflow's SQLite writes: its
    session's connection then keeps the write lock while the exception unwinds, and ending the
    run waits out MLflow's 20 s busy timeout in C, where no further interrupt is seen (about one
    interrupt in ten during logging, measured). The run left RUNNING is then ended KILLED by the
    next command that opens the store, as for kill -9."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or parent == token():
        return
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Started in the background from a script (bash ignores SIGINT for `&`): the interrupt
        # below would do nothing and the child would train on, even register, for the grace
        # period. A child of ours stops with its parent, so it takes SIGINT again.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    main = threading.main_thread().ident

    def watch():
        while not is_gone(parent):
            time.sleep(interval)
        deadline = time.monotonic() + grace
        while (left := deadline - time.monotonic()) > 0:
            # A real signal to the main thread, not _thread.interrupt_main's flag: it also ends
            # a blocking system call. Repeated, as library code may swallow one interrupt.
            signal.pthread_kill(main, signal.SIGINT)
            time.sleep(min(every, left))
        sys.stderr.write(
            f"leukemia: the parent process is gone and this one did not stop within {grace:g} s "
            "of an interrupt; exiting. Where it was:\n"
        )
        faulthandler.dump_traceback(all_threads=True)
        os._exit(130)

    threading.Thread(target=watch, name="leukemia-parent-watch", daemon=True).start()


def interrupt_on_terminate() -> None:
    """SIGTERM (``kill``, ``scancel``, a container stopping) interrupts like Ctrl-C, so a run
    ends KILLED with how to continue instead of being left RUNNING."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def descendants(pid: int) -> list[int]:
    """Every living descendant of ``pid`` (from ``/proc``), children before grandchildren."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(parent, []).append(int(entry.name))
    found, frontier = [], [pid]
    while frontier:
        frontier = [c for p in frontier for c in parents.get(p, [])]
        found += frontier
    return found


def interrupt_tree(pid: int, sig: int = signal.SIGINT) -> None:
    """Send ``sig`` to ``pid`` and its descendants (a shell between us and a ``leukemia``
    command passes no signal on)."""
    for target in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, sig)
