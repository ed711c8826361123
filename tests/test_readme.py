"""Every Python example of README.md runs, in order, in one namespace (the real 270M; Kaggle,
the Hub and the example paths replaced by local stand-ins), so the README cannot drift."""

from __future__ import annotations

import re
import shutil
import textwrap
import time
from pathlib import Path

import pytest

import gemma_eqx
from factories import shrink
from gemma_eqx.formats import hub
from gemma_eqx.formats.kaggle import save_checkpoint

README = Path(__file__).parent.parent / "README.md"


def python_blocks(*, excerpts: bool = False) -> list[tuple[int, str]]:
    """(line, code) of every ```python block at the left margin (an example), or with
    `excerpts` of every indented one (a quotation of the source, inside a list item)."""
    text = README.read_text()
    found = []
    for m in re.finditer(r"^( *)```python\n(.*?)^ *```", text, re.S | re.M):
        if bool(m.group(1)) == excerpts:
            found.append((text[:m.start()].count("\n") + 2, textwrap.dedent(m.group(2))))
    return found


def test_source_excerpts_in_the_readme_are_in_the_source():
    source = " ".join(p.read_text() for p in (README.parent / "src").rglob("*.py"))
    squash = lambda text: " ".join(text.split())  # noqa: E731
    excerpts = python_blocks(excerpts=True)
    assert excerpts
    for line, code in excerpts:
        assert squash(code) in squash(source), f"README.md line {line} quotes code that changed"


def test_the_readme_has_the_examples_this_test_runs():
    blocks = python_blocks()
    assert len(blocks) >= 8
    assert any("run_study" in code for _, code in blocks)
    assert any("activation_patching" in code for _, code in blocks)


def _tiny_qwen3_directory(directory: Path) -> Path:
    """A Qwen3 directory as the Hub holds one: transformers' save_pretrained of a tiny random
    model, and a byte-level BPE tokenizer.json with its tokenizer_config.json."""
    import json

    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8)).save_pretrained(directory)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(["<|endoftext|>", *alphabet])}
    tokenizer = Tokenizer(models.BPE(vocab, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": None}))
    return directory


def _gemma_scope_2_stand_in(root):
    """Gemma Scope 2's folder of the README's example, in its layout, with a narrower random
    dictionary for the real 270M (512 latents, not 16k: the same code, less to write)."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    folder = root / "resid_post" / "layer_6_width_16k_l0_medium"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    save_file({"w_enc": (rng.normal(size=(640, 512)) * 640 ** -0.5).astype(np.float32),
               "b_enc": np.zeros(512, np.float32),
               "w_dec": (rng.normal(size=(512, 640)) * 0.1).astype(np.float32),
               "b_dec": np.zeros(640, np.float32), "threshold": np.full(512, 1.0, np.float32)},
              str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "jump_relu", "model_name": "gemma-v3-270m-pt",
        "hf_hook_point_in": "model.layers.6.output"}))
    return root


def test_every_python_example_in_the_readme_runs(gemma270m, tokenizer_file, tmp_path,
                                                 monkeypatch, study_shared_with_callers):
    import jax

    # Stand-ins, registered under the names the README uses: tiny models of each preset's
    # mechanics, a Kaggle download and a Hugging Face snapshot served from local directories.
    transformers = pytest.importorskip("transformers")
    stand_ins = {"google/gemma-2-2b": tmp_path / "hub-snapshot"}
    tiny_hf = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    tiny_hf.save_pretrained(stand_ins["google/gemma-2-2b"])
    shutil.copy(tokenizer_file, stand_ins["google/gemma-2-2b"] / "tokenizer.model")
    for preset in ("gemma-7b", "gemma2-9b"):
        config = shrink(preset, name=preset)
        monkeypatch.setitem(gemma_eqx.PRESETS, preset, config)
        directory = tmp_path / preset
        save_checkpoint(gemma_eqx.Transformer(config, key=jax.random.key(0)),
                        directory / preset)
        shutil.copy(tokenizer_file, directory / "tokenizer.model")
        stand_ins[preset] = directory
    stand_ins["qwen3"] = _tiny_qwen3_directory(tmp_path / "qwen3-dir")
    stand_ins["google/gemma-scope-2-270m-pt"] = _gemma_scope_2_stand_in(tmp_path / "scope")
    monkeypatch.setattr(hub, "kaggle_download",
                        lambda handle: stand_ins["gemma-7b"])
    monkeypatch.setattr(hub, "hf_download", lambda repo, **kwargs: stand_ins[repo])
    monkeypatch.setenv("XLA_FLAGS", "")  # what tune_cpu_flags() adds is dropped afterwards
    monkeypatch.chdir(tmp_path)
    paths = {"/path/to/7b": str(stand_ins["gemma-7b"] / "gemma-7b"),
             "/data/gemma2-9b-dir": str(stand_ins["gemma2-9b"]),
             "/tmp/my-7b": str(tmp_path / "my-7b"),
             "/data/qwen3-dir": str(stand_ins["qwen3"]),
             # The residual map at the first and last layer only: the study of the study
             # tests, computed once in the session (`shared_study`). The experiments one by
             # one then ask for the programs that study compiled.
             "run_study(model, tokenizer, top=10, verbose=True)":
                 "run_study(model, tokenizer, top=10, verbose=True, residual_stride=17)",
             "study.patching_maps(model, tokenizer, task)":
                 "study.patching_maps(model, tokenizer, task, residual_layers=[0, 17])"}
    namespace: dict = {}
    readme = README.read_text()
    assert all(placeholder in readme for placeholder in paths)
    for line, code in python_blocks():
        for placeholder, real in paths.items():
            code = code.replace(placeholder, real)
        start = time.perf_counter()
        try:
            exec(compile(code, f"README.md, the block at line {line}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"README.md's example at line {line} fails: {type(e).__name__}: {e}")
        print(f"README.md block at line {line}: {time.perf_counter() - start:.1f} s")
    assert (tmp_path / "induction-report" / "report.html").is_file()
    assert namespace["sweep"].normalized.shape == (18, 4)
    assert namespace["acts"].shape == (*namespace["tokens"].shape, 512)  # features@resid_post
    assert namespace["grads"]["blocks.6.features@resid_post"].shape == namespace["acts"].shape
    assert isinstance(namespace["texts"][0], str)


def test_ci_runs_exactly_the_readme_test_command():
    """`.ci/run` runs the README's second set-up line, word for word."""
    setup = README.read_text().split("## Set-up on a fresh machine", 1)[1]
    block = setup.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == commands[1]
