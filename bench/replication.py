"""What fault tolerance costs a token stage per step: the serving ``Replicator`` against a real replica store.

A stage that replicates (``failure.with_ft=true``) hands every decode step's new KV slice to its
``Replicator`` (dejavu/worker/replication.py) on the thread that runs the model; the copy to host memory,
the send to the holder's store (another process, as in serving) and the acknowledgement happen
elsewhere. This measures the part the stage's thread pays, step by step, with a simulated decode step
between steps (``--step-ms`` of device work on a GPU, a sleep on the CPU), and checks at the end that the
holder acknowledged every step and holds the bytes it should:

    python bench/replication.py                               # an OPT-1.3B third (8 layers), 8 slots, CPU
    python bench/replication.py --device cuda                 # the same stage on a GPU (fp16)
    python bench/replication.py --device cuda --slots 2 --out /tmp/r.json

Printed: the stage thread's microseconds per step (p50 and mean) against the step time, the bytes per
step, and how long after the last step the holder had acknowledged everything.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_json  # noqa: E402

from dejavu.model.kv_cache import KVCache  # noqa: E402
from dejavu.streaming import StreamStats  # noqa: E402
from dejavu.worker.replication import Replicator  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=8, help="the stage's layers (OPT-1.3B on 3 stages: 8)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--slots", type=int, default=8, help="requests per microbatch")
    p.add_argument("--max-seq", type=int, default=1280)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--step-ms", type=float, default=1.0, help="simulated decode step between replications")
    p.add_argument("--out", default="results/bench/replication.json")
    return p.parse_args(argv)


def cycles_per_ms(device: torch.device) -> float:
    """How many ``torch.cuda._sleep`` cycles last a millisecond on this GPU (measured)."""
    torch.cuda._sleep(1_000_000)  # the first launch loads the kernel
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    torch.cuda._sleep(10_000_000)
    torch.cuda.synchronize(device)
    return 10_000_000 / ((time.perf_counter() - t0) * 1e3)


def simulated_step(device: torch.device, ms: float, cycles: float) -> None:
    if device.type == "cuda":
        torch.cuda._sleep(int(ms * cycles))
        torch.cuda.current_stream(device).synchronize()  # as the serving worker does after each work item
    else:
        time.sleep(ms * 1e-3)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = types.SimpleNamespace(first=0, last=a.layers, cfg=types.SimpleNamespace(num_kv_heads=a.heads))
    cache = KVCache.from_tensor(torch.randn(a.layers, 2, a.slots, a.heads, a.max_seq, a.head_dim, dtype=dtype,
                                            device=device))
    # The holder's store in a process of its own, as in serving.
    store = subprocess.Popen([sys.executable, "-m", "dejavu.streaming.transports.remote"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        address = store.stdout.readline().strip()
        stats = StreamStats()
        rep = Replicator(0, 1, address, model, 0, 1, stats)
        lens = [a.prompt_len] * a.slots
        rep.prompt(0, cache, lens, a.max_seq)
        steps = min(a.steps, a.max_seq - a.prompt_len)
        costs = []
        cycles = cycles_per_ms(device) if device.type == "cuda" else 0.0
        t_start = time.perf_counter()
        for k in range(steps):
            simulated_step(device, a.step_ms, cycles)
            positions = (torch.tensor(lens) + k).tolist()
            t0 = time.perf_counter()
            rep.step(0, cache, k, positions)
            costs.append(time.perf_counter() - t0)
        t_last = time.perf_counter()
        deadline = t_last + 60
        while rep.acked.get(0, -2) < steps - 1 and time.perf_counter() < deadline:
            rep.poll()
            time.sleep(1e-4)
        drained_s = time.perf_counter() - t_last
        acked = rep.acked.get(0, -2) + 1
        overflow = getattr(rep, "overflow_steps", 0)  # before step replicators: no landing buffers to run out of
        tally = stats.as_dict().get("replication", {})
        rep.close()
    finally:
        store.stdin.close()
        store.wait(timeout=10)
    step_bytes = a.layers * 2 * a.slots * a.heads * a.head_dim * cache.data.element_size()
    row = {"device": str(device), "slots": a.slots, "layers": a.layers, "steps": steps, "step_ms": a.step_ms,
           "step_bytes": step_bytes, "stage_us_p50": 1e6 * statistics.median(costs),
           "stage_us_mean": 1e6 * statistics.fmean(costs),
           "stage_share_of_step": statistics.fmean(costs) / (a.step_ms * 1e-3),
           "loop_s": t_last - t_start, "drained_after_last_s": drained_s, "steps_acked": acked, "overflow_steps": overflow,
           "bytes_acked": sum(t["bytes"] for t in tally.values())}
    print(f"{'device':>8} {'slots':>5} {'step KB':>8} {'stage us p50':>12} {'mean':>7} {'of step':>8} "
          f"{'acked':>9} {'drained ms':>10} {'overflow':>8}")
    print(f"{row['device']:>8} {a.slots:>5} {step_bytes / 1024:>8.0f} {row['stage_us_p50']:>12.1f} "
          f"{row['stage_us_mean']:>7.1f} {row['stage_share_of_step']:>8.2%} {acked:>4}/{steps:<4} "
          f"{1e3 * drained_s:>10.1f} {overflow:>8}")
    write_json(a.out, {"args": vars(a), "results": [row]})
    print(f"wrote {a.out}")
    if acked != steps:
        raise SystemExit(f"bench/replication.py: the holder acknowledged {acked} of {steps} steps")
    return row


if __name__ == "__main__":
    main()
