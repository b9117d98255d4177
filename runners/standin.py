"""A model-free controller and worker with the seed's flags: checks a cluster's wiring in seconds.

`dejavu-run entry=runners.standin runner=ssh cluster=ip_info` starts exactly what a real run starts —
same hosts, ranks, flags, environment, log files, process groups — but each worker only connects to the
controller (JSON lines over TCP, never pickle) and reports its rank, host and environment; the controller
writes a `standin.json` of what it saw and a small results folder. The runners' tests use it too.

Test hooks (environment): DEJAVU_STANDIN_HOLD_S keeps the controller waiting that long before it
finishes; DEJAVU_STANDIN_CRASH_RANK makes that worker exit with code 3 after saying hello.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

ENV_KEYS = ("DEJAVU_CONTROLLER_IP", "DEJAVU_CONTROLLER_PORT", "MASTER_ADDR", "MASTER_PORT", "PROMPT_MASTER_ADDR",
            "TOKEN_MASTER_ADDR", "NCCL_COMM_ID", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "DEJAVU_RUN_ID",
            "SSH_CONNECTION")


def controller(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="standin controller")
    p.add_argument("--num_peers", type=int, required=True)
    p.add_argument("--controller_ip", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--run_dir", default=".")
    p.add_argument("--num_requests", type=int, default=4)
    p.add_argument("--output_len", type=int, default=4)
    p.add_argument("--workers_ip_file")
    args, rest = p.parse_known_args(argv)
    hold = float(os.environ.get("DEJAVU_STANDIN_HOLD_S", "0"))
    t0 = time.time()
    srv = socket.create_server((args.controller_ip, args.port))
    srv.settimeout(120)
    print(f"standin controller listening on {args.controller_ip}:{args.port}, waiting for {args.num_peers} workers",
          flush=True)
    seen, conns = {}, []
    while len(seen) < args.num_peers:
        conn, addr = srv.accept()
        hello = json.loads(conn.makefile("r").readline())
        hello["peer_addr"] = addr[0]
        seen[hello["rank"]] = hello
        conns.append(conn)
        print(f"worker {hello['rank']} from {hello['hostname']} ({addr[0]}) ready [{len(seen)}/{args.num_peers}]",
              flush=True)
        _write_seen(args.run_dir, argv, rest, seen)  # as it goes: a run stopped half-way still shows who came
    end = time.time() + hold
    done = 0
    while time.time() < end or done < args.num_requests:
        time.sleep(min(0.2, max(0.0, end - time.time())))
        if done < args.num_requests:
            done += 1
            print(f"progress: {done}/{args.num_requests} requests", flush=True)
    for c in conns:
        c.sendall(b'{"bye": true}\n')
        c.close()
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # A results folder through the results package, as the real controller writes it (no plots: quick).
    from dejavu.records import RequestRecord
    from dejavu.results.writer import write_results

    wall = time.time() - t0
    records = [RequestRecord(id=i, prompt_ids=[1, 2, 3], output_ids=[(i + k) % 7 for k in range(args.output_len)],
                             arrival_s=0.0, first_token_s=0.01 * (i + 1), finish_s=wall, status="ok")
               for i in range(args.num_requests)]
    write_results(run_dir, records, [], None, {"standin": True, "argv": argv}, plots=False)
    print(f"standin controller done: {args.num_requests} requests, {len(seen)} workers", flush=True)
    return 0


def _write_seen(run_dir: str, argv: list[str], rest: list[str], seen: dict) -> None:
    path = Path(run_dir) / "standin.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"argv": argv, "unparsed": rest, "workers": seen}, indent=1))


def worker(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="standin worker")
    p.add_argument("--rank", type=int)
    p.add_argument("--world_size", type=int)
    args, _ = p.parse_known_args(argv)
    rank = args.rank if args.rank is not None else int(os.environ.get("OMPI_COMM_WORLD_RANK", "-1"))
    ip, port = os.environ["DEJAVU_CONTROLLER_IP"], int(os.environ["DEJAVU_CONTROLLER_PORT"])
    deadline = time.time() + 60
    while True:
        try:
            conn = socket.create_connection((ip, port), timeout=5)
            break
        except OSError:
            if time.time() > deadline:
                print(f"worker {rank}: cannot reach the controller at {ip}:{port}", file=sys.stderr)
                return 2
            time.sleep(0.1)
    hello = {"rank": rank, "hostname": socket.gethostname(), "pid": os.getpid(), "pgid": os.getpgid(0),
             "argv": argv, "env": {k: os.environ.get(k) for k in ENV_KEYS}}
    conn.sendall((json.dumps(hello) + "\n").encode())
    print(f"worker {rank}: connected to {ip}:{port}", flush=True)
    if os.environ.get("DEJAVU_STANDIN_CRASH_RANK") == str(rank):
        print(f"worker {rank}: crashing on purpose (DEJAVU_STANDIN_CRASH_RANK)", file=sys.stderr, flush=True)
        return 3
    conn.settimeout(None)
    conn.makefile("r").readline()
    print(f"worker {rank}: done", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("controller", "worker"):
        print("usage: python -m runners.standin {controller,worker} [seed flags]", file=sys.stderr)
        return 2
    return (controller if argv[0] == "controller" else worker)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
