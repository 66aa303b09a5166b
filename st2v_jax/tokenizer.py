"""CLIP BPE tokenizers: loading a model's `tokenizer/` folder, and writing a byte-level one.

The byte-level vocabulary (every byte, with and without CLIP's end-of-word marker, plus
optional merges) needs no download; tiny and self-trained models use it.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import transformers

MAX_LENGTH = 77


class PromptTooLongWarning(UserWarning):
    """A prompt was cut to the tokenizer's length."""


def load_tokenizer(directory: str | os.PathLike) -> "transformers.PreTrainedTokenizerBase":
    """A transformers CLIP tokenizer from a local folder (vocab.json + merges.txt, or tokenizer.json)."""
    from transformers import AutoTokenizer

    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {directory}")
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def tokenize(
    tokenizer: "transformers.PreTrainedTokenizerBase", prompts: Sequence[str], max_length: int = MAX_LENGTH
) -> tuple[np.ndarray, list[str]]:
    """Token ids (len(prompts), max_length) padded as ModelScope does, and for each prompt
    the text that was cut off because it did not fit ("" if nothing was)."""
    encoded = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
    cut = []
    for prompt, ids in zip(prompts, encoded.input_ids):
        kept = tokenizer.decode(ids, skip_special_tokens=True)
        full = tokenizer.decode(tokenizer(prompt).input_ids, skip_special_tokens=True)
        cut.append(full[len(kept) :].strip() if len(full) > len(kept) else "")
    return encoded.input_ids.astype(np.int32), cut


def word_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges that make each (lower-case, ASCII) word a single token: its prefixes are
    merged left to right, ending with the word-final symbol ("red" -> r+e, re+d</w>).

    Longer words' merges rank first: BPE applies the best-ranked pair first, so a shorter
    word's merge (a+n of "and") would otherwise split a longer word's chain ("triangle")."""
    merges: list[tuple[str, str]] = []
    for word in sorted(words, key=len, reverse=True):
        if not (word.isascii() and word.isalpha() and word.islower()):
            raise ValueError(f"tokenizer words must be lower-case ASCII letters, got {word!r}")
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        prefix = symbols[0]
        for symbol in symbols[1:]:
            if (prefix, symbol) not in merges:
                merges.append((prefix, symbol))
            prefix = prefix + symbol
    return merges


def write_byte_level_tokenizer(directory: str | os.PathLike, merges: Sequence[tuple[str, str]] = ()) -> pathlib.Path:
    """Writes a CLIP tokenizer folder (hub layout) over the 256 byte symbols plus `merges`."""
    from tokenizers import pre_tokenizers

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, **special})
    )
    return directory

