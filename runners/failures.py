"""The runner's side of fault tolerance: check the failure config, and carry out the controller's requests.

The controller decides (it detects failures, resumes the pipeline); the runner acts from outside the
processes, as an operator's tooling would: it reads the ``@dejavu-event`` lines of the controller's
output (``dejavu.controller.recovery.emit``) and

- ``inject``: sends SIGKILL (a lost machine) or SIGSTOP (a hang) to the target worker's process group,
  or to every worker process on a host (SSH runner);
- ``restart``: starts the lost rank again on its host after ``failure.restart_delay_s``, as
  ``dejavu worker ... --restart --failures G`` (at most ``failure.max_restarts`` times); a process that
  still exists (a hung one) is killed first.

It shows each event as a readable line instead of the raw one.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import replace

from dejavu.controller.recovery import EVENT_PREFIX
from dejavu.protocol import ProcessGone, to_msg

from .schema import BackendName, Config, RestartMode, RunnerKind

PHASES = ("prefill", "handover", "decode")
SIGNALS = ("kill", "stop")


def failure_problems(cfg: Config, hosts: list[str]) -> list[str]:
    """Everything wrong with ``failure.*`` for this run, each naming its key (empty: fine)."""
    f, t = cfg.failure, cfg.topology
    problems: list[str] = []
    world = t.num_peers
    for key in ("heartbeat_interval_s", "heartbeat_timeout_s", "recovery_timeout_s"):
        if getattr(f, key) <= 0:
            problems.append(f"failure.{key}={getattr(f, key)} must be > 0 seconds")
    if f.heartbeat_timeout_s <= 2 * f.heartbeat_interval_s:
        problems.append(f"failure.heartbeat_timeout_s={f.heartbeat_timeout_s} must exceed twice "
                        f"failure.heartbeat_interval_s={f.heartbeat_interval_s} (a deadline of missed heartbeats)")
    if f.restart_delay_s < 0:
        problems.append(f"failure.restart_delay_s={f.restart_delay_s} must be >= 0")
    if f.max_restarts < 0:
        problems.append(f"failure.max_restarts={f.max_restarts} must be >= 0")
    if f.spares < 0:
        problems.append(f"failure.spares={f.spares} must be >= 0")
    if not f.recoverable:
        return problems
    if cfg.backend.name == BackendName.mpi or cfg.runner.kind == RunnerKind.mpirun:
        problems.append("fault tolerance (failure.with_ft, failure.failures, failure.spares) needs backend=gloo or "
                        "nccl with runner=local or ssh: an MPI job cannot survive a dead rank (as in the seed)")
    if f.spares and not f.with_ft:
        problems.append(f"failure.spares={f.spares} without failure.with_ft=true: a hot spare takes over a lost "
                        f"rank's cache from the replicas, so it needs replication; set failure.with_ft=true")
    decoding = t.num_token_peers
    if f.with_ft and decoding < 2 and t.num_prompt_peers == 0:
        problems.append(f"failure.with_ft=true needs a successor to hold each stage's replica: at least 2 stages "
                        f"(topology.num_token_peers={decoding}); use topology=baseline or a disaggregated topology")
    lost = 0
    for i, spec in enumerate(f.failures):
        key = f"failure.failures[{i}]"
        if (spec.rank is None) == (spec.host is None):
            problems.append(f"{key}: give exactly one of rank (a worker) or host (every worker on it)")
        if spec.rank is not None and not -world <= spec.rank < world:
            problems.append(f"{key}.rank={spec.rank} is not a worker of this run (topology.num_peers={world}: "
                            f"ranks 0..{world - 1}, or -1 for the last)")
        if spec.host is not None:
            if cfg.runner.kind != RunnerKind.ssh:
                problems.append(f"{key}.host={spec.host}: killing a host needs runner=ssh (locally every process, "
                                f"the controller's too, shares one host); target a rank instead")
            elif spec.host not in hosts:
                problems.append(f"{key}.host={spec.host} is not in the host list ({', '.join(dict.fromkeys(hosts))})")
            elif spec.host == (cfg.runner.controller_host or cfg.cluster.controller_ip or hosts[0]):
                problems.append(f"{key}.host={spec.host} runs the controller, which is not replicated; pick a host "
                                f"of workers only")
        triggers = [spec.after_tokens is not None, spec.after_s is not None, spec.phase is not None]
        if sum(triggers) != 1:
            problems.append(f"{key}: give exactly one trigger: after_tokens, after_s or phase")
        if spec.phase is not None and spec.phase not in PHASES:
            problems.append(f"{key}.phase={spec.phase!r} must be one of {', '.join(PHASES)}")
        if spec.phase == "handover" and t.num_prompt_peers == 0:
            problems.append(f"{key}.phase=handover needs a disaggregated topology (topology.num_prompt_peers > 0)")
        if spec.phase == "handover" and spec.rank is not None and 0 <= spec.rank % max(world, 1) < \
                t.num_prompt_peers * t.tensor_parallelism:
            problems.append(f"{key}: phase=handover parks a token-pipeline worker as its cache arrives; rank "
                            f"{spec.rank} is a prompt worker (token workers are ranks "
                            f"{t.num_prompt_peers * t.tensor_parallelism}..{world - 1})")
        if spec.after_tokens is not None and spec.after_tokens < 0 or spec.after_s is not None and spec.after_s < 0:
            problems.append(f"{key}: after_tokens / after_s must be >= 0")
        if spec.step < 0:
            problems.append(f"{key}.step={spec.step} must be >= 0")
        if spec.signal not in SIGNALS:
            problems.append(f"{key}.signal={spec.signal!r} must be kill or stop")
        lost += hosts.count(spec.host) if spec.host is not None else 1
    if lost > f.max_restarts:
        problems.append(f"failure.failures loses {lost} workers in all but failure.max_restarts={f.max_restarts}; "
                        f"raise failure.max_restarts or inject fewer failures")
    return problems


def scenario(cfg: Config, hosts: list[str]) -> list[dict]:
    """The failures in the controller's terms (``dejavu.controller.recovery.Injection``): ranks resolved."""
    world = cfg.topology.num_peers
    out = []
    for spec in cfg.failure.failures:
        if spec.host is not None:
            ranks = [r for r, h in enumerate(hosts) if h == spec.host]
        else:
            ranks = [spec.rank % world]
        out.append({"ranks": ranks, "host": spec.host, "after_tokens": spec.after_tokens, "after_s": spec.after_s,
                    "phase": {"handover": "admit"}.get(spec.phase, spec.phase), "step": spec.step,
                    "signal": spec.signal})
    return out


class FailureDriver:
    """Acts on the controller's events for one run; ``procs`` is the runner's ProcessSet."""

    def __init__(self, procs, plan, cfg: Config, echo) -> None:
        self.procs, self.plan, self.cfg, self.echo = procs, plan, cfg, echo
        self.pending: list[tuple[float, int, int]] = []  # (when, rank, generation) restarts to do
        self.restarts = 0
        self.workers_by_rank = {w.rank: w for w in plan.workers}
        self.reported: set[tuple[str, int]] = set()  # (process name, pid) exits told to the controller
        self._sock = None  # a ZeroMQ DEALER to the controller (typed msgpack messages, as the workers')

    def filter(self, text: str) -> str:
        """The controller's output with every event line acted on and replaced by a readable one."""
        out = []
        for line in text.splitlines(keepends=True):
            if line.startswith(EVENT_PREFIX):
                try:
                    out.append(self.act(json.loads(line[len(EVENT_PREFIX):])))
                except (ValueError, KeyError) as e:
                    out.append(f"[runner] ignoring a malformed event line ({e})\n")
            else:
                out.append(line)
        return "".join(out)

    def act(self, ev: dict) -> str:
        kind = ev.get("event")
        if kind == "inject":
            sig = signal.SIGSTOP if ev["signal"] == "stop" else signal.SIGKILL
            if ev.get("host"):
                self.procs.kill_host(ev["host"], "STOP" if sig == signal.SIGSTOP else "KILL")
                return f"[runner] {sig.name} to every worker on host {ev['host']}\n"
            for t in ev["targets"]:
                self.procs.signal(f"worker{t['rank']}", sig, pid=t.get("pid"), host=t.get("host"))
            return "".join(f"[runner] {sig.name} to worker {t['rank']} (pid {t['pid']} on {t['host']})\n"
                           for t in ev["targets"])
        if kind == "restart":
            if self.cfg.failure.restart == RestartMode.manual:
                return self.manual_restart(int(ev["rank"]), int(ev["generation"]))
            self.pending.append((time.monotonic() + self.cfg.failure.restart_delay_s, int(ev["rank"]),
                                 int(ev["generation"])))
            return (f"[runner] restarting worker {ev['rank']} on {ev.get('host')}"
                    + (f" in {self.cfg.failure.restart_delay_s:g} s" if self.cfg.failure.restart_delay_s else "") + "\n")
        if kind == "lost":  # fencing: a hung or half-dead process of that rank must not come back to life
            self.procs.signal(f"worker{ev['rank']}", signal.SIGKILL, pid=ev.get("pid"), host=ev.get("host"))
            return ""
        if kind == "resumed":
            return ""
        return f"[runner] event {kind}\n"

    def manual_restart(self, rank: int, generation: int) -> str:
        """failure.restart=manual: the command that replaces the rank, as a script in the run folder."""
        import shlex

        proc = self.workers_by_rank[rank]
        python = getattr(self.procs, "interpreter", lambda host: "python3")(proc.host)
        argv = [python, "-u", "-m", self.plan.entry, proc.role, *proc.args, "--restart", "--failures", str(generation)]
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in proc.env.items())
        script = f"restart_worker{rank}.sh"
        text = (f"#!/bin/sh\n# Replaces worker {rank} of this run (failure generation {generation}) on {proc.host}.\n"
                f"cd {shlex.quote(self.plan.proc_dir)} && exec env {env} {' '.join(shlex.quote(a) for a in argv)} "
                f">> logs/{proc.name}.log 2>&1\n")
        where = self.procs.write_file(proc.host, script, text)
        return (f"[runner] failure.restart=manual: start worker {rank} again on {proc.host} yourself, within "
                f"failure.recovery_timeout_s={self.cfg.failure.recovery_timeout_s:g} s: sh {where}\n")

    def seen_exits(self, states: dict[str, int | None]) -> None:
        """A worker process that exited is reported to the controller at once (its heartbeats would
        take the deadline to go missing). Only where the runner knows the worker's own pid (local)."""
        for name, code in states.items():
            pid = self.procs.pid(name) if code not in (None, 0) and hasattr(self.procs, "pid") else None
            if pid is None or (name, pid) in self.reported:
                continue
            self.reported.add((name, pid))
            rank = next((w.rank for w in [*self.plan.workers] if w.name == name), None)
            if rank is not None:
                self._tell_controller(ProcessGone(rank, pid, int(code)))

    def _tell_controller(self, msg) -> None:
        import zmq

        if self._sock is None:
            env = self.plan.controller.env
            self._sock = zmq.Context.instance().socket(zmq.DEALER)
            self._sock.setsockopt(zmq.IDENTITY, b"runner")
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(f"tcp://{env['DEJAVU_CONTROLLER_IP']}:{env['DEJAVU_CONTROLLER_PORT']}")
        try:
            self._sock.send(to_msg(msg), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the controller is gone or busy: its heartbeat deadline still finds the worker

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def tick(self) -> None:
        now = time.monotonic()
        due = [p for p in self.pending if p[0] <= now]
        self.pending = [p for p in self.pending if p[0] > now]
        for _, rank, generation in due:
            self.restarts += 1
            proc = self.workers_by_rank[rank]
            # A hung (stopped) process, or one a host kill missed: gone before its replacement starts.
            self.procs.signal(proc.name, signal.SIGKILL)
            again = replace(proc, args=[*proc.args, "--restart", "--failures", str(generation)])
            self.procs.restart(again)
            self.echo(f"[runner] worker {rank} started again (failure generation {generation})\n")
