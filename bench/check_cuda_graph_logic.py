"""Exercise the CUDA-graph bookkeeping of VisionTower on a machine without CUDA.

Run: ``python bench/check_cuda_graph_logic.py`` (seconds). The ``torch.cuda`` graph/stream calls are
replaced by CPU stand-ins whose "replay" re-runs the captured function into the static output buffer,
so this checks only the control flow of ``llava_vision._CudaGraphCache``: one capture per shape, replay
results, inference-mode and no-grad callers sharing buffers, fallback after a failed capture, the shape
limit, invalidation by ``.to()``, and that the tower is freed without the garbage collector. Real
capture and bit-equality with the eager forward are checked by bench_gpu.py (``graph_matches_eager``).
"""

from __future__ import annotations

import contextlib
import gc
import sys
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402
import torch  # noqa: E402

import llava_vision  # noqa: E402


class _Stream:
    def wait_stream(self, other) -> None:
        pass


class _Graph:
    """Stand-in for torch.cuda.CUDAGraph: replay re-runs the function into the captured output buffer."""

    def replay(self) -> None:
        self.outputs.copy_(self.function(self.inputs))


def install_fake_cuda(fail_next: list[bool], captures: list[int]) -> None:
    def graph_context(graph, capture_error_mode="global"):
        if fail_next[0]:
            fail_next[0] = False
            raise RuntimeError("operation not permitted when stream is capturing")
        captures.append(1)
        return contextlib.nullcontext()

    torch.cuda.Stream = lambda *args, **kwargs: _Stream()
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    torch.cuda.current_stream = lambda *args: _Stream()
    torch.cuda.CUDAGraph = _Graph
    torch.cuda.device = lambda device: contextlib.nullcontext()
    torch.cuda.graph = graph_context


def main() -> int:
    import transformers.generation.utils  # noqa: F401  (import before torch.cuda is patched)

    config = bc.clip_l_336_vision_config(num_layers=3, hidden=64, heads=4, intermediate=128, image_size=56)
    tower = llava_vision.VisionTower(config, (-2,), keep_cls=False).eval().requires_grad_(False)
    fail_next, captures = [False], []
    install_fake_cuda(fail_next, captures)
    tower.enable_cuda_graphs(max_shapes=2)
    cache = tower._cuda_graphs
    original_capture = cache._capture

    def wiring_capture(function, inputs):  # give the stand-in graph what a real capture records
        entry = original_capture(function, inputs)
        if entry is not None:
            entry[2].function, entry[2].inputs, entry[2].outputs = function, entry[0], entry[1]
        return entry

    cache._capture = wiring_capture
    one, two, three = (torch.randn(b, 3, 56, 56) for b in (1, 2, 3))
    checks = {}
    with torch.inference_mode():
        eager = tower._encode(one)
        first, second = cache(tower._encode, one), cache(tower._encode, one * 2)
        checks["replay equals eager"] = torch.equal(first, eager)
        checks["second input replayed correctly"] = torch.equal(second, tower._encode(one * 2))
    with torch.no_grad():
        checks["no_grad caller after inference_mode caller"] = torch.equal(cache(tower._encode, one), eager)
        fail_next[0] = True
        checks["failed capture falls back to eager"] = torch.equal(cache(tower._encode, two), tower._encode(two))
        checks["over the shape limit runs eagerly"] = torch.equal(cache(tower._encode, three), tower._encode(three))
    checks["one capture only"] = len(captures) == 1 and tower.captured_graph_shapes == [(1, 3, 56, 56)]
    tower.float()
    checks[".to() drops graphs and keeps q/k/v fused"] = tower.captured_graph_shapes == [] and tower._qkv_is_fused(0)
    del cache, original_capture, wiring_capture
    gc.disable()
    reference = weakref.ref(tower)
    del tower
    checks["tower freed without the garbage collector"] = reference() is None
    gc.enable()
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
