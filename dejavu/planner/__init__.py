"""How to split D machines between prompts and tokens, answered before renting them (paper §4.2.1).

- ``sizes``   — bytes of a model's layers, embeddings, head and KV cache per token, from its shape alone;
- ``profile`` — a profile of prompt and token times measured with our engine (``dejavu profile``), as a
  JSON file the planner and the simulator read;
- ``plan``    — the planner (``dejavu plan``, ``topology=auto``): the paper's balance formula, each side's
  memory floor, which constraint decided, the predicted throughput;
- ``tracegen``— synthetic request-size traces in the seed's format, for users without a trace.

Nothing here needs Hydra: the profiler runs on machines that only have torch.
"""
