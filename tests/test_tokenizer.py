"""Text tokenizer: training on real shards, normalisation, padding/truncation, dropout, I/O, CLI."""

import json
import logging
import pickle

import pytest
import torch
import webdataset as wds

from dalle_ar.tokenizer import TextTokenizer, read_captions

COLORS = ["red", "green", "blue", "yellow", "purple", "cyan", "orange", "white"]
SHAPES = ["circle", "square", "triangle"]
PLACES = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]


def captions():
    out = []
    for i, (c, s) in enumerate((c, s) for c in COLORS for s in SHAPES):
        size = "small" if i % 2 else "large"
        for p in PLACES:
            out.append(f"a {size} {c} {s} at the {p}")
            out.append(f"a {c} {s}, {size}, in the {p} of the image")
    return out


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """A real WebDataset tar: two captions per sample, plus one non-UTF-8 caption member."""
    path = tmp_path_factory.mktemp("shards") / "train-000000.tar"
    caps = captions()
    with wds.TarWriter(str(path)) as sink:
        for i in range(0, len(caps), 2):
            sink.write({"__key__": f"{i:06d}", "txt": caps[i] + "\n" + caps[i + 1],
                        "json": {"i": i}})
        sink.write({"__key__": "broken", "txt": b"\xff\xfe not utf-8"})
    return path


@pytest.fixture(scope="module")
def tok(shard):
    return TextTokenizer.train(read_captions(str(shard)), vocab_size=128)


def test_read_captions_from_tar_and_text(shard, tmp_path):
    stats = {}
    got = list(read_captions(str(shard), stats))
    assert got == captions()
    assert stats == {"not_utf8": 1}
    txt = tmp_path / "caps.txt"
    txt.write_text("one caption\n\n  another one  \n")
    assert list(read_captions([txt])) == ["one caption", "another one"]
    # brace patterns
    (tmp_path / "b.txt").write_text("third\n")
    assert list(read_captions(str(tmp_path / "{caps,b}.txt"))) == ["one caption", "another one", "third"]
    with pytest.raises(FileNotFoundError):
        list(read_captions(str(tmp_path / "missing.tar")))


def test_train_specials_and_vocab(tok):
    assert tok.pad_id == 0
    assert tok.backend.token_to_id("<unk>") == 1
    assert 40 < tok.vocab_size <= 128
    ids = tok.encode("a red circle at the top left", length=16)
    assert ids.dtype == torch.long and ids.shape == (1, 16)
    n = int((ids != 0).sum())
    assert 0 < n < 16 and (ids[0, n:] == 0).all() and (ids[0, :n] != 0).all()
    # frequent words became single tokens
    assert n <= 8


def test_train_validation():
    with pytest.raises(ValueError, match="vocab_size"):
        TextTokenizer.train(["a b"], vocab_size=0)
    with pytest.raises(ValueError, match="no captions"):
        TextTokenizer.train(iter([]), vocab_size=64)


def test_lowercase_and_nfkc(tok):
    assert torch.equal(tok.encode("ＲＥＤ Circle", 8), tok.encode("red circle", 8))
    assert torch.equal(tok.encode("A Small RED Circle", 8), tok.encode("a small red circle", 8))
    assert tok.decode(tok.encode("ＲＥＤ  Circle", 8)[0]) == "red circle"


def test_batch_padding_and_decode(tok):
    texts = ["a red circle", "a large blue square at the bottom right"]
    ids = tok.encode(texts, length=12)
    assert ids.shape == (2, 12)
    assert (ids[0] == 0).sum() > (ids[1] == 0).sum()
    assert tok.decode(ids) == texts
    assert tok.decode(ids[1].tolist()) == texts[1]
    # letters never seen in training still round-trip (the alphabet is always there)
    assert tok.decode(tok.encode("zebra", 16)[0]) == "zebra"


def test_truncation_warn_and_error(tok, caplog):
    long = "a small red circle at the top left of the image " * 4
    with caplog.at_level(logging.WARNING, logger="dalle_ar.tokenizer"):
        ids = tok.encode(["a red circle", long], length=6)
    assert ids.shape == (2, 6) and (ids[1] != 0).all()
    assert any("truncated" in r.message and "length=6" in r.message for r in caplog.records)
    with pytest.raises(ValueError, match="length=6"):
        tok.encode(long, length=6, truncation="error")
    tok.encode("a red circle", length=6, truncation="error")  # fits: no error


@pytest.mark.parametrize("kw,name", [({"length": 0}, "length"), ({"length": 4, "truncation": "cut"}, "truncation")])
def test_encode_argument_errors(tok, kw, name):
    with pytest.raises(ValueError, match=name):
        tok.encode("a red circle", **kw)
    with pytest.raises(ValueError, match="texts"):
        tok.encode(["ok", 3], length=4)


def test_bpe_dropout_only_when_asked(tok):
    text = "a large purple triangle in the bottom right of the image"
    plain = tok.encode(text, 32)
    seen = set()
    for _ in range(30):
        assert torch.equal(tok.encode(text, 32), plain)  # the plain path never drops merges
        d = tok.encode(text, 32, dropout=True)
        seen.add(tuple(d[0].tolist()))
        assert tok.decode(d[0]) == tok.decode(plain[0])  # same text, other segmentation
    assert len(seen) > 1
    # dropped merges mean more, shorter tokens
    assert max(int((torch.tensor(s) != 0).sum()) for s in seen) > int((plain != 0).sum())


def test_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert cfg["pad_token"] == "<pad>" and cfg["bpe_dropout"] == 0.1
    texts = captions()[:20] + ["ＲＥＤ zebra!"]
    for src in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        again = TextTokenizer.from_pretrained(src)
        assert again.vocab_size == tok.vocab_size and again.pad_id == tok.pad_id
        assert torch.equal(again.encode(texts, 16), tok.encode(texts, 16))
    with pytest.raises(FileNotFoundError):
        TextTokenizer.from_pretrained(tmp_path / "nope")


def test_pickle_and_encoder(tok):
    again = pickle.loads(pickle.dumps(tok))
    texts = captions()[:10]
    assert torch.equal(again.encode(texts, 16), tok.encode(texts, 16))
    enc = pickle.loads(pickle.dumps(tok.encoder(16)))
    out = enc(texts[3])
    assert out.shape == (16,) and out.dtype == torch.long
    assert torch.equal(out, tok.encode(texts[3], 16)[0])
    denc = pickle.loads(pickle.dumps(tok.encoder(16, dropout=True)))
    assert len({tuple(denc(texts[3]).tolist()) for _ in range(30)}) > 1


def test_load_transformers_fast_tokenizer_dir(tok, tmp_path, monkeypatch):
    """A PreTrainedTokenizerFast saved locally, with an eos token but no pad: pads with eos."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tok.to_json())
    backend.add_special_tokens(["</s>"])
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    hf.save_pretrained(tmp_path / "hf")
    loaded = TextTokenizer.from_pretrained(tmp_path / "hf")
    eos = backend.token_to_id("</s>")
    assert loaded.pad_id == eos != 0
    ids = loaded.encode("a red circle", 8)
    assert (ids[0, 3:] == eos).all()
    assert torch.equal(ids[0, :3], tok.encode("a red circle", 8)[0, :3])
    assert loaded.decode(ids[0]) == "a red circle"


def test_load_clip_style_vocab_merges_dir(tmp_path, monkeypatch):
    """A slow-format CLIP tokenizer dir (vocab.json + merges.txt, no tokenizer.json) via transformers."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(letters)})
    vocab.update({"re": 52, "red</w>": 53, "<|startoftext|>": 54, "<|endoftext|>": 55})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))
    loaded = TextTokenizer.from_pretrained(tmp_path)
    assert loaded.pad_id == 55  # CLIP pads with <|endoftext|>
    ids = loaded.encode("RED", 5)[0].tolist()
    assert ids[:3] == [54, 53, 55] and loaded.decode(ids) == "red"


def test_cli_train(shard, tmp_path, capsys):
    from dalle_ar.cli import main

    out = tmp_path / "cli-tok"
    rc = main(["tokenizer", "train", "--shards", str(shard), "--vocab-size", "100", "--out", str(out),
               "--min-frequency", "3"])
    assert rc == 0
    assert "vocab" in capsys.readouterr().out
    tok = TextTokenizer.from_pretrained(out)
    assert tok.vocab_size <= 100 and tok.decode(tok.encode("a red circle", 8)[0]) == "a red circle"
    txt = tmp_path / "caps.txt"
    txt.write_text("\n".join(captions()))
    assert main(["tokenizer", "train", "--files", str(txt), "--vocab-size", "100", "--out", str(tmp_path / "t2")]) == 0
    assert main(["tokenizer", "train", "--files", str(txt), "--vocab-size", "1", "--out", str(tmp_path / "t3")]) == 2
    capsys.readouterr()
    assert main(["tokenizer", "train", "--files", str(txt), "--vocab-size", "16384", "--out", str(tmp_path / "t4")]) == 0
    got = TextTokenizer.from_pretrained(tmp_path / "t4").vocab_size
    assert got < 16384 and f"asked for --vocab-size 16384, but the captions only give {got}" in capsys.readouterr().err


def test_training_is_reproducible_across_processes(tmp_path):
    """Same captions -> same ids, even in another process (hash-map order differs there)."""
    import subprocess
    import sys

    txt = tmp_path / "caps.txt"
    txt.write_text("\n".join(captions()))
    code = ("import sys; from dalle_ar.tokenizer import TextTokenizer, read_captions; "
            "sys.stdout.write(TextTokenizer.train(read_captions(sys.argv[1]), vocab_size=128).to_json())")
    runs = [subprocess.run([sys.executable, "-c", code, str(txt)], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert runs[0] == runs[1] == TextTokenizer.train(captions(), vocab_size=128).to_json()
