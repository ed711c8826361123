"""Interpretability for `gemma_eqx` models: attention surgery and the induction-head study."""

from .analyses import (
    BreakingSet,
    KnockoutResult,
    RepetitionStats,
    attribution_gradient,
    correct_token_hits,
    correct_token_logprobs,
    digit_ids,
    duplicate_token_pattern,
    duplicate_token_scores,
    expected_pattern_mass,
    induction_pattern,
    induction_scores,
    knockout_eval,
    knockout_sweep,
    minimal_breaking_set,
    previous_token_pattern,
    previous_token_scores,
    rank_heads,
    repeated_digits,
    repeated_random_tokens,
    repetition_stats,
    single_head_masks,
)
from .capture import ActivationCache, capture, run, run_with_records
from .edits import ablate, apply_fn, patch, scale, steer
from .examples import Example, ExampleBatch, study_examples, tokenize_examples
from .install import (
    add_interventions,
    clear_interventions,
    installed,
    intervene,
    select_layers,
    set_interventions,
)
from .interventions import (
    LAYER_SITES,
    MODEL_SITES,
    SITES,
    Add,
    Apply,
    KnockOut,
    Linearized,
    OverridePattern,
    Record,
    Replace,
    Rewire,
    Scale,
    bos_onehot,
)
from .surgery import (
    attention_patterns,
    forward_with_records,
    knock_out,
    knockout_mask,
    override_attention,
    record_attention,
    set_knockout_mask,
)

__all__ = [
    "BreakingSet", "KnockoutResult", "RepetitionStats", "attribution_gradient",
    "correct_token_hits", "correct_token_logprobs", "digit_ids", "duplicate_token_pattern",
    "duplicate_token_scores", "expected_pattern_mass", "induction_pattern", "induction_scores",
    "knockout_eval", "knockout_sweep", "minimal_breaking_set", "previous_token_pattern",
    "previous_token_scores", "rank_heads", "repeated_digits", "repeated_random_tokens",
    "repetition_stats", "single_head_masks",
    "Example", "ExampleBatch", "study_examples", "tokenize_examples",
    "LAYER_SITES", "MODEL_SITES", "SITES", "ActivationCache", "Add", "Apply", "KnockOut",
    "Linearized",
    "OverridePattern", "Record", "Replace", "Rewire", "Scale", "ablate", "add_interventions",
    "apply_fn", "bos_onehot", "capture", "clear_interventions", "installed", "intervene",
    "patch", "run", "run_with_records", "scale", "select_layers", "steer", "set_interventions",
    "attention_patterns", "forward_with_records", "knock_out", "knockout_mask",
    "override_attention", "record_attention", "set_knockout_mask",
]
