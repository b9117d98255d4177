"""One policy for every runner: wait for the controller, stop everything on a failure, a timeout or Ctrl-C.

A runner hands over a ``ProcessSet`` (local subprocesses, remote processes over SSH, or an mpirun job)
and ``supervise`` drives it:

- the run ends when the controller exits; workers then get ``grace_s`` to exit on their own;
- a worker that exits with an error before that is a failure: the controller gets ``grace_s`` to notice
  and write its results (which requests finished), then everything is stopped;
- ``timeout_s`` bounds the whole run; Ctrl-C (or SIGTERM to the runner) stops everything at once;
- whatever happens, ``stop()`` runs last and ends every process group the runner started.
"""

from __future__ import annotations

import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Protocol

from .schema import RunnerConf


class ProcessSet(Protocol):
    def poll(self) -> dict[str, int | None]: ...  # name -> exit code, None while running
    def new_output(self) -> str: ...  # the controller's output since the last call
    def stop(self) -> None: ...  # TERM, then KILL, every process group; returns when all are gone
    def log_tail(self, name: str, lines: int = 20) -> str: ...
    # Fault tolerance (runners/failures.py): signal one process's group, start one again.
    def signal(self, name: str, sig: int, pid: int | None = None) -> None: ...
    def restart(self, proc) -> None: ...


class LaunchError(RuntimeError):
    """Nothing could be started: a host unreachable, its Python missing, its environment setup failed.
    The message names the host's address."""


@dataclass
class Outcome:
    controller_rc: int | None = None
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # processes that exited with an error on their own
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems and not self.interrupted and self.controller_rc == 0


class Interrupted(KeyboardInterrupt):
    pass


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM to the runner stops the run like Ctrl-C (a batch system or `kill` must not orphan workers)."""
    def handler(signum, frame):  # noqa: ARG001
        raise Interrupted(f"signal {signum}")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextmanager
def no_interrupts() -> Iterator[None]:
    """Cleanup must finish: a second Ctrl-C during stop() would orphan the processes it was ending."""
    try:
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def supervise(procs: ProcessSet, rc: RunnerConf, *, controller: str = "controller", echo=None,
              driver=None) -> Outcome:
    """``driver``: a ``runners.failures.FailureDriver`` when the run survives failures; then a worker's
    exit is the controller's to handle (it restarts the rank through the driver), not the run's end."""
    echo = echo or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    # A run that survives failures acts on the controller's events: where polling is cheap (local
    # processes), look often, so a kill or a restart is not late by a whole poll interval.
    poll_s = min(rc.poll_s, 0.1) if driver is not None and getattr(procs, "cheap_poll", False) else rc.poll_s
    out = Outcome()
    start = time.monotonic()
    ended_at: float | None = None  # when the controller ended, or a worker failed
    try:
        while True:
            states = procs.poll()
            out.exit_codes = dict(states)
            text = procs.new_output()
            if text and driver is not None:
                text = driver.filter(text)
            if text and rc.echo:
                echo(text)
            if driver is not None:
                driver.seen_exits(states)
                driver.tick()
            now = time.monotonic()
            ctl = states.get(controller)
            workers = {n: c for n, c in states.items() if n != controller}
            if ctl is not None and out.controller_rc is None:
                out.controller_rc = ctl
                ended_at = ended_at or now
                if ctl != 0:
                    out.problems.append(f"the controller exited with code {ctl}")
                    out.failed.append(controller)
            failed = {n: c for n, c in workers.items() if c not in (None, 0)} if driver is None else {}
            for n, c in failed.items():
                msg = f"{n} exited with code {c}" + (" before the controller finished" if ctl is None else "")
                if n not in out.failed:
                    out.problems.append(msg)
                    out.failed.append(n)
                    ended_at = ended_at or now
            if ctl is None and workers and all(c is not None for c in workers.values()) and driver is None:
                ended_at = ended_at or now  # every worker is gone: the controller cannot finish
            if ended_at is not None:
                if all(c is not None for c in states.values()):
                    break
                if now - ended_at > rc.grace_s:
                    # Workers that linger after a complete run are simply stopped; a controller that does
                    # not end after a failure is stopped too, and that is a problem of its own.
                    if out.controller_rc is None:
                        out.problems.append(f"the controller did not exit within runner.grace_s={rc.grace_s}s "
                                            f"after that; stopped it")
                    break
            if now - start > rc.timeout_s:
                out.problems.append(f"the run exceeded runner.timeout_s={rc.timeout_s}s; stopped every process")
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        out.interrupted = True
        out.problems.append("interrupted (Ctrl-C / SIGTERM); stopped every process")
    finally:
        if driver is not None:
            driver.close()
        with no_interrupts():
            procs.stop()
            text = procs.new_output()
            if text and rc.echo:
                echo(text)
            out.exit_codes = {**out.exit_codes, **{n: c for n, c in procs.poll().items() if c is not None}}
    return out


def failure_report(out: Outcome, procs: ProcessSet, run_dir, *, echoed: bool = True) -> str:
    """The problems, then the end of the log of each process that failed on its own (and the controller's,
    when its output was not already echoed)."""
    lines = [f"the run failed (run folder: {run_dir}):"] + [f"  - {p}" for p in out.problems]
    for name in dict.fromkeys([*out.failed, *([] if echoed else ["controller"])]):
        tail = without_tracebacks(procs.log_tail(name, 60 if name in out.failed else 8))
        tail = "\n".join(tail.splitlines()[-(12 if name in out.failed else 8):])
        if tail.strip():
            lines.append(f"--- last lines of {name}'s log (logs/{name}.log; tracebacks are there) ---\n{tail.rstrip()}")
    return "\n".join(lines)


def without_tracebacks(text: str) -> str:
    """A log's lines minus Python tracebacks (the console gets the account; the log keeps the details)."""
    out, inside = [], False
    for line in text.splitlines():
        if line.startswith("Traceback (most recent call last)"):
            inside = True
            out.append("    (traceback: see the log)")
            continue
        if inside:
            if line.startswith((" ", "\t")) or not line.strip():
                continue
            inside = False  # the exception line closes it; keep it, it says what went wrong
        out.append(line)
    return "\n".join(out)
