"""The study as a function and as `gemma-eqx induction`, on the real Gemma 3 270M."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_eqx.cli import main
from interp import analyses
from interp.examples import study_examples, tokenize_examples
from interp.report import REPORT_FILES
from interp.surgery import attention_patterns, forward_with_records, knock_out, knockout_mask


@pytest.fixture(scope="module")
def study(gemma270m, shared_study):
    model, tokenizer = gemma270m
    # Residual patching at the first and last layer only (each layer costs 41 forwards). The
    # README test and the command test ask for this same study: it is computed once.
    return shared_study(model, tokenizer, model_name="gemma3-270m", seed=0, residual_stride=17)


def test_study_finds_heads_whose_knockout_breaks_copying(study):
    original, knocked = study.behaviour.repetitions, study.knockout.repetitions
    assert original.accuracy[1] > 0.8 > 0.3 > original.accuracy[0]
    assert knocked.accuracy[1] < 0.35
    smallest = study.minimal_set
    assert smallest.broken and 1 <= len(smallest.heads) <= 10
    assert smallest.accuracy <= smallest.chance + 0.1
    # One definition of second-repetition accuracy: the search's baseline is section 1's.
    assert smallest.baseline == pytest.approx(original.accuracy[1], abs=1e-6)
    digits = next(r for r in study.knockout.examples if r.name == "random digits")
    assert digits.knocked.accuracy < digits.original.accuracy - 0.4
    assert digits.control.accuracy > digits.original.accuracy - 0.15


def _differences(expected, got, path="", tolerance=1e-4):
    """Where two JSON trees differ: numbers by more than `tolerance` (absolute, on values the
    report shows with 2-3 decimals), anything else at all."""
    if isinstance(expected, dict):
        keys = sorted(set(expected) | set(got))
        return [d for k in keys for d in _differences(expected.get(k), got.get(k),
                                                       f"{path}/{k}", tolerance)]
    if isinstance(expected, list) and isinstance(got, list) and len(expected) == len(got):
        return [d for i, (a, b) in enumerate(zip(expected, got, strict=True))
                for d in _differences(a, b, f"{path}[{i}]", tolerance)]
    if isinstance(expected, float) and isinstance(got, float | int):
        return [] if abs(expected - got) <= tolerance else [(path, expected, got)]
    return [] if expected == got else [(path, expected, got)]


def test_the_study_reports_the_reference_numbers(study):
    """The study's numbers equal those of the code before it was made faster (commit b200928;
    `tests/data/make_study_reference.py` made the file): every head, ranking, accuracy,
    probability and patching value."""
    reference = json.loads((Path(__file__).parent / "data" / "study_reference.json")
                           .read_text())
    got = {k: v for k, v in json.loads(json.dumps(study.to_json())).items()
           if k not in ("timings", "compilation")}
    # How many programs a sweep compiled depends on what this process compiled before.
    differences = [d for d in _differences(reference, got)
                   if not d[0].endswith("/compilations")]
    assert not differences, differences[:10]
    assert _differences({"a": [1.0, 2.0]}, {"a": [1.0, 2.01]}) == [("/a[1]", 2.0, 2.01)]


def test_study_numbers_equal_the_library_functions(study, gemma270m):
    model, tokenizer = gemma270m
    tokens = jnp.asarray(study.task.tokens)
    period = study.task.period
    patterns = attention_patterns(model, tokens)
    np.testing.assert_allclose(
        study.scores.induction, analyses.induction_scores(patterns, period), atol=1e-6
    )
    np.testing.assert_allclose(
        study.scores.previous_token, analyses.previous_token_scores(patterns), atol=1e-6
    )
    ranked = analyses.rank_heads(analyses.induction_scores(patterns, period))
    assert study.scores.top(10) == [(layer, head) for layer, head, _ in ranked[:10]]
    logits, _ = forward_with_records(model, tokens)
    np.testing.assert_allclose(
        study.behaviour.logprobs, analyses.correct_token_logprobs(logits, tokens), atol=1e-5
    )
    top_mask = knockout_mask(model, study.knockout.heads)
    batch = tokenize_examples(study_examples(0), tokenizer)
    knocked = analyses.knockout_eval(model, batch.tokens, top_mask, batch.eval_mask,
                                     padding_mask=batch.padding_mask)
    for i, row in enumerate(study.knockout.examples):
        assert row.name == batch.names[i]
        assert row.knocked.accuracy == pytest.approx(float(knocked.accuracy[i]), abs=1e-6)
        assert row.knocked.logprob == pytest.approx(float(knocked.logprob[i]), abs=1e-5)
    eval_mask = np.zeros(tokens.shape, bool)
    eval_mask[:, period + 2:] = True
    np.testing.assert_array_equal(study.task.eval_mask, eval_mask)
    grad = analyses.attribution_gradient(model, tokens, jnp.asarray(eval_mask), top_mask)
    np.testing.assert_allclose(study.attribution.knocked, grad, atol=1e-5)


def _relative_logit(logits, tokens, scored, digit_ids):
    """Correct digit's logit minus the mean of the ten digits', mean over scored positions."""
    logits = np.asarray(logits, np.float64)[:, scored]
    correct = np.take_along_axis(logits, np.asarray(tokens)[:, scored + 1, None], -1)[..., 0]
    return float((correct - logits[..., digit_ids].mean(-1)).mean())


def test_path_analysis_end_worlds_equal_plain_runs(study, gemma270m):
    """Experiment 6's first world is the knocked-out model (its linearisations are exact at
    their own point); the last is the original model read through the final norm linearised
    around the first world's stream. Both recomputed without any worlds machinery."""
    model, tokenizer = gemma270m
    tokens = jnp.asarray(study.task.tokens)
    scored = np.flatnonzero(study.task.eval_mask[0, 1:])
    ids = analyses.digit_ids(tokenizer)
    paths = study.path_analysis
    assert paths.heads == study.minimal_set.heads
    worlds = {w.world: w.relative_logit for w in paths.worlds}
    assert list(worlds) == ["fully_ablated", "restore_direct", "restore_values",
                            "restore_patterns", "linear_mlps", "original"]
    from interp import capture

    knocked_model = knock_out(model, knockout_mask(model, paths.heads))
    knocked, ablated = capture(knocked_model, tokens, sites=["final_norm_in"])
    assert worlds["fully_ablated"] == pytest.approx(
        _relative_logit(knocked, tokens, scored, ids), abs=2e-4)
    _, original = capture(model, tokens, sites=["final_norm_in"])
    a, b = ablated["final_norm_in"], original["final_norm_in"]
    primal, tangent = jax.jvp(model.final_norm, (a,), (b - a,))
    linearised = model.embedder.decode(primal + tangent)
    assert worlds["original"] == pytest.approx(
        _relative_logit(linearised, tokens, scored, ids), abs=2e-4)
    # The restore_direct world puts back most of what the knock-out took (measured: the
    # direct path alone restores the relative logit on the 270M).
    assert worlds["fully_ablated"] < worlds["original"] - 2
    assert worlds["restore_direct"] > worlds["fully_ablated"] + 2


def test_counterfactual_values_patch_equals_a_plain_patch(study, gemma270m):
    """Experiment 7's value patching, recomputed without worlds: capture the counterfactual
    input's per-head values, patch them into the repeated input with `interp.patch`."""
    from interp import capture, patch, run
    from interp.study import nonrepeating_digits

    model, tokenizer = gemma270m
    tokens = study.task.tokens
    counterfactual = nonrepeating_digits(tokenizer, study.task, seed=0)
    _, cache = capture(model, counterfactual, sites=["v_per_head"])
    patched = model
    for layer, head in study.counterfactual.heads:
        patched = patch(patched, cache, "v_per_head", layers=[layer], heads=[head])
    probs = np.asarray(jnp.exp(jax.nn.log_softmax(run(patched, tokens).astype(jnp.float32))))
    scored = np.flatnonzero(study.task.eval_mask[0, 1:])
    period = study.task.period
    target = counterfactual[:, scored - period + 1]
    p = np.take_along_axis(probs[:, scored], target[..., None], -1)[..., 0]
    values = study.counterfactual.patches[0]
    assert values.name == "values"
    assert values.copy_prob == pytest.approx(float(p.mean()), abs=1e-4)
    hits = probs[:, scored].argmax(-1) == target
    assert values.copy_accuracy == pytest.approx(float(hits.mean()), abs=1e-6)
    # Measured on the 270M: the model copies the counterfactual's digits once the critical
    # head reads its values.
    assert values.copy_accuracy > 0.6 > 0.3 > values.baseline_copy_accuracy


def test_each_experiment_runs_alone_and_results_are_frozen(study, gemma270m):
    import dataclasses

    from interp import study as experiments

    model, tokenizer = gemma270m
    task = experiments.digit_task(model, tokenizer, strings=2, seed=3)
    assert task.tokens.shape == (2, 41) and task.token_pieces[0] == "<bos>"
    behaved, patterns = experiments.behaviour(model, task)
    scores = experiments.score_heads(patterns, task, shown=2)
    assert scores.top_patterns.shape == (2, 41, 41)
    assert scores.top(1)[0] in study.scores.top(5)  # the same leading heads on other strings
    with pytest.raises(dataclasses.FrozenInstanceError):
        study.task = task
    as_json = study.to_json()
    assert as_json["behaviour"]["repetitions"]["accuracy"] == [  # JSON keeps 6 decimals
        round(a, 6) for a in study.behaviour.repetitions.accuracy]
    assert "top_patterns" not in as_json["scores"]


def test_command_writes_the_report(tmp_path, gemma270m, gguf_path, gemma_cache, capsys, study,
                                   study_shared_with_callers):
    out = tmp_path / "report"
    # The study fixture's task, its first string given as --text: the command loads the model
    # itself (from the conversion cache), and its study is the one this session already
    # computed (`shared_study`).
    first = "".join(study.task.token_pieces[1:21])
    code = main(["induction", "--model", "gemma3-270m", "--text", first, "--out", str(out),
                 "--residual-stride", "17"])
    assert code == 0
    printed = capsys.readouterr()
    assert "smallest breaking set" in printed.out and "capturing attention" in printed.err
    report = json.loads((out / "report.json").read_text())
    assert report["preset"] == "gemma3-270m" and report["task"]["period"] == 20
    assert report["task"]["tokens"] == study.task.tokens.tolist()
    assert np.asarray(report["scores"]["induction"]).shape == (18, 4)
    for key in ("behaviour", "scores", "knockout", "attribution", "minimal_set",
                "path_analysis", "counterfactual", "patching", "timings", "compilation"):
        assert report[key], key
    # Compilations per step, the same steps as the timings (here most programs come from the
    # README test's run in this process, so the counts may be zero).
    assert set(report["compilation"]) == set(report["timings"])
    assert all(0 <= step["cache_hits"] <= step["programs"]
               for step in report["compilation"].values())
    assert report["knockout"]["examples"][0]["knocked"]["accuracy"] >= 0
    assert sorted(p.name for p in out.iterdir()) == [
        "attention_top_heads.png", "attribution.png", "induction_scores.png", "patching.png",
        "path_analysis.png", "report.html", "report.json", "token_probabilities.png",
    ]
    assert report["patching"]["residual_layers"] == [0, 17]
    assert np.asarray(report["patching"]["residual"]).shape == (2, 41)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    _readme_first_run_table_holds(out, gguf_path, gemma_cache)


def _megabytes(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def _readme_first_run_table_holds(report: Path, gguf: Path, cache: Path) -> None:
    """README's table of what a first run writes: the report's files by name, and the sizes
    of the GGUF, its converted entry and the report (the XLA row comes from
    benchmarks/bench_main_job.py, which runs the command in fresh processes)."""
    text = (Path(__file__).parent.parent / "README.md").read_text()
    table = text.split("<!-- first-run -->", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[3:]:
        what, where, size = (c.strip() for c in line.strip("|").split("|"))
        rows[where] = (what, float(size.removesuffix(" MB")))
    stated = {Path(where.strip("`")).name: v for where, v in rows.items()}
    # The 270M's entry (the session's cache may hold SmolLM2's too).
    converted = [p for p in (cache / "converted").iterdir() if p.is_dir() and json.loads(
        (p / "manifest.json").read_text())["config"]["name"] == "gemma3-270m"]
    assert len(converted) == 1, converted
    measured = {"gemma-3-270m-q4_k_m.gguf": (_megabytes(gguf), 0.01),
                "gguf-<sha>": (_megabytes(converted[0]), 0.01),
                "induction-report": (_megabytes(report), 0.25)}  # PNG bytes vary a little
    for name, (size, tolerance) in measured.items():
        assert abs(stated[name][1] / size - 1) <= tolerance, (name, stated[name], size)
    named = set(re.findall(r"`([\w.]+\.(?:png|html|json))`", stated["induction-report"][0]))
    assert named == {p.name for p in report.iterdir()} == set(REPORT_FILES)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "gemma5-1t"], "gemma5-1t"),
        (["--text", ""], "--text is empty"),
        (["--text", "12a4"], "only the digits"),
        (["--text", "7" * 20000], "more than the model's context of 32768"),
        (["--period", "20000"], "--period 20000 (BOS and two repetitions) needs 40001 positions"),
    ],
)
def test_bad_arguments_exit_2_without_partial_report(tmp_path, gemma270m, capsys, args, message):
    out = tmp_path / "report"
    assert main(["induction", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["induction", "--out", str(blocker / "report")]) == 2
    assert "not writable" in capsys.readouterr().err
    assert main(["induction", "--out", str(blocker)]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") is None:
        return None
    # Debian's package; this machine may reach Debian's mirrors.
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        subprocess.run(command, capture_output=True, timeout=600, check=False,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return shutil.which("chromium")


def test_html_renders_in_headless_chromium(tmp_path, study):
    from interp.report import write_report

    browser = _chromium()
    if browser is None:
        pytest.skip("Debian's chromium package is absent and could not be installed here")
    out = write_report(study, tmp_path / "report")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=10000"]
    dom = subprocess.run([*flags, "--dump-dom", (out / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    from interp.report import FIGURES

    n = len(FIGURES)
    assert f'data-figures="{n}"' in dom and f'data-figures-loaded="{n}"' in dom, dom[-500:]
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,3000",
                    (out / "report.html").as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 50_000
