"""Per-GPU launch configurations: a bench/decode_kernels.py sweep file becomes the tables the kernels use."""

import json

import pytest

from dejavu.model import fused, kernel_tuning


def _row(part, case, m, key, configs, **extra):
    return {"part": part, "case": case, "m": m, "key": key, "mbytes": 1.0,
            "configs": {json.dumps(list(c)): us for c, us in configs.items()}, **extra}


A, B, C = (16, 512, 3, 4), (32, 256, 5, 4), (64, 128, 6, 4)
SWEEP = [
    # m = 1 and 8 share the 16-row bucket: B loses a little at m=1 but wins the sum.
    _row("matmul", "opt.qkv", 1, [6144, 2048], {A: 10.0, B: 10.5, C: 30.0}, cublas_us=20.0),
    _row("matmul", "opt.qkv", 8, [6144, 2048], {A: 12.0, B: 10.0, C: 30.0}, cublas_us=20.0),
    # cuBLAS beats every tiling at m=32 for this shape.
    _row("matmul", "opt.qkv", 32, [6144, 2048], {A: 15.0, C: 14.0}, cublas_us=13.0),
    _row("split", "out", 8, [2048, 2048], {(8, 32, 128, 4, 4): 4.0, (4, 32, 64, 6, 4): 5.0}, cublas_us=6.0),
    _row("attention", "8", 1, [1, 8], {(128, 2, 4, 528): 3.0, (64, 2, 4, 264): 3.5}),
    {"part": "prefill", "case": "prefill opt-1.3b", "b": 1, "wall_ms_triton1": 5.0},
    {"part": "launch", "case": "empty, PDL on", "us_per_kernel": 1.0},
    # A bf16 sweep (--dtype bf16) compares kernels; it must not retune the fp16-swept shapes.
    _row("attention", "8", 1, [1, 8], {(64, 2, 4, 264): 1.0}, dtype="bfloat16"),
]


def test_sweep_file_becomes_the_fastest_config_per_bucket(tmp_path):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(SWEEP))
    t = kernel_tuning.from_sweep(path)
    assert t.skinny[(16, 6144, 2048)] == B  # least total over m = 1 and 8, not m=1's winner
    assert t.skinny[(32, 6144, 2048)] == C
    assert (32, 6144, 2048) in t.cublas_faster and (16, 6144, 2048) not in t.cublas_faster
    assert t.split[(16, 2048, 2048)] == (8, 32, 128, 4, 4)
    assert t.attention[(1, 8)] == (128, 2, 4, 528)
    # Shapes the sweep did not time keep the built-in (H100) tables.
    assert t.skinny[(16, 50272, 2048)] == kernel_tuning.SKINNY[(16, 50272, 2048)]
    assert t.split[(32, 2048, 8192)] == kernel_tuning.SPLIT[(32, 2048, 8192)]
    assert kernel_tuning.Tuning().skinny[(16, 6144, 2048)] == kernel_tuning.SKINNY[(16, 6144, 2048)]


def test_dejavu_tuning_selects_the_tables_the_kernels_read(tmp_path, monkeypatch):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(SWEEP))
    monkeypatch.setenv("DEJAVU_TUNING", str(path))
    assert fused._skinny_config(8, 6144, 2048) == B
    monkeypatch.setenv("DEJAVU_TUNING", "builtin")
    assert fused._skinny_config(8, 6144, 2048) == kernel_tuning.SKINNY[(16, 6144, 2048)]
    monkeypatch.setenv("DEJAVU_TUNING", str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="DEJAVU_TUNING"):
        fused._skinny_config(8, 6144, 2048)


def test_shipped_tuning_files_parse_and_name_real_shapes():
    files = sorted(kernel_tuning.TUNING_DIR.glob("*.json"))
    for path in files:
        t = kernel_tuning.from_sweep(path)
        for (rows, n, k), cfg in t.skinny.items():
            assert rows in (16, 32, 64) and len(cfg) == 4, (path, n, k, cfg)
        for (rows, n, k), (splits, _, block_k, _, _) in t.split.items():
            assert (k // splits) % block_k == 0, (path, n, k)


def test_pdl_early_trigger_is_chosen_per_matmul_kind(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(fused, "_pdl_mode", lambda: "late")
    t = SimpleNamespace(is_cuda=True)
    monkeypatch.delenv("DEJAVU_PDL_EARLY", raising=False)  # default: split-K projections trigger at once
    assert fused._pdl(t, "split")["PDL"] == 1 and fused._pdl(t, "plain")["PDL"] == 2  # plain: after the loop
    assert fused._pdl(t)["PDL"] == 1  # kernels that are not matmuls always trigger right after their wait
    monkeypatch.setenv("DEJAVU_PDL_EARLY", "")
    assert fused._pdl(t, "split")["PDL"] == 2 and fused._pdl(t, "plain")["PDL"] == 2
    monkeypatch.setenv("DEJAVU_PDL_EARLY", "split,plain")
    assert fused._pdl(t, "split")["PDL"] == 1 and fused._pdl(t, "plain")["PDL"] == 1
    monkeypatch.setattr(fused, "_pdl_mode", lambda: "0")
    assert fused._pdl(t, "split") == {"PDL": 0}


def test_tma_matmul_switches_pick_tilings_and_reject_bad_values(monkeypatch):
    """The TMA matmul's tiling per row count and split-K slices, as DEJAVU_TMA_TILE / DEJAVU_TMA_SPLITS
    override them; a value it cannot use is refused by name before any kernel runs."""
    from dejavu.model import skinny_tma

    monkeypatch.delenv("DEJAVU_TMA_TILE", raising=False)
    monkeypatch.delenv("DEJAVU_TMA_SPLITS", raising=False)
    assert skinny_tma.tile(1) == skinny_tma.tile(16) == (64, 256, 4, 4)  # up to 16 rows
    assert skinny_tma.tile(17) == (64, 128, 8, 4)
    assert skinny_tma.splits(4) == 4
    monkeypatch.setenv("DEJAVU_TMA_TILE", "128,64,8")
    assert skinny_tma.tile(1) == (128, 64, 8, 8)  # one warpgroup per 64 rows
    monkeypatch.setenv("DEJAVU_TMA_SPLITS", "8")
    assert skinny_tma.splits(4) == 8
    for name, bad in (("DEJAVU_TMA_TILE", "32,128,4"), ("DEJAVU_TMA_TILE", "64,512,4"),
                      ("DEJAVU_TMA_SPLITS", "two"), ("DEJAVU_TMA_SPLITS", "0")):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=name):
            skinny_tma.tile(1) if name == "DEJAVU_TMA_TILE" else skinny_tma.splits(4)
        monkeypatch.delenv(name)
