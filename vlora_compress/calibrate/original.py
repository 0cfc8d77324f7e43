"""The original model, loaded to calibrate on: whole, or by layer for the sequential fit, with its
head where plans are measured by next-token KL, aligned where the weights are."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import CalibConfig
from ..errors import VloraError
from ..fit.align import read_config
from ..io.models import config_folder, head_of, load_by_layer, load_model, load_preprocessor, set_tensors
from .grams import read_calibration, resolve_measure


def load_original(source, config_dir, calib, tokenizer, calib_config: CalibConfig, ckpt, aligned, device,
                       by_layer_keys: set[str], with_head: bool = False):
    """(model, preprocessor, samples for the Grams, held-back samples, weights loaded by layer, the
    model with its language-model head) of the original model.

    A model in memory is used as it is, with ``tokenizer`` (or the preprocessor in ``config_dir``).
    From a path, the weights in ``by_layer_keys`` are not loaded but left to the sequential fit,
    which loads each layer's when it gets there (models.load_by_layer: the model never whole in
    memory); the fifth item maps those keys to their parameters, or is None when the model was
    loaded whole. With aligned weights the model runs aligned too: the same function, but the
    inputs of the output projections arrive permuted and rotated as the aligned weights expect them.
    ``with_head``: a causal LM is loaded whole with its head, the model being its base (the same
    modules), to measure plans by next-token KL; else (and for other models) the last item is None.
    """
    by_layer = lm = None
    if isinstance(source, torch.nn.Module):
        model = getattr(source, "base_model", source)  # the hidden states, as the "base" head gives them
        if with_head and model is not source and source.get_output_embeddings() is not None:
            lm = source
        preprocessor = tokenizer if tokenizer is not None else \
            load_preprocessor(config_dir) if config_dir is not None else None
        if preprocessor is None:
            raise VloraError("calibrating a model in memory needs its `tokenizer` (or image processor)")
    else:
        folder = config_folder(config_dir or source)
        path, cdir = (Path(source), None) if config_dir is None else (source, folder)
        loaded = load_by_layer(path, cdir, "base", ckpt, by_layer_keys, device) if by_layer_keys else None
        if loaded is not None:
            model, by_layer = loaded
        elif with_head and head_of(read_config(folder)) == "causal-lm":
            lm = load_model(path, cdir, "causal-lm").to(device)
            model = lm.base_model
        else:
            model = load_model(path, cdir, "base").to(device)
        preprocessor = tokenizer if tokenizer is not None else load_preprocessor(folder)
    if aligned:  # weights loaded by layer are read aligned when they are loaded
        set_tensors(model, {k: v for k, v in aligned.items() if not (by_layer and k in by_layer)}, ckpt.read)
    samples, held = read_calibration(preprocessor, calib, calib_config, head_of(model.config) == "causal-lm")
    return model, preprocessor, samples, held, by_layer, lm


def measure_of(asked: str, model, lm) -> str:
    """What plans are measured by (calibrate.resolve_measure); ``auto`` on a causal LM given without
    its head (a base model in memory) measures its final hidden states."""
    measure = resolve_measure(asked, model.config)
    if measure == "logits" and lm is None:
        if asked == "auto":
            return "hidden"
        raise VloraError("`calibration.measure` logits needs the model with its language-model head")
    return measure
