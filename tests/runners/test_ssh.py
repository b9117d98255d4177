"""The SSH runner against a real OpenSSH server on loopback (127.0.0.1 and 127.0.0.2 are two "hosts"):
environment setup, a disaggregated run end to end with logs and results brought back, Ctrl-C and
kill_host leaving nothing behind, and unreachable hosts failing fast with their address."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_dir

from runner_helpers import REPO, dejavu_run, leftover_processes, tiny_model_args, wait_for_text

import runners.schema  # noqa: F401
from runners import conf_dir


@pytest.fixture
def two_hosts(tmp_path):
    hosts = tmp_path / "ip_info"
    hosts.write_text("127.0.0.1\n127.0.0.2\n")
    return hosts


def test_disaggregated_run_on_two_hosts_end_to_end(sshd, two_hosts, tmp_path, tiny_checkpoint):
    run = tmp_path / "run"
    t0 = time.monotonic()
    r = dejavu_run([*sshd.overrides(two_hosts), "topology=disagg", *tiny_model_args(tiny_checkpoint("llama-gqa-bias")),
                    "logger=none",
                    # setup=install: a venv per machine with this tree pip-installed (offline: the venv shares
                    # this interpreter's packages, so only our package itself is installed)
                    "cluster.setup=install", "cluster.system_site_packages=true",
                    "cluster.pip_args=[--no-deps,--no-build-isolation]", f"hydra.run.dir={run}"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(f"ssh end-to-end: {time.monotonic() - t0:.1f}s")
    # logs and results came back into the local run folder
    for f in ("logs/controller.log", "logs/worker0.log", "logs/worker1.log", "summary.json", "requests.jsonl",
              "trace.json", "pids/127.0.0.1.pids", "pids/127.0.0.2.pids"):
        assert (run / f).is_file(), f
    summary = json.loads((run / "summary.json").read_text())
    assert summary["counts"]["completed"] == 4 and summary["run"]["topology"]["prompt_stages"] == 1
    # the prompt worker (rank 0) ran on the first host, the token worker (rank 1) on the second
    assert (run / "pids/127.0.0.2.pids").read_text().split()[0] == "worker1"
    assert "worker0" in (run / "pids/127.0.0.1.pids").read_text()
    assert "ready" in (run / "logs/controller.log").read_text()
    # the venv was made and holds our package, installed from the copied tree
    venv = sshd.remote_dir / "venv"
    assert (venv / ".dejavu-src").is_file()
    assert list(venv.glob("lib/python3*/site-packages/runners/ssh.py"))
    assert leftover_processes(run) == []


def _bare_interpreter() -> str | None:
    """An interpreter of this Python version with none of the launching environment's packages (the
    distribution's /usr/bin/python3): a host as a newcomer's machine has it, with no `wheel` installed."""
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if not os.path.exists(cand) or os.path.realpath(cand) == os.path.realpath(sys.executable):
            continue
        probe = subprocess.run([cand, "-c", "import sys; print('%d.%d' % sys.version_info[:2]); import torch"],
                               capture_output=True, text=True)
        if probe.stdout.strip() == "%d.%d" % sys.version_info[:2] and probe.returncode != 0:
            return cand
    return None


def test_install_on_a_host_whose_interpreter_lacks_wheel_and_our_packages(sshd, two_hosts, tmp_path, tiny_checkpoint):
    """The hosts' venv is made from a bare interpreter: nothing is built there (the tree arrives as a wheel
    built here) and, on this machine, the venv sees the launching environment's packages (torch...)."""
    bare = _bare_interpreter()
    if bare is None:
        pytest.skip("no second interpreter of this Python version without torch on this machine")
    run = tmp_path / "run"
    remote = tmp_path / "remote-bare"
    r = dejavu_run([*sshd.overrides(two_hosts), *tiny_model_args(tiny_checkpoint("llama-gqa-bias")), "logger=none",
                    "cluster.setup=install", "cluster.system_site_packages=true", "cluster.pip_args=[--no-deps]",
                    f"cluster.python={bare}", f"cluster.remote_dir={remote}", f"hydra.run.dir={run}"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["counts"]["completed"] == 4
    installed = list((remote / "venv").glob("lib/python3*/site-packages/dejavu-*.dist-info"))
    assert installed and (installed[0] / "WHEEL").is_file()


def test_ctrl_c_leaves_no_process_on_any_host(sshd, two_hosts, tmp_path, tiny_checkpoint):
    run = tmp_path / f"run-{time.time_ns()}"  # its own name: the remote runs/ folder is shared by the tests
    env = {**os.environ, "WANDB_MODE": "offline"}
    # The stand-in controller holds the run open; Ctrl-C comes once both workers are connected.
    args = [*sshd.overrides(two_hosts), "topology=disagg", "cluster.setup=pythonpath", "logger=none",
            "entry=runners.standin", "+cluster.env.DEJAVU_STANDIN_HOLD_S=300",
            *tiny_model_args(tiny_checkpoint("llama-gqa-bias")), f"hydra.run.dir={run}"]
    p = subprocess.Popen([sys.executable, "-m", "runners.app", *args], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(sshd.remote_dir.glob(f"runs/{run.name}-*/logs/controller.log")) and time.monotonic() < deadline:
            time.sleep(0.2)
        [log] = sshd.remote_dir.glob(f"runs/{run.name}-*/logs/controller.log")
        wait_for_text(log, "[2/2]", timeout=60)  # both workers are up, one per host
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, out[-3000:] + err[-3000:]
    assert time.monotonic() - t0 < 30
    assert "interrupted" in err
    assert leftover_processes(run) == []  # on both hosts (one machine here)
    assert (run / "logs" / "worker1.log").is_file()  # logs were still fetched


@pytest.mark.parametrize("bad,timeout", [("127.0.0.3", 5), ("192.0.2.1", 2)])  # closed port; TEST-NET-1 (no route)
def test_unreachable_host_fails_fast_naming_it(sshd, tmp_path, bad, timeout, tiny_checkpoint):
    hosts = tmp_path / "ip_info"
    hosts.write_text(f"127.0.0.1\n{bad}\n")
    t0 = time.monotonic()
    r = dejavu_run([*sshd.overrides(hosts), "topology=disagg", "entry=runners.standin", "logger=none",
                    *tiny_model_args(tiny_checkpoint("llama-gqa-bias")), f"cluster.ssh.connect_timeout={timeout}",
                    f"hydra.run.dir={tmp_path / 'run'}"], timeout=120)
    elapsed = time.monotonic() - t0
    assert r.returncode == 3, r.stderr[-2000:]
    assert bad in r.stderr and "unreachable" in r.stderr and "nothing was started" in r.stderr
    assert elapsed < timeout + 20
    assert not (tmp_path / "run" / "logs" / "controller.log").exists()


def test_kill_host_kills_every_process_there(sshd, two_hosts, tmp_path):
    from runners.ssh import SSHRunner
    from runners.validate import check

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            *sshd.overrides(two_hosts), "topology=disagg", "entry=runners.standin", "logger=none",
            "cluster.setup=pythonpath", "+cluster.env.DEJAVU_STANDIN_HOLD_S=300", "model=opt-125m"])
    run = tmp_path / "run"
    run.mkdir()
    runner = SSHRunner(check(cfg), run)
    plan = runner.prepare()
    try:
        runner.start(plan)
        wait_for_text(sshd.remote_dir / "runs" / runner.run_id / "logs" / "controller.log", "[2/2]", timeout=60)
        runner.kill_host("127.0.0.2")
        deadline = time.monotonic() + 10
        while (states := runner.poll())["worker1"] is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert states["worker1"] == 137  # gone, killed
        assert states["controller"] is None and states["worker0"] is None  # 127.0.0.1's processes live on
    finally:
        runner.stop()
        runner.fetch()
        runner.close()
    (run / "launch.json").write_text(json.dumps({"procs": [{"env": {"DEJAVU_RUN_ID": runner.run_id}}]}))
    assert leftover_processes(run) == []
    # The wiring, as the stand-in workers saw it: rank i came through the SSH server address of line i of
    # the host list, with the seed's environment.
    seen = json.loads((run / "standin.json").read_text())["workers"]
    assert seen["0"]["env"]["SSH_CONNECTION"].split()[2] == "127.0.0.1"
    assert seen["1"]["env"]["SSH_CONNECTION"].split()[2] == "127.0.0.2"
    for rank, w in seen.items():
        env = w["env"]
        assert env["MASTER_ADDR"] == env["PROMPT_MASTER_ADDR"] == env["DEJAVU_CONTROLLER_IP"] == "127.0.0.1"
        assert env["TOKEN_MASTER_ADDR"] == "127.0.0.2" and env["NCCL_COMM_ID"].startswith("127.0.0.1:")
        assert w["argv"][w["argv"].index("--rank") + 1] == rank
    assert (run / "pids/127.0.0.2.pids").read_text().split() == ["worker1", str(seen["1"]["pgid"])]
