"""Before launch: the KV memory of every worker that decodes, against topology.kv_memory_gb and, with
topology.swapping, the host swap space against the memory this machine has available.

The same sizing and messages as the workers' own check at start-up (``CachePool.plan``, which also
covers a GPU's free memory when no budget is set): :mod:`dejavu.worker.swap`.
"""

from __future__ import annotations

from dejavu.worker.swap import CONFIG_NAMES, GB, check_kv, host_available, host_problem, kv_need

from .schema import Config


def kv_memory_problems(cfg: Config, model_config, hosts: list[str]) -> list[str]:
    t, b = cfg.topology, cfg.backend
    problems: list[str] = []
    if t.resident_buffers < 2:
        problems.append(f"topology.resident_buffers={t.resident_buffers} must be >= 2 (the microbatch a stage runs "
                        f"and the one it runs next)")
    if t.inflight_ubatches is not None and t.inflight_ubatches < 1:
        problems.append(f"topology.inflight_ubatches={t.inflight_ubatches} must be >= 1 (or null: one per stage)")
    if t.kv_memory_gb is not None and not t.kv_memory_gb > 0:
        problems.append(f"topology.kv_memory_gb={t.kv_memory_gb} must be > 0 (GB of device memory for KV buffers "
                        f"per worker), or null")
    if problems or model_config is None or cfg.bench is not None or not (t.swapping or t.kv_memory_gb is not None):
        return problems
    import torch

    from dejavu.engine import split_layers
    from dejavu.model.config import parse_dtype
    from dejavu.model.kv_cache import CacheShape

    from .validate import longest_request

    tp, stages = t.tensor_parallelism, t.num_token_peers
    if stages < 1 or tp < 1 or stages > model_config.num_layers or model_config.num_kv_heads % tp:
        return problems  # reported by the topology checks
    try:
        dtype = (torch.float16 if b.device == "cuda" else torch.float32) if b.inference_data_type == "auto" \
            else parse_dtype(b.inference_data_type)
        max_seq = longest_request(cfg)
    except Exception:  # noqa: BLE001 - a bad data type or workload is reported by its own check
        return problems
    max_seq = max_seq or min(model_config.max_positions, 2048)
    inflight = t.inflight_ubatches or stages
    budget = None if t.kv_memory_gb is None else int(t.kv_memory_gb * GB)
    source = f"topology.kv_memory_gb={t.kv_memory_gb:g}" if budget is not None else ""
    first_token_rank = t.num_prompt_peers * tp
    host_need: dict[str, int] = {}
    pipeline = "token stage" if t.num_prompt_peers else "stage"
    for s, (lo, hi) in enumerate(split_layers(model_config.num_layers, stages)):
        shape = CacheShape(hi - lo, t.ubatch_size, model_config.num_kv_heads // tp, 1, model_config.head_dim)
        need = kv_need(shape, dtype, ubatch=t.ubatch_size, max_seq=max_seq, max_positions=model_config.max_positions,
                       inflight=inflight, swapping=t.swapping, resident=t.resident_buffers)
        ranks = [first_token_rank + s * tp + k for k in range(tp)]
        found = check_kv(need, budget, source, names=CONFIG_NAMES, host=None,
                         who=f"{pipeline} {s} (worker{'s' if tp > 1 else ''} {', '.join(map(str, ranks))})")
        if found:
            problems.extend(found)
            break  # one stage says it; the others differ by a layer at most
        for r in ranks:
            if r < len(hosts):
                host_need[hosts[r]] = host_need.get(hosts[r], 0) + need.host_bytes
    local = {h: n for h, n in host_need.items() if h in ("localhost", "::1") or h.startswith("127.")}
    if not problems and t.swapping and local:
        avail = host_available()
        total = sum(local.values())
        if avail is not None and total > avail:
            problems.append(host_problem(total, avail, f"{inflight} microbatches in flight x every decoding worker on "
                                                       f"this machine", names=CONFIG_NAMES, who="this machine"))
    return problems
