"""Helpers for the runner tests: a real OpenSSH server on loopback, and a way to run `dejavu-run`.

The sshd listens on a free port on 127.0.0.1 and 127.0.0.2 (two "hosts" of one machine), with a host key
and a client key generated here; it needs /usr/sbin/sshd (Debian: `apt-get install openssh-server`) and
its privilege-separation folder /run/sshd, which it creates when it may.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SSHServer:
    port: int
    key_file: Path
    user: str
    addrs: tuple[str, ...]
    remote_dir: Path

    def overrides(self, hosts_file: Path) -> list[str]:
        """dejavu-run overrides for a cluster of this server's addresses."""
        return [
            "runner=ssh", "cluster=ip_info", f"cluster.hosts_file={hosts_file}", f"cluster.ssh.port={self.port}",
            f"cluster.ssh.user={self.user}", f"cluster.ssh.key_file={self.key_file}", "cluster.ssh.connect_timeout=5",
            f"cluster.remote_dir={self.remote_dir}", f"cluster.python={sys.executable}",
        ]


def wait_listening(addr: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((addr, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd did not start listening on {addr}:{port}")


def _run_env(env: dict[str, str] | None) -> dict[str, str]:
    e = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", **(env or {})}
    e.pop("DEJAVU_PROGRESS", None)
    return e


def dejavu_run(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 240,
               cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`dejavu-run ARGS` as the user types it (python -m runners.app, the console script's target)."""
    return subprocess.run([sys.executable, "-m", "runners.app", *args], cwd=cwd, env=_run_env(env),
                          capture_output=True, text=True, timeout=timeout)


def dejavu_run_started(args: list[str], *, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.Popen:
    """`dejavu-run ARGS` started in the background, its output (stdout and stderr) readable as it comes."""
    return subprocess.Popen([sys.executable, "-m", "runners.app", *args], cwd=cwd, env=_run_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def launch_record(run_dir: Path) -> dict:
    import json

    return json.loads((Path(run_dir) / "launch.json").read_text())


def leftover_processes(run_dir: Path, settle_s: float = 3.0) -> list[str]:
    """Processes on this machine (every loopback "host" is this machine) still carrying the run's id."""
    from runners.mpirun import pids_with_marker

    run_id = launch_record(run_dir)["procs"][0]["env"]["DEJAVU_RUN_ID"]
    deadline = time.monotonic() + settle_s
    while (pids := pids_with_marker("DEJAVU_RUN_ID", run_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    out = []
    for pid in pids:
        try:
            out.append(f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
        except OSError:
            pass
    return out


def wait_for_text(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} did not appear in {path} within {timeout}s")


def tiny_model_args(ckpt: Path, *, rps: float = 50.0, num_requests: int = 4) -> list[str]:
    """Overrides for a tiny random Llama checkpoint folder (tests/tiny_models.py) with random-id prompts."""
    return ["model.source=hf_folder", f"+model.path={ckpt}", "model.name=tiny-llama", "workload=poisson",
            f"workload.rps={rps}", f"workload.num_requests={num_requests}", "workload.input_len=12",
            "workload.output_len=8", "print_answers=false"]
