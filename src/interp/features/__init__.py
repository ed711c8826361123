"""Sparse dictionaries (SAEs, transcoders, cross-layer transcoders) as Equinox modules:
loaded from Gemma Scope 1 and 2 and SAELens folders, spliced into any model of the zoo, their
features sites like any other (`features@<site>`), evaluated with SAELens' metrics."""

from .dictionary import (
    ACTIVATIONS,
    CrossLayerTranscoder,
    HookPoint,
    SparseDictionary,
    activate,
    shard_dictionary,
)
from .evaluate import DictionaryMetrics, evaluate
from .load import load_dictionary, load_gemma_scope_1, load_gemma_scope_2, load_saelens
from .splice import check_fits, feature_gradients, feature_sites, splice, spliced

__all__ = ["ACTIVATIONS", "CrossLayerTranscoder", "DictionaryMetrics", "HookPoint",
           "SparseDictionary", "activate", "check_fits", "evaluate", "feature_gradients",
           "feature_sites", "load_dictionary", "load_gemma_scope_1", "load_gemma_scope_2",
           "load_saelens", "shard_dictionary", "splice", "spliced"]
