"""Storage forms: how a family of layers is stored, one registered class a form.

``base.py`` says what a form declares (docs/architecture.md); ``stored.py`` holds the registry,
``form_of`` (the form that stores a written chunk) and the one walk every reader follows, asking
each chunk's form; each other module is one form and registers itself on import: dense (every layer whole), per_layer (per-layer low rank), vlora (a
base and increments, chain or star), shared (a basis shared by a group, either side, with or
without residual factors), quantized_base (W ≈ Q + B A). Adding a form is one module here, its
import below, and its tests.
"""

from . import dense, per_layer, quantized_base, shared, vlora  # noqa: F401 - each registers its form
from .base import Candidate, Form, candidate_bytes, dense_if_cheaper, family_plan, fit_rank, store_dtype
from .stored import FORMS, family_bytes, family_matrices, form_of, register, walk

__all__ = ["FORMS", "Candidate", "Form", "candidate_bytes", "dense", "dense_if_cheaper", "family_bytes", "family_matrices",
           "family_plan", "fit_rank", "form_of", "per_layer", "quantized_base", "register", "shared", "store_dtype", "vlora",
           "walk"]
