"""Check that our VisionTower (fused q/k/v, own layer forward) equals transformers' towers exactly.

Run: ``python bench/check_tower_exactness.py`` (a few seconds, CPU). For CLIP and SigLIP, fp32 and bf16,
and several feature-layer selections, prints the largest |ours - reference| (expected 0.0) and exits
non-zero otherwise. Also checks the fallback when a q/k/v parameter is replaced after loading, and that
``.to()`` keeps the q/k/v weights fused. Candidate material for a unit test.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common  # noqa: E402,F401  (sys.path and offline environment)
import torch  # noqa: E402

import llava_vision  # noqa: E402


def reference_tower(kind: str):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=56,
                 patch_size=14)
    if kind == "clip":
        config = CLIPVisionConfig(hidden_act="quick_gelu", **shape)
        model = CLIPVisionModel(config)
    else:
        config = SiglipVisionConfig(**shape)
        model = SiglipVisionModel(config)
    fields = config.to_dict()
    fields["model_type"] = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}[kind]
    return model.eval(), fields


def ours(fields: dict, layers: tuple[int, ...], state: dict, dtype: torch.dtype):
    with torch.device("meta"):
        tower = llava_vision.VisionTower(fields, layers, keep_cls=False)
    tower = tower.to_empty(device="cpu")
    tower.reset_position_ids()
    tower.load_weights(state, "reference")
    return tower.to(dtype=dtype).eval()


def main() -> int:
    torch.manual_seed(0)
    failures = 0
    for kind in ("clip", "siglip"):
        reference, fields = reference_tower(kind)
        state = dict(reference.state_dict())
        for dtype in (torch.float32, torch.bfloat16):
            for layers in ((-2,), (-1,), (1, -2), (0,)):
                tower = ours(fields, layers, state, dtype)
                fused = all(tower._qkv_is_fused(i) for i in range(len(tower.encoder.layers)))
                pixels = torch.randn(2, 3, 56, 56)
                converted = copy.deepcopy(reference).to(dtype)  # .to() in place would round the reference's weights
                with torch.inference_mode():
                    hidden = converted(pixels.to(dtype), output_hidden_states=True).hidden_states
                    want = torch.cat([hidden[k][:, 1:] if kind == "clip" else hidden[k] for k in layers], dim=-1)
                    diff = float((tower(pixels).float() - want.float()).abs().max())
                ok = diff == 0.0 and fused
                failures += not ok
                print(f"{kind:6s} {str(dtype):14s} layers={layers!s:8s} fused={fused} max|diff|={diff}")
        # A parameter replaced after loading must fall back to the separate projections.
        tower = ours(fields, (-2,), state, torch.float32)
        attention = tower.encoder.layers[0].self_attn
        attention.k_proj.weight = torch.nn.Parameter(attention.k_proj.weight.detach().clone())
        with torch.inference_mode():
            hidden = reference(pixels, output_hidden_states=True).hidden_states[-2]
            want = hidden[:, 1:] if kind == "clip" else hidden
            diff = float((tower(pixels) - want).abs().max())
        ok = diff == 0.0 and not tower._qkv_is_fused(0) and tower._qkv_is_fused(1)
        failures += not ok
        print(f"{kind:6s} fallback after a replaced k_proj: max|diff|={diff} ok={ok}")
    print("OK" if not failures else f"{failures} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
