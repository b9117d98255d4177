"""The worker's end of the control plane: a ZeroMQ DEALER to the controller, plus a heartbeat thread.

The main socket carries hello/ready/tokens/stats/errors; only the main thread touches it. The heartbeat
thread owns a second socket: it proves the worker alive even while the main thread sits in a long
forward pass or a blocking receive, takes the controller's Abort (and exits the process at once, since
the main thread may be stuck in a collective with a dead peer), and exits the worker when the controller
has been silent past its deadline, so no worker outlives a dead controller.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

import zmq

from ..protocol import Abort, Arm, Error, Heartbeat, Hello, ProtocolError, Reset, Welcome, from_msg, to_msg

EXIT_ABORTED = 3
EXIT_CONTROLLER_LOST = 4


class ControllerUnreachable(RuntimeError):
    pass


class ControlClient:
    def __init__(self, address: str, rank: int, world_size: int, *, connect_timeout_s: float = 120.0,
                 restart: bool = False, generation: int = 0) -> None:
        self.address, self.rank = address, rank
        self.restart, self.generation = restart, generation
        # Fault tolerance: the newest Reset's generation (the heartbeat thread takes it in).
        self.reset_generation = generation
        self._reset = threading.Condition()
        self.welcome: Welcome | None = None
        self.armed: tuple[str, int] | None = None  # failure scenario: (phase, decode step) to park at
        self._send_lock = threading.Lock()  # the serving thread and the recovery both send on ``main``
        # A context of our own, so close() can wait for the last messages (Stats, Error) to leave.
        self.ctx = zmq.Context()
        self.main = self.ctx.socket(zmq.DEALER)
        self.main.setsockopt(zmq.IDENTITY, f"w{rank}".encode())
        self.main.setsockopt(zmq.LINGER, 2000)
        self.main.connect(address)
        self.offset = 0.0  # worker clock + offset = controller clock
        self.progress = 0  # work items done; the heartbeat reports it
        self.replicated: dict[int, int] = {}  # ubatch -> last replicated step acknowledged (the heartbeat reports it)
        self._hb_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._hello(world_size, connect_timeout_s)

    # ---- clock ----------------------------------------------------------------------------------------
    def now(self) -> float:
        """Seconds on the controller's clock."""
        return time.perf_counter() + self.offset

    def _hello(self, world_size: int, timeout_s: float) -> None:
        sent = time.perf_counter()
        # DEJAVU_HOST: the host-list address the runner started us as (SSH runner), else our name.
        host = os.environ.get("DEJAVU_HOST") or socket.gethostname()
        self.main.send(to_msg(Hello(self.rank, world_size, os.getpid(), host, sent,
                                    restart=self.restart, generation=self.generation)))
        if not self.main.poll(int(timeout_s * 1000)):
            raise ControllerUnreachable(
                f"no answer from the controller at {self.address} within {timeout_s:.0f} s; is it running, and "
                f"do DEJAVU_CONTROLLER_IP / --controller_ip and --port point at it?")
        msg = from_msg(self.main.recv())
        if isinstance(msg, Abort):
            raise ControllerUnreachable(f"the controller refused this worker: {msg.reason}")
        if not isinstance(msg, Welcome):
            raise ProtocolError(f"expected Welcome from the controller, got {type(msg).__name__}")
        got = time.perf_counter()
        self.welcome = msg
        self.reset_generation = max(self.reset_generation, msg.generation)
        # NTP-style: the controller read its clock halfway through the round trip.
        self.offset = msg.controller_time_s - (sent + got) / 2
        self.rtt_s = got - sent
        self.heartbeat_interval_s = msg.heartbeat_interval_s
        self.controller_timeout_s = msg.controller_timeout_s
        self._hb_thread = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        self._hb_thread.start()

    def wait_for_reset(self, after: int) -> int:
        """Block until a Reset past generation ``after`` has come; its generation."""
        with self._reset:
            self._reset.wait_for(lambda: self.reset_generation > after)
            return self.reset_generation

    # ---- main socket ----------------------------------------------------------------------------------
    def send(self, msg) -> None:
        with self._send_lock:
            self.main.send(to_msg(msg))

    def poll(self, timeout_ms: int) -> list:
        """Messages waiting on the main socket, waiting up to ``timeout_ms`` for the first."""
        out = []
        if self.main.poll(timeout_ms):
            while True:
                try:
                    out.append(from_msg(self.main.recv(zmq.NOBLOCK)))
                except zmq.Again:
                    break
        return out

    def report_error(self, message: str, where: str = "", tb: str = "") -> None:
        try:
            self.send(Error(self.rank, message, where, tb))
        except Exception:
            pass

    def close(self, linger_s: float = 5.0) -> None:
        """Stop the heartbeat and wait (up to ``linger_s``) for queued messages to reach the controller."""
        self._stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=2)
        self.main.close(linger=int(linger_s * 1000))
        self.ctx.destroy(linger=int(linger_s * 1000))  # also closes listener sockets left open by a failure

    # ---- heartbeat thread -----------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"hb{self.rank}".encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        heard, seq = time.perf_counter(), 0
        interval_ms = max(1, int(self.heartbeat_interval_s * 1000))
        while not self._stop.is_set():
            seq += 1
            sock.send(to_msg(Heartbeat(self.rank, seq, self.now(), self.progress, dict(self.replicated))))
            deadline = time.perf_counter() + self.heartbeat_interval_s
            while (left := deadline - time.perf_counter()) > 0 and not self._stop.is_set():
                if not sock.poll(min(interval_ms, max(1, int(left * 1000)))):
                    continue
                try:
                    msg = from_msg(sock.recv())
                except ProtocolError:
                    continue
                heard = time.perf_counter()
                if isinstance(msg, Arm):
                    self.armed = (msg.phase, msg.step)
                    continue
                if isinstance(msg, Reset):
                    if msg.generation > self.reset_generation:
                        with self._reset:
                            self.reset_generation = msg.generation
                            self._reset.notify_all()
                        print(f"[worker {self.rank}] reset to failure generation {msg.generation}: "
                              f"{msg.reason}", flush=True)
                    continue
                if isinstance(msg, Abort):
                    print(f"[worker {self.rank}] aborted by the controller: {msg.reason}", file=sys.stderr, flush=True)
                    os._exit(EXIT_ABORTED)
            if time.perf_counter() - heard > self.controller_timeout_s:
                print(f"[worker {self.rank}] the controller has been silent for {self.controller_timeout_s:.0f} s; "
                      f"exiting", file=sys.stderr, flush=True)
                os._exit(EXIT_CONTROLLER_LOST)
        sock.close()


def report_early_error(address: str, rank: int, world_size: int, message: str, wait_s: float = 30.0) -> None:
    """Tell the controller why this worker will not start: the frames wait (up to ``wait_s``) for a
    controller that is still coming up, and are dropped if none does."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, f"w{rank}".encode())
    try:
        sock.connect(address)
        sock.send(to_msg(Hello(rank, world_size, os.getpid(), socket.gethostname(), time.perf_counter())))
        sock.send(to_msg(Error(rank, message, "startup")))
    finally:
        sock.close(linger=int(wait_s * 1000))
        ctx.term()  # returns once the frames are delivered, or after wait_s
