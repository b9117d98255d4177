"""DéjàVuLib: streaming the KV cache between stages, to host memory, to disk and to peers.

- plan.py: partitions (layer range x TP shard of KV heads x batch slots) and the chunk planner;
- staging.py: gather / scatter of non-contiguous cache regions through reusable staging buffers;
- transports/: flush / fetch over local host memory, disk, torch.distributed, MPI, a peer's host memory;
- stream.py: stream_out / stream_in with the naive / buffered / layerwise ladder, swap, replication;
- replicator.py: StepReplicator, the per-token-step replication fast path (set up once per cache:
  reserved host buffers that are the stored replicas, on a GPU one CUDA graph each, replayed per step);
- stats.py: bytes and seconds per path and transport.
"""

from .plan import Box, Chunk, Partition, Plan, make_plan, pipeline
from .staging import StagingPool, StepSlice, gather, gather_step, region, scatter, scatter_step
from .stats import StreamStats
from .replicator import StepReplicator
from .stream import (LADDER, Handle, LayerwiseStreamer, Message, StreamOptions, messages, replicate_box,
                     replicate_step, restore, stream_in, stream_out, swap_in, swap_out)
from .transports import ChunkError, DiskTransport, LocalTransport, Pending, Transport, make_transport

__all__ = [
    "Box", "Chunk", "ChunkError", "DiskTransport", "LocalTransport", "Handle", "LADDER", "LayerwiseStreamer", "Message", "Partition", "Pending", "Plan",
    "StagingPool", "StepReplicator", "StepSlice", "StreamOptions", "StreamStats", "Transport", "gather", "gather_step", "make_plan",
    "make_transport", "messages", "pipeline", "region", "replicate_box", "replicate_step", "restore", "scatter",
    "scatter_step", "stream_in", "stream_out", "swap_in", "swap_out",
]
