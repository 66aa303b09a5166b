"""Peak memory of converting an official-layout StreamingT2V checkpoint.

Writes a synthetic checkpoint in the official key layout with block widths scaled so the
file is about --size-gb, as a torch zip (.ckpt, `{"state_dict": ...}`) and as safetensors,
then converts each in a fresh process (read, convert, save the verified orbax folder) and
reports that process's peak resident memory next to the file size. Key names are taken from
an official fixture set (they do not depend on the widths):

    python -m st2v_jax.benchmarks.conversion_memory --size-gb 3 --fixture ../shared/fixtures/official_tiny_a
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import flax.linen as nn
import numpy as np
from flax import traverse_util

from st2v_jax.convert.components import COMPONENTS
from st2v_jax.convert.readers import open_weight_file
from st2v_jax.convert.streaming import streaming_mapping

def scaled_config(fixture: pathlib.Path, size_gb: float) -> dict:
    """The fixture set's config with every block width multiplied by one integer, chosen so
    the fp32 file is about `size_gb` (the key set, which depends on which blocks change
    width, stays that of the fixture)."""
    config = json.loads((fixture / "config.json").read_text())
    config = {"unet": config["unet"], "streaming": config["streaming"]}
    spec = COMPONENTS["streaming"]
    count = lambda c: sum(int(np.prod(x.shape)) for x in traverse_util.flatten_dict(nn.unbox(spec.abstract_params(spec.parse_config(c)))).values())
    # The count is ~ a * multiplier^2 + b (width x width matrices plus the fixed 1024-wide
    # token layers); fit a and b on multipliers 1 and 2.
    one, two = count(config), count(_with_widths(config, 2))
    a = (two - one) / 3
    multiplier = max(1, int(((size_gb * 2**30 / 4 - (one - a)) / a) ** 0.5))
    return _with_widths(config, multiplier)


def _with_widths(config: dict, multiplier: int) -> dict:
    unet = dict(config["unet"], block_out_channels=[multiplier * c for c in config["unet"]["block_out_channels"]])
    return {"unet": unet, "streaming": config["streaming"]}


def official_shapes(config: dict, fixture: pathlib.Path) -> dict[str, tuple[int, ...]]:
    """Torch shape of every official key for `config`, read off our abstract params through
    the forward key mapping (Flax kernels (..taps, in, out) are torch (out, in, ..taps))."""
    spec = COMPONENTS["streaming"]
    abstract = traverse_util.flatten_dict(nn.unbox(spec.abstract_params(spec.parse_config(config))))
    mapping, shapes = streaming_mapping(), {}
    for key in open_weight_file(fixture / "state_dict.safetensors"):
        path = mapping(key)
        stem, leaf = path[:-1], path[-1]
        if leaf == "weight" and stem + ("kernel",) in abstract:
            flax_shape = abstract[stem + ("kernel",)].shape
            shapes[key] = (flax_shape[-1], flax_shape[-2]) + tuple(flax_shape[:-2])
        else:
            shapes[key] = tuple(abstract[stem + ("scale",) if leaf == "weight" else path].shape)
    return shapes


def write_checkpoints(shapes: dict[str, tuple[int, ...]], directory: pathlib.Path) -> dict[str, pathlib.Path]:
    """The same random tensors as a torch zip checkpoint and as safetensors."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    state_dict = {k: torch.randn(shape, generator=generator) * 0.02 for k, shape in shapes.items()}
    paths = {"torch zip (.ckpt)": directory / "streaming_t2v.ckpt", "safetensors": directory / "streaming_t2v.safetensors"}
    torch.save({"state_dict": state_dict, "epoch": 0}, paths["torch zip (.ckpt)"])
    save_file(state_dict, paths["safetensors"])
    return paths


_CONVERT = """
import json, resource, sys, time
from st2v_jax.checkpoint import save_converted
from st2v_jax.convert.sources import from_official_checkpoint
start = time.time()
model = from_official_checkpoint(sys.argv[1], {"streaming": json.loads(sys.argv[2])})
save_converted(model, sys.argv[3])
print(json.dumps({"seconds": time.time() - start, "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=3.0)
    parser.add_argument("--fixture", type=pathlib.Path, default=pathlib.Path("../shared/fixtures/official_tiny_a"))
    parser.add_argument("--workdir", type=pathlib.Path, default=None, help="where to write the synthetic files (default: a temp dir)")
    args = parser.parse_args()
    config = scaled_config(args.fixture, args.size_gb)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = pathlib.Path(tmp)
        shapes = official_shapes(config, args.fixture)
        params = sum(int(np.prod(s)) for s in shapes.values())
        (tmp / "shapes.json").write_text(json.dumps(shapes))
        # Written in a child process so the generator's memory is not this process's.
        subprocess.run(
            [sys.executable, "-c", "import sys, json, pathlib; from st2v_jax.benchmarks.conversion_memory import write_checkpoints; "
             "d = pathlib.Path(sys.argv[1]); write_checkpoints({k: tuple(v) for k, v in json.loads((d / 'shapes.json').read_text()).items()}, d)",
             str(tmp)],
            check=True,
        )
        print(f"block_out_channels {config['unet']['block_out_channels']}: {params / 1e9:.3f} B params, {len(shapes)} tensors")
        print("| format | file size | peak RSS of the conversion | RSS / file | seconds |")
        print("|---|---|---|---|---|")
        for name in ("torch zip (.ckpt)", "safetensors"):
            path = tmp / ("streaming_t2v.ckpt" if name.startswith("torch") else "streaming_t2v.safetensors")
            out = subprocess.run(
                [sys.executable, "-c", _CONVERT, str(path), json.dumps(config), str(tmp / f"converted-{path.suffix[1:]}")],
                check=True, capture_output=True, text=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            size = path.stat().st_size
            rss = result["peak_rss_kb"] * 1024
            print(f"| {name} | {size / 2**30:.2f} GiB | {rss / 2**30:.2f} GiB | {rss / size:.2f} | {result['seconds']:.0f} |")


if __name__ == "__main__":
    main()
