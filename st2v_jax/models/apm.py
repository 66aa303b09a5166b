"""APM, the appearance preservation module (long-term memory).

* `ImageTokenResampler`: pooled CLIP image embedding(s) of the anchor -> image tokens.
* `APMContextMixer`: installed in every spatial cross-attention of the base UNet3D; mixes
  the text and image tokens into a text-length context:
  text + SiLU(alpha) * LayerNorm(Conv1d over tokens(all tokens))
  alpha starts at 0, so a fresh module leaves the context unchanged.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from st2v_jax.models.execution import DEFAULT_EXECUTION, ExecutionOptions
from st2v_jax.models.layers import Array, conv, dense, layer_norm


class ImageTokenResampler(nn.Module):
    """Mean over anchor frames, Linear -> SiLU -> Linear, cut into `num_tokens` tokens."""

    hidden_features: int = 1280
    num_tokens: int = 16
    token_width: int = 1024
    execution: ExecutionOptions = DEFAULT_EXECUTION

    @nn.compact
    def __call__(self, image_embeds: Array) -> Array:
        """image_embeds (B, anchor_frames, D) -> tokens (B, num_tokens, token_width)."""
        dtype = self.execution.dtype
        h = nn.silu(dense(self.hidden_features, dtype=dtype, name="proj_hidden")(image_embeds.mean(axis=1)))
        tokens = dense(self.num_tokens * self.token_width, dtype=dtype, name="proj_tokens")(h)
        return tokens.reshape(image_embeds.shape[0], self.num_tokens, self.token_width)


class APMContextMixer(nn.Module):
    """Context (B, text_tokens + image_tokens, D) -> (B, text_tokens, D)."""

    text_tokens: int = 77
    execution: ExecutionOptions = DEFAULT_EXECUTION

    @nn.compact
    def __call__(self, context: Array) -> Array:
        dtype = self.execution.dtype
        # The tokens are the conv's channels and it slides along the feature axis ('same' padding).
        mixed = conv(self.text_tokens, (3,), padding=1, dtype=dtype, name="conv")(jnp.swapaxes(context, 1, 2))
        mixed = layer_norm(1e-5, dtype=dtype, name="conv_ln")(jnp.swapaxes(mixed, 1, 2))
        alpha = self.param("alpha", nn.with_logical_partitioning(nn.initializers.zeros_init(), ()), ())
        return (context[:, : self.text_tokens] + nn.silu(alpha) * mixed).astype(dtype)
