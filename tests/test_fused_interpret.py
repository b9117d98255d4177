"""The fused norm + matmul kernel (``fused.norm_skinny_mm``) in Triton's CPU interpreter: it must equal the
two-step reference (the norm module, then ``x @ w.T + b`` and the activation) and write the new residual
exactly; and the fused pre-norm pass must give the same logits with it as without it.

Skipped where Triton is not installed (CI). The interpreter must be switched on before Triton compiles the
kernels, so the checks run in a child process. The interpreter's tl.dot is wrong on bf16, so bf16 is
checked on the GPU only (tests/test_perf_paths.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.runtime.interpreter as I
    if hasattr(I, "_patch_lang_tensor"):
        _orig = I._patch_lang_tensor
        def _patched(tensor, scope):  # triton 3.6 + numpy >= 2.4: int() of a 1-element array
            _orig(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
        I._patch_lang_tensor = _patched
    sys.path[:0] = [{root!r}, {tests!r}]
    import torch
    import torch.nn.functional as F
    from dejavu.model import fused
    from dejavu.model.layers import RMSNorm

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    def reference(x, d, db, norm, w, b, act):
        os.environ["DEJAVU_TRITON"] = "0"  # the modules' plain PyTorch path
        h = x + (d + db if db is not None else d) if d is not None else x
        y = F.linear(norm(h), w, b)
        os.environ["DEJAVU_TRITON"] = "1"
        if act == 1:
            y = F.relu(y)
        if act == 2:
            gate, up = y.split(y.shape[-1] // 2, -1)
            y = F.silu(gate) * up
        return h, y

    torch.manual_seed(0)
    K = 200  # not a multiple of the K tile: the masked tail must not count in the statistics
    cases = 0
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        for m in (1, 3, 8, 32) if dtype == torch.float32 else (1, 8, 32):
            x = torch.randn(m, K, dtype=dtype) + 0.5  # an offset, so that LayerNorm's mean matters
            d, db = torch.randn(m, K, dtype=dtype), torch.randn(K, dtype=dtype)
            rms = RMSNorm(K, 1e-5).to(dtype)
            rms.weight.data.uniform_(0.5, 1.5)
            ln = torch.nn.LayerNorm(K, eps=1e-5).to(dtype)
            ln.weight.data.uniform_(0.5, 1.5)
            ln.bias.data.normal_()
            bare_ln = torch.nn.LayerNorm(K, elementwise_affine=False).to(dtype)
            w, w2 = torch.randn(96, K, dtype=dtype) / K ** 0.5, torch.randn(160, K, dtype=dtype) / K ** 0.5
            bias = torch.randn(96, dtype=dtype)
            for norm in (rms, ln, bare_ln) if dtype == torch.float32 else (rms, ln):
                # (delta, its bias, weight, matmul bias, act): with and without each part, and every
                # epilogue (none, ReLU, SwiGLU on [gate; up]).
                for delta, dbias, wt, b, act in ((d, db, w, bias, 0), (d, None, w, bias, 1), (d, db, w2, None, 2),
                                                 (None, None, w, None, 0), (None, None, w2, None, 2)):
                    # 3 or 2 programs over 4 K-tiles: every slice of the new h is stored, once. The
                    # statistics pass over 1 to 4 tiles (the last one partial).
                    cfg = ((32, 64, 2, 4), (64, 64, 2, 4))[cases % 2]
                    fused.NORM_STAT_ELEMS = (4096, 512)[cases // 2 % 2]
                    h, y = fused.norm_skinny_mm(x, delta, dbias, norm, wt, b, act, config=cfg)
                    h_ref, y_ref = reference(x, delta, dbias, norm, wt, b, act)
                    where = (dtype, m, type(norm).__name__, act, delta is None, dbias is None, cfg)
                    assert torch.equal(h, h_ref), where
                    assert (h is x) == (delta is None), where  # no copy when there is no add
                    assert rel(y, y_ref) < tol, (where, rel(y, y_ref))
                    cases += 1
            _, y = fused.norm_skinny_mm(x, d, db, rms, w2, None, 2, keep_h=False)
            assert _ is None and rel(y, reference(x, d, db, rms, w2, None, 2)[1]) < tol
    print("kernel cases", cases)

    # The pass: decode-sized steps of tiny models in fp16, the norm folded into the matmuls or not.
    import tiny_models as tm
    from dejavu.engine import build_stages
    from dejavu.model.config import ModelConfig
    from dejavu.model.weights import HFCheckpoint
    calls = []
    _norm_skinny_mm = fused.norm_skinny_mm
    fused.norm_skinny_mm = lambda *a, **k: calls.append(1) or _norm_skinny_mm(*a, **k)
    for name in ("llama", "opt"):  # RMSNorm + SwiGLU; LayerNorm + biases + ReLU
        folder = getattr(tm, name)(sys.argv[1] + "/" + name, layers=2)
        stage = build_stages(ModelConfig.from_folder(folder), HFCheckpoint(folder), 1, dtype="fp16")[0]
        prompts = torch.tensor([[5, 7, 9, 11, 3], [4, 8, 12, 16, 20]])
        logits = []
        calls.clear()
        for on in ("1", "0"):
            os.environ["DEJAVU_NORM_MATMUL"] = on
            cache = stage.new_cache(2, 16)
            out = [stage(prompts, torch.arange(5).expand(2, -1), cache, torch.tensor([4, 4]))]
            for step in range(1):
                x = out[-1].argmax(-1, keepdim=True)
                out.append(stage(x, torch.full((2, 1), 5 + step), cache, torch.zeros(2, dtype=torch.long)))
            logits.append(torch.stack(out))
        assert rel(logits[0], logits[1]) < 5e-3, (name, rel(logits[0], logits[1]))
        assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1)), name
        # Taken at every norm (2 a layer and the head's) of both steps, only while switched on.
        assert len(calls) == 2 * (2 * 2 + 1), (name, len(calls))
    print("ok")
""")


def test_norm_matmul_kernel_and_pass_in_interpreter(tmp_path):
    pytest.importorskip("triton")
    script = _SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"))
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]
