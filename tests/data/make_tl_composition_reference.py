"""Reference for tests/test_circuits.py: TransformerLens 4.3.0's
`all_composition_scores` (on a `TransformerBridge` of a tiny transformers Gemma 3 with random
weights: 3 layers, 4 query heads, 2 key heads, embed 32, head_dim 8, norm scales 1); its
attention weights (key and value heads unexpanded) and the Q-, K- and V-composition scores
are written to `tl_composition_reference.npz`.

    $TL_PYTHON tests/data/make_tl_composition_reference.py [OUT.npz]

(TransformerLens lives in its own virtual environment:
`pip install -c constraints.txt transformer-lens==4.3.0 transformers==5.24.0`, with
`torch==2.13.0` in the constraints file.)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models
from transformer_lens.model_bridge import TransformerBridge

LAYERS, HEADS, KV_HEADS, D_MODEL, D_HEAD = 3, 4, 2, 32, 8


def main(out: Path) -> None:
    config = transformers.Gemma3TextConfig(
        vocab_size=50, hidden_size=D_MODEL, intermediate_size=48, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=D_HEAD)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * p.shape[-1] ** -0.5
                    if p.ndim > 1 else torch.zeros(p.shape))  # norms: scale 1 + 0
    vocab = {f"t{i}": i for i in range(50)}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        bridge = TransformerBridge.boot_transformers(directory, hf_model=hf, tokenizer=tokenizer)
        scores = {f"scores_{m}": bridge.all_composition_scores(m).scores for m in "QKV"}
    layers = [layer.self_attn for layer in hf.model.layers]

    def heads(w, n):  # a [n * head_dim, d_model] projection as [n, d_model, head_dim]
        return w.reshape(n, D_HEAD, D_MODEL).transpose(1, 2)

    arrays = {
        "W_Q": torch.stack([heads(a.q_proj.weight, HEADS) for a in layers]),
        "W_K": torch.stack([heads(a.k_proj.weight, KV_HEADS) for a in layers]),
        "W_V": torch.stack([heads(a.v_proj.weight, KV_HEADS) for a in layers]),
        "W_O": torch.stack([a.o_proj.weight.T.reshape(HEADS, D_HEAD, D_MODEL) for a in layers]),
        **scores,
    }
    np.savez(out, **{k: v.detach().numpy().astype(np.float64) for k, v in arrays.items()})


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1
         else Path(__file__).with_name("tl_composition_reference.npz"))
