"""`python -m st2v_jax.convert`: PyTorch weights -> a verified st2v_jax checkpoint folder.

  python -m st2v_jax.convert diffusers --model-dir text-to-video-ms-1.7b --out ckpt/ms-1.7b
  python -m st2v_jax.convert official --checkpoint streaming_t2v.ckpt \
      --base-model-dir text-to-video-ms-1.7b --out ckpt/streaming_t2v
  python -m st2v_jax.convert random --config configs/tiny_random.py --out ckpt/tiny-random
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time
from typing import Optional, Sequence

from st2v_jax.checkpoint import save_converted
from st2v_jax.config_files import load_config_file
from st2v_jax.convert.components import SAMPLING_DEFAULTS_FILE, modelscope_scheduler_config, random_pretrained, split_model_config
from st2v_jax.convert.official_configs import MS_1_7B_SCHEDULER
from st2v_jax.convert.sources import from_diffusers_dir, from_official_checkpoint
from st2v_jax.tokenizer import word_merges, write_byte_level_tokenizer


def _streaming_configs(path: Optional[str]) -> Optional[dict]:
    if path is None:
        return None
    config = json.loads(pathlib.Path(path).read_text()) if path.endswith(".json") else load_config_file(path).to_dict()
    return {"streaming": config}


def _default_files(
    scratch: pathlib.Path, words: Sequence[str] = (), sampling: Optional[dict] = None, scheduler: dict = MS_1_7B_SCHEDULER
) -> dict[str, pathlib.Path]:
    """A byte-level tokenizer (`words` as single tokens), the scheduler config and the
    config's sampling defaults, if any, for a random model."""
    tokenizer = write_byte_level_tokenizer(scratch / "tokenizer", word_merges(words))
    (scratch / "scheduler_config.json").write_text(json.dumps(scheduler))
    files = {f"tokenizer/{p.name}": p for p in tokenizer.iterdir()}
    files["scheduler/scheduler_config.json"] = scratch / "scheduler_config.json"
    if sampling:
        (scratch / SAMPLING_DEFAULTS_FILE).write_text(json.dumps(sampling, indent=1))
        files[SAMPLING_DEFAULTS_FILE] = scratch / SAMPLING_DEFAULTS_FILE
    return files


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m st2v_jax.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True)
    diffusers = sub.add_parser("diffusers", help="a diffusers text-to-video folder (text-to-video-ms-1.7b layout)")
    diffusers.add_argument("--model-dir", required=True, help="folder with model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/")
    official = sub.add_parser("official", help="the official StreamingT2V checkpoint (streaming_t2v.ckpt or .safetensors)")
    official.add_argument("--checkpoint", required=True, help="streaming_t2v.ckpt (torch zip) or a .safetensors with the same keys")
    official.add_argument("--base-model-dir", help="text-to-video-ms-1.7b diffusers folder: adds the first-chunk UNet3D, tokenizer and scheduler")
    official.add_argument("--config", help="streaming model config (.py with get_config() or .json); default: the official model")
    random = sub.add_parser("random", help="random weights for a config (tests, smoke runs): NOT a trained model")
    random.add_argument("--config", required=True, help="component configs (.py with get_config(), e.g. configs/tiny_random.py)")
    random.add_argument("--seed", type=int, default=0)
    for p in (diffusers, official, random):
        p.add_argument("--out", required=True, help="output folder (written atomically)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    out = pathlib.Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"error: {out} already exists (use --overwrite to replace it)", file=sys.stderr)
        return 2
    start = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        if args.source == "diffusers":
            model = from_diffusers_dir(args.model_dir)
        elif args.source == "official":
            model = from_official_checkpoint(args.checkpoint, _streaming_configs(args.config), args.base_model_dir)
        else:
            configs, extras = split_model_config(load_config_file(args.config).to_dict())
            words, sampling = extras.get("tokenizer_words", ()), extras.get("sampling")
            scheduler = modelscope_scheduler_config(extras.get("scheduler"))
            model = random_pretrained(configs, args.seed)
            model.files = _default_files(pathlib.Path(scratch), words, sampling, scheduler)
        save_converted(model, out, overwrite=args.overwrite)
    print(f"converted {', '.join(model.params)} -> {out} in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
