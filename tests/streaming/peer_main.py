"""One process of a two-process streaming test: rank 0 holds every sender, rank 1 every receiver.

    python peer_main.py gloo <rank> <port> [cpu|cuda]   (torch.distributed, gloo, over 127.0.0.1)
    python peer_main.py nccl <rank> <port>              (rank r on GPU r; needs two GPUs)
    mpirun -n 2 --oversubscribe python peer_main.py mpi [cpu|cuda]

Runs every layout x dtype x mode of streaming_cases through the transport; rank 1 checks the bytes
and both print one "ok" line. Any mismatch or error exits non-zero with the reason.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

import streaming_cases as cases  # noqa: E402
from dejavu.streaming import LADDER, StreamOptions, StreamStats, stream_in, stream_out  # noqa: E402


def run(transport, rank: int, barrier, device: str = "cpu") -> int:
    stats = StreamStats()
    n = 0
    for layout in cases.LAYOUTS:
        plan = cases.plan_for(layout)
        for dname, dtype in cases.DTYPES.items():
            for mode in LADDER:
                opts = StreamOptions.named(mode)
                prefix = f"{layout}/{dname}/{mode}"
                if rank == 0:
                    caches = cases.sender_caches(plan, dtype, device=device)
                    # Every partition's sends are posted before any is waited: one process plays all
                    # senders, and the receiver posts its receives receiver by receiver.
                    handles = [stream_out(c, plan, i, transport, prefix=prefix, peers=[1] * len(plan.receivers),
                                          options=opts, stats=stats) for i, c in enumerate(caches)]
                else:
                    caches = cases.receiver_caches(plan, dtype, device=device)
                    handles = [stream_in(c, plan, j, transport, prefix=prefix, peers=[0] * len(plan.senders),
                                         options=opts, stats=stats) for j, c in enumerate(caches)]
                for h in handles:
                    h.wait()
                if rank == 1:
                    try:
                        cases.check_received(plan, caches, dtype)
                    except AssertionError as e:
                        raise SystemExit(f"{layout} {dname} {mode}: {e}")
                barrier()  # tags restart at 0 for the next case
                n += 1
    moved = sum(t["bytes"] for path in stats.as_dict().values() for t in path.values())
    print(f"ok rank={rank} transport={transport.name} cases={n} bytes={moved}", flush=True)
    return n


def main() -> None:
    kind = sys.argv[1]
    if kind in ("gloo", "nccl"):
        import torch.distributed as dist

        from dejavu.streaming.transports.dist import DistTransport

        rank, port = int(sys.argv[2]), int(sys.argv[3])
        device = sys.argv[4] if len(sys.argv) > 4 else "cpu"
        if kind == "nccl":
            torch.cuda.set_device(rank)
            device = f"cuda:{rank}"
        dist.init_process_group(kind, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        try:
            run(DistTransport(), rank, dist.barrier, device)
        finally:
            dist.destroy_process_group()
    elif kind == "mpi":
        from dejavu.streaming.transports.mpi import MPITransport

        t = MPITransport()
        if t.comm.Get_size() != 2:
            raise SystemExit(f"run with mpirun -n 2, got {t.comm.Get_size()} ranks")
        run(t, t.comm.Get_rank(), t.comm.Barrier, sys.argv[2] if len(sys.argv) > 2 else "cpu")
    else:
        raise SystemExit(f"unknown transport {kind!r}; expected gloo, nccl or mpi")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
