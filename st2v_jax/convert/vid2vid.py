"""Key mappings and converters for ModelScope MS-Vid2Vid-XL, the official StreamingT2V refiner.

Its release (`damo/Video-to-Video`, HF mirror `ali-vilab/MS-Vid2Vid-XL`) ships three files:
  non_ema_0035000.pth          {"state_dict": Vid2VidSDUNet weights}   -> component "vid2vid_unet"
  open_clip_pytorch_model.bin  OpenCLIP ViT-H/14 (text and vision)      -> component "text_encoder"
  v2-1_512-ema-pruned.ckpt     Stable Diffusion 2.1 in the original LDM layout; only its
                               `first_stage_model.` (the VAE) is used      -> component "vae"

Each model has one pair (`*_tensors`, `*_mapping`) used by both the converter and its parity
test. `*_tensors` is a lazy view of the source state dict that fixes tensors whose layout
differs from ours: 1x1 convolutions used as Linear layers are squeezed, and nn.MultiheadAttention's
packed in_proj (q; k; v) is split into the q/k/v projections of our CLIP text tower (the
transformers layout, which MS-Vid2Vid's penultimate-layer embedding then reuses unchanged:
a 23-layer tower's final-norm output). `*_mapping` renames the keys onto our params.
`convert_state_dict` then refuses anything unmapped, missing or mis-shaped.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np

from st2v_jax.convert.components import COMPONENTS, PretrainedModel
from st2v_jax.convert.mapping import (
    ConversionError,
    KeyMapping,
    Path,
    convert_state_dict,
    renaming_mapping,
)
from st2v_jax.convert.official_configs import (
    MS_1_7B_TEXT_ENCODER,
    MS_1_7B_VAE,
    MS_VID2VID_XL_UNET,
)
from st2v_jax.convert.readers import open_weight_file
from st2v_jax.models.vid2vid_unet import Vid2VidUNetConfig

Transform = Callable[[np.ndarray], np.ndarray]


class _TensorView(Mapping[str, np.ndarray]):
    """A lazy state dict: each key reads one source tensor and optionally transforms it."""

    def __init__(self, entries: Mapping[str, tuple[Mapping[str, np.ndarray], str, Optional[Transform]]]) -> None:
        self._entries = dict(entries)

    def __getitem__(self, key: str) -> np.ndarray:
        source, source_key, transform = self._entries[key]
        array = np.asarray(source[source_key])
        return transform(array) if transform is not None else array

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def _squeeze_trailing_ones(array: np.ndarray) -> np.ndarray:
    """(out, in, 1[, 1]) conv kernel -> (out, in) Linear weight; anything else is returned as
    it is and left for `convert_state_dict`'s shape check to report."""
    if array.ndim > 2 and all(n == 1 for n in array.shape[2:]):
        return array.reshape(array.shape[:2])
    return array


def _prefixed(state_dict: Mapping[str, np.ndarray], prefix: str) -> dict[str, str]:
    """{key without prefix: key} for the keys under `prefix`."""
    return {key[len(prefix) :]: key for key in state_dict if key.startswith(prefix)}


# ------------------------------------------------------------------------------- the UNet

_UNET_RENAMES = (
    # ResBlock: in_layers = (GroupNorm, SiLU, Conv), emb_layers = (SiLU, Linear),
    # out_layers = (GroupNorm, SiLU, Dropout, Conv); its temporal conv ("temopral", sic).
    (r"\.in_layers\.0\.", ".resnet.norm1."),
    (r"\.in_layers\.2\.", ".resnet.conv1."),
    (r"\.emb_layers\.1\.", ".resnet.time_emb_proj."),
    (r"\.out_layers\.0\.", ".resnet.norm2."),
    (r"\.out_layers\.3\.", ".resnet.conv2."),
    (r"\.skip_connection\.", ".resnet.conv_shortcut."),
    (r"\.temopral_conv\.(conv[1-4])\.0\.", r".temporal_conv.\1_norm."),
    (r"\.temopral_conv\.(conv[1-4])\.[23]\.", r".temporal_conv.\1."),
    (r"\.to_out\.0\.", ".to_out."),
    (r"\.ff\.net\.0\.proj\.", ".ff.gate_proj."),
    (r"\.ff\.net\.2\.", ".ff.out_proj."),
)
# Temporal transformers project in and out with Conv1d(kernel 1), (out, in, 1) weights;
# spatial transformers with Linear layers, whose (out, in) weights the squeeze leaves alone.
_PROJECTION = re.compile(r"\.proj_(in|out)\.weight$")


def vid2vid_unet_block_names(config: Vid2VidUNetConfig) -> dict[str, str]:
    """modelscope module prefix -> our module prefix (dotted), for every block of the UNet."""
    names = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "input_blocks.0.1": "transformer_in",
        "middle_block.0": "mid_resnets.0",
        "middle_block.1": "mid_attention",
        "middle_block.2": "mid_temp_attention",
        "middle_block.3": "mid_resnets.1",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
    }
    last = config.num_levels - 1
    n = 1
    for level in range(config.num_levels):
        for j in range(config.num_res_blocks):
            names[f"input_blocks.{n}.0"] = f"down_blocks.{level}.resnets.{j}"
            if config.has_attention(level):
                names[f"input_blocks.{n}.1"] = f"down_blocks.{level}.attentions.{j}"
                names[f"input_blocks.{n}.2"] = f"down_blocks.{level}.temp_attentions.{j}"
            n += 1
        if level != last:
            names[f"input_blocks.{n}.op"] = f"down_blocks.{level}.downsample"
            n += 1
    n = 0
    for i in range(config.num_levels):
        attention = config.has_attention(last - i)
        for j in range(config.num_res_blocks + 1):
            names[f"output_blocks.{n}.0"] = f"up_blocks.{i}.resnets.{j}"
            if attention:
                names[f"output_blocks.{n}.1"] = f"up_blocks.{i}.attentions.{j}"
                names[f"output_blocks.{n}.2"] = f"up_blocks.{i}.temp_attentions.{j}"
            if i != last and j == config.num_res_blocks:
                names[f"output_blocks.{n}.{3 if attention else 1}.conv"] = f"up_blocks.{i}.upsample"
            n += 1
    return names


def vid2vid_unet_tensors(state_dict: Mapping[str, np.ndarray], prefix: str = "") -> Mapping[str, np.ndarray]:
    """The UNet's tensors under `prefix` (prefix stripped), temporal-transformer Conv1d
    projections squeezed to Linear weights."""
    return _TensorView(
        {
            key: (state_dict, source_key, _squeeze_trailing_ones if _PROJECTION.search(key) else None)
            for key, source_key in _prefixed(state_dict, prefix).items()
        }
    )


def vid2vid_unet_mapping(config: Vid2VidUNetConfig, target: Path = ()) -> KeyMapping:
    """Maps `Vid2VidSDUNet` state-dict keys (as `vid2vid_unet_tensors` presents them) to
    `Vid2VidUNet` param paths under `target`."""
    names = vid2vid_unet_block_names(config)
    renames = renaming_mapping(_UNET_RENAMES, "", target)

    def mapping(key: str) -> Optional[Path]:
        parts = key.split(".")
        for size in (4, 3, 2):  # the longest block prefix wins ("output_blocks.2.1.conv")
            block = ".".join(parts[:size])
            if block in names:
                return renames(names[block] + "." + ".".join(parts[size:]))
        return None

    return mapping


# -------------------------------------------------------------------- the SD 2.1 LDM VAE

LDM_VAE_PREFIX = "first_stage_model."
_LDM_ATTENTION_KERNEL = re.compile(r"\.attn_1\.(q|k|v|proj_out)\.weight$")


def ldm_vae_tensors(state_dict: Mapping[str, np.ndarray], prefix: str = LDM_VAE_PREFIX) -> Mapping[str, np.ndarray]:
    """The VAE's tensors under `prefix` (prefix stripped), its mid-block attention 1x1-conv
    kernels squeezed to Linear weights."""
    return _TensorView(
        {
            key: (state_dict, source_key, _squeeze_trailing_ones if _LDM_ATTENTION_KERNEL.search(key) else None)
            for key, source_key in _prefixed(state_dict, prefix).items()
        }
    )


def ldm_vae_mapping(num_levels: int, target: Path = ()) -> KeyMapping:
    """Maps original LDM/Stable Diffusion VAE keys (`encoder.down.0.block.1.norm1.weight`, as
    `ldm_vae_tensors` presents them) to `AutoencoderKL` param paths under `target`. The
    decoder's `up.{i}` runs from the lowest resolution `up.{num_levels - 1}` to `up.0`; our
    `up_blocks_{j}` count in execution order."""
    flip = lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}."
    renames = (
        (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
        (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
        (r"^decoder\.up\.(\d+)\.block\.", lambda m: flip(m) + "resnets."),
        (r"^decoder\.up\.(\d+)\.upsample\.", lambda m: flip(m) + "upsamplers.0."),
        (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
        (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
        (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
        (r"\.mid\.attn_1\.(q|k|v)\.", r".mid_block.attentions.0.to_\1."),
        (r"\.mid\.attn_1\.proj_out\.", ".mid_block.attentions.0.to_out."),
        (r"\.nin_shortcut\.", ".conv_shortcut."),
        (r"\.norm_out\.", ".conv_norm_out."),
    )
    return renaming_mapping(renames, "", target)


# ------------------------------------------------------------------ the OpenCLIP text tower

OPEN_CLIP_TEXT_RENAMES = (
    (r"^token_embedding\.weight$", "token_embedding.embedding"),
    (r"^positional_embedding$", "position_embedding.embedding"),
    (r"^transformer\.resblocks\.", "layers."),
    (r"\.ln_([12])\.", r".layer_norm\1."),
    (r"\.attn\.", ".self_attn."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."),
    (r"\.mlp\.c_proj\.", ".mlp.fc2."),
    (r"^ln_final\.", "final_layer_norm."),
)
# Parts of an open_clip CLIP state dict the penultimate-layer text embedding never uses.
OPEN_CLIP_TEXT_UNUSED = ("visual.", "logit_scale", "text_projection")
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.")
_IN_PROJ = re.compile(r"^(.*\.attn)\.in_proj_(weight|bias)$")


def open_clip_text_tensors(state_dict: Mapping[str, np.ndarray], num_layers: int) -> Mapping[str, np.ndarray]:
    """The first `num_layers` text blocks (and embeddings, final norm) of an open_clip CLIP
    state dict; the packed attention in_proj (3W, ...) is split into q/k/v_proj. Keys of
    the vision tower, later blocks, the text projection and logit scale are left out."""
    entries: dict[str, tuple[Mapping[str, np.ndarray], str, Optional[Transform]]] = {}
    for key in state_dict:
        block = _RESBLOCK.match(key)
        if key.startswith(OPEN_CLIP_TEXT_UNUSED) or (block and int(block.group(1)) >= num_layers):
            continue
        packed = _IN_PROJ.match(key)
        if packed is None:
            entries[key] = (state_dict, key, None)
            continue
        for index, name in enumerate("qkv"):
            part = lambda a, i=index: np.split(a, 3, axis=0)[i]
            entries[f"{packed.group(1)}.{name}_proj.{packed.group(2)}"] = (state_dict, key, part)
    return _TensorView(entries)


def open_clip_text_mapping(target: Path = ()) -> KeyMapping:
    """Maps open_clip text-tower keys (as `open_clip_text_tensors` presents them) to
    `CLIPTextTransformer` param paths under `target`."""
    return renaming_mapping(OPEN_CLIP_TEXT_RENAMES, "", target)


# ------------------------------------------------------------------------------ converter


def _torch_state_dict(path: pathlib.Path) -> Mapping[str, np.ndarray]:
    """A weight file's tensors; a checkpoint's `state_dict` entry is unwrapped."""
    state_dict = open_weight_file(path)
    nested = _prefixed(state_dict, "state_dict.")
    return _TensorView({k: (state_dict, v, None) for k, v in nested.items()}) if nested else state_dict


def _convert(component: str, config: dict, tensors: Mapping[str, np.ndarray], mapping: KeyMapping, path: pathlib.Path) -> Any:
    spec = COMPONENTS[component]
    if not len(tensors):
        raise ConversionError(f"{path}: no {component} tensors found (is this the right file?)")
    try:
        return convert_state_dict(tensors, mapping, spec.abstract_params(spec.parse_config(config)), progress=f"converting {component}")
    except ConversionError as err:
        raise ConversionError(f"{component} from {path}: {err}") from None


def from_ms_vid2vid_files(
    unet: str | os.PathLike,
    open_clip: str | os.PathLike,
    vae: str | os.PathLike,
    tokenizer_dir: Optional[str | os.PathLike] = None,
    configs: Optional[Mapping[str, dict]] = None,
) -> PretrainedModel:
    """MS-Vid2Vid-XL's release files -> vid2vid_unet, text_encoder and vae params.

    `unet` is non_ema_0035000.pth, `open_clip` open_clip_pytorch_model.bin, `vae`
    v2-1_512-ema-pruned.ckpt. `tokenizer_dir`, a CLIP BPE tokenizer folder with OpenCLIP's
    vocabulary (e.g. text-to-video-ms-1.7b's tokenizer/), is kept with the weights so the
    refiner can encode prompts. `configs` overrides component configs (default: the release's).
    """
    paths = {name: pathlib.Path(p) for name, p in (("unet", unet), ("open_clip", open_clip), ("vae", vae))}
    configs = {
        "vid2vid_unet": dict(MS_VID2VID_XL_UNET),
        "text_encoder": dict(MS_1_7B_TEXT_ENCODER),
        "vae": dict(MS_1_7B_VAE),
        **(configs or {}),
    }
    unet_config = Vid2VidUNetConfig.from_modelscope(configs["vid2vid_unet"])
    layers = configs["text_encoder"]["num_hidden_layers"]
    levels = len(configs["vae"]["block_out_channels"])
    params = {
        "vid2vid_unet": _convert(
            "vid2vid_unet", configs["vid2vid_unet"], vid2vid_unet_tensors(_torch_state_dict(paths["unet"])),
            vid2vid_unet_mapping(unet_config), paths["unet"],
        ),
        "text_encoder": _convert(
            "text_encoder", configs["text_encoder"], open_clip_text_tensors(_torch_state_dict(paths["open_clip"]), layers),
            open_clip_text_mapping(), paths["open_clip"],
        ),
        "vae": _convert(
            "vae", configs["vae"], ldm_vae_tensors(_torch_state_dict(paths["vae"])), ldm_vae_mapping(levels), paths["vae"]
        ),
    }
    files = {}
    if tokenizer_dir is not None:
        tokenizer_dir = pathlib.Path(tokenizer_dir)
        if not any((tokenizer_dir / name).is_file() for name in ("vocab.json", "tokenizer.json")):
            raise FileNotFoundError(f"{tokenizer_dir} holds no CLIP tokenizer (vocab.json + merges.txt, or tokenizer.json)")
        files = {f"tokenizer/{p.name}": p for p in sorted(tokenizer_dir.iterdir()) if p.is_file()}
    return PretrainedModel(configs, params, files, sorted(paths.values()))


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m st2v_jax.convert.vid2vid`: the three release files -> a converted refiner folder."""
    from st2v_jax.checkpoint import save_converted

    parser = argparse.ArgumentParser(prog="python -m st2v_jax.convert.vid2vid", description=main.__doc__)
    parser.add_argument("--unet", required=True, help="non_ema_0035000.pth")
    parser.add_argument("--open-clip", required=True, help="open_clip_pytorch_model.bin (OpenCLIP ViT-H/14)")
    parser.add_argument("--vae", required=True, help="v2-1_512-ema-pruned.ckpt (Stable Diffusion 2.1, LDM layout)")
    parser.add_argument(
        "--tokenizer-dir", required=True, help="a CLIP tokenizer folder with OpenCLIP's BPE, e.g. text-to-video-ms-1.7b/tokenizer"
    )
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"error: {out} already exists (use --overwrite to replace it)", file=sys.stderr)
        return 2
    model = from_ms_vid2vid_files(args.unet, args.open_clip, args.vae, args.tokenizer_dir)
    save_converted(model, out, overwrite=args.overwrite)
    print(f"converted {', '.join(model.params)} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
