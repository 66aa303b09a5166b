"""Key mappings of CLIP state dicts onto `st2v_jax.models.clip`.

Text: transformers CLIPTextModel / CLIPTextModelWithProjection. Files written by
transformers 4 (the ModelScope hub weights among them) prefix the text tower with
`text_model.`; transformers 5 saves a plain CLIPTextModel without it (WithProjection still
has it). `clip_text_prefix` tells which. Old files also persist the `position_ids` buffer,
which `convert_state_dict` must be told to skip: pass `ignore=clip_text_ignored_keys(prefix)`.

Vision: open_clip VisionTransformer keys (`conv1.weight`, `transformer.resblocks.N...`).
nn.MultiheadAttention's packed in_proj_weight (3W, W) becomes the fused Dense `in_proj`,
whose kernel (W, 3W) is exactly its generic transpose. `class_embedding`,
`positional_embedding` and `proj` (used as `x @ proj`) are not `weight` leaves, so they
keep their torch layout, which is already the Flax one.
"""
from __future__ import annotations

from typing import Iterable

from st2v_jax.convert.mapping import KeyMapping, Path, first_match, renaming_mapping

CLIP_TEXT_PREFIX = "text_model."
CLIP_TEXT_RENAMES = (
    # nn.Embed stores its table as `embedding`; a `weight` leaf would be transposed.
    (r"^embeddings\.(token|position)_embedding\.weight$", r"\1_embedding.embedding"),
    (r"^encoder\.layers\.", "layers."),
)
# Non-parameter buffers that transformers 4 wrote into the weight files.
CLIP_TEXT_BUFFERS = ("embeddings.position_ids",)

OPEN_CLIP_VISION_RENAMES = (
    (r"^transformer\.resblocks\.", "layers."),
    (r"\.ln_([12])\.", r".layer_norm\1."),
    (r"\.attn\.in_proj_(weight|bias)$", r".self_attn.in_proj.\1"),
    (r"\.attn\.out_proj\.", ".self_attn.out_proj."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."),
    (r"\.mlp\.c_proj\.", ".mlp.fc2."),
)


def clip_text_mapping(prefix: str = CLIP_TEXT_PREFIX, target: Path = (), projection_prefix: str = "") -> KeyMapping:
    """Maps `prefix` + CLIPTextModel keys, and `projection_prefix` + `text_projection.weight`
    (CLIPTextModelWithProjection keeps it outside `text_model.`), to CLIPTextTransformer
    param paths under `target`."""
    return first_match(
        renaming_mapping((), projection_prefix + "text_projection.", target + ("text_projection",)),
        renaming_mapping(CLIP_TEXT_RENAMES, prefix, target),
    )


def clip_text_ignored_keys(prefix: str = CLIP_TEXT_PREFIX) -> tuple[str, ...]:
    """Key prefixes for `convert_state_dict(ignore=...)`: buffers that are not parameters."""
    return tuple(prefix + buffer for buffer in CLIP_TEXT_BUFFERS)


def clip_text_prefix(keys: Iterable[str]) -> str:
    """`text_model.` if the text tower's keys carry it (transformers 4 files, WithProjection
    models), else "" (a CLIPTextModel saved by transformers 5)."""
    return CLIP_TEXT_PREFIX if any(key.startswith(CLIP_TEXT_PREFIX) for key in keys) else ""


def open_clip_vision_mapping(prefix: str = "", target: Path = ()) -> KeyMapping:
    """Maps `prefix` + open_clip VisionTransformer keys (those of `model.visual.state_dict()`)
    to OpenCLIPVisionTransformer param paths under `target`."""
    return renaming_mapping(OPEN_CLIP_VISION_RENAMES, prefix, target)
