"""Key mapping of the official StreamingT2V `VideoLDM.state_dict()` onto `StreamingUNet3D`.

Official naming: `unet.*` is the CAM encoder (ControlNet copy + `controlnet_cond_embedding`),
`base_model.*` the denoising UNet3D with the CAM mergers and the APM layers in each attn2,
`resampler.*` the APM image-token resampler. The frozen `vae.*`, `text_encoder.*` and
`image_encoder.*` are mapped by their own models' mappings.
"""
from __future__ import annotations

from st2v_jax.convert.mapping import KeyMapping, first_match, renaming_mapping
from st2v_jax.convert.unet3d import UNET3D_RENAMES, unet3d_mapping

STREAMING_PREFIXES = ("base_model.", "unet.", "resampler.")

_MERGER_RENAMES = ((r"^attention\.to_out\.0\.", "attention.to_out."),)
_APM_RENAMES = UNET3D_RENAMES + ((r"\.attn2\.(conv|conv_ln|alpha)(\.|$)", r".attn2.mixer.\1\2"),)


def _merger_mapping(official_prefix: str, target: tuple[str, ...]) -> KeyMapping:
    return renaming_mapping(_MERGER_RENAMES, official_prefix, target)


def _down_mergers(key: str):
    prefix = "base_model.cross_attention_merger_down_blocks."
    if not key.startswith(prefix):
        return None
    index, rest = key[len(prefix) :].split(".", 1)
    if not rest.startswith("temporal_transformer."):
        return None
    return _merger_mapping("", (f"skip_mergers_{index}",))(rest[len("temporal_transformer.") :])


def streaming_mapping() -> KeyMapping:
    """Official `resampler.*`, `unet.*`, `base_model.*` keys -> StreamingUNet3D param paths."""
    return first_match(
        _down_mergers,
        _merger_mapping("base_model.cross_attention_merger_mid_block.temporal_transformer.", ("mid_merger",)),
        renaming_mapping(_APM_RENAMES, "base_model.", ("base",)),
        renaming_mapping((), "unet.controlnet_cond_embedding.", ("cam", "cond_embedding")),
        unet3d_mapping("unet.", ("cam",)),
        renaming_mapping(
            ((r"^context_embedding\.0\.", "proj_hidden."), (r"^context_embedding\.2\.", "proj_tokens.")),
            "resampler.",
            ("resampler",),
        ),
    )
