"""Gemma's SentencePiece tokenizer, from a Kaggle `tokenizer.model`, or rebuilt from a GGUF file
or from a Hugging Face `tokenizer.json`; and the byte-level BPE tokenizer of other families
(`BPETokenizer`, GPT-2 style: SmolLM, Llama 3, Qwen), rebuilt from a GGUF file's vocabulary."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import sentencepiece as spm
from jaxtyping import Array, Bool, Int

from ..core.atomic import replace_file
from ..core.text import TokenizerLike  # noqa: F401 (re-exported: it was defined here)

_WHITESPACE_MARK = "\u2581"  # SentencePiece's spelling of a space inside a piece


class _Batches:
    """Padded batches, for any tokenizer with `encode`, `bos_id` and `pad_id`."""

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        add_bos: bool = True,
        pad_side: str = "left",  # "left" or "right"; a str so bad values get our ValueError
    ) -> tuple[Int[Array, "batch seq"], Bool[Array, "batch seq"]]:
        """Padded `[batch, seq]` token ids and a mask that is True on real tokens.

        Left padding (the default) lines up every sequence's last token, as generation wants;
        the model's default positions count real tokens only, so either side gives the same
        logits on real tokens. Padding uses `pad_id` (0 if the model has none).
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a sequence of strings, not one string")
        if pad_side not in ("left", "right"):
            raise ValueError(f"pad_side must be 'left' or 'right'; got {pad_side!r}")
        if len(texts) == 0:
            raise ValueError("encode_batch needs at least one text")
        rows = [([self.bos_id] if add_bos else []) + self.encode(t) for t in texts]
        length = max(len(r) for r in rows)
        tokens = np.full((len(rows), length), max(self.pad_id, 0), np.int32)
        mask = np.zeros((len(rows), length), bool)
        for i, row in enumerate(rows):
            span = slice(length - len(row), length) if pad_side == "left" else slice(0, len(row))
            tokens[i, span] = row
            mask[i, span] = True
        return jnp.asarray(tokens), jnp.asarray(mask)



class Tokenizer(_Batches):
    """A SentencePiece processor plus the serialised `ModelProto` it was built from."""

    def __init__(self, proto: bytes, *, source: str = "SentencePiece model"):
        """Load a serialised `ModelProto`; `source` names it in error messages."""
        self._proto = bytes(proto)
        self.source = source
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(self._proto)
        except Exception as e:  # sentencepiece raises RuntimeError / OSError with terse text
            raise ValueError(f"{source}: not a readable SentencePiece model ({e})") from None
        self._sp = processor

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_proto(cls, proto: bytes, *, source: str = "SentencePiece model") -> Tokenizer:
        """From the bytes of a serialised SentencePiece `ModelProto` (what `to_proto` gives)."""
        return cls(proto, source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """From a SentencePiece model file, e.g. Kaggle's `tokenizer.model`."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ValueError(f"{path}: cannot read tokenizer file ({e.strerror})") from None
        return cls(data, source=str(path))

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """Rebuilt from the vocabulary a GGUF file carries in its metadata."""
        from .gguf import read_gguf_header  # the GGUF reader is only needed here

        return cls.from_gguf_metadata(read_gguf_header(path).metadata, source=str(path))

    @classmethod
    def from_gguf_metadata(
        cls, metadata: Mapping[str, Any], *, source: str = "GGUF metadata"
    ) -> Tokenizer:
        """Rebuilt from GGUF metadata (`read_gguf(...).metadata`), without re-reading the file."""
        return cls(proto_from_gguf_metadata(metadata, source=source), source=source)

    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike) -> Tokenizer:
        """Rebuilt from a Hugging Face `tokenizer.json` of a SentencePiece BPE vocabulary (see
        `proto_from_tokenizer_json`); `tokenizer_config.json` beside it names the special
        tokens when present."""
        import json

        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            config_file = path.with_name("tokenizer_config.json")
            config = (json.loads(config_file.read_text(encoding="utf-8"))
                      if config_file.is_file() else {})
        except OSError as e:
            raise ValueError(f"{path}: cannot read tokenizer file ({e.strerror})") from None
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path.with_name('tokenizer_config.json')} must hold a JSON "
                             f"object; got {type(config).__name__}")
        special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                   if config.get(k)}
        return cls(proto_from_tokenizer_json(data, special_tokens=special, source=str(path)),
                   source=str(path))

    def to_proto(self) -> bytes:
        """The serialised SentencePiece `ModelProto`; `from_proto` restores the tokenizer."""
        return self._proto

    def save(self, path: str | os.PathLike) -> Path:
        """Write the `ModelProto` as a `tokenizer.model`-style file (to a temporary name, then
        renamed, so a reader never sees half a file). Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with replace_file(path) as tmp:
            tmp.write_bytes(self._proto)
        return path

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        """The padding id (-1 if the model defines none)."""
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def id_to_piece(self, token_id: int) -> str:
        self._check_id(token_id)
        return self._sp.IdToPiece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece, or `unk_id` if the vocabulary has no such piece."""
        return self._sp.PieceToId(piece)

    def _check_id(self, token_id: int, where: str = "") -> None:
        if not 0 <= int(token_id) < self.vocab_size:
            raise ValueError(
                f"token id {int(token_id)}{where} is outside the vocabulary [0, {self.vocab_size})"
            )

    # ------------------------------------------------------------------ text

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS or EOS."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str; got {type(text).__name__}")
        return self._sp.EncodeAsIds(text)

    def decode(self, ids: Sequence[int] | Int[Array, " seq"] | np.ndarray) -> str:
        """Text of a sequence of ids; control tokens (BOS, EOS, padding) decode to nothing."""
        flat = np.asarray(ids)
        if flat.ndim != 1 or (flat.size and not np.issubdtype(flat.dtype, np.integer)):
            raise ValueError(
                f"decode expects a 1-D sequence of integer ids; got shape {flat.shape}, "
                f"dtype {flat.dtype}"
            )
        bad = np.flatnonzero((flat < 0) | (flat >= self.vocab_size))
        if bad.size:
            self._check_id(int(flat[bad[0]]), f" at position {int(bad[0])}")
        return self._sp.DecodeIds(flat.astype(np.int64).tolist())

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


def proto_from_gguf_metadata(
    metadata: Mapping[str, Any], *, source: str = "GGUF metadata"
) -> bytes:
    """A serialised SentencePiece `ModelProto` rebuilt from a GGUF file's tokenizer metadata.

    GGUF keeps SentencePiece's pieces, scores and types but not the model's settings; Gemma's
    are BPE with byte fallback and digit splitting, an identity normalizer, no dummy prefix and
    escaped whitespace. llama.cpp's conversion also changed two things that are undone here:
    `<unk>` is marked CONTROL (SentencePiece needs exactly one UNKNOWN piece), and the
    whitespace-only user-defined pieces hold real spaces where SentencePiece writes `▁`.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb  # needs protobuf; import on use

    from .gguf import ARCHITECTURES

    arch = metadata.get("general.architecture", "gemma")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{source}: architecture {arch!r} is not a Gemma model; only Gemma vocabularies "
            "can be rebuilt (their SentencePiece settings are not stored in the file)"
        )
    model = metadata.get("tokenizer.ggml.model")
    if model is None:
        raise ValueError(f"{source}: GGUF metadata has no tokenizer (no 'tokenizer.ggml.model')")
    if model != "llama":
        raise ValueError(
            f"{source}: tokenizer.ggml.model is {model!r}; only SentencePiece ('llama') "
            "vocabularies can be rebuilt"
        )
    try:
        pieces = metadata["tokenizer.ggml.tokens"]
        scores = np.asarray(metadata["tokenizer.ggml.scores"], np.float32)
        types = np.asarray(metadata["tokenizer.ggml.token_type"], np.int64)
    except KeyError as e:
        raise ValueError(f"{source}: GGUF metadata lacks {e.args[0]!r}") from None
    if not len(pieces) == len(scores) == len(types):
        raise ValueError(
            f"{source}: {len(pieces)} tokens but {len(scores)} scores and {len(types)} types"
        )
    special = {}
    for name, default in (("unknown", 3), ("bos", 2), ("eos", 1), ("padding", 0)):
        value = metadata.get(f"tokenizer.ggml.{name}_token_id", default)
        if not 0 <= int(value) < len(pieces):
            raise ValueError(f"{source}: {name} token id {value} is outside the vocabulary")
        special[name] = int(value)

    types = types.copy()
    types[types == pb.ModelProto.SentencePiece.UNKNOWN] = pb.ModelProto.SentencePiece.CONTROL
    types[special["unknown"]] = pb.ModelProto.SentencePiece.UNKNOWN
    user_defined = pb.ModelProto.SentencePiece.USER_DEFINED
    pieces = [_WHITESPACE_MARK * len(piece)
              if kind == user_defined and piece and not piece.strip(" ") else piece
              for piece, kind in zip(pieces, types.tolist(), strict=True)]
    return _sentencepiece_proto(pieces, scores.tolist(), types.tolist(), special,
                                byte_fallback=True, split_digits=True, add_dummy_prefix=False)


def _sentencepiece_proto(
    pieces: Sequence[str], scores: Sequence[float], types: Sequence[int], special: dict[str, int],
    *, byte_fallback: bool, split_digits: bool, add_dummy_prefix: bool,
) -> bytes:
    """A serialised BPE `ModelProto` of Gemma's kind (identity normalizer, escaped whitespace,
    whitespace-only pieces allowed) with these pieces, in id order."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    for piece, score, kind in zip(pieces, scores, types, strict=True):
        proto.pieces.add(piece=piece, score=score, type=kind)

    trainer = proto.trainer_spec
    trainer.model_type = pb.TrainerSpec.BPE
    trainer.vocab_size = len(pieces)
    trainer.byte_fallback = byte_fallback
    trainer.split_digits = split_digits
    trainer.allow_whitespace_only_pieces = True
    trainer.unk_id, trainer.bos_id = special["unknown"], special["bos"]
    trainer.eos_id, trainer.pad_id = special["eos"], special["padding"]
    # SentencePiece finds BOS, EOS and padding by these names, not by the ids above.
    trainer.unk_piece, trainer.bos_piece = pieces[special["unknown"]], pieces[special["bos"]]
    trainer.eos_piece, trainer.pad_piece = pieces[special["eos"]], pieces[special["padding"]]

    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = add_dummy_prefix
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto.SerializeToString()


def _json_error(source: str, what: str) -> ValueError:
    return ValueError(f"{source}: {what}; only the BPE tokenizer.json that Hugging Face writes "
                      f"for a SentencePiece (Gemma) vocabulary can be rebuilt")


def _json_normalizer(normalizer: Any, source: str) -> bool:
    """Whether the tokenizer.json normalizer prepends a space (SentencePiece's dummy prefix);
    anything beyond escaping spaces as `▁` is refused, since it would change the encoding."""
    steps = _json_steps(normalizer, "normalizers")
    prefix = False
    for step in steps:
        kind = step.get("type")
        if kind == "Replace" and step.get("pattern") == {"String": " "} and (
                step.get("content") == _WHITESPACE_MARK):
            continue
        if kind == "Prepend" and step.get("prepend") == _WHITESPACE_MARK:
            prefix = True
            continue
        raise _json_error(source, f"its normalizer step {kind} cannot be reproduced")
    return prefix


def proto_from_tokenizer_json(
    data: Mapping[str, Any], *, special_tokens: Mapping[str, str] | None = None,
    source: str = "tokenizer.json",
) -> bytes:
    """A serialised SentencePiece `ModelProto` rebuilt from a Hugging Face `tokenizer.json`
    (parsed) of a SentencePiece BPE vocabulary, for repositories that ship no `tokenizer.model`.

    Pieces and ids come from the vocabulary; types from the added tokens (special: CONTROL,
    the unknown token UNKNOWN, others USER_DEFINED), `<0xNN>` pieces are BYTE under byte
    fallback. The file has merges, not SentencePiece's scores: a piece's score is minus the
    rank of the first merge that makes it (SentencePiece merges the best-scoring piece first,
    as Hugging Face applies merges in rank order). `special_tokens` maps `bos_token`,
    `eos_token`, `pad_token` to their pieces (from `tokenizer_config.json`; Gemma's
    `<bos>`, `<eos>`, `<pad>` by default)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise _json_error(source, f"its model is {model.get('type')!r}, not 'BPE'")
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list):
        raise _json_error(source, "it has no BPE vocab and merges")
    add_dummy_prefix = _json_normalizer(data.get("normalizer"), source)
    pieces: dict[int, str] = {}
    for piece, index in vocab.items():
        pieces[int(index)] = piece
    added = {int(t["id"]): t for t in data.get("added_tokens", [])}
    for index, token in added.items():
        if pieces.setdefault(index, token["content"]) != token["content"]:
            raise _json_error(source, f"added token {token['content']!r} has id {index}, which "
                                      f"the vocabulary gives to {pieces[index]!r}")
    size = len(pieces)
    if sorted(pieces) != list(range(size)):
        missing = sorted(set(range(max(pieces) + 1)) - set(pieces))[:5]
        raise _json_error(source, f"its ids are not 0..{size - 1} (missing e.g. {missing})")
    ordered = [pieces[i] for i in range(size)]
    ids = {piece: i for i, piece in enumerate(ordered)}

    def special_id(name: str, default: str) -> int:
        piece = (special_tokens or {}).get(name) or default
        if isinstance(piece, dict):  # tokenizer_config.json may hold an AddedToken dict
            piece = piece.get("content")
        if piece not in ids:
            raise _json_error(source, f"its {name} {piece!r} is not in the vocabulary")
        return ids[piece]

    special = {"unknown": special_id("unk_token", model.get("unk_token") or "<unk>"),
               "bos": special_id("bos_token", "<bos>"), "eos": special_id("eos_token", "<eos>"),
               "padding": special_id("pad_token", "<pad>")}

    kinds = pb.ModelProto.SentencePiece
    types = [kinds.NORMAL] * size
    for index, token in added.items():
        types[index] = kinds.CONTROL if token.get("special") else kinds.USER_DEFINED
    byte_pieces = [i for i, piece in enumerate(ordered) if len(piece) == 6 and
                   piece.startswith("<0x") and piece.endswith(">") and i not in added]
    # Without byte pieces, byte fallback ends in the unknown token, as without fallback.
    byte_fallback = bool(model.get("byte_fallback")) and bool(byte_pieces)
    if byte_fallback:
        if len(byte_pieces) != 256:
            raise _json_error(source, f"byte fallback needs the 256 pieces <0x00>..<0xFF>; it "
                                      f"has {len(byte_pieces)}")
        for index in byte_pieces:
            types[index] = kinds.BYTE
    types[special["unknown"]] = kinds.UNKNOWN

    scores = [0.0] * size
    made = set()
    for rank, merge in enumerate(merges):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        index = ids.get(left + right)
        if index is None:
            raise _json_error(source, f"merge {rank} ({left!r}, {right!r}) makes a piece that "
                                      f"is not in the vocabulary")
        if index not in made:
            made.add(index)
            scores[index] = -float(rank)
    digits_split = any(step.get("type") == "Digits" and step.get("individual_digits")
                       for step in _json_steps(data.get("pre_tokenizer"), "pretokenizers"))
    return _sentencepiece_proto(ordered, scores, types, special, byte_fallback=byte_fallback,
                                split_digits=digits_split, add_dummy_prefix=add_dummy_prefix)


def _json_steps(node: Any, key: str) -> list[dict[str, Any]]:
    """The steps of a tokenizer.json normalizer or pre-tokenizer: a `Sequence`'s `key` list,
    the node alone, or none."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return list(node.get(key, []))
    return [node]


# How llama.cpp splits text before byte-level BPE, by `tokenizer.ggml.pre` (its
# llama-vocab.cpp): None = GPT-2's own pattern (what `pre_tokenizers.ByteLevel` applies).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BPE_SPLITS: dict[str, tuple[bool, str | None]] = {  # (each digit alone first, pattern)
    "gpt2": (False, None), "gpt-2": (False, None), "olmo": (False, None),
    "default": (False, None), "smollm": (True, None),
    "starcoder": (True, None), "llama-bpe": (False, _LLAMA3_SPLIT),
    "llama3": (False, _LLAMA3_SPLIT), "qwen2": (False, _QWEN2_SPLIT),
}
_CONTROL = 3  # GGUF token type of a control token (`<|endoftext|>`)


class BPETokenizer(_Batches):
    """Byte-level BPE (GPT-2's scheme, used by SmolLM, Llama 3 and Qwen), run by Hugging
    Face's `tokenizers`; built from a GGUF file's vocabulary and merges, saved as one JSON file
    (the `tokenizers` model plus the special ids)."""

    def __init__(self, spec: Mapping[str, Any], *, source: str = "BPE tokenizer"):
        from tokenizers import Tokenizer as Backend

        self.source = source
        try:
            self._backend = Backend.from_str(spec["tokenizer"])
            self._ids = {k: int(spec[k]) for k in ("bos_id", "eos_id", "pad_id")}
        except Exception as e:  # `tokenizers` raises its own exception type
            raise ValueError(f"{source}: not a readable BPE tokenizer ({e})") from None
        self._spec = dict(spec)

    @classmethod
    def from_gguf_metadata(
        cls, metadata: Mapping[str, Any], *, source: str = "GGUF metadata"
    ) -> BPETokenizer:
        """Rebuilt from GGUF metadata of `tokenizer.ggml.model` "gpt2": tokens, merges, token
        types (control tokens stay whole), special ids and the pre-tokenizer llama.cpp uses
        (`tokenizer.ggml.pre`)."""
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as Backend

        try:
            tokens = list(metadata["tokenizer.ggml.tokens"])
            merges = list(metadata["tokenizer.ggml.merges"])
        except KeyError as e:
            raise ValueError(f"{source}: GGUF metadata lacks {e.args[0]!r}") from None
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if pre not in _BPE_SPLITS:
            raise ValueError(f"{source}: tokenizer.ggml.pre {pre!r} is not a pre-tokenizer this "
                             f"library rebuilds ({', '.join(_BPE_SPLITS)})")
        bad = next((m for m in merges if not isinstance(m, str) or m.count(" ") != 1), None)
        if bad is not None:
            raise ValueError(f"{source}: merge {bad!r} is not two pieces separated by a space")
        types = np.asarray(metadata.get("tokenizer.ggml.token_type", np.ones(len(tokens))))
        if len(types) != len(tokens) or len(set(tokens)) != len(tokens):
            raise ValueError(f"{source}: {len(tokens)} tokens ({len(set(tokens))} distinct) "
                             f"and {len(types)} token types: the vocabulary is inconsistent")
        backend = Backend(models.BPE({t: i for i, t in enumerate(tokens)},
                                     [tuple(m.split(" ")) for m in merges]))
        digits, split = _BPE_SPLITS[pre]
        steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
        if split is None:
            steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
        else:
            steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, k in zip(tokens, types, strict=True)
                                    if k == _CONTROL])
        ids = {}
        for name, key in (("bos_id", "bos"), ("eos_id", "eos"), ("pad_id", "padding")):
            value = metadata.get(f"tokenizer.ggml.{key}_token_id",
                                 ids.get("eos_id", -1) if name == "pad_id" else -1)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) \
                    or not -1 <= int(value) < len(tokens):
                raise ValueError(f"{source}: tokenizer.ggml.{key}_token_id {value!r} is not a "
                                 f"token id of the {len(tokens)}-token vocabulary")
            ids[name] = int(value)
        return cls({"tokenizer": backend.to_str(), **ids}, source=source)

    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike) -> BPETokenizer:
        """From a Hugging Face byte-level `tokenizer.json` (Llama 3, Qwen, SmolLM: `tokenizers`
        reads it as it is); the special tokens are those `tokenizer_config.json` beside it
        names (a missing BOS is -1), else the ids `config.json` gives."""
        import json

        from tokenizers import Tokenizer as Backend

        path = Path(path)
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # `tokenizers` raises its own exception type
            raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None
        names: dict[str, Any] = {}
        for config_name in ("tokenizer_config.json", "config.json"):
            try:
                raw = json.loads(path.with_name(config_name).read_text(encoding="utf-8"))
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as e:
                raise ValueError(f"{path.with_name(config_name)}: not readable JSON "
                                 f"({e})") from None
            if isinstance(raw, dict):
                for role in ("bos", "eos", "pad"):
                    token, token_id = raw.get(f"{role}_token"), raw.get(f"{role}_token_id")
                    if isinstance(token, dict):  # an AddedToken written out
                        token = token.get("content")
                    if role not in names and isinstance(token, str):
                        names[role] = backend.token_to_id(token)
                    elif role not in names and isinstance(token_id, int) \
                            and not isinstance(token_id, bool):
                        names[role] = token_id
        ids = {f"{role}_id": -1 if names.get(role) is None else int(names[role])
               for role in ("bos", "eos", "pad")}
        if ids["pad_id"] < 0:
            ids["pad_id"] = ids["eos_id"]
        return cls({"tokenizer": backend.to_str(), **ids}, source=str(path))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> BPETokenizer:
        """From the JSON file `save` writes."""
        import json

        path = Path(path)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ValueError(f"{path}: cannot read tokenizer file ({e.strerror})") from None
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: must hold a JSON object; got {type(spec).__name__}")
        return cls(spec, source=str(path))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer as one JSON file, atomically. Returns the path."""
        import json

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with replace_file(path) as tmp:
            tmp.write_text(json.dumps(self._spec), encoding="utf-8")
        return path

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._ids["bos_id"]

    @property
    def eos_id(self) -> int:
        return self._ids["eos_id"]

    @property
    def pad_id(self) -> int:
        """The padding id (-1 if the file names none)."""
        return self._ids["pad_id"]

    def id_to_piece(self, token_id: int) -> str:
        if not 0 <= int(token_id) < self.vocab_size:
            raise ValueError(f"token id {int(token_id)} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        return self._backend.id_to_token(int(token_id))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS or EOS (control tokens in the text stay whole)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str; got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | Int[Array, " seq"] | np.ndarray) -> str:
        """Text of a sequence of ids; control tokens decode to nothing."""
        flat = np.asarray(ids)
        if flat.ndim != 1 or (flat.size and not np.issubdtype(flat.dtype, np.integer)):
            raise ValueError(f"decode expects a 1-D sequence of integer ids; got shape "
                             f"{flat.shape}, dtype {flat.dtype}")
        bad = np.flatnonzero((flat < 0) | (flat >= self.vocab_size))
        if bad.size:
            raise ValueError(f"token id {int(flat[bad[0]])} at position {int(bad[0])} is "
                             f"outside the vocabulary [0, {self.vocab_size})")
        return self._backend.decode(flat.astype(np.int64).tolist(), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


def tokenizer_from_gguf_metadata(
    metadata: Mapping[str, Any], *, source: str = "GGUF metadata"
) -> Tokenizer | BPETokenizer:
    """The tokenizer a GGUF file describes: SentencePiece (`tokenizer.ggml.model` "llama", a
    Gemma vocabulary) or byte-level BPE ("gpt2")."""
    if metadata.get("tokenizer.ggml.model") == "gpt2":
        return BPETokenizer.from_gguf_metadata(metadata, source=source)
    return Tokenizer.from_gguf_metadata(metadata, source=source)


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.bpe.json")  # what `save` writes, by kind


def tokenizer_file_name(tokenizer: Tokenizer | BPETokenizer) -> str:
    return TOKENIZER_FILES[isinstance(tokenizer, BPETokenizer)]


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer | BPETokenizer:
    """The tokenizer saved in `directory` (either kind of `TOKENIZER_FILES`)."""
    directory = Path(directory)
    if (directory / TOKENIZER_FILES[1]).is_file():
        return BPETokenizer.from_file(directory / TOKENIZER_FILES[1])
    return Tokenizer.from_file(directory / TOKENIZER_FILES[0])


def is_byte_level_json(path: str | os.PathLike) -> bool:
    """Whether a `tokenizer.json` is byte-level BPE (GPT-2's scheme) rather than a
    SentencePiece vocabulary written out (Gemma's, whose bytes fall back to `<0x..>` pieces)."""
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # the SentencePiece reader says what is wrong with it
    if not isinstance(data, dict):
        return False
    steps = json.dumps([data.get("pre_tokenizer"), data.get("decoder")])
    return '"ByteLevel"' in steps
