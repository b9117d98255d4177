"""A model's memory in bytes, from its shape only (no weights): what the planner's memory floors need.

The counts come from our own blocks built on the meta device, so they are exact for this engine
(biases, norms, GQA). A stage that holds the embeddings also counts them, and the stage with the LM
head counts the head, even where the two are tied: pipeline stages keep their own copies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..model.config import ModelConfig, parse_dtype


@dataclass(frozen=True)
class ModelSizes:
    num_layers: int
    layer_bytes: int  # weights of one decoder layer
    embed_bytes: int  # token (and position) embeddings: the first stage holds them
    head_bytes: int  # final norm + LM head: the last stage holds them
    kv_bytes_per_token_layer: int  # keys + values of one token in one layer
    dtype: str

    @property
    def weight_bytes(self) -> int:
        return self.num_layers * self.layer_bytes + self.embed_bytes + self.head_bytes

    def kv_bytes(self, tokens: int, layers: int | None = None) -> int:
        return tokens * self.kv_bytes_per_token_layer * (self.num_layers if layers is None else layers)

    def to_dict(self) -> dict:
        return asdict(self)


def _param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_sizes(cfg: ModelConfig, dtype: str | torch.dtype = "fp16") -> ModelSizes:
    from ..model.stage import family_module
    from ..model.tp import SingleProcess

    dt = parse_dtype(dtype)
    elem = torch.empty((), dtype=dt).element_size()
    fam = family_module(cfg.family)
    comm, shared = SingleProcess(), {}
    with torch.device("meta"):
        embed, block, head = fam.Embedding(cfg, comm), fam.make_block(cfg, comm, shared), fam.Head(cfg, comm)
    return ModelSizes(num_layers=cfg.num_layers, layer_bytes=_param_count(block) * elem,
                      embed_bytes=_param_count(embed) * elem, head_bytes=_param_count(head) * elem,
                      kv_bytes_per_token_layer=cfg.kv_bytes_per_token_per_layer(dt),
                      dtype=str(dt).removeprefix("torch."))
