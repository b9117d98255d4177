"""Processes on this machine: the controller and workers as subprocesses, each with its own log file.

Each process starts in its own session (a process group of its own), so stopping one stops everything
it spawned, and Ctrl-C in the terminal reaches only the runner, which then stops them in order.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from .plan import Plan, Proc
from .supervise import Outcome, supervise
from .schema import RunnerConf


class LocalProcs:
    """A ProcessSet of local subprocesses; `controller_name` is the one whose output is echoed."""

    cheap_poll = True  # polling is a waitpid and a file read: the supervisor may poll often

    def __init__(self, run_dir: Path, controller_name: str = "controller", stop_grace_s: float = 5.0) -> None:
        self.run_dir = Path(run_dir)
        self.controller_name = controller_name
        self.stop_grace_s = stop_grace_s
        self.popen: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self._offset = 0

    def start(self, name: str, argv: list[str], env: dict[str, str], log: str) -> subprocess.Popen:
        path = self.run_dir / log
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as f:
            p = subprocess.Popen(argv, cwd=self.run_dir, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                                 stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.popen[name], self.logs[name] = p, path
        return p

    def poll(self) -> dict[str, int | None]:
        return {n: p.poll() for n, p in self.popen.items()}

    def new_output(self) -> str:
        path = self.logs.get(self.controller_name)
        if path is None or not path.exists():
            return ""
        with open(path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        # Only whole lines (or \r-redrawn progress lines), so a line is never torn in two.
        cut = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
        self._offset += cut
        return data[:cut].decode("utf-8", "replace")

    def stop(self) -> None:
        """SIGTERM to every process group still running, SIGKILL after stop_grace_s, then reap."""
        alive = [p for p in self.popen.values() if p.poll() is None]
        for p in alive:
            _killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        while time.monotonic() < deadline and any(p.poll() is None for p in alive):
            time.sleep(0.05)
        # KILL the whole group even when its leader is gone: children it left behind share the pgid.
        for p in self.popen.values():
            _killpg(p.pid, signal.SIGKILL)
        for p in self.popen.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def signal(self, name: str, sig: int, pid: int | None = None, host: str | None = None) -> None:  # noqa: ARG002
        """Signal a process's group: the one with ``pid`` if given (a spare may have become that rank)."""
        targets = [p for p in self.popen.values() if p.pid == pid]
        if not targets and name in self.popen:
            targets = [self.popen[name]]
        for p in targets:
            if p.poll() is None:
                _killpg(p.pid, sig)

    def pid(self, name: str) -> int | None:
        """The process's own pid (the worker's, as it says hello with): started directly, not via a shell."""
        p = self.popen.get(name)
        return p.pid if p is not None else None

    def interpreter(self, host: str) -> str:  # noqa: ARG002 — every process is here
        return sys.executable

    def write_file(self, host: str, name: str, text: str) -> str:  # noqa: ARG002 — every process is here
        path = self.run_dir / name
        path.write_text(text)
        path.chmod(0o755)
        return str(path)

    def restart(self, proc: Proc) -> None:
        """Start a process again under its name (its log goes on in the same file)."""
        old = self.popen.get(proc.name)
        if old is not None:
            _killpg(old.pid, signal.SIGKILL)
            try:
                old.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.start(proc.name, python_argv(self.plan, proc), proc.env, proc.log)

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.logs.get(name)
        if path is None or not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def python_argv(plan: Plan, proc: Proc, python: str = sys.executable) -> list[str]:
    return [python, "-u", "-m", plan.entry, proc.role, *proc.args]


def run_local(plan: Plan, run_dir: Path, rc: RunnerConf, cfg=None) -> tuple[Outcome, LocalProcs]:
    procs = LocalProcs(run_dir)
    procs.plan = plan
    try:
        # The controller first: workers connect to it (and retry while it comes up).
        procs.start("controller", python_argv(plan, plan.controller), plan.controller.env, plan.controller.log)
        for w in [*plan.workers, *plan.spares]:
            procs.start(w.name, python_argv(plan, w), w.env, w.log)
    except BaseException:
        procs.stop()
        raise
    driver = None
    if cfg is not None and cfg.failure.recoverable:
        from .failures import FailureDriver

        driver = FailureDriver(procs, plan, cfg, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    return supervise(procs, rc, driver=driver), procs


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def prepare_local(checked, run_dir: Path) -> Plan:
    from .plan import build, cpu_threads_env, local_ports, write_inputs

    cfg = checked.cfg
    inputs = write_inputs(checked, run_dir)
    ip = cfg.cluster.controller_ip or "127.0.0.1"
    env = {
        # Marks every process of this run (unique even when run folder names repeat across sweeps).
        "DEJAVU_RUN_ID": f"{run_dir.name}-{uuid.uuid4().hex[:8]}",
        # The processes run in the run folder; this tree must be importable there even when not installed.
        "PYTHONPATH": os.pathsep.join([str(repo_root()), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "DEJAVU_CONF_DIR": str(_conf_dir()),
        **cpu_threads_env(checked.hosts, cfg),
    }
    if sys.stdout.isatty():
        env["DEJAVU_PROGRESS"] = "1"  # the controller's progress line, echoed from its log
    return build(checked, inputs, proc_dir=str(Path(run_dir).resolve()), ports=local_ports(cfg),
                 controller_host="127.0.0.1", controller_ip=ip, extra_env=env)


def _conf_dir() -> Path:
    from . import conf_dir

    return conf_dir()
