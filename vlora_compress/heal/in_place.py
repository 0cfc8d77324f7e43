"""Healing a file just written, in its place: what ``vlora-compress --distill`` (and run.run) does."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from ..errors import Interrupted
from .distill import HealConfig, heal, state_path


def heal_in_place(out: Path, teacher: Path, data, heal_config, progress: bool, eval_data, eval_config) -> dict:
    """Distil the teacher into the file just written, then put the healed file in its place.

    With eval data, healing scores before and after on it (``healing.before``/``after``)."""
    heal_config = heal_config or HealConfig()
    if eval_data is not None and eval_config is not None and eval_config.samples:
        heal_config = replace(heal_config, eval_samples=eval_config.samples)
    healed = out.with_name(out.name + ".healing")
    try:
        result = heal(out, teacher, data, healed, heal_config, force=True, progress=progress, eval_data=eval_data)
    except BaseException as e:
        healed.unlink(missing_ok=True)
        state_path(healed).unlink(missing_ok=True)
        if isinstance(e, Interrupted):
            raise Interrupted(f"interrupted while healing: {out} is compressed but not healed; "
                              "heal it with vlora-compress heal") from None
        raise
    os.replace(healed, out)
    return {"data": str(data), **result.to_dict(), "output": str(out)}
