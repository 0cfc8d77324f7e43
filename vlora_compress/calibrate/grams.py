"""Calibrate: run real samples through the original model and collect each layer's input Gram XᵀX.

The Grams turn factorisation from "small weight error" into "small output error on real inputs"
(whitening, fit/svd.Whitener). They are accumulated batch by batch in float64 from forward
pre-hooks; activations are never stored. Layers fed the same input tensor (q, k and v; gate and up)
share one Gram, found by the identity of the input tensor, so memory per transformer block is one
(d × d) Gram per distinct input: for a 7B Llama about 1.4 GB in float64 per block, 44 GB in all.
Where that does not fit, ``gram_dtype="fp32"`` halves it and ``gram_dir`` keeps the Grams in
memory-mapped files that the kernel pages to disk.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch

from ..config import CalibConfig
from ..io.data import read_corpus, read_images, read_texts
from ..errors import VloraError
from ..fit.svd import Whitener
from ..io.models import batches, head_of, model_device, module_for_key, pooled_embedding, takes_text, token_limit
from ..progress import Progress
from . import kl


GRAM_DTYPES = {"fp64": torch.float64, "fp32": torch.float32}  # config.GRAM_DTYPE_NAMES
# eigendecompositions kept while planning, least recently used out first: a family's layers, so that
# each candidate does not decompose them again (MiniLM's all fit; a 7B Llama's down_proj family is
# 31 GB in float64, and past this its whiteners are recomputed for each candidate: time for memory)
WHITENER_CACHE_BYTES = 16 * 2**30


class Grams:
    """Input Gram matrices per checkpoint key, and how the key's weight is oriented."""

    def __init__(self, damping: float = 1e-2, dtype: str = "fp64", folder: str | Path | None = None):
        self.damping = damping
        self.dtype = GRAM_DTYPES[dtype]
        self.folder = Path(folder) if folder is not None else None
        self.grams: dict[str, torch.Tensor] = {}
        self.side: dict[str, int] = {}
        self.alias: dict[str, str] = {}  # key -> key whose Gram it shares
        self.tokens = 0
        self.samples = 0
        self._whiteners: dict[str, Whitener | None] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.alias or key in self.grams

    def gram(self, key: str) -> torch.Tensor:
        return self.grams[self.alias.get(key, key)]

    def whitener(self, key: str) -> Whitener | None:
        """The key's whitening, cached: planning asks for each one once per candidate it fits."""
        if key not in self:
            return None
        group = self.alias.get(key, key)
        wh = self._whiteners.pop(group) if group in self._whiteners else \
            Whitener.from_gram(self.gram(key), self.side[key], self.damping)
        need = wh.nbytes if wh is not None else 0
        while self._whiteners and self._whiteners_bytes() + need > WHITENER_CACHE_BYTES:
            self._whiteners.pop(next(iter(self._whiteners)))  # the least recently asked for
        self._whiteners[group] = wh  # the most recently asked for last
        return wh

    def _whiteners_bytes(self) -> int:
        return sum(wh.nbytes for wh in self._whiteners.values() if wh is not None)

    def new(self, key: str, n: int, device: torch.device | None = None) -> torch.Tensor:
        """A zero n x n Gram, in memory on ``device`` or, with a folder, in a memory-mapped file the
        kernel pages (on the CPU)."""
        if self.folder is None:
            return torch.zeros(n, n, dtype=self.dtype, device=device)
        path = self.folder / (key.replace("/", "_") + ".gram")
        size = n * n * torch.empty(0, dtype=self.dtype).element_size()
        with open(path, "wb") as f:
            f.truncate(size)
        return torch.from_file(str(path), shared=True, size=n * n, dtype=self.dtype).view(n, n)

    @property
    def nbytes(self) -> int:
        return sum(g.numel() * g.element_size() for g in self.grams.values())


def packing(preprocessor, config: CalibConfig, causal: bool) -> str:
    """How text samples are cut: ``windows`` of running text for a causal LM (what it is trained and
    evaluated on: every position of a long context, not the first thirty tokens of a sentence),
    ``lines`` for other models (a sentence encoder sees sentences)."""
    if config.packing != "auto":
        if config.packing == "windows" and not takes_text(preprocessor):
            raise VloraError("`calibration.packing` windows needs a model that takes text")
        return config.packing
    return "windows" if causal and takes_text(preprocessor) else "lines"


def read_calibration(preprocessor, data: str | Path | list, config: CalibConfig,
                     causal: bool = False) -> tuple[list, list]:
    """(samples for the Grams, held-back samples): the first ``samples``, then ``holdout`` more, of
    the file's (or list's) lines or, packed in windows (``packing``), of its windows of
    ``max_length`` tokens. Too few for both keeps at least half for the Grams. With
    ``holdout_data`` the held-back samples are that file's first ``holdout``, read the same way.
    """
    if config.holdout_data is not None and config.holdout:
        alone = replace(config, holdout=0, holdout_data=None)
        samples = read_calibration(preprocessor, data, alone, causal)[0]
        held = read_calibration(preprocessor, config.holdout_data, replace(alone, samples=config.holdout), causal)[0]
        return samples, held
    want = config.samples + config.holdout
    if isinstance(data, (list, tuple)) and not data:
        raise VloraError("`calib` is an empty list of samples")
    if packing(preprocessor, config, causal) == "windows":
        text = "\n".join(map(str, data)) if isinstance(data, (list, tuple)) else read_corpus(data)
        items = text_windows(preprocessor, text, config.max_length, want)
    elif isinstance(data, (list, tuple)):
        items = list(data[:want])
    else:
        reader = read_texts if takes_text(preprocessor) else read_images
        items = reader(data, want)
    held = min(config.holdout, len(items) // 2)
    return items[: len(items) - held][: config.samples], items[len(items) - held:]


def text_windows(tokenizer, text: str, length: int, limit: int) -> list[str]:
    """The first ``limit`` windows of ``length`` tokens of ``text`` (the last may be shorter), as
    text: each is decoded, so that samples stay text whatever reads them, and the tokenizer adds
    its special tokens when it reads them back."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    windows = [tokenizer.decode(ids[i:i + length]) for i in range(0, len(ids), length)][:limit]
    if not windows:
        raise VloraError("the calibration text holds no tokens")
    return windows


TOP_TOKENS = 256  # next-token KL: the reference's likeliest tokens kept per position, the rest as one


class OutputMeter:
    """The model's output error, with some weights replaced, on held-back samples.

    This is what ``auto`` planning decides by: the error at the model's output, not in the weights.
    ``measure`` says which output (config.MEASURES, resolved by ``resolve_measure``):

    - ``hidden``: the final hidden states' relative squared error over real tokens;
    - ``logits``: for a causal LM (``model`` then has its head), the mean KL divergence of the next-token
      distributions from the original's, per real token: what perplexity feels. The original's
      ``TOP_TOKENS`` likeliest tokens are kept per position and the rest of the vocabulary counted as
      one outcome, so the reference holds 256 numbers a token, not the vocabulary. Where the logits
      are the head's product with the last hidden state, a measurement runs the base model only and
      takes those tokens' logits from their head rows, the rest's mass to first order (kl.py): its
      cost is the layers', not the vocabulary's. Otherwise the head and a log-softmax over the
      vocabulary run per measurement;
    - ``embedding``: the mean of 1 - cosine between the pooled sentence embeddings (the mean over real
      tokens of the last hidden state, as ``vlora-eval --task embedding`` scores them).

    A subclass measures somewhere else by giving other ``_outputs`` (blockwise.BlockMeter: the
    output of one block of layers). ``name`` is what a decision records its errors as (plan.MEASURES).
    """

    measure = "hidden"
    head: kl.Head | None = None  # a causal LM's head, where the KL is taken from the hidden states
    _head_at: int | None = None  # where its weights were when loaded (a replaced head is not there)

    def __init__(self, model, preprocessor, samples: list, max_length: int, read=None, batch_size: int = 32,
                 measure: str = "hidden"):
        self.model, self.read, self.measure = model, read, measure
        limit = token_limit(model, max_length)
        self.head = kl.plain_head(model) if measure == "logits" else None  # KL from the hidden states (kl.py)
        if measure == "logits" and self.head is None:  # a batch's log-probabilities: at most 256 MB
            vocab = model.get_output_embeddings().weight.shape[0]
            batch_size = max(1, min(batch_size, 2**26 // (limit * vocab)))
        self.batches = list(batches(preprocessor, samples, batch_size, limit))
        self._modules: dict[str, torch.nn.Module] = {}
        if self.head is not None and not self._head_agrees():
            self.head = None
        # the head's weights as loaded: a measurement that replaces them (a quantized head or tied
        # embedding) is taken with the head it was given, over the whole vocabulary
        self._head_at = self.model.get_output_embeddings().weight.data_ptr() if self.head is not None else None
        self.reference = [self._reference(out) for out in self._outputs()]

    @property
    def name(self) -> str:
        return {"hidden": "model"}.get(self.measure, self.measure)

    def __call__(self, replacements: dict[str, torch.Tensor]) -> float:
        saved = []
        try:
            for key, w in replacements.items():
                module = self._module(key)
                saved.append((module, module.weight.data))
                module.weight.data = w.to(device=module.weight.device, dtype=module.weight.dtype).reshape(
                    module.weight.shape)
            head = self._replaced_head()
            err = total = 0.0
            for out, ref in zip(self._outputs(), self.reference):
                e, n = self._error(out, ref, head)
                err, total = err + e, total + n
            return err / total
        finally:
            for module, data in saved:
                module.weight.data = data

    def _replaced_head(self) -> kl.Head | None:
        """The head with the weights a measurement put in its place, or None where they are the
        loaded ones (or the logits are measured plainly)."""
        if self.head is None:
            return None
        weight = self.model.get_output_embeddings().weight
        return None if weight.data_ptr() == self._head_at else kl.Head(weight.detach().float(), self.head.bias)

    def finds(self, key: str) -> bool:
        """Whether checkpoint tensor ``key`` is the weight of a module of the model measured (a head
        outside the base model it runs is not)."""
        if key not in self._modules:
            found = module_for_key(self.model, key, self.read)
            if found is None:
                return False
            self._modules[key] = found[1]
        return True

    def _module(self, key: str) -> torch.nn.Module:
        if not self.finds(key):
            raise VloraError(f"cannot find the module of {key} in the model to measure a plan")
        return self._modules[key]

    def _outputs(self) -> Iterator[torch.Tensor]:
        """What each held-back batch gives, one batch at a time: its real tokens' final hidden states
        (float64) or next-token log-probabilities (float32), or its samples' pooled embeddings."""
        device = model_device(self.model)
        model = self.model.base_model if self.head is not None else self.model  # no head: kl.py applies it
        for inputs, mask, _ in self.batches:
            mask = mask.to(device) if mask is not None else None
            with torch.no_grad():
                out = model(**{k: v.to(device) for k, v in inputs.items()})
                if self.measure == "embedding":
                    yield pooled_embedding(out, mask).double()
                    continue
                h = out.logits if self.measure == "logits" and self.head is None else out.last_hidden_state
                h = h[mask] if mask is not None else h.flatten(0, -2)
                if self.measure != "logits":
                    yield h.double()
                else:
                    yield h.float() if self.head is not None else torch.log_softmax(h.float(), -1)

    def _head_agrees(self) -> bool:
        """Whether the model's logits on the first two samples are its head's product with its base
        model's last hidden state (kl.agrees): soft-capped or scaled logits are measured plainly."""
        device = model_device(self.model)
        inputs = {k: v[:2].to(device) for k, v in self.batches[0][0].items()}  # two samples tell
        with torch.no_grad():
            logits = self.model(**inputs).logits
            hidden = self.model.base_model(**inputs).last_hidden_state
        return kl.agrees(self.head, hidden, logits)

    def _reference(self, out: torch.Tensor):
        """What the original's outputs are kept as: under ``logits`` the likeliest tokens' indices and
        log-probabilities, and the log of the rest's probability; else the outputs themselves."""
        if self.measure != "logits":
            return out
        if self.head is not None:
            return kl.reference(self.head, out, TOP_TOKENS)
        top, at = out.topk(min(TOP_TOKENS, out.shape[-1]), dim=-1)
        return at, top.double(), kl.log_rest(top.double())

    def _error(self, out: torch.Tensor, ref, head: kl.Head | None = None) -> tuple[float, float]:
        """(summed error, what it is divided by) of one batch; ``head``: a head replaced for this
        measurement (its change is not the hidden state's, which kl_sum takes to first order)."""
        if self.measure == "logits" and head is not None:
            return kl.kl_sum_plain(head, out, ref), out.shape[0]
        if self.measure == "logits" and self.head is not None:
            return kl.kl_sum(self.head, out, ref), out.shape[0]
        if self.measure == "logits":
            at, top, rest = ref
            mine = out.gather(-1, at).double()
            div = (top.exp() * (top - mine)).sum(-1) + torch.xlogy(rest.exp(), rest.exp()) - rest.exp() * kl.log_rest(mine)
            return float(div.sum()), out.shape[0]
        if self.measure == "embedding":
            return float((1 - (out * ref).sum(-1)).sum()), out.shape[0]
        return float((out - ref).square().sum()), float(ref.square().sum())


def resolve_measure(measure: str, model_config) -> str:
    """What a plan is measured by: ``auto`` follows what ``vlora-eval`` scores the model by by
    default (evaluate.default_task): next-token KL for a causal LM (perplexity), the pooled
    embedding's cosine for a model without a head (embedding), the final hidden states otherwise."""
    head = head_of(model_config)
    if measure == "auto":
        return {"causal-lm": "logits", "base": "embedding"}.get(head, "hidden")
    if measure == "logits" and head != "causal-lm":
        raise VloraError("`calibration.measure` logits needs a causal LM (a model with a language-model head)")
    return measure


def calibrate(model: torch.nn.Module, preprocessor, data: str | Path | list, keys: list[str],
              config: CalibConfig = CalibConfig(), progress: bool = False,
              read: Callable[[str], torch.Tensor] | None = None) -> Grams:
    """Grams for every checkpoint key in ``keys`` that is the weight of a Linear or Conv1D module.

    ``data`` is a file or a list of samples already read. ``read(key)`` gives the checkpoint
    tensor, to find a module whose name transformers changed.
    """
    grams = Grams(config.damping, config.gram_dtype, config.gram_dir)
    batch_state: dict = {}
    handles = []
    for key in keys:
        found = module_for_key(model, key, read)
        if found is None:
            continue
        _, module = found
        kind = type(module).__name__
        if isinstance(module, torch.nn.Linear):
            side = 1
        elif kind == "Conv1D":  # GPT-2: y = x W + b with W stored (in, out)
            side = 0
        else:
            continue
        grams.side[key] = side
        handles.append(module.register_forward_pre_hook(gram_hook(key, grams, batch_state)))
    if not handles:
        raise VloraError("calibration found none of the factorised weights in the model's linear layers")
    try:
        samples = data if isinstance(data, list) else read_calibration(
            preprocessor, data, replace(config, holdout=0), head_of(model.config) == "causal-lm")[0]
        work = list(batches(preprocessor, samples, config.batch_size, token_limit(model, config.max_length)))
        with torch.no_grad(), Progress("calibrating", len(work), enabled=progress) as bar:
            device = model_device(model)
            for inputs, mask, n in work:
                batch_state.clear()
                batch_state["mask"] = mask.to(device) if mask is not None else None
                model(**{k: v.to(device) for k, v in inputs.items()})
                grams.samples += n
                grams.tokens += int(mask.sum()) if mask is not None else n
                bar.advance()
    finally:
        for h in handles:
            h.remove()
    return grams


def sibling_input(seen: dict, x: torch.Tensor, key: str) -> str | None:
    """The key whose module was fed this very tensor earlier in the batch (q, k and v; gate and up
    share one Gram), or None, and then ``key`` is remembered as its first reader. A weak reference,
    not the address: a freed activation's memory is reused by the next layer's input."""
    earlier = seen.get(id(x))
    if earlier is not None and earlier[0]() is x:
        return earlier[1]
    seen[id(x)] = (weakref.ref(x), key)
    return None


def token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A module input as (tokens, features) rows, padding tokens left out: they are not real inputs."""
    rows = x.reshape(-1, x.shape[-1])
    return rows[mask.reshape(-1)] if mask is not None and rows.shape[0] == mask.numel() else rows


def gram_hook(key: str, grams: Grams, batch_state: dict):
    """A forward pre-hook adding its module's input rows to ``key``'s Gram (or noting the key
    whose Gram it shares); ``batch_state`` holds the batch's ``mask`` and is cleared per batch."""
    def hook(module, args):
        first = sibling_input(batch_state.setdefault("seen", {}), args[0], key)
        if first is not None:
            grams.alias[key] = first
            return
        rows = token_rows(args[0], batch_state.get("mask")).float()  # each product in float32, summed in float64
        if key not in grams.grams:
            grams.grams[key] = grams.new(key, rows.shape[1], rows.device)
        gram = grams.grams[key]
        gram += (rows.T @ rows).to(device=gram.device, dtype=grams.dtype)

    return hook
