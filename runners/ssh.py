"""Processes on the hosts of a host list, over SSH (Fabric): the seed's multi-machine runs.

For every distinct host: check that it answers and has Python, then set up the environment — this
source tree copied over SFTP into ``<remote_dir>/src/<content hash>/`` and, as a wheel built once on this
machine, pip-installed into a venv (``setup=install``: hosts build nothing, so they need neither setuptools
nor ``wheel``), or only put on PYTHONPATH (``pythonpath``), or an existing venv checked
(``existing``). Hosts that turn out to be one machine (same /etc/machine-id) are set up once.

Then the controller (on ``runner.controller_host``, default the first host) and one worker per line of
the host list start under ``setsid``, so each is a process group of its own; the group ids go to
``pids/<host>.pids`` in the remote run folder (``<remote_dir>/runs/<run id>/``). On the end, on Ctrl-C or
a failed start, every group on every host gets SIGTERM then SIGKILL, and a last sweep kills anything still
carrying this run's ``DEJAVU_RUN_ID``; then logs and results come back into the local run folder.
``kill_host(host)`` does the same to one host on request (failure injection).
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import io
import logging
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .plan import Plan, Ports, build, local_ports, write_inputs
from .schema import Config, SetupMode
from .supervise import LaunchError, Outcome, supervise
from .validate import Checked, _is_loopback

# Hydra sets the root logger to INFO; paramiko's per-connection chatter would flood the terminal.
logging.getLogger("paramiko").setLevel(logging.WARNING)

# What a host needs of this tree: the packages, the config tree (model registry) and the benches.
SOURCE_PATHS = ("dejavu", "runners", "conf", "bench", "pyproject.toml", "README.md")
SKIP_PARTS = {"__pycache__", ".pytest_cache", ".hypothesis"}


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def q(s: object) -> str:
    return shlex.quote(str(s))


def source_archive() -> tuple[bytes, str]:
    """This tree as a tar.gz, and a hash of its contents (the remote folder name, so hosts reuse it)."""
    root = repo_root()
    files = []
    for rel in SOURCE_PATHS:
        p = root / rel
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += [f for f in sorted(p.rglob("*")) if f.is_file() and not (set(f.relative_to(root).parts) & SKIP_PARTS)
                      and not f.name.endswith((".pyc", ".egg-info")) and ".egg-info" not in str(f)]
    h = hashlib.sha256()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in files:
            rel = f.relative_to(root).as_posix()
            data = f.read_bytes()
            h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
            info = tarfile.TarInfo(rel)
            info.size, info.mode, info.mtime = len(data), f.stat().st_mode & 0o777, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), h.hexdigest()[:16]


def build_wheel(archive: bytes, digest: str) -> Path:
    """The tree (as archived for the hosts) built into a wheel here, once per content hash. Building needs
    the build backend of pyproject.toml: this environment's when it has it (offline), else pip's isolated
    build environment from the index. Hosts then only install it."""
    cache = Path(tempfile.gettempdir()) / f"dejavu-wheel-{digest}"
    if found := sorted(cache.glob("dejavu-*.whl")):
        return found[0]
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "dist"
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            tar.extractall(src, filter="data")
        errors = []
        for isolation in (["--no-build-isolation"], []):
            cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
                   *isolation, "-w", str(out), str(src)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode == 0:
                break
            errors.append(f"`pip wheel {' '.join(isolation)}`: {(res.stderr or res.stdout).strip()[-400:]}")
        else:
            raise LaunchError("cluster.setup=install: cannot build a wheel of this tree on this machine, so there is "
                              f"nothing to install on the hosts. Install 'setuptools>=70.1' into {sys.prefix} "
                              "(or give pip an index), or use cluster.setup=pythonpath.\n" + "\n".join(errors))
        cache.mkdir(parents=True, exist_ok=True)
        for w in out.glob("dejavu-*.whl"):
            shutil.copy(w, cache / w.name)
    return sorted(cache.glob("dejavu-*.whl"))[0]


def _local_machine() -> str:
    try:
        return Path("/etc/machine-id").read_text().strip() or socket.gethostname()
    except OSError:
        return socket.gethostname()


def _local_py() -> str:
    return "%d.%d" % sys.version_info[:2]


def _launcher_site_packages() -> list[str]:
    """Where this environment's packages live (its own site-packages first, then its base's)."""
    import site

    return [p for p in dict.fromkeys([*site.getsitepackages(), site.getusersitepackages()]) if os.path.isdir(p)]


@dataclass
class Host:
    addr: str
    home: str = ""
    machine: str = ""  # /etc/machine-id (or the address): hosts on one machine share a setup
    python: str = ""  # the interpreter that runs our processes there
    src: str = ""  # the copied source tree
    py: str = ""  # cluster.python's version there, "3.11"


class SSHRunner:
    def __init__(self, checked: Checked, run_dir: Path) -> None:
        self.checked = checked
        self.cfg: Config = checked.cfg
        self.run_dir = Path(run_dir)
        self.run_id = f"{self.run_dir.name}-{uuid.uuid4().hex[:8]}"
        c, r = self.cfg.cluster, self.cfg.runner
        self.controller_host = r.controller_host or c.controller_ip or checked.hosts[0]
        self.controller_ip = c.controller_ip or self.controller_host
        self.addrs = list(dict.fromkeys([self.controller_host, *checked.hosts]))  # distinct, in order
        self.hosts: dict[str, Host] = {a: Host(a) for a in self.addrs}
        self._conns: dict[str, object] = {}
        self.plan: Plan | None = None
        self._offset = 0
        self._exit: dict[str, int | None] = {}
        self._stopped = False
        self._wheel: Path | None = None  # setup=install: this tree's wheel, built here

    # ---- connections -------------------------------------------------------------------------------
    def conn(self, addr: str):
        if addr not in self._conns:
            from fabric import Connection

            s = self.cfg.cluster.ssh
            kw: dict = {"banner_timeout": s.connect_timeout, "auth_timeout": s.connect_timeout}
            if s.key_file:
                kw.update(key_filename=os.path.expanduser(s.key_file), look_for_keys=False, allow_agent=False)
            c = Connection(addr, user=s.user or getpass.getuser(), port=s.port,
                           connect_timeout=max(1, math.ceil(s.connect_timeout)), connect_kwargs=kw)
            if s.strict_host_keys:
                from paramiko import RejectPolicy

                c.client.load_system_host_keys()
                c.client.set_missing_host_key_policy(RejectPolicy())
            self._conns[addr] = c
        return self._conns[addr]

    def sh(self, addr: str, script: str, *, check: bool = True, timeout: float | None = None):
        """Run a shell script on a host; stdin never reads ours (the terminal stays with Ctrl-C)."""
        res = self.conn(addr).run(script, hide=True, warn=True, in_stream=False, timeout=timeout)
        if check and not res.ok:
            raise LaunchError(f"host {addr}: command failed (exit {res.exited}): {script[:200]}\n"
                              f"{(res.stderr or res.stdout).strip()[-2000:]}")
        return res

    def _where(self, addr: str) -> str:
        s = self.cfg.cluster.ssh
        return f"{s.user or getpass.getuser()}@{addr}:{s.port}"

    def close(self) -> None:
        for c in self._conns.values():
            try:
                c.close()
            except Exception:  # noqa: BLE001 — closing a dead connection must not hide the real error
                pass
        self._conns.clear()

    # ---- preflight and environment -------------------------------------------------------------------
    def _probe(self, addr: str) -> Host:
        c = self.cfg.cluster
        script = (f"echo HOME=$HOME; echo MACHINE=$(cat /etc/machine-id 2>/dev/null); "
                  f"{c.python} -c 'import sys; print(\"PY=%d.%d\" % sys.version_info[:2])'")
        try:
            res = self.sh(addr, script, check=False, timeout=self.cfg.cluster.ssh.connect_timeout + 30)
        except (socket.timeout, TimeoutError, OSError, EOFError) as e:
            raise LaunchError(f"host {addr} is unreachable over SSH ({self._where(addr)}): {_reason(e)}; check "
                              f"the address in {self.cfg.cluster.hosts_file}, that sshd listens on port "
                              f"{self.cfg.cluster.ssh.port}, and cluster.ssh.user/key_file") from None
        except Exception as e:  # paramiko's auth and protocol errors
            raise LaunchError(f"host {addr}: SSH login failed ({self._where(addr)}): {_reason(e)}; check "
                              f"cluster.ssh.user and cluster.ssh.key_file") from None
        out = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
        if "PY" not in out:
            raise LaunchError(f"host {addr}: cluster.python={c.python!r} does not run there "
                              f"({(res.stderr or '').strip()[-300:]}); set cluster.python to an interpreter path")
        major, minor = (int(x) for x in out["PY"].split("."))
        if (major, minor) < (3, 11):
            raise LaunchError(f"host {addr}: cluster.python={c.python} is Python {major}.{minor}; need >= 3.11")
        return Host(addr, home=out["HOME"], machine=out.get("MACHINE") or addr, py=out["PY"])

    def _path(self, addr: str, p: str) -> str:
        home = self.hosts[addr].home
        return home + p[1:] if p == "~" or p.startswith("~/") else p

    def _setup(self, addr: str, archive: bytes, digest: str) -> None:
        c = self.cfg.cluster
        h = self.hosts[addr]
        root = self._path(addr, c.remote_dir)
        venv = self._path(addr, c.venv) if c.venv else f"{root}/venv"
        h.src = f"{root}/src/{digest}"
        self.sh(addr, f"mkdir -p {q(root)}/src {q(root)}/runs")
        if not self.sh(addr, f"test -f {q(h.src)}/.complete", check=False).ok:
            tgz = f"{root}/src/{digest}.tar.gz"
            self.conn(addr).put(io.BytesIO(archive), tgz)
            self.sh(addr, f"rm -rf {q(h.src)} && mkdir -p {q(h.src)} && tar xzf {q(tgz)} -C {q(h.src)} && "
                          f"rm -f {q(tgz)} && touch {q(h.src)}/.complete")
        if c.setup == SetupMode.pythonpath:
            h.python = f"{venv}/bin/python" if c.venv else c.python
            self._check_import(addr)
            return
        h.python = f"{venv}/bin/python"
        if c.setup == SetupMode.install:
            self._install(addr, venv, digest)
        self._check_import(addr)

    def _install(self, addr: str, venv: str, digest: str) -> None:
        """The tree's wheel (built once on this machine) pip-installed into the host's venv: nothing is
        built on the host, so it needs neither setuptools nor wheel, and works offline with --no-deps."""
        c, h = self.cfg.cluster, self.hosts[addr]
        # Sharing the interpreter's packages: no pip/setuptools of the venv's own either (ensurepip's old
        # setuptools would shadow the interpreter's); its pip then installs into the venv.
        flags = " --system-site-packages --without-pip" if c.system_site_packages else ""
        made = self.sh(addr, f"test -x {q(venv)}/bin/python || {c.python} -m venv{flags} {q(venv)}", check=False)
        if not made.ok:
            raise LaunchError(f"host {addr}: `{c.python} -m venv{flags}` failed, so cluster.setup=install cannot "
                              f"work there: {(made.stderr or made.stdout).strip()[-400:]}; install the venv module "
                              f"(Debian: apt-get install python3-venv) or use cluster.setup=pythonpath")
        if c.system_site_packages and h.machine == _local_machine() and h.py == _local_py():
            # The launching environment (a venv, a conda env) is on this very machine: the host venv sees
            # its packages, not only the base interpreter's, so what runs dejavu-run here runs there too.
            site = f"{venv}/lib/python{h.py}/site-packages"
            paths = " ".join(q(p) for p in _launcher_site_packages())
            self.sh(addr, f"mkdir -p {q(site)} && printf '%s\\n' {paths} > {q(site)}/_dejavu_launcher.pth")
        pip = self.sh(addr, f"{q(venv)}/bin/python -m pip --version", check=False)
        if not pip.ok:
            raise LaunchError(f"host {addr}: the venv {venv} has no pip ({c.python} lacks it"
                              f"{' and cluster.system_site_packages=true gives the venv none of its own' if flags else ''}); "
                              f"install pip there (Debian: apt-get install python3-pip) or use cluster.setup=pythonpath")
        wheel = f"{h.src}/dist/{self._wheel.name}"
        if not self.sh(addr, f"test -f {q(wheel)}", check=False).ok:
            self.sh(addr, f"mkdir -p {q(h.src)}/dist")
            self.conn(addr).put(str(self._wheel), wheel + ".part")
            self.sh(addr, f"mv {q(wheel + '.part')} {q(wheel)}")
        wheel, py = q(wheel), f"{q(venv)}/bin/python -m pip install -q --disable-pip-version-check"
        # Our version number does not change with the tree: force our package in, then (unless --no-deps)
        # let pip add what it depends on. pip never touches a launching environment outside the venv.
        deps = "" if "--no-deps" in c.pip_args else f" && {py} {' '.join(q(a) for a in c.pip_args)} {wheel}"
        self.sh(addr, f"set -e; if [ \"$(cat {q(venv)}/.dejavu-src 2>/dev/null)\" != {digest} ]; then "
                      f"{py} {' '.join(q(a) for a in c.pip_args)} --no-deps --force-reinstall {wheel}{deps}; "
                      f"echo {digest} > {q(venv)}/.dejavu-src; fi", timeout=1800)

    def _check_import(self, addr: str) -> None:
        h, c = self.hosts[addr], self.cfg.cluster
        pp = f"PYTHONPATH={q(h.src)} " if c.setup == SetupMode.pythonpath else ""
        res = self.sh(addr, f"cd /tmp && {pp}{q(h.python)} -c 'import dejavu, runners'", check=False)
        if not res.ok:
            raise LaunchError(f"host {addr}: {h.python} cannot import dejavu and its dependencies "
                              f"(cluster.setup={c.setup.value}): {(res.stderr or res.stdout).strip()[-500:]}")

    def _check_gpus(self, addr: str) -> None:
        need = self.checked.hosts.count(addr)
        if self.cfg.backend.device != "cuda" or not need:
            return
        res = self.sh(addr, f"{q(self.hosts[addr].python)} -c 'import torch; print(torch.cuda.device_count())'",
                      check=False)
        have = int(res.stdout.strip() or 0) if res.ok and res.stdout.strip().isdigit() else 0
        if have < need:
            raise LaunchError(f"host {addr}: backend.device=cuda needs {need} GPU(s) there (one per worker) "
                              f"but torch sees {have}")

    def _parallel(self, fn, addrs: list[str]) -> list:
        """fn on every host at once; every host's error is reported, not just the first."""
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(addrs)))) as ex:
            futures = {a: ex.submit(fn, a) for a in addrs}
        errors = [str(f.exception()) for f in futures.values() if f.exception() is not None]
        if errors:
            raise LaunchError("\n".join(errors))
        return [f.result() for f in futures.values()]

    def prepare(self) -> Plan:
        """Check every host and set up its environment; write and upload the run's inputs. Nothing runs yet."""
        for host in self._parallel(self._probe, self.addrs):
            self.hosts[host.addr] = host
        archive, digest = source_archive()
        if self.cfg.cluster.setup == SetupMode.install:
            self._wheel = build_wheel(archive, digest)
        by_machine: dict[str, list[str]] = {}
        for a in self.addrs:
            by_machine.setdefault(self.hosts[a].machine, []).append(a)
        self._parallel(lambda a: self._setup(a, archive, digest), [group[0] for group in by_machine.values()])
        for group in by_machine.values():  # the other addresses of one machine reuse its setup
            for a in group[1:]:
                self.hosts[a].src, self.hosts[a].python = self.hosts[group[0]].src, self.hosts[group[0]].python
        self._parallel(self._check_gpus, self.addrs)

        inputs = write_inputs(self.checked, self.run_dir)
        ctl = self.hosts[self.controller_host]
        proc_dir = f"{self._path(self.controller_host, self.cfg.cluster.remote_dir)}/runs/{self.run_id}"
        self.proc_dirs = {a: f"{self._path(a, self.cfg.cluster.remote_dir)}/runs/{self.run_id}" for a in self.addrs}
        env = {"DEJAVU_RUN_ID": self.run_id, "DEJAVU_CONF_DIR": f"{ctl.src}/conf"}
        if self.cfg.cluster.setup == SetupMode.pythonpath:
            env["PYTHONPATH"] = ctl.src
        plan = build(self.checked, inputs, proc_dir=proc_dir, ports=self._ports(), controller_host=self.controller_host,
                     controller_ip=self.controller_ip, extra_env=env)
        if len({self.proc_dirs[a] for a in self.addrs}) != 1 or len({h.src for h in self.hosts.values()}) != 1:
            # Home folders differ between hosts: each process gets its own host's paths.
            for p in plan.procs:
                d, src = self.proc_dirs[p.host], self.hosts[p.host].src
                p.args = [a.replace(proc_dir, d) for a in p.args]
                p.env.update(DEJAVU_CONF_DIR=f"{src}/conf", **({"PYTHONPATH": src} if "PYTHONPATH" in env else {}))
        self._parallel(self._upload_inputs, self.addrs)
        self.plan = plan
        return plan

    def _ports(self) -> Ports:
        if all(_is_loopback(a) for a in self.addrs):
            return local_ports(self.cfg)
        c = self.cfg.cluster

        def free(addr: str, n: int) -> list[int]:
            code = ("import socket\nss=[socket.socket() for _ in range(%d)]\n"
                    "[s.bind(('', 0)) for s in ss]\nprint(' '.join(str(s.getsockname()[1]) for s in ss))" % n)
            res = self.sh(addr, f"{q(self.hosts[addr].python)} -c {q(code)}")
            return [int(x) for x in res.stdout.split()]

        ctl = c.controller_port or free(self.controller_host, 1)[0]
        m = free(self.checked.hosts[0], 2)
        return Ports(ctl, c.master_port or m[0], c.nccl_port or m[1])

    def _upload_inputs(self, addr: str) -> None:
        d = self.proc_dirs[addr]
        self.sh(addr, f"mkdir -p {q(d)}/inputs {q(d)}/logs {q(d)}/pids")
        for f in sorted((self.run_dir / "inputs").iterdir()):
            self.conn(addr).put(str(f), f"{d}/inputs/{f.name}")

    # ---- running -----------------------------------------------------------------------------------
    def _start(self, proc, again: bool = False) -> None:
        d, h = self.proc_dirs[proc.host], self.hosts[proc.host]
        # DEJAVU_HOST: which host of the list it belongs to, so that kill_host(host) finds exactly these even
        # when several addresses of the list are one machine.
        env = " ".join(f"{k}={q(v)}" for k, v in {**proc.env, "DEJAVU_HOST": proc.host}.items())
        cmd = " ".join(q(a) for a in [h.python, "-u", "-m", self.plan.entry, proc.role, *proc.args])
        n = proc.name
        # setsid: the process group of its own whose id we record; the sh wrapper keeps the exit code.
        # A restarted rank (fault tolerance) keeps its name: its log goes on, its old exit code goes.
        wrapper = f'echo $$ > logs/{n}.pid; "$@" >> logs/{n}.log 2>&1 < /dev/null; echo $? > logs/{n}.rc'
        # The background command must be a simple command, not a list (`cd x && cmd &`): bash runs a list in
        # a subshell that keeps the SSH channel's output open until the process ends.
        clear = f"rm -f logs/{n}.rc logs/{n}.pid; " if again else ""
        script = (f"cd {q(d)} || exit 1; {clear}env {env} nohup setsid sh -c {q(wrapper)} sh {cmd} > /dev/null 2>&1 < /dev/null & "
                  f"for i in $(seq 100); do [ -s logs/{n}.pid ] && break; sleep 0.05; done; "
                  f"echo \"{n} $(cat logs/{n}.pid)\" >> pids/{q(proc.host)}.pids; cat logs/{n}.pid")
        res = self.sh(proc.host, script)
        if not res.stdout.strip().isdigit():
            raise LaunchError(f"host {proc.host}: {n} did not start: {res.stdout.strip()} {res.stderr.strip()}")

    def start(self, plan: Plan) -> None:
        """Start the controller, then every worker (they retry until the controller listens)."""
        self._start(plan.controller)
        for w in [*plan.workers, *plan.spares]:
            self._start(w)

    def run(self, plan: Plan) -> Outcome:
        try:
            self.start(plan)
            driver = None
            if self.cfg.failure.recoverable:
                from .failures import FailureDriver

                driver = FailureDriver(self, plan, self.cfg, lambda text: print(text, end="", flush=True))
            outcome = supervise(self, self.cfg.runner, driver=driver)
        except BaseException:
            self.stop()
            self.fetch()
            self.close()
            raise
        self.fetch()
        self.close()
        return outcome

    # ---- ProcessSet ------------------------------------------------------------------------------------
    def poll(self) -> dict[str, int | None]:
        def host_state(addr: str) -> dict[str, int | None]:
            names = [p.name for p in self.plan.procs if p.host == addr]
            loop = " ".join(names)
            script = (f"cd {q(self.proc_dirs[addr])}; for n in {loop}; do if [ -s logs/$n.rc ]; then echo \"$n $(cat logs/$n.rc)\"; "
                      f"elif [ -s logs/$n.pid ] && kill -0 $(cat logs/$n.pid) 2>/dev/null; then echo \"$n run\"; "
                      f"else echo \"$n gone\"; fi; done")
            res = self.sh(addr, script, check=False, timeout=60)
            out: dict[str, int | None] = {}
            for line in res.stdout.splitlines():
                name, state = line.split()
                # "gone": killed before it could record an exit code (SIGKILL to its group, a dead host).
                out[name] = None if state == "run" else (137 if state == "gone" else int(state))
            return out

        if self._stopped:
            return dict(self._exit)
        states: dict[str, int | None] = {}
        for part in self._parallel(host_state, sorted({p.host for p in self.plan.procs})):
            states.update(part)
        self._exit = states
        return states

    def new_output(self) -> str:
        if self.plan is None or self._stopped:
            return ""
        d = self.proc_dirs[self.controller_host]
        res = self.sh(self.controller_host, f"tail -c +{self._offset + 1} {q(d)}/logs/controller.log 2>/dev/null "
                                            f"| head -c 1048576 | base64 | tr -d '\\n'", check=False)
        data = base64.b64decode(res.stdout.strip())
        cut = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
        self._offset += cut
        return data[:cut].decode("utf-8", "replace")

    def _sweep(self, addr: str, sig: str) -> str:
        """Shell: signal every process whose environment says it is this run's, on this host of the list."""
        run, host = q(f"DEJAVU_RUN_ID={self.run_id}"), q(f"DEJAVU_HOST={addr}")
        return (f"for p in /proc/[0-9]*; do e=$(tr '\\0' '\\n' < $p/environ 2>/dev/null) || continue; "
                f"echo \"$e\" | grep -qxF {run} && echo \"$e\" | grep -qxF {host} && kill -{sig} ${{p#/proc/}} 2>/dev/null; "
                f"done; true")

    def _kill_script(self, addr: str, term_s: float) -> str:
        d = q(self.proc_dirs[addr])
        tries = max(1, int(term_s / 0.2))
        return (f"pgs=$(awk '{{print $2}}' {d}/pids/{q(addr)}.pids 2>/dev/null); "
                f"for g in $pgs; do kill -TERM -- -$g 2>/dev/null; done; "
                f"for i in $(seq {tries}); do alive=0; for g in $pgs; do kill -0 -- -$g 2>/dev/null && alive=1; done; "
                f"[ $alive = 0 ] && break; sleep 0.2; done; "
                f"for g in $pgs; do kill -KILL -- -$g 2>/dev/null; done; "
                # Anything of this run that left its group (it cannot have left its environment).
                + self._sweep(addr, "KILL"))

    def stop(self) -> None:
        if self._stopped or not hasattr(self, "proc_dirs"):
            return
        try:
            self.poll()
        except Exception:  # noqa: BLE001 — a host that died must not stop us from cleaning the others
            pass
        errors = []
        for addr in self.addrs:
            try:
                self.sh(addr, self._kill_script(addr, 5.0), check=False, timeout=60)
            except Exception as e:  # noqa: BLE001
                errors.append(f"host {addr}: could not stop processes: {_reason(e)}")
        self._stopped = True
        for name, code in self._exit.items():
            if code is None:
                self._exit[name] = 143  # stopped by us
        if errors:
            print("dejavu-run: " + "; ".join(errors))

    def signal(self, name: str, sig: int, pid: int | None = None, host: str | None = None) -> None:
        """Signal one process's group on its host (failure injection, or a hung rank before its restart);
        by ``pid`` when given (a spare may have become that rank), else by the name's recorded group."""
        proc = next(p for p in self.plan.procs if p.name == name)
        addr = host if host in self.proc_dirs else proc.host
        if pid is not None:
            # Every process we start leads its own group (setsid); the group id is the recorded pid.
            self.sh(addr, f"kill -{int(sig)} -- -{int(pid)} 2>/dev/null || kill -{int(sig)} {int(pid)} 2>/dev/null; true",
                    check=False)
            return
        d = q(self.proc_dirs[proc.host])
        self.sh(proc.host, f"g=$(cat {d}/logs/{q(name)}.pid 2>/dev/null) && kill -{int(sig)} -- -$g 2>/dev/null; true",
                check=False)

    def interpreter(self, host: str) -> str:
        return self.hosts[host].python

    def write_file(self, host: str, name: str, text: str) -> str:
        path = f"{self.proc_dirs[host]}/{name}"
        self.conn(host).put(io.BytesIO(text.encode()), path)
        self.sh(host, f"chmod +x {q(path)}", check=False)
        return f"{host}:{path}"

    def restart(self, proc) -> None:
        """Start one process again on its host, over the same connection."""
        self._start(proc, again=True)

    def kill_host(self, addr: str, sig: str = "KILL") -> None:
        """Kill every process of this run on one host of the list at once (failure injection): their
        process groups, and any process whose environment marks it as this run's on that host. The
        supervisor then sees them as gone (exit code 137)."""
        d = q(self.proc_dirs[addr])
        self.sh(addr, f"for g in $(awk '{{print $2}}' {d}/pids/{q(addr)}.pids 2>/dev/null); do kill -{sig} -- -$g 2>/dev/null; done; "
                      + self._sweep(addr, sig), check=False)

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.run_dir / "logs" / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # ---- results -------------------------------------------------------------------------------------
    def fetch(self) -> None:
        """Every host's part of the remote run folder (logs, pids, the controller's results) comes back."""
        if not hasattr(self, "proc_dirs"):
            return
        for addr in self.addrs:
            d = self.proc_dirs[addr]
            tgz = f"{d}.{addr}.tgz"
            try:
                self.sh(addr, f"cd {q(d)} && tar czf {q(tgz)} --exclude=./inputs .", timeout=600)
                with tempfile.TemporaryDirectory() as tmp:
                    local = Path(tmp) / "part.tgz"
                    self.conn(addr).get(tgz, str(local))
                    with tarfile.open(local) as tar:
                        try:
                            tar.extractall(self.run_dir, filter="data")  # no absolute paths or links out
                        except TypeError:  # Python < 3.11.4 has no filters
                            tar.extractall(self.run_dir)
                self.sh(addr, f"rm -f {q(tgz)}", check=False)
            except Exception as e:  # noqa: BLE001 — fetch what we can from the other hosts
                print(f"dejavu-run: could not fetch the run folder from host {addr}: {_reason(e)}")


def _reason(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return f"{type(e).__name__}: {text}" if type(e).__name__ not in text else text
