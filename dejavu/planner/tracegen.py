"""Synthetic request-size traces in the seed's format, for users without a trace (``dejavu make-trace``).

The output is what ``workload=trace`` reads (``workload.input_sizes_file``): a JSON list of
``[prompt_size, num_generated_tokens]``. It is SYNTHETIC: a sidecar ``<name>.meta.json`` says so and
records the distributions, their parameters and the seed, so the file can always be told apart from a
real trace and drawn again.

Distributions (``--prompt`` and ``--output``, each ``NAME:key=value,...``):

- ``lognormal:median=M,sigma=S`` — exp(N(ln M, S)), rounded; a long right tail, the usual shape of chat
  prompts and answers (the default prompt is lognormal median 64 sigma 1.0, the default output lognormal
  median 128 sigma 0.8 — chat-like, in the spirit of LMSys-Chat; not fitted to it);
- ``uniform:low=A,high=B`` — integers uniform in [A, B];
- ``fixed:n=N`` — every request the same;
- ``zipf:a=A,max=M`` — Zipf with exponent A > 1, truncated to M.

Every value is clipped to [1, ``--max-prompt``] / [1, ``--max-output``], and a pair whose sum exceeds
``--max-positions`` has its output shortened to fit.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

DISTRIBUTIONS = {"lognormal": ("median", "sigma"), "uniform": ("low", "high"), "fixed": ("n",), "zipf": ("a", "max")}


@dataclass(frozen=True)
class Dist:
    name: str
    params: dict[str, float]

    @classmethod
    def parse(cls, text: str, flag: str = "--prompt") -> "Dist":
        name, _, rest = text.partition(":")
        if name not in DISTRIBUTIONS:
            raise ValueError(f"{flag}={text!r}: unknown distribution {name!r}; one of {', '.join(DISTRIBUTIONS)} "
                             f"(e.g. lognormal:median=64,sigma=1.0)")
        params: dict[str, float] = {}
        for part in filter(None, rest.split(",")):
            k, eq, v = part.partition("=")
            if not eq:
                raise ValueError(f"{flag}={text!r}: {part!r} is not key=value")
            try:
                params[k.strip()] = float(v)
            except ValueError:
                raise ValueError(f"{flag}={text!r}: {k}={v!r} is not a number") from None
        want = DISTRIBUTIONS[name]
        if set(params) != set(want):
            raise ValueError(f"{flag}={text!r}: {name} takes exactly {', '.join(want)}")
        bad = {"lognormal": params.get("median", 1) <= 0 or params.get("sigma", 0) < 0,
               "uniform": not 1 <= params.get("low", 1) <= params.get("high", 1),
               "fixed": params.get("n", 1) < 1,
               "zipf": params.get("a", 2) <= 1 or params.get("max", 1) < 1}[name]
        if bad:
            raise ValueError(f"{flag}={text!r}: parameters out of range (lognormal: median > 0, sigma >= 0; "
                             f"uniform: 1 <= low <= high; fixed: n >= 1; zipf: a > 1, max >= 1)")
        return cls(name, params)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        p = self.params
        if self.name == "lognormal":
            x = rng.lognormal(np.log(p["median"]), p["sigma"], n)
        elif self.name == "uniform":
            x = rng.integers(int(p["low"]), int(p["high"]) + 1, n)
        elif self.name == "fixed":
            x = np.full(n, p["n"])
        else:
            x = np.minimum(rng.zipf(p["a"], n), p["max"])
        return np.maximum(np.rint(x), 1).astype(np.int64)

    def text(self) -> str:
        return f"{self.name}:" + ",".join(f"{k}={v:g}" for k, v in self.params.items())


def generate(n: int, prompt: Dist, output: Dist, *, seed: int = 0, max_prompt: int = 4096, max_output: int = 4096,
             max_positions: int | None = None) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    ps = np.minimum(prompt.sample(rng, n), max_prompt)
    outs = np.minimum(output.sample(rng, n), max_output)
    if max_positions is not None:
        if max_positions < 2:
            raise ValueError(f"--max-positions={max_positions} must be >= 2 (one prompt token and one new token)")
        ps = np.minimum(ps, max_positions - 1)
        outs = np.minimum(outs, max_positions - ps)
    return [[int(p), int(o)] for p, o in zip(ps, outs)]


def write_trace(path: str | Path, sizes: list[list[int]], meta: dict) -> tuple[Path, Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sizes) + "\n")
    side = path.with_name(path.stem + ".meta.json")
    side.write_text(json.dumps({"synthetic": True, "format": "[prompt_size, num_generated_tokens] per request",
                                **meta}, indent=1) + "\n")
    return path, side


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dejavu make-trace", description=__doc__.split("\n\n")[0],
                                epilog="Distributions: lognormal:median=M,sigma=S | uniform:low=A,high=B | fixed:n=N | "
                                       "zipf:a=A,max=M")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--prompt", default="lognormal:median=64,sigma=1.0", help="prompt-size distribution")
    p.add_argument("--output", default="lognormal:median=128,sigma=0.8", help="generated-tokens distribution")
    p.add_argument("--max-prompt", type=int, default=2048)
    p.add_argument("--max-output", type=int, default=1024)
    p.add_argument("--max-positions", type=int, default=None, help="cap prompt + output (the model's context)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="synthetic_trace.json")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        if a.num_requests < 1:
            raise ValueError(f"--num-requests={a.num_requests} must be >= 1")
        prompt, output = Dist.parse(a.prompt, "--prompt"), Dist.parse(a.output, "--output")
        sizes = generate(a.num_requests, prompt, output, seed=a.seed, max_prompt=a.max_prompt,
                         max_output=a.max_output, max_positions=a.max_positions)
    except ValueError as e:
        print(f"dejavu make-trace: error: {e}", file=sys.stderr)
        return 2
    meta = {"generator": "dejavu make-trace", "num_requests": a.num_requests, "seed": a.seed,
            "prompt": asdict(prompt), "output": asdict(output), "max_prompt": a.max_prompt,
            "max_output": a.max_output, "max_positions": a.max_positions}
    path, side = write_trace(a.out, sizes, meta)
    ps, os_ = np.array([s[0] for s in sizes]), np.array([s[1] for s in sizes])
    print(f"SYNTHETIC trace: {len(sizes)} requests, prompt {prompt.text()} (median {np.median(ps):.0f}, mean "
          f"{ps.mean():.0f}), output {output.text()} (median {np.median(os_):.0f}, mean {os_.mean():.0f}), seed {a.seed}")
    print(f"wrote {path} (and {side.name}); use it with workload=trace workload.input_sizes_file={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
