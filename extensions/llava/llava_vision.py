"""Vision tower and projector: pixels ``[B, 3, S, S]`` -> image embeddings ``[B, N, H_lm]``.

The tower runs only up to the deepest selected layer (later layers and ``post_layernorm`` are never
built), and keeps no list of hidden states unless several layers are selected. Both modules load from
the checkpoint's own tensors onto their own device and dtype.

Speed without changing the arithmetic (bench/bench_cpu.py and bench/bench_gpu.py measure it):

* Truncation: the reference runs every layer and keeps all hidden states; we stop after the selected
  one (23 of 24 layers for LLaVA-1.5). On the CPU this is most of what can be saved exactly: the tower
  is GEMM-bound (MKL), so the items below change CPU time by less than run-to-run noise.
* Each layer's query, key and value weights are views into one ``[3C, C]`` tensor, so one GEMM
  computes all three projections (fewer kernel launches on the GPU). On the CPU the outputs are
  bit-identical to the reference's; on the GPU the merged GEMM may pick another cuBLAS kernel, so
  results can differ at the level of fp16 rounding.
* Encoder layers run through our own forward with the same operations in the same order as the
  transformers layers, but residual adds and QuickGELU work in place (fewer large temporaries).
* On CUDA, :meth:`VisionTower.enable_cuda_graphs` captures the whole tower once per input shape and
  replays it: the same kernels on the same inputs, minus the Python and launch overhead.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llava_checkpoint import CheckpointError, LlavaSpec, WeightFiles, read_raw_config

logger = logging.getLogger(__name__)

BITS_TO_DTYPE = {"32": torch.float32, "16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(bits: str | int, device: torch.device) -> torch.dtype:
    """Map a ``*_bits`` setting to a dtype. On the CPU "16" means bfloat16: CPU float16 matmuls are
    emulated and many times slower, and bfloat16 keeps float32's range."""
    key = str(bits).lower().replace("float", "").replace("fp", "")
    if key not in BITS_TO_DTYPE:
        raise ValueError(f"bits must be one of 32, 16, bf16; got {bits!r}")
    dtype = torch.bfloat16 if key == "16" and device.type == "cpu" else BITS_TO_DTYPE[key]
    if dtype == torch.bfloat16 and device.type == "cpu" and not _cpu_has_bf16_units():
        logger.warning(
            "bfloat16 on this CPU is emulated (no AVX512-BF16 / AMX): slower and less exact than 32-bit; "
            "consider bits 32 for the vision part on the CPU"
        )
    return dtype


def _cpu_has_bf16_units() -> bool:
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"not a torch device: {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but CUDA is not available")
    return resolved


# ----------------------------------------------------------------------------------------------------------
# Where the tower's weights come from


@dataclass(frozen=True)
class TowerSource:
    """Folder holding the tower config (``config.json``) and preprocessing (``preprocessor_config.json``),
    plus the weight folder and the key prefix of the tower's tensors in it."""

    config_dir: Path
    weights_dir: Path
    prefixes: tuple[str, ...]
    vision_config: dict


# Prefixes under which each layout stores the tower (llava-formats.md §2.3, §3.2).
HF_TOWER_PREFIXES = ("vision_tower.vision_model.", "model.vision_tower.vision_model.", "model.vision_tower.", "vision_tower.")
ORIGINAL_TOWER_PREFIXES = ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower.vision_tower.")
STANDALONE_TOWER_PREFIXES = ("vision_model.", "")


def find_tower_source(spec: LlavaSpec, override: str | None = None, models_dir: str | os.PathLike | None = None) -> TowerSource:
    """Locate the vision tower of ``spec``.

    llava-hf checkpoints hold it; original checkpoints name it in ``mm_vision_tower`` and it is looked up
    as: ``override``, a local path, ``models_dir/<org>_<name>`` (webui's naming), the Hugging Face cache,
    then a hub download. Offline with nothing local raises CheckpointError saying what to download.
    """
    if spec.format == "hf" and not override:
        vision_config = dict(spec.hf_config.get("vision_config") or {})
        vision_config.setdefault("model_type", spec.vision_type or "clip_vision_model")
        return TowerSource(spec.model_dir, spec.model_dir, HF_TOWER_PREFIXES, vision_config)
    name = override or spec.vision_tower_name
    origin = "from the vision tower setting" if override else "named by mm_vision_tower"
    folder = _locate_tower_folder(name, spec.model_dir, models_dir, origin)
    vision_config = _vision_config_of(folder)
    if spec.vision_in_checkpoint and not override:
        # Fine-tuned tower stored in the checkpoint (unfreeze_mm_vision_tower); config from the named tower.
        return TowerSource(folder, spec.model_dir, ORIGINAL_TOWER_PREFIXES, vision_config)
    return TowerSource(folder, folder, STANDALONE_TOWER_PREFIXES, vision_config)


def _vision_config_of(folder: Path) -> dict:
    raw = read_raw_config(folder)
    if raw is None:
        raise CheckpointError(f"vision tower folder {folder} has no config.json")
    if "vision_config" in raw:  # a full CLIPModel / SiglipModel repo such as openai/clip-vit-large-patch14-336
        vision = dict(raw["vision_config"])
        vision.setdefault("model_type", {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}.get(raw.get("model_type"), "clip_vision_model"))
        return vision
    return raw


def _locate_tower_folder(name: str, model_dir: Path, models_dir, origin: str = "named by mm_vision_tower") -> Path:
    candidates = [Path(name).expanduser()]
    if not Path(name).is_absolute():
        candidates.append(model_dir / name)
    if models_dir is not None:
        candidates.append(Path(models_dir) / name.replace("/", "_"))
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", name):
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.txt"]
        try:
            return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True))
        except Exception:  # noqa: BLE001 - any cache miss falls through to the download
            pass
        try:
            logger.info("Downloading vision tower %s from the Hugging Face hub", name)
            return Path(snapshot_download(name, allow_patterns=patterns))
        except Exception as exc:  # noqa: BLE001 - offline, missing repo, auth: one clear message below
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
    else:
        # A path, not a hub id: say what is wrong with it (a hub download would make no sense).
        path = Path(name).expanduser()
        if path.is_file():
            problem = "is a file; it must be the tower's folder (config.json and its weights)"
        elif path.is_dir():
            problem = "is a folder without config.json, not a vision tower folder"
        else:
            problem = "does not exist (no such folder)"
        raise CheckpointError(f"vision tower {name!r} ({origin}) {problem}; point the vision tower setting "
                              "to the tower's folder or a hub id such as openai/clip-vit-large-patch14-336.")
    where = f" or into {Path(models_dir) / name.replace('/', '_')}" if models_dir is not None else ""
    raise CheckpointError(
        f"vision tower {name!r} ({origin}) was not found locally and could not be downloaded "
        f"({reason}). Download it with `hf download {name}` (huggingface-hub < 1.0: "
        f"`huggingface-cli download {name}`){where}, or set the vision tower setting to a local folder."
    )


# ----------------------------------------------------------------------------------------------------------
# Tower


def _layer_count_needed(layers: tuple[int, ...], num_hidden_layers: int) -> tuple[int, tuple[int, ...]]:
    """Convert layer indices into ``hidden_states`` positions and return how many encoder layers to run.

    ``hidden_states`` has ``num_hidden_layers + 1`` entries; index k is produced after k encoder layers.
    """
    positions = []
    for layer in layers:
        position = layer if layer >= 0 else num_hidden_layers + 1 + layer
        if not 0 <= position <= num_hidden_layers:
            raise CheckpointError(
                f"vision feature layer {layer} is out of range for a tower with {num_hidden_layers} layers"
            )
        positions.append(position)
    return max(positions), tuple(positions)


class TruncatedTower(nn.Module):
    """What every tower shares: its geometry, read from ``self.config`` (a transformers vision config whose
    ``num_hidden_layers`` is cut to the deepest selected layer), ``self.positions`` (the selected
    ``hidden_states`` indices) and a strict weight load."""

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def feature_size(self) -> int:
        return self.hidden_size * len(self.positions)

    def load_weights(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Strictly load this (truncated) tower from tensors named like the full tower's state dict."""
        wanted = self.state_dict()
        missing = [k for k in wanted if k not in tensors]
        if missing:
            raise CheckpointError(
                f"vision tower weights in {source} lack {len(missing)} tensors (first: {missing[:3]}); "
                "the tower does not match its config"
            )
        for key, value in wanted.items():
            if tensors[key].shape != value.shape:
                raise CheckpointError(
                    f"vision tower tensor {key} in {source} has shape {tuple(tensors[key].shape)}, "
                    f"the config expects {tuple(value.shape)}"
                )
        self.load_state_dict({k: tensors[k] for k in wanted}, strict=True)


class VisionTower(TruncatedTower):
    """CLIP (or SigLIP) vision encoder truncated after the deepest selected layer.

    forward: pixels ``[B, 3, S, S]`` -> features ``[B, N, C * len(layers)]`` with N = (S/patch)² (+1 with CLS).
    """

    #: A tensor every checkpoint layout stores for this tower (locates the tower's key prefix).
    weight_probe = "embeddings.patch_embedding.weight"

    def __init__(self, vision_config: dict, layers: tuple[int, ...], keep_cls: bool):
        super().__init__()
        from transformers import AutoConfig

        config_fields = dict(vision_config)
        model_type = config_fields.pop("model_type", "clip_vision_model")
        self.config = AutoConfig.for_model(model_type, **config_fields)
        # sdpa is what the transformers reference picks by default; same numbers, less memory.
        self.config._attn_implementation = "sdpa"
        self.model_type = model_type
        self.keep_cls = keep_cls
        self.has_cls = model_type == "clip_vision_model"
        depth, self.positions = _layer_count_needed(layers, self.config.num_hidden_layers)
        self.config.num_hidden_layers = depth
        if model_type == "clip_vision_model":
            from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPVisionEmbeddings

            self.embeddings = CLIPVisionEmbeddings(self.config)
            self.pre_layrnorm = nn.LayerNorm(self.config.hidden_size, eps=self.config.layer_norm_eps)
            self.encoder = CLIPEncoder(self.config)
        elif model_type == "siglip_vision_model":
            from transformers.models.siglip.modeling_siglip import SiglipEncoder, SiglipVisionEmbeddings

            self.embeddings = SiglipVisionEmbeddings(self.config)
            self.pre_layrnorm = nn.Identity()
            self.encoder = SiglipEncoder(self.config)
        else:
            raise CheckpointError(f"unsupported vision tower type {model_type!r} (supported: CLIP, SigLIP)")
        # (weight [3C, C], bias [3C] or None) per layer; q/k/v_proj parameters are row views into them.
        self._fused_qkv: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._cuda_graphs: _CudaGraphCache | None = None
        self._fuse_qkv()

    @property
    def tokens_per_image(self) -> int:
        patches = (self.image_size // self.patch_size) ** 2
        return patches + (1 if self.has_cls and self.keep_cls else 0)

    def reset_position_ids(self) -> None:
        """Refill the non-persistent ``position_ids`` buffer, which ``to_empty`` leaves uninitialised
        (the tower is built on the meta device so that no random init is spent on it)."""
        buffer = self.embeddings.position_ids
        buffer.copy_(torch.arange(buffer.shape[-1], device=buffer.device).expand_as(buffer))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixels ``[B, 3, S, S]`` (any float dtype) -> ``[B, N, C * len(layers)]`` in the tower's dtype."""
        pixels = pixel_values.to(self.embeddings.patch_embedding.weight.dtype)
        if self._cuda_graphs is not None and pixels.is_cuda and not torch.is_grad_enabled():
            return self._drop_cls_view(self._cuda_graphs(self._encode_dense, pixels))
        return self._encode(pixels)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels ``[B, 3, S, S]`` in the tower's dtype -> ``[B, N, C * len(layers)]``."""
        return self._drop_cls_view(self._encode_dense(pixels))

    def _encode_dense(self, pixels: torch.Tensor) -> torch.Tensor:
        """The tower up to the deepest selected layer -> one dense tensor: ``[B, L, C]`` with L = all
        positions for a single layer (see :meth:`_drop_cls_view`), else the layers' features concatenated.
        """
        hidden = self.pre_layrnorm(self.embeddings(pixels))
        captured = {0: hidden} if 0 in self.positions else {}
        for index, layer in enumerate(self.encoder.layers, start=1):
            hidden = self._layer_forward(index - 1, layer, hidden)
            if index in self.positions:
                captured[index] = hidden
        if len(self.positions) == 1:
            return captured[self.positions[0]]
        # As the references: drop CLS from each layer, then concatenate (a contiguous result).
        features = [captured[p][:, 1:] if self._drops_cls else captured[p] for p in self.positions]
        return torch.cat(features, dim=-1)

    @property
    def _drops_cls(self) -> bool:
        return self.has_cls and not self.keep_cls

    def _drop_cls_view(self, dense: torch.Tensor) -> torch.Tensor:
        """``[:, 1:]`` of a single layer's output, as a view like the references' (the projector then sees
        the same strides, which decide how the GEMM library splits its matmul: a contiguous copy gave other
        last bits for batches of several images on an H100). Done outside any CUDA graph for that reason."""
        if len(self.positions) == 1 and self._drops_cls:
            return dense[:, 1:]
        return dense

    def _layer_forward(self, index: int, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """One CLIP/SigLIP encoder layer, ``[B, L, C]`` -> ``[B, L, C]``.

        The transformers layer's operations in its order (pre-norm attention, residual, pre-norm MLP,
        residual); only the q/k/v GEMMs are merged into one and temporaries are reused. Adds are
        commutative and the in-place QuickGELU performs the reference's three roundings, so the
        results are the reference's up to how the GEMM library blocks the merged matmul (bit-identical
        with MKL on the CPU in our checks).
        """
        attention = layer.self_attn
        batch, length, width = hidden.shape
        heads = attention.num_heads
        normed = layer.layer_norm1(hidden)
        if self._qkv_is_fused(index):
            weight, bias = self._fused_qkv[index]
            # [B, L, 3C] -> three [B, H, L, D] views (no copies).
            qkv = F.linear(normed, weight, bias).view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
            query, key, value = qkv.unbind(0)
        else:  # someone replaced a q/k/v parameter after loading: the separate projections stay correct
            query, key, value = (
                projection(normed).view(batch, length, heads, width // heads).transpose(1, 2)
                for projection in (attention.q_proj, attention.k_proj, attention.v_proj)
            )
        attended = F.scaled_dot_product_attention(query, key, value, scale=attention.scale)
        attended = attention.out_proj(attended.transpose(1, 2).reshape(batch, length, width))
        hidden = attended.add_(hidden)  # residual + attention
        activations = layer.mlp.fc1(layer.layer_norm2(hidden))
        activations = _activation_in_place(layer.mlp.activation_fn, activations)
        return layer.mlp.fc2(activations).add_(hidden)  # residual + MLP

    # ------------------------------------------------------------------------------------------ fused QKV

    def _fuse_qkv(self) -> None:
        """Re-point every layer's q/k/v weights (and biases) at row blocks of one new ``[3C, C]`` tensor.

        Runs after construction and after every ``to`` / ``to_empty`` / ``half`` (see ``_apply``), which
        give each parameter its own storage again. ``load_state_dict`` copies into the views in place, so
        the state dict keys and loading stay those of the transformers tower.
        """
        self._fused_qkv = []
        for layer in self.encoder.layers:
            attention = layer.self_attn
            projections = (attention.q_proj, attention.k_proj, attention.v_proj)
            weight = torch.cat([p.weight.detach() for p in projections])
            has_bias = all(p.bias is not None for p in projections)
            bias = torch.cat([p.bias.detach() for p in projections]) if has_bias else None
            rows = projections[0].out_features
            for block, projection in enumerate(projections):
                part = slice(block * rows, (block + 1) * rows)
                projection.weight = nn.Parameter(weight[part], requires_grad=projection.weight.requires_grad)
                if has_bias:
                    projection.bias = nn.Parameter(bias[part], requires_grad=projection.bias.requires_grad)
            self._fused_qkv.append((weight, bias))

    def _qkv_is_fused(self, index: int) -> bool:
        """True while layer ``index``'s q/k/v parameters still live inside its fused tensors."""
        if index >= len(self._fused_qkv):
            return False
        weight, bias = self._fused_qkv[index]
        attention = self.encoder.layers[index].self_attn
        for block, projection in enumerate((attention.q_proj, attention.k_proj, attention.v_proj)):
            if not _is_row_block(projection.weight, weight, block):
                return False
            if (bias is None) != (projection.bias is None) or (bias is not None and not _is_row_block(projection.bias, bias, block)):
                return False
        return True

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._fuse_qkv()
        if self._cuda_graphs is not None:
            self._cuda_graphs.clear()  # captured for the old device / dtype / storage
        return result

    # ------------------------------------------------------------------------------------------ CUDA graphs

    def enable_cuda_graphs(self, max_shapes: int = 4) -> None:
        """Replay a captured CUDA graph of the whole tower for inputs on a CUDA device.

        One graph is captured per input shape (batch size) on first use, up to ``max_shapes``; other
        shapes, CPU inputs and calls with autograd enabled run eagerly. The replay runs the kernels the
        eager forward launched at capture time, so results equal the eager forward's. Captured
        graphs keep their activation memory (a few tens of MB per shape at CLIP-L, fp16).
        """
        if max_shapes < 1:
            raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
        self._cuda_graphs = _CudaGraphCache(max_shapes)

    def disable_cuda_graphs(self) -> None:
        """Drop captured graphs (and their memory); later calls run eagerly."""
        if self._cuda_graphs is not None:
            self._cuda_graphs.clear()
        self._cuda_graphs = None

    @property
    def cuda_graphs_enabled(self) -> bool:
        return self._cuda_graphs is not None

    @property
    def captured_graph_shapes(self) -> list[tuple[int, ...]]:
        """Input shapes that currently replay a captured graph (failed captures are not listed)."""
        return self._cuda_graphs.captured_shapes() if self._cuda_graphs is not None else []


def _is_row_block(part: torch.Tensor, whole: torch.Tensor, block: int) -> bool:
    """Is ``part`` the ``block``-th row block (of ``part.shape[0]`` rows) of contiguous ``whole``?"""
    if part.device != whole.device or part.dtype != whole.dtype or part.shape[1:] != whole.shape[1:]:
        return False
    offset = block * part.numel() * part.element_size()
    return part.data_ptr() == whole.data_ptr() + offset and part.is_contiguous()


def _activation_in_place(activation: nn.Module, values: torch.Tensor) -> torch.Tensor:
    """Apply the MLP activation; QuickGELU (CLIP) in place with the reference's exact roundings:
    ``x * sigmoid(1.702 * x)`` is one rounded product, one rounded sigmoid and one rounded product."""
    from transformers.activations import QuickGELUActivation

    if type(activation) is QuickGELUActivation:
        gate = values.mul(1.702).sigmoid_()
        return values.mul_(gate)
    return activation(values)


class _CudaGraphCache:
    """Captured CUDA graphs of a one-tensor-in, one-tensor-out function, one per input shape/dtype/device.

    Input and output live in static buffers owned by each graph: a call copies its input in, replays and
    returns a clone of the output. A lock serialises replays (static buffers are shared by all callers).
    A shape whose capture fails (e.g. another thread used the GPU mid-capture) runs eagerly from then on.
    The function is passed on every call rather than stored, so that the tower and this cache form no
    reference cycle (the tower's GPU memory is freed as soon as the pipeline drops it).
    """

    def __init__(self, max_shapes: int):
        self.max_shapes = max_shapes
        self._graphs: dict[tuple, tuple[torch.Tensor, torch.Tensor, "torch.cuda.CUDAGraph"] | None] = {}
        self._lock = threading.Lock()

    def __call__(self, function, inputs: torch.Tensor) -> torch.Tensor:
        key = (tuple(inputs.shape), inputs.dtype, inputs.device)
        # Static buffers must be normal tensors: an inference-mode caller would otherwise create
        # inference tensors that a later no_grad caller may not copy into.
        with self._lock, torch.inference_mode(False), torch.no_grad(), torch.cuda.device(inputs.device):
            if key not in self._graphs:
                if len(self._graphs) >= self.max_shapes:
                    return function(inputs)
                self._graphs[key] = self._capture(function, inputs)
            entry = self._graphs[key]
            if entry is None:
                return function(inputs)
            static_inputs, static_outputs, graph = entry
            static_inputs.copy_(inputs)
            graph.replay()
            return static_outputs.clone()

    def _capture(self, function, inputs: torch.Tensor):
        static_inputs = inputs.clone()
        try:
            eager_outputs = function(inputs)
            # Warm-up on a side stream before capture, as torch.cuda.graph requires (lazy init, autotuning).
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    function(static_inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a webui thread using the GPU meanwhile does not invalidate the capture.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_outputs = function(static_inputs)
            graph.replay()
        except RuntimeError as exc:
            logger.warning("CUDA graph capture of the vision tower failed for input %s (%s); running it eagerly",
                           tuple(inputs.shape), exc)
            return None
        # The GEMM library may pick other kernels while capturing (seen on an H100 for a batch of 3, not
        # for 1), which changes the last bits; such a shape keeps the eager forward, whose results are
        # the reference's.
        if not torch.equal(static_outputs, eager_outputs):
            logger.info("The CUDA graph of the vision tower for input %s differs from its eager forward; "
                        "running that shape eagerly", tuple(inputs.shape))
            return None
        logger.info("Captured a CUDA graph of the vision tower for input %s %s", tuple(inputs.shape), inputs.dtype)
        return static_inputs, static_outputs, graph

    def captured_shapes(self) -> list[tuple[int, ...]]:
        with self._lock:
            return [key[0] for key, entry in self._graphs.items() if entry is not None]

    def clear(self) -> None:
        with self._lock:
            self._graphs.clear()


# ----------------------------------------------------------------------------------------------------------
# Projector


class Projector(nn.Module):
    """Vision features ``[..., C_in]`` -> language-model embeddings ``[..., H_lm]``.

    ``linear``: one Linear. ``mlpNx_gelu``: N Linears with exact-erf GELU between them (original
    builder). ``identity``: passthrough. ``hf``: ``linear_1 -> act -> linear_2`` (llava-hf).
    """

    def __init__(self, kind: str, in_features: int, out_features: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        self.kind = kind
        if kind == "identity":
            self.layers = nn.Sequential()
        elif kind == "linear":
            self.layers = nn.Sequential(nn.Linear(in_features, out_features, bias=bias))
        elif kind == "hf":
            from transformers.activations import ACT2FN

            if act not in ACT2FN:
                raise CheckpointError(f"unknown projector_hidden_act {act!r}")
            self.layers = nn.Sequential(
                nn.Linear(in_features, out_features, bias=bias), ACT2FN[act], nn.Linear(out_features, out_features, bias=bias)
            )
        else:
            match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
            if not match:
                raise CheckpointError(f"unknown mm_projector_type {kind!r} (known: linear, mlpNx_gelu, identity)")
            modules: list[nn.Module] = [nn.Linear(in_features, out_features)]
            for _ in range(1, int(match.group(1))):
                modules += [nn.GELU(), nn.Linear(out_features, out_features)]
            self.layers = nn.Sequential(*modules)

    def forward(self, features: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """``[B, n, C_in]`` -> ``[B, n, H_lm]``; ``grid`` (the patch rows and columns) is not needed here."""
        return self.layers(features)

    @property
    def out_features(self) -> int | None:
        linears = [m for m in self.layers if isinstance(m, nn.Linear)]
        return linears[-1].out_features if linears else None

    @classmethod
    def load(cls, spec: LlavaSpec, weights: WeightFiles, *, tower: nn.Module, lm_hidden_size: int) -> "Projector":
        """The checkpoint's projector on the CPU in float32, checked against the tower's feature width and
        the language model's embedding width."""
        projector_tensors = read_projector_tensors(spec, weights)
        in_features = projector_tensors["layers.0.weight"].shape[1] if projector_tensors else tower.feature_size
        out_features = lm_hidden_size if spec.projector_type == "identity" else None
        if out_features is None:
            last = max(int(k.split(".")[1]) for k in projector_tensors if k.endswith("weight"))
            out_features = projector_tensors[f"layers.{last}.weight"].shape[0]
        check_projector_widths(in_features, out_features, tower, lm_hidden_size)
        with torch.device("meta"):
            projector = cls(spec.projector_type, in_features, out_features, spec.projector_act, spec.projector_bias)
        return load_module_strictly(projector, projector_tensors, spec.projector_type, spec.model_dir)


class VipLlavaProjector(nn.Module):
    """VipLLaVA: ``LayerNorm -> linear_1 -> act -> linear_2`` over the features of several layers
    concatenated (``[B, n, C * layers] -> [B, n, H_lm]``), as ``VipLlavaMultiModalProjector``; parameter
    names are the checkpoint's (``multi_modal_projector.projector_layernorm.*``, ``linear_1.*``, ...)."""

    def __init__(self, in_features: int, out_features: int, act: str, eps: float):
        super().__init__()
        from transformers.activations import ACT2FN

        if act not in ACT2FN:
            raise CheckpointError(f"unknown projector_hidden_act {act!r}")
        self.projector_layernorm = nn.LayerNorm(in_features, eps=eps)
        self.linear_1 = nn.Linear(in_features, out_features, bias=True)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(out_features, out_features, bias=True)

    def forward(self, features: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.projector_layernorm(features))))

    @classmethod
    def load(cls, spec: LlavaSpec, weights: WeightFiles, *, tower: nn.Module, lm_hidden_size: int) -> "VipLlavaProjector":
        tensors = read_hf_projector_tensors(weights, "projector_layernorm.weight")
        in_features, out_features = linear_pair_widths(tensors, tower, lm_hidden_size)
        eps = float(spec.hf_config.get("projector_layernorm_eps", 1e-5))
        with torch.device("meta"):
            projector = cls(in_features, out_features, spec.projector_act, eps)
        return load_module_strictly(projector, tensors, spec.projector_type, spec.model_dir)


def check_projector_widths(in_features: int, out_features: int, tower: nn.Module, lm_hidden_size: int) -> None:
    """Raise with a hint when the projector does not fit the tower or the language model (checked at load)."""
    if in_features != tower.feature_size:
        raise CheckpointError(
            f"projector input width {in_features} does not match the vision tower's feature width "
            f"{tower.feature_size} ({tower.hidden_size} x {len(tower.positions)} layers); hint: the vision tower "
            "setting or mm_vision_tower names a different tower than the one this projector was trained with"
        )
    if out_features != lm_hidden_size:
        raise CheckpointError(
            f"projector output width {out_features} does not match the language model's embedding width "
            f"{lm_hidden_size}; hint: the loaded language model is not the one this projector belongs to"
        )


def linear_pair_widths(tensors: dict[str, torch.Tensor], tower: nn.Module, lm_hidden_size: int) -> tuple[int, int]:
    """``(in_features, out_features)`` of an llava-hf ``linear_1 -> act -> linear_2`` projector, checked like
    :func:`check_projector_widths` (a missing tensor reads as width -1, so the message names the mismatch
    and the strict load that follows names the missing key)."""
    in_features = tensors["linear_1.weight"].shape[1] if "linear_1.weight" in tensors else -1
    out_features = tensors["linear_2.weight"].shape[0] if "linear_2.weight" in tensors else -1
    check_projector_widths(in_features, out_features, tower, lm_hidden_size)
    return in_features, out_features


def load_module_strictly(module: nn.Module, tensors: dict[str, torch.Tensor], kind: str, folder) -> nn.Module:
    """Materialise a meta-device projector on the CPU and load ``tensors`` into it with ``strict=True``."""
    module = module.to_empty(device="cpu")
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"projector tensors in {folder} do not fit {kind}: {exc}") from exc
    return module


# Checkpoint projector keys -> Projector state-dict keys.
HF_PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
HF_PROJECTOR_RENAMES = {"linear_1.": "layers.0.", "linear_2.": "layers.2."}
ORIGINAL_PROJECTOR_PREFIX = "model.mm_projector."


def read_hf_projector_tensors(weights: WeightFiles, probe: str = "linear_1.weight") -> dict[str, torch.Tensor]:
    """llava-hf ``multi_modal_projector.*`` tensors (4.x or 5.x prefix), prefix removed."""
    prefix = weights.find_prefix(HF_PROJECTOR_PREFIXES, probe)
    if prefix is None:
        raise CheckpointError(f"no multi_modal_projector.{probe} in {weights.folder}")
    return weights.read_prefix(prefix)


def read_projector_tensors(spec: LlavaSpec, weights: WeightFiles) -> dict[str, torch.Tensor]:
    """Projector tensors renamed to :class:`Projector` keys."""
    if spec.projector_type == "identity":
        return {}
    if spec.format == "hf":
        renamed = {}
        for key, tensor in read_hf_projector_tensors(weights).items():
            for old, new in HF_PROJECTOR_RENAMES.items():
                if key.startswith(old):
                    renamed[new + key[len(old):]] = tensor
        return renamed
    tensors = weights.read_prefix(ORIGINAL_PROJECTOR_PREFIX)
    if not tensors:
        raise CheckpointError(
            f"no model.mm_projector.* tensors in {weights.folder}; this checkpoint has no projector "
            "(a delta or an LLM-only checkpoint?)"
        )
    if spec.projector_type == "linear":
        return {f"layers.0.{k}": v for k, v in tensors.items()}
    return {f"layers.{k}": v for k, v in tensors.items()}


def load_vision_modules(
    spec: LlavaSpec,
    source: TowerSource,
    *,
    tower_class: type = None,
    projector_class: type = None,
    tower_device: torch.device,
    tower_dtype: torch.dtype,
    projector_device: torch.device,
    projector_dtype: torch.dtype,
    lm_hidden_size: int,
) -> tuple[nn.Module, nn.Module]:
    """Build the truncated tower and the projector and load their tensors (and nothing else).

    ``tower_class`` (default :class:`VisionTower`) is built as ``tower_class(vision_config, layers, keep_cls)``
    on the meta device and names the probe key that locates its tensors (``weight_probe``);
    ``projector_class`` (default :class:`Projector`) loads itself with ``projector_class.load(spec, weights,
    tower=..., lm_hidden_size=...)``. ``llava_family`` picks both for the checkpoint's family.
    """
    tower_class = tower_class or VisionTower
    projector_class = projector_class or Projector
    started = time.perf_counter()
    with torch.device("meta"):
        tower = tower_class(source.vision_config, spec.vision_feature_layers, spec.keep_cls)
    tower_weights = WeightFiles(source.weights_dir)
    probe = tower_class.weight_probe
    prefix = tower_weights.find_prefix(source.prefixes, probe)
    if prefix is None:
        raise CheckpointError(f"no vision tower tensors ({'|'.join(source.prefixes)}{probe}) in {source.weights_dir}")
    wanted = [prefix + k for k in tower.state_dict()]
    tensors = {k[len(prefix):]: v for k, v in tower_weights.read([k for k in wanted if k in tower_weights]).items()}
    tower = tower.to_empty(device="cpu")
    tower.reset_position_ids()
    tower.load_weights(tensors, str(source.weights_dir))
    tower = tower.to(device=tower_device, dtype=tower_dtype).eval().requires_grad_(False)

    weights = tower_weights if source.weights_dir == spec.model_dir else WeightFiles(spec.model_dir)
    projector = projector_class.load(spec, weights, tower=tower, lm_hidden_size=lm_hidden_size)
    projector = projector.to(device=projector_device, dtype=projector_dtype).eval().requires_grad_(False)
    logger.info(
        "Loaded vision tower (%s, %d of %d layers kept, %s %s) and %s projector (%s %s) in %.2f s",
        source.config_dir.name, tower.config.num_hidden_layers,
        int(source.vision_config.get("num_hidden_layers", tower.config.num_hidden_layers)),
        tower_device, str(tower_dtype).replace("torch.", ""), spec.projector_type, projector_device,
        str(projector_dtype).replace("torch.", ""), time.perf_counter() - started,
    )
    return tower, projector
