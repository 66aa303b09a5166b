"""Key mapping of diffusers' UNet3DConditionModel state dict onto `st2v_jax.models.unet3d.UNet3D`."""
from __future__ import annotations

from st2v_jax.convert.mapping import KeyMapping, Path, renaming_mapping

UNET3D_RENAMES = (
    (r"\.to_out\.0\.", ".to_out."),
    (r"\.ff\.net\.0\.proj\.", ".ff.gate_proj."),
    (r"\.ff\.net\.2\.", ".ff.out_proj."),
    # TemporalConvLayer: convN = Sequential(GroupNorm, SiLU, [Dropout,] Conv3d).
    (r"\.(conv[1-4])\.0\.", r".\1_norm."),
    (r"\.(conv[1-4])\.[23]\.", r".\1."),
)


def unet3d_mapping(prefix: str = "", target: Path = ()) -> KeyMapping:
    """Maps `prefix` + diffusers UNet3D keys to UNet3D param paths under `target`."""
    return renaming_mapping(UNET3D_RENAMES, prefix, target)
