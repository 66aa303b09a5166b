"""`python -m st2v_jax.sample`: text (or a storyboard) -> a long video, streamed to an mp4.

  python -m st2v_jax.sample --model-dir ckpt/streaming_t2v --prompt "a cat surfing" --num-frames 240 --out cat.mp4

Every check that can fail runs before the model is loaded. The mp4 grows chunk by chunk; an
interrupted run (Ctrl-C, SIGTERM, crash) leaves a playable video and a resumable state,
and `--resume` with the same arguments finishes exactly the video an uninterrupted run
would have made.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import tempfile
import warnings
from typing import Optional, Sequence

import numpy as np

import st2v_jax
from st2v_jax.cpu_kernels import prefer_eigen_kernels
from st2v_jax.generation.long_video import StoryboardEntry
from st2v_jax.models.execution import ATTENTION_BACKENDS, COMPUTE_DTYPES, ExecutionOptions, ExecutionOptionsError
from st2v_jax.tokenizer import PromptTooLongWarning

_DEFAULT_CHUNK = (16, 8)  # (frames per chunk, new frames per chunk) of the official model


class UsageError(ValueError):
    """Bad command-line input; reported without a traceback."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m st2v_jax.sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the text of the whole video")
    what.add_argument("--storyboard", help="a prompt per segment: JSON [{\"prompt\": ..., \"frames\": N}, ...] or text lines 'N: prompt'")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--num-frames", type=int, default=240, help="16 + 8*n (default 240); with --image/--extend: the new frames to add, 8*n")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--image", help="start from this image: it opens the video, is the APM anchor and the first conditioning")
    start.add_argument("--extend", help="continue this video: its first frame is the anchor, its last frames condition CAM")
    p.add_argument("--seed", type=int, default=0)
    # Sampling options left unset take the model folder's sampling.json, then the release's values.
    p.add_argument("--steps", type=int, default=None, help="DDIM steps per streaming chunk (release: 50)")
    p.add_argument("--init-steps", type=int, default=None, help="DPM-Solver++ steps of the first chunk (release: 50)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance of the streaming chunks (release: 7.5)")
    p.add_argument("--anchor-guidance", type=float, default=None, help="paper's separate anchor guidance weight (default: the release's single weight)")
    p.add_argument("--init-guidance", type=float, default=None, help="guidance of the first chunk (release: 9)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (release: 1)")
    p.add_argument(
        "--model-dir",
        default=None,
        help="converted st2v_jax folder, diffusers folder, official checkpoint file, or a hub repo id "
        "(default: the embedded st2v-shapes-tiny model)",
    )
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--out", default="outputs/video.mp4", help="mp4 path; a JSON sidecar and a .resume/ state sit beside it")
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--png-dir", default=None, help="also write every frame as a PNG here")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run with the same arguments")
    p.add_argument("--whole-video", action="store_true", help="generate all chunks in one compiled lax.scan, then write (no partial output)")
    refine = p.add_argument_group("refinement (randomized blending with MS-Vid2Vid-XL, the official refiner, or a diffusers-layout text-to-video model)")
    refine.add_argument("--refine", action=argparse.BooleanOptionalAction, default=False, help="refine the preview video")
    refine.add_argument("--refiner-dir", help="the refiner model: a converted MS-Vid2Vid-XL folder (python -m st2v_jax.convert.vid2vid), or a converted or diffusers text-to-video folder (e.g. zeroscope_v2_XL)")
    refine.add_argument("--refiner-chunk", type=int, default=24)
    refine.add_argument("--refiner-overlap", type=int, default=8)
    refine.add_argument("--refiner-strength", type=float, default=0.6, help="noise level to refine from (0.6: timestep ~600 of 1000)")
    refine.add_argument("--refiner-steps", type=int, default=None, help="solver steps (default: 30 with MS-Vid2Vid-XL, as the release; 50 otherwise)")
    refine.add_argument("--refiner-guidance", type=float, default=7.5)
    refine.add_argument("--refiner-height", type=int, default=720)
    refine.add_argument("--refiner-width", type=int, default=720)
    refine.add_argument("--refiner-chunks-per-batch", type=int, default=1, help="chunks denoised together (memory vs speed)")
    refine.add_argument("--refiner-letterbox", action="store_true", help="MS-Vid2Vid-XL: keep the release's whole 1280x720 letterboxed canvas instead of the 720x720 content")
    p.add_argument("--skip-checksums", action="store_true", help="verify converted weights by size only (faster start)")
    p.add_argument(
        "--mesh",
        help="spread the model over the devices, e.g. data=-1,fsdp=4 (axes data, fsdp, tensor; see st2v_jax.parallel); "
        "default: one device",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="one run over several hosts (a TPU pod slice; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
        "JAX_PROCESS_ID): start this command on every host; process 0 writes --out, the others keep their copy "
        "under $ST2V_SCRATCH_DIR (default ~/.cache/st2v_jax/process-N)",
    )
    p.add_argument(
        "--attention",
        choices=ATTENTION_BACKENDS,
        default="xla",
        help="attention kernel: xla (any device), cudnn (NVIDIA GPU, with --dtype bfloat16), splash (Pallas kernel "
        "for the spatial attention; one TPU, no --mesh)",
    )
    p.add_argument(
        "--dtype",
        choices=COMPUTE_DTYPES,
        default="float32",
        help="compute dtype of the UNets and CLIP towers (bfloat16 halves their weights in memory); the VAE and "
        "the solvers stay float32",
    )
    return p


def parse_storyboard(text: str, source: str) -> list[StoryboardEntry]:
    """JSON list of {"prompt", "frames"} or lines 'FRAMES: prompt' (blank lines and # comments skipped)."""
    stripped = text.strip()
    entries = []
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
            entries = [StoryboardEntry(str(item["prompt"]), int(item["frames"])) for item in items]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise UsageError(f"{source}: not a storyboard ({err}); expected [{{\"prompt\": \"...\", \"frames\": 48}}, ...]") from None
    else:
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            frames, sep, prompt = line.partition(":")
            if not sep or not frames.strip().isdigit():
                raise UsageError(f"{source} line {number}: expected 'FRAMES: prompt', got {line!r}")
            entries.append(StoryboardEntry(prompt.strip(), int(frames)))
    if not entries:
        raise UsageError(f"{source}: the storyboard is empty")
    for entry in entries:
        if not entry.prompt.strip():
            raise UsageError(f"{source}: a storyboard entry has an empty prompt")
        if entry.frames <= 0:
            raise UsageError(f"{source}: frame counts must be positive (got {entry.frames})")
    return entries


def _check_frame_count(total: int, chunk: tuple[int, int]) -> None:
    from st2v_jax.generation.pipeline import streaming_chunks

    try:
        streaming_chunks(total, *chunk)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _check_writable(out: pathlib.Path) -> None:
    if out.suffix.lower() != ".mp4":
        raise UsageError(f"--out {out}: the video is written as mp4; give a path ending in .mp4")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=".st2v-write-test-"):
            pass
    except OSError as err:
        raise UsageError(f"--out {out}: cannot write to {out.parent} ({err.strerror or err})") from None


def _resolve_model(model_dir: str) -> pathlib.Path:
    path = pathlib.Path(model_dir)
    if path.exists():
        return path
    if model_dir.count("/") == 1 and not model_dir.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return pathlib.Path(snapshot_download(model_dir))
        except Exception as err:  # offline, unknown repo, no access: all end the same way
            raise UsageError(
                f"--model-dir {model_dir}: not a local path, and fetching it from the Hugging Face hub failed "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Offline, download it elsewhere "
                "and pass the local folder."
            ) from None
    raise UsageError(f"--model-dir {model_dir}: no such file or folder")


def _embedded_model() -> pathlib.Path:
    from st2v_jax.embedded import EMBEDDED_MODEL_DIR

    if not EMBEDDED_MODEL_DIR.is_dir():
        raise UsageError(f"no --model-dir given and the embedded model is not installed at {EMBEDDED_MODEL_DIR}; pass --model-dir")
    return EMBEDDED_MODEL_DIR


_SAMPLING_OPTIONS = ("steps", "init_steps", "guidance", "anchor_guidance", "init_guidance", "eta")


def _sampling_settings(args: argparse.Namespace, pipe, num_frames: int):
    """Command-line values, else the model's sampling.json, else the release's defaults."""
    from st2v_jax.generation.sampler import SamplingSettings

    try:
        model_defaults = SamplingSettings.checked_overrides(pipe.model.sampling_defaults(), "the model's sampling.json")
    except ValueError as err:
        raise UsageError(str(err)) from None
    chosen = {name: getattr(args, name) for name in _SAMPLING_OPTIONS if getattr(args, name) is not None}
    default_h, default_w = pipe.default_resolution()
    values = {"height": default_h, "width": default_w, **model_defaults, **chosen}
    values.update(num_frames=num_frames, seed=args.seed)
    if args.height:
        values["height"] = args.height
    if args.width:
        values["width"] = args.width
    return SamplingSettings(**values)


def _chunk_layout(model_path: pathlib.Path) -> tuple[int, int]:
    """(frames per chunk, new frames per chunk) from a converted folder's manifest, without loading weights."""
    from st2v_jax.checkpoint import MANIFEST, read_manifest
    from st2v_jax.models.streaming import StreamingConfig

    if not (model_path / MANIFEST).is_file():
        return _DEFAULT_CHUNK
    components = read_manifest(model_path)["components"]
    if "streaming" not in components:
        return _DEFAULT_CHUNK
    config = StreamingConfig.from_dict(components["streaming"]["config"])
    return config.num_frames, config.num_frames - config.cam_frames


def _refiner_config(args: argparse.Namespace, num_frames: int):
    if not args.refine:
        return None
    from st2v_jax.generation.refiner import RefinerConfig

    if not args.refiner_dir:
        raise UsageError("--refine needs --refiner-dir (a text-to-video model to refine with)")
    if not pathlib.Path(args.refiner_dir).exists():
        raise UsageError(f"--refiner-dir {args.refiner_dir}: no such file or folder")
    from st2v_jax.generation.vid2vid_refiner import Vid2VidRefinerConfig, is_vid2vid_model

    if is_vid2vid_model(args.refiner_dir):
        if (args.refiner_height, args.refiner_width) != (720, 720):
            raise UsageError("MS-Vid2Vid-XL refines on the release's 1280x720 canvas; --refiner-height/--refiner-width do not apply (see --refiner-letterbox)")
        try:
            config = Vid2VidRefinerConfig(
                chunk=args.refiner_chunk, overlap=args.refiner_overlap, num_steps=30 if args.refiner_steps is None else args.refiner_steps,
                start_timestep=round(args.refiner_strength * 1000) - 1, guidance=args.refiner_guidance,
                chunks_per_batch=args.refiner_chunks_per_batch, letterbox=args.refiner_letterbox,
            )
        except ValueError as err:
            raise UsageError(str(err)) from None
        if num_frames < config.chunk:
            raise UsageError(f"--refiner-chunk {config.chunk} is longer than the video ({num_frames} frames)")
        return config
    if args.refiner_letterbox:
        raise UsageError("--refiner-letterbox applies to the MS-Vid2Vid-XL refiner only")
    try:
        config = RefinerConfig(
            chunk=args.refiner_chunk, overlap=args.refiner_overlap, strength=args.refiner_strength,
            num_inference_steps=50 if args.refiner_steps is None else args.refiner_steps, chunks_per_batch=args.refiner_chunks_per_batch,
            height=args.refiner_height, width=args.refiner_width,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    if num_frames < config.chunk:
        raise UsageError(f"--refiner-chunk {config.chunk} is longer than the video ({num_frames} frames)")
    return config


def preview_path(out: pathlib.Path) -> pathlib.Path:
    """Where the low-resolution video goes when `out` receives the refined one."""
    return out.with_name(out.stem + ".preview.mp4")


def run(argv: Optional[Sequence[str]] = None) -> pathlib.Path:
    prefer_eigen_kernels()
    args = _parser().parse_args(argv)
    # --- cheap checks, before any model is loaded
    try:
        execution = ExecutionOptions(attention=args.attention, compute_dtype=args.dtype)
    except ExecutionOptionsError as err:
        raise UsageError(f"--attention/--dtype: {err}") from None
    if args.storyboard is not None:
        path = pathlib.Path(args.storyboard)
        if not path.is_file():
            raise UsageError(f"--storyboard {path}: no such file")
        storyboard = parse_storyboard(path.read_text(), str(path))
    else:
        if not args.prompt.strip():
            raise UsageError("--prompt is empty; describe the video to generate")
        storyboard = [StoryboardEntry(args.prompt, args.num_frames)]
    num_frames = sum(entry.frames for entry in storyboard)
    out = pathlib.Path(args.out)
    _check_writable(out)
    model_path = _resolve_model(args.model_dir) if args.model_dir is not None else _embedded_model()
    start_path = args.image or args.extend
    if start_path is not None:
        if args.storyboard is not None:
            raise UsageError("--image/--extend take a single --prompt, not a --storyboard")
        if not pathlib.Path(start_path).is_file():
            raise UsageError(f"{'--image' if args.image else '--extend'} {start_path}: no such file")
        new_frames = _chunk_layout(model_path)[1]
        if num_frames <= 0 or num_frames % new_frames:
            raise UsageError(f"with --image/--extend, --num-frames counts the new frames: a positive multiple of {new_frames} (got {num_frames})")
    else:
        _check_frame_count(num_frames, _chunk_layout(model_path))
    refiner_config = _refiner_config(args, num_frames)
    if args.distributed:
        from st2v_jax import multihost

        if args.mesh is None:
            raise UsageError("--distributed runs one video over every host's devices: give --mesh too (e.g. --mesh data=-1,fsdp=4)")
        try:
            multihost.initialize()
        except multihost.DistributedSetupError as err:
            raise UsageError(f"--distributed: {err}") from None
        out = multihost.process_output_path(out)
        args.png_dir = args.png_dir and multihost.process_output_path(args.png_dir)
    if args.mesh is not None:
        import jax

        from st2v_jax.parallel import MeshSpecError, parse_mesh_spec

        try:
            parse_mesh_spec(args.mesh, jax.device_count())
        except MeshSpecError as err:
            raise UsageError(f"--mesh: {err}") from None
    # After --distributed's set-up: asking JAX for its platform starts the backend.
    import jax

    try:
        execution.check_platform(devices=jax.device_count() if args.mesh is not None else 1)
    except ExecutionOptionsError as err:
        raise UsageError(f"--attention: {err}") from None
    from st2v_jax.generation.run_state import RunState, resume_directory_for
    from st2v_jax.generation.video_writer import check_free_space, estimate_output_bytes

    state_dir = resume_directory_for(preview_path(out) if refiner_config else out)
    if args.resume and not (state_dir / "state.json").is_file():
        raise UsageError(f"--resume: no interrupted run to resume at {state_dir}")
    # --- the model
    from st2v_jax.compilation_cache import enable_compilation_cache

    enable_compilation_cache()
    from st2v_jax.generation.long_video import chunk_prompts, encode_prompts, generate_long_video, generate_whole_video
    from st2v_jax.generation.pipeline import StreamingT2VPipeline

    pipe = StreamingT2VPipeline.from_pretrained(model_path, checksums=not args.skip_checksums, execution=execution)
    if args.mesh is not None:
        from st2v_jax.parallel import make_mesh

        mesh = make_mesh(args.mesh)
        pipe.shard(mesh)
    settings = _sampling_settings(args, pipe, num_frames)
    multiple = pipe.vae_downscale * 2 ** (len(pipe.config["unet"].block_out_channels) - 1)
    if settings.height % multiple or settings.width % multiple:
        raise UsageError(f"--height/--width must be multiples of {multiple} for this model (got {settings.height}x{settings.width})")
    check_free_space(out, estimate_output_bytes(num_frames, settings.height, settings.width, png=args.png_dir is not None, keep_frame_store=True))
    start = None
    if start_path is not None:
        from st2v_jax.generation.long_video import VideoStart
        from st2v_jax.generation.media_input import load_image, load_video

        load = load_image if args.image else load_video
        try:
            start = VideoStart(load(start_path, settings.height, settings.width))
        except (ValueError, FileNotFoundError) as err:
            raise UsageError(str(err)) from None
        prompts = [args.prompt] * (1 + num_frames // pipe.new_frames_per_chunk)
    else:
        prompts = chunk_prompts(pipe, storyboard)
    for cut in pipe.tokenize(sorted(set(prompts)))[1]:
        if cut:
            warnings.warn(
                f"prompt longer than the tokenizer's {pipe.tokenizer.model_max_length} tokens; this was cut off: {cut!r}",
                PromptTooLongWarning,
                stacklevel=1,
            )
    encoded = encode_prompts(pipe, prompts, args.negative_prompt)
    run_settings = {
        "storyboard": [dataclasses.asdict(e) for e in storyboard],
        "negative_prompt": args.negative_prompt,
        "model": str(model_path.resolve()),
        "sampling": dataclasses.asdict(settings),
        "fps": args.fps,
        "start": {"image": args.image, "extend": args.extend} if start_path else None,
        "execution": {"attention": args.attention, "dtype": args.dtype},
        "st2v_jax": st2v_jax.__version__,
    }
    if args.whole_video and start is not None:
        raise UsageError("--whole-video makes a video from text only; drop it with --image/--extend")
    if args.whole_video:
        from st2v_jax.generation.video_writer import VideoOutput

        frames = generate_whole_video(pipe, encoded, settings)[0]
        with VideoOutput(out, args.fps, settings.height, settings.width, settings=run_settings, seed=settings.seed, png_dir=args.png_dir) as video:
            video.write(frames)
        return out
    stream_out = preview_path(out) if refiner_config else out
    if args.resume:
        RunState.load(resume_directory_for(stream_out)).check_settings(run_settings)
    state = generate_long_video(
        pipe, encoded, settings, stream_out, run_settings=run_settings, fps=args.fps, png_dir=args.png_dir,
        resume=args.resume, keep_state=refiner_config is not None, start=start,
    )
    if refiner_config is not None:
        from st2v_jax.generation.long_video import Refiner
        from st2v_jax.generation.vid2vid_refiner import Vid2VidRefiner, Vid2VidRefinerConfig
        from st2v_jax.generation.video_writer import VideoOutput

        if isinstance(refiner_config, Vid2VidRefinerConfig):
            refiner = Vid2VidRefiner.from_pretrained(args.refiner_dir, checksums=not args.skip_checksums, execution=execution)
            if args.mesh is not None:
                refiner.shard(mesh)
            refined = refiner.refine(np.asarray(state.frames()), storyboard[0].prompt, args.negative_prompt, refiner_config, args.seed)
        else:
            refiner = Refiner.from_pretrained(args.refiner_dir, checksums=not args.skip_checksums, execution=execution)
            if args.mesh is not None:
                refiner.shard(mesh)
            refined = refiner.refine(np.asarray(state.frames()), storyboard[0].prompt, args.negative_prompt, refiner_config, args.refiner_guidance, args.seed)
        refine_settings = dict(run_settings, refiner=dict(dataclasses.asdict(refiner_config), model=str(args.refiner_dir), guidance=args.refiner_guidance))
        with VideoOutput(out, args.fps, refined.shape[1], refined.shape[2], settings=refine_settings, seed=settings.seed) as video:
            video.write(refined)
        state.finish()
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        out = run(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the finished chunks are in the video; continue with the same command plus --resume", file=sys.stderr)
        return 130
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
