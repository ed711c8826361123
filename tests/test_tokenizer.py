"""The SentencePiece tokenizer rebuilt from the real Gemma 3 GGUF, against transformers' own
GGUF tokenizer, plus serialisation, batching and bad input."""

from __future__ import annotations

import gc

import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGUFWriter

from gemma_eqx.formats.tokenizer import Tokenizer

DIGITS = "01976954310149754605"

TEXTS = [
    DIGITS,
    "Hello world",
    "x = [1, 22, 333, 4444] and 3.14159 or 1e-6",
    "  two  spaces   three    four     five",
    " leading space",
    "trailing spaces   ",
    "a\n\nb\t\tc\r\nd",
    "\n\n\n  \t x\n",
    "          ten spaces",
    "\t\t\tindented with tabs",
    "日本語のテキスト、中文文本，한국어",
    "emoji 🤗🎉 and 👨‍👩‍👧 family",
    "Ünïcödé façade naïve coöperate",
    "Привет, мир! مرحبا بالعالم",
    "e\u0301 vs \u00e9, \u00a0nbsp, \u200bzero-width",
    "ﬁ ligature, １２３ fullwidth",
    "def f(x):\n    return {'a': x ** 2}  # comment\n",
    "<start_of_image> between <end_of_image>",
    "",
]


@pytest.fixture(scope="module")
def tok(gguf_path):
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def hf_tok(gguf_path):
    """transformers' tokenizer built from the same GGUF by its own converter (~1 min)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    yield hf
    del hf
    gc.collect()


def test_ids_match_transformers(tok, hf_tok):
    for text in TEXTS:
        theirs = hf_tok(text)["input_ids"]
        assert theirs[0] == tok.bos_id
        assert tok.encode(text) == theirs[1:], repr(text)


def test_control_tokens_in_text_are_plain_text(tok, hf_tok):
    """SentencePiece never turns the text "<bos>" into the BOS token; transformers does unless
    told to split special tokens, and then agrees with us."""
    text = "<bos> is not the start"
    ids = tok.encode(text)
    assert tok.bos_id not in ids
    assert ids == hf_tok(text, split_special_tokens=True)["input_ids"][1:]


def test_digits_are_single_tokens(tok):
    ids = tok.encode(DIGITS)
    assert len(ids) == 20
    assert [tok.id_to_piece(i) for i in ids] == list(DIGITS)


def test_decode_inverts_encode(tok):
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text, repr(text)
    assert tok.decode([tok.bos_id, *tok.encode("hi"), tok.eos_id]) == "hi"
    assert tok.decode(jnp.asarray(tok.encode("array input"))) == "array input"


def test_special_tokens_and_repairs(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (262_144, 2, 1, 0, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    # Whitespace-only pieces are spelled with "▁" again, so runs of spaces find them.
    assert tok.id_to_piece(138) == "▁▁"
    assert tok.encode("a  b") == [tok.piece_to_id("a"), 138, tok.piece_to_id("b")]


def test_proto_and_file_round_trip(tok, tmp_path):
    again = Tokenizer.from_proto(tok.to_proto())
    target = tmp_path / "sub" / "tokenizer.model"
    assert tok.save(target) == target
    target.write_bytes(b"stale")  # saving again replaces the file whole
    tok.save(target)
    loaded = Tokenizer.from_file(target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["tokenizer.model"]
    for other in (again, loaded):
        assert other.vocab_size == tok.vocab_size
        for text in TEXTS:
            assert other.encode(text) == tok.encode(text)


def test_encode_batch_pads_and_masks(tok):
    texts = ["one two three four", "hi", ""]
    rows = [[tok.bos_id] + tok.encode(t) for t in texts]
    width = max(map(len, rows))
    tokens, mask = tok.encode_batch(texts)
    assert tokens.shape == mask.shape == (3, width)
    assert tokens.dtype == jnp.int32 and mask.dtype == jnp.bool_
    for i, row in enumerate(rows):  # left padding: real tokens at the end
        assert np.asarray(tokens[i, width - len(row):]).tolist() == row
        assert np.asarray(mask[i]).tolist() == [False] * (width - len(row)) + [True] * len(row)
        assert np.all(np.asarray(tokens[i, : width - len(row)]) == tok.pad_id)
    right, right_mask = tok.encode_batch(texts, add_bos=False, pad_side="right")
    assert right.shape == (3, width - 1)
    for i, text in enumerate(texts):
        ids = tok.encode(text)
        assert np.asarray(right[i, : len(ids)]).tolist() == ids
        assert int(right_mask[i].sum()) == len(ids) and bool(np.all(right_mask[i, : len(ids)]))


def test_bad_batch_arguments(tok):
    with pytest.raises(ValueError, match="pad_side"):
        tok.encode_batch(["a"], pad_side="middle")
    with pytest.raises(ValueError, match="at least one"):
        tok.encode_batch([])
    with pytest.raises(TypeError, match="sequence of strings"):
        tok.encode_batch("abc")


def test_bad_ids(tok):
    with pytest.raises(ValueError, match="token id 262144 at position 1"):
        tok.decode([5, 262_144])
    with pytest.raises(ValueError, match="token id -1"):
        tok.id_to_piece(-1)
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(np.array([[1, 2]]))


def test_unreadable_tokenizer_files(tmp_path):
    with pytest.raises(ValueError, match="cannot read tokenizer file") as info:
        Tokenizer.from_file(tmp_path / "missing.model")
    assert "missing.model" in str(info.value)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00\x01 this is not a protobuf \xff" * 10)
    with pytest.raises(ValueError, match="not a readable SentencePiece model") as info:
        Tokenizer.from_file(garbage)
    assert str(garbage) in str(info.value)
    with pytest.raises(ValueError, match="not a readable SentencePiece model"):
        Tokenizer.from_proto(b"")


def test_gguf_without_a_vocabulary(tmp_path):
    path = tmp_path / "novocab.gguf"
    w = GGUFWriter(str(path), "gemma3")
    w.add_tensor("output_norm.weight", np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="no tokenizer") as info:
        Tokenizer.from_gguf(path)
    assert str(path) in str(info.value)


def _metadata(tokens, types, **extra):
    return {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.arange(0, -len(tokens), -1, dtype=np.float32),
        "tokenizer.ggml.token_type": np.asarray(types, np.int32), **extra,
    }


def test_repairs_on_a_small_vocabulary():
    """The file's quirks in miniature: `<unk>` marked CONTROL, whitespace pieces in real spaces."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "  ", "   ", "\n\n"]
    tokens += [f"<0x{b:02X}>" for b in range(256)] + ["a", "b", "▁", "▁a"]
    types = [3, 3, 3, 3, 4, 4, 4] + [6] * 256 + [1, 1, 1, 1]
    tok = Tokenizer.from_gguf_metadata(_metadata(tokens, types))
    assert tok.unk_id == 3 and tok.bos_id == 2
    assert [tok.id_to_piece(i) for i in tok.encode("a   b\n\na a")] == [
        "a", "▁▁▁", "b", "\n\n", "a", "▁a"
    ]
    assert tok.decode(tok.encode("a   b\n\nab z")) == "a   b\n\nab z"  # z: byte fallback


def test_inconsistent_metadata_is_rejected():
    with pytest.raises(ValueError, match="2 tokens but 3 scores"):
        Tokenizer.from_gguf_metadata({
            "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b"],
            "tokenizer.ggml.scores": np.zeros(3, np.float32),
            "tokenizer.ggml.token_type": np.ones(2, np.int32),
        })
    with pytest.raises(ValueError, match="'gpt2'"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(ValueError, match="architecture 'llama' is not a Gemma"):
        Tokenizer.from_gguf_metadata({"general.architecture": "llama",
                                      "tokenizer.ggml.model": "llama"})


# ------------------------------------------------------------------ tokenizer.json


def _pieces_and_types(tokenizer: Tokenizer) -> list[tuple[str, int]]:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tokenizer.to_proto())
    return [(p.piece, p.type) for p in proto.pieces]


def test_tokenizer_json_of_the_real_vocabulary_rebuilds_it(tok, tmp_path):
    """The 270M's SentencePiece model converted by transformers to tokenizer.json (as on the
    Hub), alone: the rebuilt model has the original's pieces and types, and encodes like it
    and like Hugging Face's `tokenizers` (scores come from merge ranks, not from the file)."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    tok.save(tmp_path / "src" / "tokenizer.model")
    transformers.GemmaTokenizer.from_pretrained(tmp_path / "src").save_pretrained(tmp_path)
    path = tmp_path / "tokenizer.json"
    reference = tokenizers.Tokenizer.from_file(str(path))
    rebuilt = Tokenizer.from_tokenizer_json(path)
    assert _pieces_and_types(rebuilt) == _pieces_and_types(tok)
    assert (rebuilt.bos_id, rebuilt.eos_id, rebuilt.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    rng = np.random.default_rng(0)
    alphabet = list(" abcdefghijklmnopqrstuvwxyzABCDE0123456789.,;:!?-_\n\té日😀ß") + ["  "]
    texts = TEXTS + ["".join(rng.choice(alphabet, rng.integers(1, 40))) for _ in range(200)]
    for text in texts:
        ids = tok.encode(text)
        assert rebuilt.encode(text) == ids, repr(text)
        if "<" not in text:  # `tokenizers` matches control tokens in text; SentencePiece not
            assert reference.encode(text, add_special_tokens=False).ids == ids


@pytest.fixture(scope="module")
def tiny_tokenizer_json(tokenizer_file, tmp_path_factory):
    """transformers' conversion of the small trained SentencePiece model to tokenizer.json."""
    transformers = pytest.importorskip("transformers")
    src, out = tmp_path_factory.mktemp("spm-src"), tmp_path_factory.mktemp("spm-json")
    (src / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    transformers.GemmaTokenizer.from_pretrained(src).save_pretrained(out)
    return out / "tokenizer.json"


def test_tokenizer_json_encodes_like_hugging_face_tokenizers(tiny_tokenizer_json):
    tokenizers = pytest.importorskip("tokenizers")
    from conftest import CORPUS

    reference = tokenizers.Tokenizer.from_file(str(tiny_tokenizer_json))
    rebuilt = Tokenizer.from_tokenizer_json(tiny_tokenizer_json)
    assert rebuilt.vocab_size == reference.get_vocab_size()
    # tokenizer_config.json beside it names the special tokens.
    assert rebuilt.id_to_piece(rebuilt.bos_id) == "<bos>"
    texts = CORPUS[:3] + ["fox 0123 dog  xyz!", "  two  spaces", "unseen: qjw ÄÖ", ""]
    for text in texts:
        ids = reference.encode(text, add_special_tokens=False).ids
        assert rebuilt.encode(text) == ids, repr(text)
        if rebuilt.unk_id not in ids:  # SentencePiece spells it " ⁇ ", tokenizers drops it
            assert rebuilt.decode(ids) == reference.decode(ids), repr(text)


def test_tokenizer_json_that_cannot_be_rebuilt_says_why(tiny_tokenizer_json, tmp_path):
    import json

    data = json.loads(tiny_tokenizer_json.read_text())

    def refused(changed: dict, match: str) -> None:
        path = tmp_path / "tokenizer.json"
        path.write_text(json.dumps(changed))
        with pytest.raises(ValueError, match=match) as e:
            Tokenizer.from_tokenizer_json(path)
        assert str(path) in str(e.value)

    refused({**data, "model": {**data["model"], "type": "WordPiece"}},
            "its model is 'WordPiece', not 'BPE'")
    refused({**data, "normalizer": {"type": "NFKC"}}, "normalizer step NFKC cannot be reproduced")
    vocab = dict(data["model"]["vocab"])
    vocab.update({f"<0x{i:02X}>": 1000 + i for i in range(3)})
    refused({**data, "model": {**data["model"], "vocab": vocab}}, "ids are not 0..")
    merges = data["model"]["merges"] + [["q", "zz"]]
    refused({**data, "model": {**data["model"], "merges": merges}}, "makes a piece that is not")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        Tokenizer.from_tokenizer_json(tmp_path / "bad.json")
