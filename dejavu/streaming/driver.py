"""Four CUDA driver calls for the per-token-step issue path, without PyTorch's Python layer.

A token step's replication (``StepReplicator.step``) issues five tiny operations: snapshot the positions,
record an event, make the side stream wait for it, replay a graph, record another event. Through
``Tensor.copy_``, ``Event.record/wait``, ``torch.cuda.set_stream`` and ``CUDAGraph.replay`` that is ~20 µs
of host time per step (measured on an H100 host), more than the step's gather kernel. The same
operations as driver calls on the raw handles PyTorch already owns (``Event.cuda_event``,
``Stream.cuda_stream``, ``CUDAGraph.raw_cuda_graph_exec``) cost a few µs. PyTorch's runtime handles are
the driver's (cudaStream_t is CUstream, cudaEvent_t is CUevent, cudaGraphExec_t is CUgraphExec).

:func:`load` returns None where this cannot work (no libcuda, a PyTorch without raw graph handles, or
``DEJAVU_DRIVER_ISSUE=0``); callers then use the PyTorch calls.
"""

from __future__ import annotations

import ctypes

import torch

from ..model import switches

_c = ctypes.c_void_p


class CudaError(RuntimeError):
    def __init__(self, call: str, code: int, name: str) -> None:
        super().__init__(f"{call} failed: {name} ({code})")
        self.code = code


class Driver:
    """The driver entry points, typed once; every call checks its result."""

    NO_CONTEXT = (201, 709)  # CUDA_ERROR_INVALID_CONTEXT, CUDA_ERROR_CONTEXT_IS_DESTROYED

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._copy = lib.cuMemcpyDtoDAsync_v2
        self._copy.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, _c]
        self._record = lib.cuEventRecord
        self._record.argtypes = [_c, _c]
        self._wait = lib.cuStreamWaitEvent
        self._wait.argtypes = [_c, _c, ctypes.c_uint]
        self._launch = lib.cuGraphLaunch
        self._launch.argtypes = [_c, _c]
        self._name = lib.cuGetErrorName
        self._name.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        for f in (self._copy, self._record, self._wait, self._launch, self._name):
            f.restype = ctypes.c_int

    def _check(self, call: str, code: int) -> None:
        if code:
            name = ctypes.c_char_p()
            self._name(code, ctypes.byref(name))
            raise CudaError(call, code, (name.value or b"?").decode())

    def copy(self, dst: int, src: int, size: int, stream: int) -> None:
        """Device-to-device copy of ``size`` bytes, queued on ``stream``."""
        self._check("cuMemcpyDtoDAsync", self._copy(dst, src, size, stream))

    def record(self, event: int, stream: int) -> None:
        self._check("cuEventRecord", self._record(event, stream))

    def wait(self, stream: int, event: int) -> None:
        self._check("cuStreamWaitEvent", self._wait(stream, event, 0))

    def launch(self, graph_exec: int, stream: int) -> None:
        self._check("cuGraphLaunch", self._launch(graph_exec, stream))


_DRIVER: Driver | None | bool = False  # False: not looked up yet


def load() -> Driver | None:
    """The driver calls, or None where they cannot be used (see the module docstring)."""
    global _DRIVER
    if not switches.get("DEJAVU_DRIVER_ISSUE"):
        return None
    if _DRIVER is False:
        _DRIVER = None
        if torch.cuda.is_available() and hasattr(torch.cuda.CUDAGraph, "raw_cuda_graph_exec"):
            try:
                _DRIVER = Driver(ctypes.CDLL("libcuda.so.1"))
            except (OSError, AttributeError):
                pass
    return _DRIVER
