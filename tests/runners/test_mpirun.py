"""The mpirun runner: the hostfile from the host list, the seed's MCA settings, ranks from MPI, and a
real serving run with the MPI backend end to end."""

from __future__ import annotations

import json

from runner_helpers import dejavu_run, leftover_processes, tiny_model_args

from runners.mpirun import hostfile_text


def test_hostfile_has_one_line_per_machine_with_its_slots():
    assert hostfile_text(["10.0.0.1", "10.0.0.1", "10.0.0.2"]) == "10.0.0.1 slots=2\n10.0.0.2 slots=1\n"
    assert hostfile_text(["127.0.0.1"] * 3) == "localhost slots=3\n"


def test_mpirun_serves_a_baseline_pipeline_end_to_end(tmp_path, tiny_checkpoint):
    run = tmp_path / "run"
    r = dejavu_run(["runner=mpirun", "backend=mpi", "topology=baseline", "backend.btl_tcp_if_exclude=[docker0]",
                    *tiny_model_args(tiny_checkpoint("llama-gqa-bias")), "logger=none", f"hydra.run.dir={run}"],
                   timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the seed's command line: MCA settings for large messages, exported environment
    cmd = next(line for line in r.stderr.splitlines() if line.startswith("dejavu-run: mpirun"))
    for part in ("-n 2", "--mca btl_tcp_max_send_size 1000000000", "--mca btl_sm_max_send_size 1000000000",
                 "--mca btl_tcp_progress_thread 1", "--mca btl_tcp_if_exclude docker0", "-x DEJAVU_CONTROLLER_IP",
                 "-x MASTER_ADDR", "--hostfile"):
        assert part in cmd, part
    assert "--rank" not in cmd  # ranks come from MPI
    summary = json.loads((run / "summary.json").read_text())
    assert summary["counts"]["completed"] == 4
    for f in ("logs/controller.log", "logs/mpirun.log", "logs/worker0.log", "logs/worker1.log", "inputs/hostfile"):
        assert (run / f).is_file(), f
    assert leftover_processes(run) == []
