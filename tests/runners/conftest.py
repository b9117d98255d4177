"""Fixtures for the runner tests (helpers live in runner_helpers.py)."""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess

import pytest

from runner_helpers import SSHD, SSHServer, free_port, wait_listening


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    if not os.path.exists(SSHD):
        pytest.skip(f"{SSHD} is missing: install OpenSSH server (apt-get install -y openssh-server) to run SSH tests")
    if not os.path.isdir("/run/sshd"):
        try:
            os.makedirs("/run/sshd", mode=0o755)
        except OSError as e:
            pytest.skip(f"sshd needs its privilege-separation folder /run/sshd and we cannot create it: {e}")
    d = tmp_path_factory.mktemp("sshd")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "client_key")], check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    port = free_port()
    user = getpass.getuser()
    addrs = ("127.0.0.1", "127.0.0.2")
    (d / "sshd_config").write_text("\n".join([
        f"Port {port}", *[f"ListenAddress {a}" for a in addrs],
        f"HostKey {d / 'host_key'}", f"PidFile {d / 'sshd.pid'}", f"AuthorizedKeysFile {d / 'authorized_keys'}",
        "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "UsePAM no", "PermitRootLogin prohibit-password", "StrictModes no", f"AllowUsers {user}",
        "Subsystem sftp internal-sftp", "MaxStartups 100:30:200", "MaxSessions 100", "LogLevel ERROR", "",
    ]))
    log = open(d / "sshd.log", "wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        for a in addrs:
            wait_listening(a, port)
    except RuntimeError:
        proc.kill()
        pytest.fail(f"sshd did not start: {(d / 'sshd.log').read_text()[-2000:]}")
    remote = tmp_path_factory.mktemp("remote")
    yield SSHServer(port, d / "client_key", user, addrs, remote)
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
