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
from .splice import check_fits, feature_gradients, feature_sites, splice, spliced

__all__ = ["ACTIVATIONS", "CrossLayerTranscoder", "HookPoint", "SparseDictionary", "activate",
           "check_fits", "feature_gradients", "feature_sites", "shard_dictionary", "splice",
           "spliced"]
