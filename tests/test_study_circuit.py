"""Experiment 9 of the study (`gemma-eqx induction --circuit`): on a tiny model trained to
copy, whose induction head is known by construction (`induction_model`), the circuit found
automatically reaches that head through its key from the previous-token heads, and path
patching confirms it; the command writes the experiment, its figure and (with a transcoder)
its attribution graph into the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from factories import CharTokenizer, varied_model
from gemma_eqx.cli import main
from induction_model import BOS_ID, INDUCTION_HEAD, trained
from interp.study import behaviour, digit_task, score_heads
from interp.study.circuit import circuit_experiment
from test_study_features import STUDY


class _Tokenizer(CharTokenizer):
    bos_id = BOS_ID  # the trained model's


def test_the_circuit_found_is_the_induction_circuit_built_in():
    """The trained model copies (accuracy > 0.8 on the second copy). The circuit ACDC keeps
    reads the built-in induction head's key from layer-0 heads, and that head writes to the
    logits (directly or through the last MLP); the claim with the largest |EAP-IG| names
    the built-in head as Y and a previous-token head (top 2 by previous-token score) as X,
    and path patching confirms it. The faithfulness curve ends at 1 (every edge kept)."""
    copier = trained().model
    tokenizer = _Tokenizer()
    task = digit_task(copier, tokenizer, period=8, strings=4, seed=0)
    behaved, patterns = behaviour(copier, task)
    assert behaved.repetitions.accuracy[1] > 0.8
    scores = score_heads(patterns, task, shown=2)
    out = circuit_experiment(copier, tokenizer, task, scores, strings=4, start=60, top=3)
    edges = {(e.sender, e.receiver) for e in out.circuit}
    layer, head = INDUCTION_HEAD
    group = head // (out.heads // out.kv_heads)
    keys = {s for s, r in edges if r == f"a{layer}.kv{group}<k>" and s.startswith("a0.")}
    assert len(keys) >= 2, edges
    assert {(f"a{layer}.h{head}", "logits"), (f"a{layer}.h{head}", f"m{layer}<in>")} & edges
    assert out.faithfulness[-1] == pytest.approx(1, abs=1e-5)
    assert out.sizes[-1] == out.edges
    assert out.circuit_faithfulness > 0.8 and out.completeness.max() < 0.05
    claim = out.claims[0]
    assert claim.in_circuit and claim.receiver == INDUCTION_HEAD and claim.induction_rank == 1
    assert claim.previous_token_rank <= 2 and claim.sender[0] == 0
    assert claim.holds and claim.path_fraction > 0.05 and claim.path_rank == 1
    assert abs(claim.eap_ig) == max(abs(e.eap_ig) for e in out.circuit
                                    if e.receiver == f"a{layer}.kv{group}<k>"
                                    and e.sender.startswith("a"))
    with pytest.raises(ValueError, match="1 to 4 strings"):
        circuit_experiment(copier, tokenizer, task, scores, strings=5)


def _transcoder_folder(target, root, layer, width=16):
    """A JumpReLU transcoder in Gemma Scope 2's layout, from layer `layer`'s MLP input to its
    output (after the post-norm)."""
    d = target.config.embed_dim
    rng = np.random.default_rng(layer)
    folder = root / f"transcoder_layer_{layer}"
    folder.mkdir(parents=True)
    save_file({"w_enc": rng.normal(size=(d, width)).astype(np.float32) * 0.5,
               "b_enc": rng.normal(size=width).astype(np.float32) * 0.1,
               "w_dec": rng.normal(size=(width, d)).astype(np.float32) * 0.3,
               "b_dec": rng.normal(size=d).astype(np.float32) * 0.1,
               "threshold": np.abs(rng.normal(size=width)).astype(np.float32) * 0.3},
              folder / "params.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "architecture": "jump_relu",
        "hf_hook_point_in": f"model.layers.{layer}.pre_feedforward_layernorm.output",
        "hf_hook_point_out": f"model.layers.{layer}.post_feedforward_layernorm.output"}))
    return folder


@pytest.fixture(scope="module")
def tiny_model():
    return varied_model("gemma3")  # the model of test_study_features' command tests


@pytest.fixture
def tiny(tiny_model, monkeypatch):
    """The command's model (a tiny Gemma 3) with a character tokenizer."""
    import gemma_eqx.formats.pretrained as pretrained

    monkeypatch.setattr(pretrained, "from_pretrained",
                        lambda name: (tiny_model, CharTokenizer()))
    monkeypatch.setenv("GEMMA_EQX_NO_COMPILE_CACHE", "1")
    return tiny_model


@pytest.mark.slow  # the whole command on a tiny model: ~18 s of tracing some 300 programs;
# the experiment itself stays in the quick loop (the test above)
def test_the_command_adds_experiment_9_and_its_figures(tmp_path, tiny, capsys):
    """`--circuit` adds the experiment to report.json and report.html, with circuit.png and
    its time; `--transcoder` its attribution graph (graph.png, and graph.json in
    circuit-tracer's schema). A later report without them in the same directory removes
    those files (its own) and leaves a file it did not write."""
    out = tmp_path / "report"
    folder = _transcoder_folder(tiny, tmp_path / "tc", 1)
    assert main(["induction", *STUDY, "--circuit", "--transcoder", str(folder),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    circuit = report["circuit"]
    assert circuit["strings"] == 2 and circuit["edges"] > 100
    assert len(circuit["top_edges"]) == 20 and circuit["claims"]
    assert "circuit" in report["timings"]
    assert (out / "circuit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert "9. The circuit, found automatically" in page and 'alt="circuit.png"' in page
    assert "  circuit: " in printed
    assert np.isfinite(circuit["area"])
    graph = circuit["graph"]
    assert graph["layer"] == 1 and graph["active_features"] > 0
    assert graph["reconstruction_error"] < 1e-4
    assert len(graph["prompt"]) == 13  # BOS + 6 digits twice (the study's period)
    data = json.loads((out / "graph.json").read_text())
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    assert data["metadata"]["prompt_tokens"] == graph["prompt"]
    assert (out / "graph.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Attribution graph" in page and 'alt="graph.png"' in page
    assert main(["induction", *STUDY, "--circuit", "--out", str(out)]) == 0
    assert not (out / "graph.json").exists() and (out / "circuit.png").exists()
    (out / "notes.txt").write_text("mine")
    assert main(["induction", *STUDY, "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["circuit"] is None
    assert not (out / "circuit.png").exists()
    assert (out / "notes.txt").read_text() == "mine"
