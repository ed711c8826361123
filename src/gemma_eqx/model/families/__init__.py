"""Model families beyond Gemma, each a declaration (`Family`) over the one schema.

A family states the facts that set it apart (norms, positional scheme, MLP kind, biases,
tied or untied unembedding) as `GemmaConfig` fields, and how its Hugging Face `config.json`
and GGUF metadata spell them. `gemma_eqx.formats` reads every family through these
declarations; `gemma_eqx.model.modules` builds every model from the config fields alone, and
`gemma_eqx.model.params` names every leaf in every format. Gemma's own three generations are
declared in `gemma_eqx.core.config.family_config`.
"""

from __future__ import annotations

from typing import Any

from . import gpt, llama
from .base import Family, FieldReader, Stored, unpermute_rotary

FAMILIES: dict[str, Family] = {f.name: f for f in (*llama.FAMILIES, *gpt.FAMILIES)}


def family_of_hf(model_type: Any) -> Family | None:
    """The family whose `config.json` says `model_type`, or None."""
    return next((f for f in FAMILIES.values() if model_type in f.hf_model_types), None)


def family_of_gguf(architecture: Any) -> Family | None:
    """The family a GGUF file's `general.architecture` names, or None."""
    return next((f for f in FAMILIES.values() if architecture in f.gguf_architectures), None)


__all__ = ["FAMILIES", "Family", "FieldReader", "Stored", "family_of_gguf", "family_of_hf",
           "unpermute_rotary"]
