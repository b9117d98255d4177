"""Workers under `mpirun` (the seed's MPI build), the controller beside it on this machine.

The hostfile comes from the host list — one `host slots=k` line per distinct address, k = how often it
is repeated — so rank i runs where line i of the host list says (when repeats are grouped, as in the
seed's /tmp/ip_info). The seed's MCA settings for large messages over TCP come from the backend config.
Every rank writes its own log (logs/worker<rank>.log); mpirun's own output goes to logs/mpirun.log.
Remote hosts need this tree and the same Python at the same paths (the usual MPI cluster setup).
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from collections import Counter
from pathlib import Path

from .local import LocalProcs, prepare_local, python_argv
from .plan import Plan
from .supervise import Outcome, supervise
from .validate import Checked, _is_loopback


def hostfile_text(hosts: list[str]) -> str:
    counts = Counter(hosts)
    order = list(dict.fromkeys(hosts))
    if all(_is_loopback(h) for h in order):  # one machine: name it as MPI expects for a local run
        return f"localhost slots={len(hosts)}\n"
    return "".join(f"{h} slots={counts[h]}\n" for h in order)


def mca_args(checked: Checked) -> list[str]:
    b = checked.cfg.backend
    pairs: list[tuple[str, str]] = []
    for key in ("btl_tcp_max_send_size", "btl_sm_max_send_size", "btl_tcp_progress_thread"):
        if getattr(b, key) is not None:
            pairs.append((key, str(getattr(b, key))))
    if b.btl_tcp_if_exclude:
        pairs.append(("btl_tcp_if_exclude", ",".join(b.btl_tcp_if_exclude)))
    pairs += [(k, str(v)) for k, v in b.mca.items()]
    return [a for k, v in pairs for a in ("--mca", k, v)]


def mpirun_argv(plan: Plan, checked: Checked, run_dir: Path) -> list[str]:
    rc = checked.cfg.runner
    w = plan.workers[0]
    (run_dir / "inputs" / "hostfile").write_text(hostfile_text(checked.hosts))
    argv = [rc.mpirun, "-n", str(len(plan.workers)), "--hostfile", str(run_dir / "inputs" / "hostfile"),
            "--bind-to", rc.bind_to]
    if rc.oversubscribe:
        argv.append("--oversubscribe")
    argv += mca_args(checked)
    for k in sorted(mpirun_env(plan)):  # -x NAME exports NAME from mpirun's environment to every rank
        argv += ["-x", k]
    argv += rc.extra_args
    # Each rank redirects its own output to logs/worker<rank>.log (MPI sets OMPI_COMM_WORLD_RANK).
    cmd = " ".join(shlex.quote(a) for a in python_argv(plan, w))
    argv += ["sh", "-c", f'exec {cmd} > "{plan.proc_dir}/logs/worker$OMPI_COMM_WORLD_RANK.log" 2>&1']
    return argv


def mpirun_env(plan: Plan) -> dict[str, str]:
    # MPI numbers the ranks of a host itself (OMPI_COMM_WORLD_LOCAL_RANK); rank 0's LOCAL_RANK must not leak.
    env = {k: v for k, v in plan.workers[0].env.items() if k not in ("LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    if os.geteuid() == 0:  # Open MPI refuses root unless told twice
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def prepare_mpirun(checked: Checked, run_dir: Path) -> Plan:
    return prepare_local(checked, run_dir)


class MpirunProcs(LocalProcs):
    """Ranks are process-group leaders of their own under mpirun, so besides mpirun's group, stop()
    ends any process that still carries this run's DEJAVU_RUN_ID (mpirun normally takes them down)."""

    def __init__(self, run_dir: Path, run_id: str) -> None:
        super().__init__(run_dir)
        self.run_id = run_id

    def stop(self) -> None:
        super().stop()
        deadline = time.monotonic() + 5
        while (left := pids_with_marker("DEJAVU_RUN_ID", self.run_id)) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGTERM if time.monotonic() < deadline - 2 else signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)


def pids_with_marker(key: str, value: str) -> list[int]:
    """Processes of this user whose environment holds key=value exactly (our run id, unique per run)."""
    marker = f"{key}={value}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def run_mpirun(plan: Plan, checked: Checked, run_dir: Path) -> tuple[Outcome, MpirunProcs]:
    procs = MpirunProcs(run_dir, plan.controller.env["DEJAVU_RUN_ID"])
    argv = mpirun_argv(plan, checked, run_dir)
    print("dejavu-run: " + " ".join(shlex.quote(a) for a in argv), file=sys.stderr, flush=True)
    try:
        procs.start("controller", python_argv(plan, plan.controller), plan.controller.env, plan.controller.log)
        procs.start("mpirun", argv, mpirun_env(plan), "logs/mpirun.log")
    except BaseException:
        procs.stop()
        raise
    return supervise(procs, checked.cfg.runner), procs
