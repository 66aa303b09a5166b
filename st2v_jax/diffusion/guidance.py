"""Classifier-free guidance for the streaming model, in the release's and the paper's form.

Release (default, `anchor_scale=None`): two branches that share the latent and the CAM
conditioning frames,
    uncond = (negative prompt, image tokens of a mid-grey anchor)
    cond   = (prompt,          image tokens of the real anchor)
    eps    = eps_uncond + text_scale * (eps_cond - eps_uncond)
Paper (`anchor_scale` set): text and anchor guided separately, three branches,
    eps = eps(-, -) + anchor_scale * (eps(-, a) - eps(-, -)) + text_scale * (eps(t, a) - eps(-, a))
where "-" is the negative prompt / grey anchor and "a" the real anchor.
With every weight at 1 both forms reduce to eps(prompt, real anchor): one branch is run, not
two or three, as diffusers skips guidance at scale 1.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Guidance:
    text_scale: float = 7.5
    anchor_scale: Optional[float] = None

    @property
    def unguided(self) -> bool:
        return self.text_scale == 1.0 and self.anchor_scale in (None, 1.0)

    @property
    def num_branches(self) -> int:
        if self.unguided:
            return 1
        return 2 if self.anchor_scale is None else 3


def guidance_contexts(
    guidance: Guidance, text: Array, negative_text: Array, anchor_tokens: Array, null_anchor_tokens: Array
) -> Array:
    """Stacks the branch contexts along the batch: (branches * B, text + image tokens, D).

    All inputs are (B, tokens, D); the branch order is that `combine_guidance` expects.
    """
    if guidance.unguided:
        return jnp.concatenate([text, anchor_tokens], axis=1)
    branches = [(negative_text, null_anchor_tokens)]
    if guidance.anchor_scale is not None:
        branches.append((negative_text, anchor_tokens))
    branches.append((text, anchor_tokens))
    return jnp.concatenate([jnp.concatenate(pair, axis=1) for pair in branches], axis=0)


def combine_guidance(guidance: Guidance, eps: Array) -> Array:
    """eps of all branches stacked on the batch axis (as `guidance_contexts` ordered them) -> guided eps."""
    if guidance.unguided:
        return eps
    parts = jnp.split(eps, guidance.num_branches, axis=0)
    if guidance.anchor_scale is None:
        uncond, cond = parts
        return uncond + guidance.text_scale * (cond - uncond)
    uncond, anchor_only, cond = parts
    return uncond + guidance.anchor_scale * (anchor_only - uncond) + guidance.text_scale * (cond - anchor_only)


def repeat_for_branches(guidance: Guidance, x: Array) -> Array:
    """Latents or conditioning frames are the same in every branch."""
    return jnp.concatenate([x] * guidance.num_branches, axis=0)
