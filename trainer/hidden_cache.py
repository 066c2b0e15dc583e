"""The hidden states entering the first tuned layer, computed once per token sequence.

With the routers of layers ``first..`` being tuned and every other weight frozen, layers
``0..first-1`` compute the same states for a sequence at every step, in the success set's
scoring, in the after-training re-scoring and in an evaluation of a patch whose layers all lie
at or above ``first``. :class:`HiddenCache` stores those states per sequence of token ids
(computed once, without grad) and runs only ``layers[first:]``, the final norm and the LM head.

How the suffix runs: the decoder's own ``forward`` with ``inputs_embeds`` = the cached states
and ``decoder.layers`` cut to ``layers[first:]`` for the call. Every supported family (OLMoE,
Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3) builds its rotary positions and its causal + padding mask
from ``inputs_embeds``' shape and ``attention_mask`` alone and does nothing else to
``inputs_embeds``; a decoder layer knows whether it is dense or MoE (``mlp_only_layers``,
``first_k_dense_replace``) from its construction. The one per-layer value the forward looks up
by loop position is ``config.layer_types`` (full or sliding attention), which is cut alike.
The prefix runs the same way with the layers cut to ``layers[:first]``; its result is taken at
the final norm's input, i.e. the output of layer ``first - 1``.

Storage: causal attention makes a prompt's states the same in every choice's sequence, so a
prompt is stored once and each choice stores only its own tokens' states (a 4-choice question
with a 60-token prompt and 5-token answers costs 80 token states, not 260). Memory costs
``hidden_size x bytes per value`` per token: 2.25 MiB per 1024 tokens for hidden 576 in fp32.
``disk`` mode also keeps them in a safetensors file under the cache folder, named by the
fingerprints of the model's prefix weights and config and of the data, the layer and the dtype,
so a later run on the same model and data (a sweep, an evaluation of another patch) skips the
prefix entirely. Any change to those weights, the config or the data names another file.

Valid only while layers ``0..first-1`` (their routers included) are unchanged: the recipe tunes
routers at or above ``first`` only, and evaluation opens a cache below the first patched layer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from roma_patch import fingerprint, raw_from_torch
from roma_trainer.config import HiddenCacheMode
from roma_trainer.data import Sample, data_fingerprint
from roma_trainer.packing import Layout, can_share_prompts
from roma_trainer.scoring import Encoded

log = logging.getLogger("roma_trainer.hidden_cache")

FILE_FORMAT = "roma-hidden-cache/1"
MIB = 2**20


def default_cache_dir() -> Path:
    """``$ROMA_CACHE_DIR/hidden-states`` (``~/.cache/roma/hidden-states`` without the variable)."""
    return Path(os.environ.get("ROMA_CACHE_DIR", Path.home() / ".cache" / "roma")) / "hidden-states"


@contextmanager
def only_layers(decoder: nn.Module, start: int, stop: int | None) -> Iterator[None]:
    """Run ``decoder``'s forward over ``decoder.layers[start:stop]`` only, inside the block."""
    layers = decoder.layers
    types = getattr(decoder.config, "layer_types", None)
    decoder.layers = layers[start:stop]
    if types is not None:
        decoder.config.layer_types = list(types[start:stop])
    try:
        yield
    finally:
        decoder.layers = layers
        if types is not None:
            decoder.config.layer_types = types


def prefix_fingerprint(model: nn.Module, first_layer: int) -> str:
    """sha256 of the model's config and of every decoder weight outside ``layers[first:]``."""
    decoder = model.get_decoder()
    suffix = tuple(f"layers.{i}." for i in range(first_layer, len(decoder.layers)))
    kept = ((n, p) for n, p in decoder.named_parameters() if not n.startswith(suffix))
    return weights_fingerprint(model, kept)


def weights_fingerprint(
    model: nn.Module, params: Iterable[tuple[str, torch.Tensor]] | None = None
) -> str:
    """sha256 of the model's config and of ``params`` (default: every weight it holds)."""
    found = model.named_parameters() if params is None else params
    specs = {name: raw_from_torch(param).spec() for name, param in found}
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")}
    config.pop("transformers_version", None)
    text = json.dumps(config, sort_keys=True, default=str) + "\n" + fingerprint(specs)
    return hashlib.sha256(text.encode()).hexdigest()


def _ids_key(ids: torch.Tensor) -> bytes:
    return ids.to(torch.int64).numpy().tobytes()


def _key_ids(key: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(key), dtype=torch.int64)


class HiddenCache:
    """Per-sequence hidden states entering layer ``first_layer`` of ``model``; see the module
    docstring. ``path`` set: loaded from there if the file exists, written by :meth:`save`."""

    def __init__(self, model: nn.Module, first_layer: int, path: Path | None = None) -> None:
        if first_layer < 1:
            raise ValueError("a hidden-state cache needs at least one layer below the first tuned")
        self.model = model
        self.decoder = model.get_decoder()
        self.first_layer = first_layer
        self.hidden_size: int = model.config.hidden_size
        self.dtype = next(model.parameters()).dtype
        self.share = can_share_prompts(model)
        self.path = path
        self.prompts: dict[bytes, torch.Tensor] = {}  # prompt ids -> [prompt len, H]
        self.choices: dict[tuple[bytes, int], torch.Tensor] = {}  # (ids, prompt len) -> [n, H]
        self.unsaved = False
        if path is not None and path.is_file():
            self._load(path)

    # ------------------------------------------------------------------------- forward
    def last_hidden_state(self, enc: Encoded) -> torch.Tensor:
        """What ``model.get_decoder()(enc)`` returns, running only ``layers[first:]`` (on
        prompts shared by their choices, see :mod:`roma_trainer.packing`)."""
        self._fill(enc)  # before the cut below: it may run the prefix
        layout = Layout.of(enc, self.share)
        entering = torch.zeros(
            (len(layout.position_ids), layout.width, self.hidden_size), dtype=self.dtype
        )
        for row, (prompt, choice) in enumerate(self._keys(enc)):
            b, start, n = layout.row_of[row], layout.start_of[row], enc.continuation_lens[row]
            entering[b, : enc.context_lens[row]] = self.prompts[prompt]
            entering[b, start : start + n] = self.choices[choice]
        device = next(self.model.parameters()).device
        with only_layers(self.decoder, self.first_layer, None):
            out = self.decoder(
                inputs_embeds=entering.to(device),
                attention_mask=layout.attention_mask(self.model, self.dtype).to(device),
                position_ids=layout.position_ids.to(device),
                use_cache=False,
            ).last_hidden_state
        unpacked = out.reshape(-1, out.shape[-1]).index_select(
            0, layout.unpack_index(enc).to(device)
        )
        return unpacked.view(*enc.input_ids.shape, out.shape[-1])

    def routing_rows(self, enc: Encoded, rows: Sequence[int]) -> tuple[list[int], int]:
        """Where :meth:`last_hidden_state` puts the prompt of each of ``enc``'s ``rows``:
        (packed row of each, packed width), for :meth:`RoutingCapture.target`."""
        layout = Layout.of(enc, self.share)
        return [layout.row_of[row] for row in rows], layout.width

    def _keys(self, enc: Encoded) -> list[tuple[bytes, tuple[bytes, int]]]:
        keys = []
        for row, n_prompt in enumerate(enc.context_lens):
            ids = enc.input_ids[row, : n_prompt + enc.continuation_lens[row]]
            keys.append((_ids_key(ids[:n_prompt]), (_ids_key(ids), n_prompt)))
        return keys

    @torch.no_grad()
    def _fill(self, enc: Encoded) -> None:
        """Compute the states of ``enc``'s rows not cached yet, in one forward of the prefix."""
        keys = self._keys(enc)
        rows = [
            i for i, (p, c) in enumerate(keys) if p not in self.prompts or c not in self.choices
        ]
        if not rows:
            return
        sub = Encoded(
            enc.input_ids[rows],
            enc.attention_mask[rows],
            [enc.context_lens[r] for r in rows],
            [enc.continuation_lens[r] for r in rows],
            [enc.first_text_token[r] for r in rows],
        )
        layout = Layout.of(sub, self.share)
        device = next(self.model.parameters()).device
        entering: list[torch.Tensor] = []
        # layers[:first] then the final norm: the norm's input is the output of layer first-1
        handle = self.decoder.norm.register_forward_pre_hook(
            lambda _module, args: entering.append(args[0])
        )
        try:
            with only_layers(self.decoder, 0, self.first_layer):
                self.decoder(
                    input_ids=layout.pack(sub, sub.input_ids).to(device),
                    attention_mask=layout.attention_mask(self.model, self.dtype).to(device),
                    position_ids=layout.position_ids.to(device),
                    use_cache=False,
                )
        finally:
            handle.remove()
        states = entering[0].to("cpu", self.dtype)
        for j, row in enumerate(rows):
            prompt, choice = keys[row]
            b, start, n = layout.row_of[j], layout.start_of[j], sub.continuation_lens[j]
            if prompt not in self.prompts:
                self.prompts[prompt] = states[b, : sub.context_lens[j]].clone()
            self.choices[choice] = states[b, start : start + n].clone()
        self.unsaved = True

    # ------------------------------------------------------------------------- size
    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.prompts.values()) + sum(
            len(t) for t in self.choices.values()
        )

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.prompts.values()) + sum(
            t.nbytes for t in self.choices.values()
        )

    def describe(self) -> str:
        return (
            f"layer={self.first_layer} prompts={len(self.prompts)} choices={len(self.choices)} "
            f"tokens={self.n_tokens} size_mib={self.nbytes / MIB:.1f}"
        )

    # ------------------------------------------------------------------------- disk
    def save(self) -> None:
        """Write every cached state to :attr:`path` (atomically), if anything is new.

        Layout: the token ids of every key and the states, each concatenated, with lengths to
        split them again (``choice_splits`` = the prompt length inside each choice's ids)."""
        if self.path is None or not self.unsaved or not self.prompts:
            return
        prompt_ids = [_key_ids(key) for key in self.prompts]
        choice_ids = [_key_ids(key) for key, _ in self.choices]
        tensors = {
            "prompt_ids": torch.cat(prompt_ids),
            "prompt_lens": torch.tensor([len(ids) for ids in prompt_ids]),
            "prompt_states": torch.cat(list(self.prompts.values())),
            "choice_ids": torch.cat(choice_ids),
            "choice_lens": torch.tensor([len(ids) for ids in choice_ids]),
            "choice_splits": torch.tensor([split for _, split in self.choices]),
            "choice_states": torch.cat(list(self.choices.values())),
        }
        write_tensors(self.path, tensors, {"format": FILE_FORMAT, "layer": str(self.first_layer)})
        self.unsaved = False
        log.info("hidden cache saved path=%s", self.path)

    def _load(self, path: Path) -> None:
        """Read a file :meth:`save` wrote; any other (or a damaged one) is ignored, with a
        warning, and replaced by the next :meth:`save`."""
        t = read_tensors(path, FILE_FORMAT, "hidden cache")
        if t is None:
            return
        prompt_ids = t["prompt_ids"].split(t["prompt_lens"].tolist())
        states = t["prompt_states"].split(t["prompt_lens"].tolist())
        self.prompts = {_ids_key(ids): s for ids, s in zip(prompt_ids, states, strict=True)}
        lens, splits = t["choice_lens"].tolist(), t["choice_splits"].tolist()
        choice_ids = t["choice_ids"].split(lens)
        states = t["choice_states"].split([n - s for n, s in zip(lens, splits, strict=True)])
        self.choices = {
            (_ids_key(ids), split): s
            for ids, split, s in zip(choice_ids, splits, states, strict=True)
        }
        log.info("hidden cache loaded path=%s %s", path, self.describe())


def read_tensors(path: Path, file_format: str, what: str) -> dict[str, torch.Tensor] | None:
    """The tensors of a safetensors file whose metadata names ``file_format``; None, with a
    warning, for any other file or a damaged one (the next :func:`write_tensors` replaces it)."""
    try:
        with safe_open(path, "pt") as f:
            fmt = (f.metadata() or {}).get("format")
        found = load_file(path) if fmt == file_format else None
    except (OSError, SafetensorError) as exc:
        fmt, found = f"unreadable ({exc})", None
    if found is None:
        log.warning("%s %s has format %s, not %s: ignored", what, path, fmt, file_format)
    return found


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically: a reader (another run) never sees half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    save_file(tensors, partial, metadata=metadata)
    os.replace(partial, path)


def open_hidden_cache(
    mode: HiddenCacheMode,
    model: nn.Module,
    first_layer: int,
    tokenizer,
    samples: Sequence[Sample],
    cache_dir: Path | None = None,
) -> HiddenCache | None:
    """The cache for scoring ``samples`` with layers below ``first_layer`` frozen, or None when
    ``mode`` is off or nothing lies below ``first_layer``. Logs what it will hold."""
    if mode == "off":
        return None
    if first_layer < 1:
        log.info("hidden cache off: the first tuned layer is layer 0, nothing lies below it")
        return None
    per_token = model.config.hidden_size * next(model.parameters()).element_size()
    prompts = sorted({s.prompt for s in samples})
    choices = [c for s in samples for c in s.choices]
    n_tokens = sum(map(len, tokenizer(prompts).input_ids)) + sum(
        map(len, tokenizer(choices, add_special_tokens=False).input_ids)
    )
    log.info(
        "hidden cache (%s): states entering layer %d, %.2f MiB per 1024 tokens, "
        "about %.1f MiB for %d tokens",
        mode, first_layer, per_token * 1024 / MIB, per_token * n_tokens / MIB, n_tokens,
    )  # fmt: skip
    path = None
    if mode == "disk":
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        name = (
            f"{prefix_fingerprint(model, first_layer)[:16]}-{data_fingerprint(samples)[:16]}"
            f"-layer{first_layer}-{dtype}.safetensors"
        )
        path = (cache_dir or default_cache_dir()) / name
    return HiddenCache(model, first_layer, path)
