"""RAFT-large optical flow (torchvision's `raft_large`) as a Flax module, channels-last.

MAWE (`st2v_jax.metrics.mawe`) needs the flow between every two consecutive frames, and the
release measures it with torchvision's RAFT-large; this is that network, so that the flow
runs jitted on the accelerator that generated the video and gives the release's numbers.

The module tree mirrors torchvision's, so the weight mapping (`st2v_jax.convert.raft`) is a
few renames:

  feature_encoder   both images -> 256-d features at 1/8 resolution (instance norm)
  context_encoder   first image -> GRU state (tanh) and context (ReLU) (frozen batch norm)
  (no parameters)   all-pairs correlation / sqrt(256), pooled 2x2 into a 4-level pyramid
  update_block      one refinement: bilinear 9x9 correlation windows around the current
                    match on every level, motion encoder, two separable ConvGRUs, flow head.
                    Run `num_flow_updates` times as one `nn.scan` (a `lax.scan`).
  mask_predictor    convex-combination 8x upsampling of the flow

torchvision upsamples the flow after every update (for its training loss); inference uses
only the last estimate, so it is upsampled once here: the same numbers, less work.

Images are (B, H, W, 3) in [-1, 1] (torchvision's `Raft_Large_Weights.transforms()`), H and
W multiples of 8 and at least 128 (the coarsest correlation level must be 2x2). Flow is
(B, H, W, 2) in pixels, (dx, dy), from image1 to image2.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from st2v_jax.models.layers import Array, conv

Norm = Literal["instance", "batch"]

DOWNSAMPLING = 8
MIN_IMAGE_SIZE = 128
CORRELATION_LEVELS = 4
CORRELATION_RADIUS = 4
HIDDEN_SIZE = 128  # the GRU state; the context encoder's other 128 channels are the context
MASK_SCALE = 0.25  # torchvision's MaskPredictor multiplier (scales the logits)


def instance_norm(x: Array, epsilon: float = 1e-5) -> Array:
    """torchvision's InstanceNorm2d (no affine, no running stats): per image and channel."""
    mean = x.mean(axis=(1, 2), keepdims=True)
    var = jnp.square(x - mean).mean(axis=(1, 2), keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + epsilon)


class FrozenBatchNorm(nn.Module):
    """BatchNorm2d in eval mode: the running statistics are parameters like the affine ones."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: Array) -> Array:
        def vector(name: str, init) -> Array:
            return self.param(name, nn.with_logical_partitioning(init, ("channels",)), (x.shape[-1],))

        scale = vector("scale", nn.initializers.ones_init())
        bias = vector("bias", nn.initializers.zeros_init())
        mean = vector("mean", nn.initializers.zeros_init())
        var = vector("var", nn.initializers.ones_init())
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class ConvNormAct(nn.Module):
    """torchvision's Conv2dNormActivation: square conv with bias and "same" padding, an
    optional norm, an optional ReLU."""

    features: int
    kernel_size: int
    stride: int = 1
    norm: Optional[Norm] = None
    relu: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        x = conv(self.features, (k, k), strides=self.stride, padding=(k - 1) // 2, name="conv")(x)
        if self.norm == "instance":
            x = instance_norm(x)
        elif self.norm == "batch":
            x = FrozenBatchNorm(name="norm")(x)
        return nn.relu(x) if self.relu else x


class ResidualBlock(nn.Module):
    """Two 3x3 conv-norm-ReLUs plus a (strided 1x1 conv-norm) shortcut, then ReLU."""

    features: int
    stride: int
    norm: Norm

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = ConvNormAct(self.features, 3, self.stride, self.norm, name="convnormrelu1")(x)
        y = ConvNormAct(self.features, 3, 1, self.norm, name="convnormrelu2")(y)
        if self.stride != 1:
            x = ConvNormAct(self.features, 1, self.stride, self.norm, relu=False, name="downsample")(x)
        return nn.relu(x + y)


class FeatureEncoder(nn.Module):
    """7x7/2 stem, three stages of two residual blocks (strides 1, 2, 2), 1x1 conv to 256."""

    norm: Norm

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = ConvNormAct(64, 7, 2, self.norm, name="convnormrelu")(x)
        for stage, (features, stride) in enumerate(((64, 1), (96, 2), (128, 2)), start=1):
            x = ResidualBlock(features, stride, self.norm, name=f"layer{stage}_0")(x)
            x = ResidualBlock(features, 1, self.norm, name=f"layer{stage}_1")(x)
        return conv(256, (1, 1), name="conv")(x)


def correlation_pyramid(fmap1: Array, fmap2: Array, levels: int = CORRELATION_LEVELS) -> tuple[Array, ...]:
    """All-pairs correlation of two (B, h, w, C) feature maps as (B*h*w, h_l, w_l) volumes:
    level 0 is <f1(p), f2(q)> / sqrt(C), each further level a 2x2 average pool of the last."""
    b, h, w, c = fmap1.shape
    corr = jnp.einsum(
        "bpc,bqc->bpq", fmap1.reshape(b, h * w, c), fmap2.reshape(b, h * w, c), precision=jax.lax.Precision.HIGHEST
    )
    volume = (corr / math.sqrt(c)).reshape(b * h * w, h, w)
    pyramid = [volume]
    for _ in range(levels - 1):
        n, vh, vw = volume.shape
        volume = volume[:, : vh // 2 * 2, : vw // 2 * 2].reshape(n, vh // 2, 2, vw // 2, 2).mean(axis=(2, 4))
        pyramid.append(volume)
    return tuple(pyramid)


def _bilinear_windows(volume: Array, centers: Array, radius: int) -> Array:
    """Samples each volume[n] (h_l, w_l) on the (2r+1)^2 grid centers[n] + (dx, dy),
    dx, dy in [-r, r], bilinearly with zeros outside (grid_sample, align_corners=True).

    The offsets are whole pixels, so all samples of one window share the fractional
    weights: gather the (2r+2)^2 integer neighbourhood once and blend it. Output channel
    index dx_index * (2r+1) + dy_index (torchvision's order)."""
    n, vh, vw = volume.shape
    side = 2 * radius + 1
    x, y = centers[:, 0], centers[:, 1]
    # Windows entirely outside stay entirely outside after clipping; the clip only keeps
    # the integer conversion defined for diverging estimates.
    x0 = jnp.clip(jnp.floor(x), -radius - 2, vw + radius + 1)
    y0 = jnp.clip(jnp.floor(y), -radius - 2, vh + radius + 1)
    fx, fy = (x - x0)[:, None, None], (y - y0)[:, None, None]
    offsets = jnp.arange(-radius, radius + 2)
    rows = y0.astype(jnp.int32)[:, None] + offsets
    cols = x0.astype(jnp.int32)[:, None] + offsets
    inside = ((rows >= 0) & (rows < vh))[:, :, None] & ((cols >= 0) & (cols < vw))[:, None, :]
    index = jnp.clip(rows, 0, vh - 1)[:, :, None] * vw + jnp.clip(cols, 0, vw - 1)[:, None, :]
    window = jnp.take_along_axis(volume.reshape(n, vh * vw), index.reshape(n, -1), axis=1)
    window = jnp.where(inside, window.reshape(n, side + 1, side + 1), 0.0)  # [n, row, col]
    top = window[:, :-1, :-1] * (1 - fx) + window[:, :-1, 1:] * fx
    bottom = window[:, 1:, :-1] * (1 - fx) + window[:, 1:, 1:] * fx
    sampled = top * (1 - fy) + bottom * fy  # [n, dy, dx]
    return jnp.swapaxes(sampled, 1, 2).reshape(n, side * side)


def lookup_correlation(pyramid: tuple[Array, ...], coords: Array, radius: int = CORRELATION_RADIUS) -> Array:
    """Correlation features (B, h, w, levels * (2r+1)^2) around the matches `coords`
    (B, h, w, 2), absolute (x, y) at 1/8 resolution; level l is sampled at coords / 2^l."""
    b, h, w, _ = coords.shape
    centers = coords.reshape(b * h * w, 2)
    features = [_bilinear_windows(volume, centers / 2**level, radius) for level, volume in enumerate(pyramid)]
    return jnp.concatenate(features, axis=-1).reshape(b, h, w, -1)


def coords_grid(batch: int, height: int, width: int) -> Array:
    """(B, h, w, 2) pixel coordinates (x, y)."""
    ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing="ij")
    return jnp.broadcast_to(jnp.stack([xs, ys], axis=-1), (batch, height, width, 2))


def upsample_flow(flow: Array, mask_logits: Array) -> Array:
    """Convex upsampling: each of the 8x8 full-resolution pixels of a coarse cell is a
    softmax-weighted mix of 8 x the 3x3 coarse flows around it. flow (B, h, w, 2),
    mask_logits (B, h, w, 9*8*8) in torchvision's channel order (neighbour, row, col)."""
    b, h, w, _ = flow.shape
    f = DOWNSAMPLING
    weights = jax.nn.softmax(mask_logits.reshape(b, h, w, 9, f, f), axis=3)
    padded = jnp.pad(f * flow, ((0, 0), (1, 1), (1, 1), (0, 0)))
    neighbours = jnp.stack([padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=3)
    fine = jnp.einsum("bhwkrc,bhwkd->bhrwcd", weights, neighbours, precision=jax.lax.Precision.HIGHEST)
    return fine.reshape(b, h * f, w * f, 2)


class MotionEncoder(nn.Module):
    """Encodes (correlation features, current flow) into 126 channels, then appends the flow."""

    @nn.compact
    def __call__(self, flow: Array, corr: Array) -> Array:
        corr = ConvNormAct(256, 1, name="convcorr1")(corr)
        corr = ConvNormAct(192, 3, name="convcorr2")(corr)
        motion = ConvNormAct(128, 7, name="convflow1")(flow)
        motion = ConvNormAct(64, 3, name="convflow2")(motion)
        motion = ConvNormAct(HIDDEN_SIZE - 2, 3, name="conv")(jnp.concatenate([corr, motion], axis=-1))
        return jnp.concatenate([motion, flow], axis=-1)


class ConvGRU(nn.Module):
    """Convolutional GRU cell with a (kh, kw) kernel."""

    kernel_size: tuple[int, int]

    @nn.compact
    def __call__(self, h: Array, x: Array) -> Array:
        padding = [(k - 1) // 2 for k in self.kernel_size]
        gate = lambda name: conv(HIDDEN_SIZE, self.kernel_size, padding=padding, name=name)
        hx = jnp.concatenate([h, x], axis=-1)
        z = jax.nn.sigmoid(gate("convz")(hx))
        r = jax.nn.sigmoid(gate("convr")(hx))
        q = jnp.tanh(gate("convq")(jnp.concatenate([r * h, x], axis=-1)))
        return (1 - z) * h + z * q


class RecurrentBlock(nn.Module):
    """A horizontal (1x5) then a vertical (5x1) ConvGRU."""

    @nn.compact
    def __call__(self, h: Array, x: Array) -> Array:
        h = ConvGRU((1, 5), name="convgru1")(h, x)
        return ConvGRU((5, 1), name="convgru2")(h, x)


class FlowHead(nn.Module):
    @nn.compact
    def __call__(self, h: Array) -> Array:
        return conv(2, (3, 3), padding=1, name="conv2")(nn.relu(conv(256, (3, 3), padding=1, name="conv1")(h)))


class UpdateBlock(nn.Module):
    """One refinement step, written as a scan body: carry (GRU state, matches coords1)."""

    @nn.compact
    def __call__(
        self, carry: tuple[Array, Array], pyramid: tuple[Array, ...], context: Array, coords0: Array
    ) -> tuple[tuple[Array, Array], None]:
        hidden, coords1 = carry
        corr = lookup_correlation(pyramid, coords1)
        flow = coords1 - coords0
        motion = MotionEncoder(name="motion_encoder")(flow, corr)
        hidden = RecurrentBlock(name="recurrent_block")(hidden, jnp.concatenate([context, motion], axis=-1))
        delta = FlowHead(name="flow_head")(hidden)
        return (hidden, coords1 + delta), None


class MaskPredictor(nn.Module):
    @nn.compact
    def __call__(self, hidden: Array) -> Array:
        x = ConvNormAct(256, 3, name="convrelu")(hidden)
        return MASK_SCALE * conv(9 * DOWNSAMPLING**2, (1, 1), name="conv")(x)


def check_images(*images: Array) -> None:
    """Raises ValueError unless every image batch is (B, H, W, 3) of one shape that RAFT takes."""
    shape = images[0].shape
    if any(image.shape != shape for image in images):
        raise ValueError(f"RAFT inputs must have one shape, got {[image.shape for image in images]}")
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"RAFT takes images (B, H, W, 3), got shape {shape}")
    h, w = shape[1:3]
    if h % DOWNSAMPLING or w % DOWNSAMPLING or min(h, w) < MIN_IMAGE_SIZE:
        raise ValueError(
            f"RAFT needs H and W that are multiples of {DOWNSAMPLING} and at least {MIN_IMAGE_SIZE}, got {h}x{w}"
        )


class RAFT(nn.Module):
    """torchvision `raft_large`. `__call__(image1, image2)` -> flow (B, H, W, 2) after
    `num_flow_updates` refinements (torchvision's last prediction); `consecutive_flows`
    gives the flows between the neighbours of one frame sequence, encoding each frame once.
    Parameters do not depend on `num_flow_updates`."""

    num_flow_updates: int = 12

    def setup(self) -> None:
        if self.num_flow_updates < 1:
            raise ValueError(f"num_flow_updates must be at least 1, got {self.num_flow_updates}")
        self.feature_encoder = FeatureEncoder("instance")
        self.context_encoder = FeatureEncoder("batch")
        refine = nn.scan(
            UpdateBlock,
            variable_broadcast="params",
            split_rngs={"params": False},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=self.num_flow_updates,
        )
        self.update_block = refine()
        self.mask_predictor = MaskPredictor()

    def __call__(self, image1: Array, image2: Array) -> Array:
        check_images(image1, image2)
        fmap1, fmap2 = jnp.split(self.feature_encoder(jnp.concatenate([image1, image2])), 2)
        return self._flow(fmap1, fmap2, image1)

    def consecutive_flows(self, frames: Array) -> Array:
        """frames (T, H, W, 3) -> flows (T-1, H, W, 2), flow t from frame t to frame t+1."""
        check_images(frames)
        if frames.shape[0] < 2:
            raise ValueError(f"consecutive flows need at least 2 frames, got {frames.shape[0]}")
        fmaps = self.feature_encoder(frames)
        return self._flow(fmaps[:-1], fmaps[1:], frames[:-1])

    def _flow(self, fmap1: Array, fmap2: Array, image1: Array) -> Array:
        pyramid = correlation_pyramid(fmap1, fmap2)
        context_out = self.context_encoder(image1)
        hidden, context = jnp.tanh(context_out[..., :HIDDEN_SIZE]), nn.relu(context_out[..., HIDDEN_SIZE:])
        coords0 = coords_grid(*fmap1.shape[:3])
        (hidden, coords1), _ = self.update_block((hidden, coords0), pyramid, context, coords0)
        return upsample_flow(coords1 - coords0, self.mask_predictor(hidden))
