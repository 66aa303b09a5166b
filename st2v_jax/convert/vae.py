"""Key mapping of diffusers' AutoencoderKL state dict onto `st2v_jax.models.vae.AutoencoderKL`.

Both attention namings of diffusers-format checkpoints are accepted: the current one
(`to_q`, `to_k`, `to_v`, `to_out.0`) and the one older VAE checkpoints were saved with
(`query`, `key`, `value`, `proj_attn`). As in diffusers' own loader
(`ModelMixin._fix_state_dict_keys_on_load`) the legacy tensors are only renamed: they are
already Linear-shaped (out, in). The 1x1-conv attention weights of original LDM/SD
single-file checkpoints (`encoder.mid.attn_1.q` ...) belong to a different key layout that
diffusers converts separately; they are not handled here and come out as unmapped keys.
"""
from __future__ import annotations

from st2v_jax.convert.mapping import KeyMapping, Path, renaming_mapping

VAE_RENAMES = (
    (r"\.to_out\.0\.", ".to_out."),
    (r"\.attentions\.0\.query\.", ".attentions.0.to_q."),
    (r"\.attentions\.0\.key\.", ".attentions.0.to_k."),
    (r"\.attentions\.0\.value\.", ".attentions.0.to_v."),
    (r"\.attentions\.0\.proj_attn\.", ".attentions.0.to_out."),
)


def vae_mapping(prefix: str = "", target: Path = ()) -> KeyMapping:
    """Maps `prefix` + diffusers AutoencoderKL keys to AutoencoderKL param paths under `target`."""
    return renaming_mapping(VAE_RENAMES, prefix, target)
