"""The text tokenizer: a BPE trained with HF `tokenizers`, or any local HF tokenizer.

    tok = TextTokenizer.train(read_captions("shards/train-{000..009}.tar"), vocab_size=16384)
    tok.save_pretrained("my-model/tokenizer")
    ids = TextTokenizer.from_pretrained("my-model/tokenizer").encode(["a red circle"], length=32)

Captions are NFKC-normalised and lower-cased (as in the DALL-E paper) and split into words and
punctuation runs; words are BPE-encoded CLIP-style (an end-of-word suffix `</w>`, so `decode`
restores the spaces). Ids are padded on the right with `pad_id` (0, `<pad>`) to a fixed length:
the prior learns one padding embedding per text position instead of masking.

BPE dropout (paper: 0.1 while training the prior) lives in a separate copy of the BPE model,
used only by `encode(..., dropout=True)`: the plain path stays deterministic.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from dalle_ar.data.shards import expand_shards, tar_samples
from dalle_ar.io import atomic_path, write_json

log = logging.getLogger(__name__)

PAD, UNK, EOW = "<pad>", "<unk>", "</w>"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
DEFAULT_DROPOUT = 0.1  # paper: BPE dropout 0.1 on training captions
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


class TextTokenizer:
    """Text <-> fixed-length LongTensor of token ids. Picklable (DataLoader workers)."""

    def __init__(self, tokenizer: Tokenizer, pad_token: str = PAD, bpe_dropout: float = DEFAULT_DROPOUT):
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"pad_token {pad_token!r} is not in the tokenizer's vocabulary")
        if not 0.0 <= bpe_dropout < 1.0:
            raise ValueError(f"bpe_dropout must be in [0, 1), got {bpe_dropout!r}")
        # We pad and truncate ourselves (with a warning); a tokenizer.json may carry its own settings.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tok = tokenizer
        self.pad_token = pad_token
        model = json.loads(tokenizer.to_str())["model"]
        self._eow = model.get("end_of_word_suffix")
        # decode drops padding and special tokens other than unk (e.g. CLIP's bos/eos)
        self._hidden = {pad_id} | {i for i, t in tokenizer.get_added_tokens_decoder().items()
                                   if t.special and t.content != model.get("unk_token")}
        self.bpe_dropout = float(bpe_dropout)
        self._dropout_tok: Optional[Tokenizer] = None  # built on first use

    # ---- training ---------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
              dropout: Optional[float] = None) -> "TextTokenizer":
        """Train a BPE on `texts` (any iterable of captions). `dropout` is the BPE dropout that
        `encode(..., dropout=True)` applies (default 0.1, the paper's); training itself has none."""
        if not isinstance(vocab_size, int) or vocab_size < 3:
            raise ValueError(f"vocab_size must be an integer >= 3, got {vocab_size!r}")
        if not isinstance(min_frequency, int) or min_frequency < 1:
            raise ValueError(f"min_frequency must be an integer >= 1, got {min_frequency!r}")
        tok = Tokenizer(BPE(unk_token=UNK, end_of_word_suffix=EOW))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs
        tok.decoder = decoders.BPEDecoder(suffix=EOW)
        # Letters and digits are always in the alphabet, so unseen words in prompts never become <unk>.
        trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[PAD, UNK],
                             initial_alphabet=list(ALPHABET), end_of_word_suffix=EOW, show_progress=False)
        counted = _Counted(texts)
        tok.train_from_iterator(counted, trainer)
        if counted.n == 0:
            raise ValueError("texts: no captions to train the tokenizer on")
        log.info("trained BPE: %d captions, vocab %d", counted.n, tok.get_vocab_size())
        return cls(_canonical_ids(tok), PAD, DEFAULT_DROPOUT if dropout is None else dropout)

    # ---- I/O ---------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "TextTokenizer":
        """Load a directory written by `save_pretrained`, any local HF tokenizer directory, or a
        `tokenizer.json` file.

        Padding id of a foreign tokenizer: its pad token, else its eos token (CLIP's tokenizer has
        `<|endoftext|>` as both), else `<pad>` if in its vocabulary; otherwise a ValueError.
        Its own normaliser and special-token template (e.g. CLIP's bos/eos) are kept as they are.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer at {path}")
        config: dict = {}
        if path.is_file():
            tok = Tokenizer.from_file(str(path))
            cfg_path = path.with_name(CONFIG_FILE)
        else:
            cfg_path = path / CONFIG_FILE
            if (path / TOKENIZER_FILE).is_file():
                tok = Tokenizer.from_file(str(path / TOKENIZER_FILE))
            else:
                tok, config = _fast_from_transformers(path)
        if not config and cfg_path.is_file():
            config = json.loads(cfg_path.read_text())
        pad = _pad_token(tok, config)
        if pad is None:
            raise ValueError(f"tokenizer at {path} has no pad, eos or {PAD} token to pad with")
        return cls(tok, pad, float(config.get("bpe_dropout", DEFAULT_DROPOUT)))

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json + tokenizer_config.json (each atomically); transformers'
        AutoTokenizer / PreTrainedTokenizerFast can load the directory too."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / TOKENIZER_FILE) as tmp:
            self._tok.save(str(tmp))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": self.pad_token,
                  "bpe_dropout": self.bpe_dropout}
        if self._tok.token_to_id(UNK) is not None:
            config["unk_token"] = UNK
        write_json(directory / CONFIG_FILE, config)
        return directory

    def to_json(self) -> str:
        return self._tok.to_str()

    def __getstate__(self):
        return {"json": self._tok.to_str(), "pad_token": self.pad_token, "bpe_dropout": self.bpe_dropout}

    def __setstate__(self, state):
        self.__init__(Tokenizer.from_str(state["json"]), state["pad_token"], state["bpe_dropout"])

    # ---- encoding ----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._tok.token_to_id(self.pad_token)

    @property
    def backend(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer` (no padding, no truncation, no dropout)."""
        return self._tok

    def _dropout_model(self) -> Tokenizer:
        if self._dropout_tok is None:
            spec = json.loads(self._tok.to_str())
            if spec["model"].get("type") != "BPE":
                raise ValueError(f"dropout=True needs a BPE model, this tokenizer's is {spec['model'].get('type')}")
            spec["model"]["dropout"] = self.bpe_dropout
            spec["model"]["ignore_merges"] = False  # else whole words in the vocab skip the merges (and dropout)
            self._dropout_tok = Tokenizer.from_str(json.dumps(spec))
        return self._dropout_tok

    def encode(self, texts: str | Sequence[str], length: int, truncation: str = "warn",
               dropout: bool = False) -> torch.Tensor:
        """-> LongTensor [B, length] (B = 1 for a single string), right-padded with `pad_id`.

        Longer captions are cut to `length` tokens with a logged warning (`truncation="warn"`) or
        rejected with a ValueError (`"error"`). `dropout=True` applies BPE dropout.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise ValueError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
        if not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise ValueError(f"length must be an integer >= 1, got {length!r}")
        if truncation not in ("warn", "error"):
            raise ValueError(f"truncation must be 'warn' or 'error', got {truncation!r}")
        tok = self._dropout_model() if dropout else self._tok
        encodings = tok.encode_batch(texts) if len(texts) > 1 else [tok.encode(t) for t in texts]
        out = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        long = []
        for i, enc in enumerate(encodings):
            ids = enc.ids
            if len(ids) > length:
                long.append((i, len(ids)))
                ids = ids[:length]
            out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        if long:
            i, n = long[0]
            msg = (f"{len(long)} of {len(texts)} caption(s) longer than length={length} tokens, e.g. "
                   f"{_short(texts[i])!r} ({n} tokens)")
            if truncation == "error":
                raise ValueError(msg + "; shorten it or raise length (truncation='warn' cuts it)")
            log.warning(msg + ": truncated")
        return out

    def decode(self, ids) -> str | list[str]:
        """Ids of one sequence (1-D) -> str, or of a batch (2-D / list of lists) -> list[str].
        Padding and special tokens other than unk (e.g. CLIP's bos/eos) are dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = list(ids)
        if ids and isinstance(ids[0], (list, tuple)) or (ids and isinstance(ids[0], torch.Tensor)):
            return [self.decode(row) for row in ids]
        text = self._tok.decode([int(i) for i in ids if int(i) not in self._hidden], skip_special_tokens=False)
        # CLIP's tokenizer decodes byte-level and leaves its end-of-word suffix (transformers strips it too).
        eow = self._eow
        return " ".join(text.replace(eow, " ").split()) if eow and eow in text else text

    def encoder(self, length: int, dropout: bool = False) -> "CaptionEncoder":
        """A picklable callable str -> LongTensor [length] for loader workers (truncation warns)."""
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be an integer >= 1, got {length!r}")
        if dropout:
            self._dropout_model()  # fail here, not in a worker
        return CaptionEncoder(self, length, bool(dropout))

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, pad={self.pad_token!r}@{self.pad_id})"


class CaptionEncoder:
    """`tokenizer.encoder(length)`: one caption -> LongTensor [length]."""

    def __init__(self, tokenizer: TextTokenizer, length: int, dropout: bool):
        self.tokenizer, self.length, self.dropout = tokenizer, length, dropout

    def __call__(self, text: str) -> torch.Tensor:
        return self.tokenizer.encode(text, self.length, truncation="warn", dropout=self.dropout)[0]


# ---- helpers ---------------------------------------------------------------------------------------

class _Counted:
    """An iterable that counts what passes through it (to detect an empty training set)."""

    def __init__(self, items: Iterable[str]):
        self.items, self.n = items, 0

    def __iter__(self):
        for item in self.items:
            if not isinstance(item, str):
                raise ValueError(f"texts must be strings, got {type(item).__name__}")
            self.n += 1
            yield item


def _canonical_ids(tok: Tokenizer) -> Tokenizer:
    """Give the alphabet sorted ids. The trainer numbers it in hash-map order, which changes from
    process to process (its merges do not): the same captions must give the same ids."""
    spec = json.loads(tok.to_str())
    model = spec["model"]
    merged = {"".join(m) if isinstance(m, list) else m.replace(" ", "") for m in model["merges"]}
    specials = [t["content"] for t in sorted(spec["added_tokens"], key=lambda t: t["id"])]
    by_id = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    alphabet = sorted(t for t in by_id if t not in merged and t not in specials)
    order = specials + alphabet + [t for t in by_id if t in merged]
    assert len(order) == len(by_id), "vocabulary changed while renumbering"
    model["vocab"] = {t: i for i, t in enumerate(order)}
    for t in spec["added_tokens"]:
        t["id"] = model["vocab"][t["content"]]
    return Tokenizer.from_str(json.dumps(spec))


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[:n] + "..."


def _fast_from_transformers(path: Path) -> tuple[Tokenizer, dict]:
    """A local HF tokenizer directory without tokenizer.json (e.g. CLIP's vocab.json + merges.txt)
    -> (its `tokenizers` backend, its special tokens)."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path} is not a tokenizer directory ({TOKENIZER_FILE} or a transformers "
                         f"tokenizer): {e}") from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{path}: transformers gives a slow tokenizer ({type(hf).__name__}) without a "
                         "`tokenizers` backend; save it as a fast tokenizer (tokenizer.json)")
    specials = {"pad_token": hf.pad_token, "eos_token": hf.eos_token}
    return Tokenizer.from_str(backend.to_str()), specials


def _token_name(value) -> Optional[str]:
    """tokenizer_config.json stores special tokens as strings or AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _pad_token(tok: Tokenizer, config: dict) -> Optional[str]:
    candidates = [_token_name(config.get("pad_token")), _token_name(config.get("eos_token"))]
    padding = json.loads(tok.to_str()).get("padding") or {}
    candidates += [padding.get("pad_token"), PAD]
    return next((c for c in candidates if c and tok.token_to_id(c) is not None), None)


# ---- captions ----------------------------------------------------------------------------------------

def read_captions(shards_or_files, stats: Optional[dict] = None) -> Iterator[str]:
    """Captions, one per line, from WebDataset tars (their `txt` members) or plain `.txt` files.

    Accepts a path, a brace pattern (`train-{000..009}.tar`), a glob, a directory or a list of them.
    Members that are not UTF-8 and unreadable tars are skipped and counted in `stats` (reason ->
    count, if given) and in a logged warning; blank lines are dropped.
    """
    skipped: dict[str, int] = stats if stats is not None else {}
    for path in expand_shards(shards_or_files):
        if not Path(path).is_file():
            raise FileNotFoundError(f"no such shard or caption file: {path}")
        if path.endswith(".tar"):
            yield from _tar_captions(path, skipped)
        else:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except UnicodeDecodeError:
                skipped["not_utf8"] = skipped.get("not_utf8", 0) + 1
                continue
            yield from _lines(text)
    if any(skipped.values()):
        log.warning("read_captions skipped: %s", skipped)


def _tar_captions(path: str, skipped: dict) -> Iterator[str]:
    """The `txt` members of one tar, read through the data stage's reader (any sample, with or without an image)."""
    def bad_tar(exn: BaseException) -> bool:
        skipped["bad_tar"] = skipped.get("bad_tar", 0) + 1
        log.warning("read_captions: unreadable tar %s: %s", path, exn)
        return True

    for raw in tar_samples([path], bad_tar):
        if "txt" not in raw:
            continue
        try:
            text = raw["txt"].decode("utf-8")
        except UnicodeDecodeError:
            skipped["not_utf8"] = skipped.get("not_utf8", 0) + 1
            continue
        yield from _lines(text)


def _lines(text: str) -> Iterator[str]:
    for line in text.splitlines():
        line = line.strip()
        if line:
            yield line
