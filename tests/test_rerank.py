"""CLIP reranker: the small CLIP, its save/offline reload, scoring, ranking, loss and retrieval."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_ar.clip import (SmallCLIPConfig, build_small_clip, clip_inputs, clip_loss, retrieval_accuracy,
                           retrieval_metrics)
from dalle_ar.rerank import CLIPReranker
from dalle_ar.tokenizer import TextTokenizer

S, T = 32, 12  # image size, text length
COLORS = {"red": (220, 20, 20), "green": (20, 180, 20), "blue": (30, 60, 230), "yellow": (240, 220, 20)}
CFG = SmallCLIPConfig(embed_dim=32, text_width=32, text_layers=2, text_heads=2, vision_width=32,
                      vision_layers=2, vision_heads=2, patch_size=8)


def picture(color, shape):
    """A coloured square or horizontal bar on black (uint8 HWC)."""
    a = np.zeros((S, S, 3), np.uint8)
    if shape == "square":
        a[10:22, 10:22] = COLORS[color]
    else:
        a[14:18, 2:30] = COLORS[color]
    return a


def batch():
    """8 pictures, each told apart from the others by colour and shape (content, not position:
    a tiny CLIP learns where things are far more slowly than what they are)."""
    arrays, caps = [], []
    for c in COLORS:
        for shape in ("square", "bar"):
            arrays.append(picture(c, shape))
            caps.append(f"a {c} {shape} in the middle")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    return images, caps, [Image.fromarray(a) for a in arrays]


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.train(batch()[1] * 4, vocab_size=128)


@pytest.fixture(scope="module")
def clip(tok):
    torch.manual_seed(0)
    return build_small_clip(tok, CFG, image_size=S, text_len=T)


@pytest.fixture(scope="module")
def saved(clip, tmp_path_factory):
    """Export as the trainer does: model.save_pretrained(state_dict=...) + tokenizer + processor."""
    model, clip_tok, processor = clip
    d = tmp_path_factory.mktemp("clip")
    model.save_pretrained(d, state_dict={k: v.clone() for k, v in model.state_dict().items()})
    clip_tok.save_pretrained(d)
    processor.save_pretrained(d)
    return d


@pytest.fixture()
def reranker(saved, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return CLIPReranker.from_pretrained(saved)


def test_export_layout(saved, clip):
    model = clip[0]
    # DeepSpeed's parameter broadcast views each parameter as bytes: no 0-dim parameters
    assert all(p.dim() >= 1 for p in model.parameters())
    assert (saved / "config.json").is_file() and (saved / "model.safetensors").is_file()
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "clip" and config["architectures"] == ["CLIPModel"]
    from transformers import CLIPModel

    plain = CLIPModel.from_pretrained(saved, local_files_only=True)
    assert plain.logit_scale.dim() == 0 and torch.allclose(plain.logit_scale, model.logit_scale[0])
    model.load_state_dict(plain.state_dict())  # a plain CLIPModel state dict loads back


def test_clip_tokenizer_appends_eos_and_pools_there(clip, tok):
    model, clip_tok, processor = clip
    images, caps, _ = batch()
    inputs = clip_inputs(images, caps, clip_tok, processor, text_len=T)
    ids = inputs["input_ids"]
    eos = clip_tok.eos_token_id
    assert ids.shape == (8, T) and eos != 2 and model.config.text_config.eos_token_id == eos
    n = inputs["attention_mask"].sum(1)
    assert (ids[torch.arange(8), n - 1] == eos).all()  # eos right after each caption...
    assert torch.equal(ids[:, : int(n.min()) - 1], tok.encode(caps, T)[:, : int(n.min()) - 1])  # ...our BPE ids
    # too long: truncated but the eos is kept
    long = clip_tok(["a red square " * 10], padding="max_length", max_length=T, truncation=True)["input_ids"][0]
    assert len(long) == T and long[-1] == eos


def test_reload_offline_and_scores(reranker, saved, clip):
    model = clip[0]
    assert reranker.path == str(saved)
    assert reranker.model.config.text_config.eos_token_id == model.config.text_config.eos_token_id
    _, _, pil = batch()
    s1 = reranker.score("a red square in the middle", pil)
    s2 = reranker.score("a red square in the middle", pil, batch_size=3)
    assert s1.shape == (8,) and s1.dtype == torch.float32 and torch.isfinite(s1).all()
    assert torch.allclose(s1, s2, atol=1e-5)  # batching does not change scores
    assert not torch.allclose(s1, reranker.score("a blue bar in the middle", pil))
    assert reranker.to("cpu") is reranker


def test_pil_path_matches_tensor_path(reranker, clip):
    """score() (PIL + processor) and clip_inputs() (tensors) give the same scores and ranking."""
    model, clip_tok, processor = clip
    images, _, pil = batch()
    prompt = "a green bar in the middle"
    with torch.no_grad():
        out = model.eval()(**clip_inputs(images, [prompt] * 8, clip_tok, processor, text_len=T))
    tensor_scores = out.logits_per_image[:, 0]  # row i: image i against (copy i of) the prompt
    pil_scores = reranker.score(prompt, pil)
    assert torch.allclose(pil_scores, tensor_scores, atol=1e-4)
    assert torch.equal(torch.argsort(pil_scores), torch.argsort(tensor_scores))


def test_clip_inputs_resizes_other_sizes(clip):
    _, clip_tok, processor = clip
    images = torch.rand(2, 3, 48, 64)
    px = clip_inputs(images, ["a", "b"], clip_tok, processor, text_len=T)["pixel_values"]
    assert px.shape == (2, 3, S, S)


def test_rerank_order_and_validation(reranker):
    _, _, pil = batch()
    prompt = "a yellow square in the middle"
    scores = reranker.score(prompt, pil)
    idx, top = reranker.rerank(prompt, pil, keep=3, consensus=0)
    assert idx.dtype == torch.long and idx.shape == (3,) and top.shape == (3,)
    assert torch.equal(idx, torch.argsort(scores, descending=True)[:3])
    assert torch.equal(top, scores[idx]) and (top[:-1] >= top[1:]).all()
    for keep in (0, 9, 2.0):
        with pytest.raises(ValueError, match="keep"):
            reranker.rerank(prompt, pil, keep=keep)
    for consensus in (-1.0, float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match="consensus"):
            reranker.rerank(prompt, pil, keep=1, consensus=consensus)
    with pytest.raises(ValueError, match="prompt"):
        reranker.rerank("  ", pil, keep=1)
    with pytest.raises(ValueError, match="images"):
        reranker.rerank(prompt, [], keep=1)
    with pytest.raises(ValueError, match="images"):
        reranker.score(prompt, [])


def test_consensus_mixes_clip_score_and_agreement(reranker):
    """rerank's default score is z(CLIP score) + w * z(mean cosine to the other candidates)."""
    _, _, pil = batch()
    images = pil[:1] * 4 + pil[1:4]  # four copies of one picture, three different ones
    prompt = "a green bar in the middle"
    clip_scores = reranker.score(prompt, images)
    with torch.no_grad():  # the image embeddings, straight from the CLIPModel
        px = reranker.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        emb = torch.nn.functional.normalize(reranker.model.get_image_features(**px).pooler_output, dim=-1)
    sim = emb @ emb.T
    agreement = (sim.sum(1) - 1) / (len(images) - 1)

    def z(x):
        return (x - x.mean()) / x.std(unbiased=False)

    for w in (0.5, 1.0, 100.0):
        idx, top = reranker.rerank(prompt, images, keep=len(images), consensus=w)
        want = z(clip_scores) + w * z(agreement)
        assert sorted(idx.tolist()) == list(range(len(images))) and (top[:-1] >= top[1:]).all()
        assert torch.allclose(top, want[idx], rtol=1e-3, atol=1e-3)  # z-scores magnify float noise
    # with a large weight the majority wins whatever the prompt: one of the four copies is first
    assert int(reranker.rerank(prompt, images, keep=1, consensus=100.0)[0]) < 4
    # with two images agreement cannot separate them: CLIP order, CLIP scores
    idx, top = reranker.rerank(prompt, images[3:5], keep=2, consensus=1.0)
    assert torch.equal(top, reranker.score(prompt, images[3:5])[idx])


def test_not_a_clip_directory(tmp_path, tok):
    with pytest.raises(ValueError, match="no config.json"):
        CLIPReranker.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a CLIP"):
        CLIPReranker.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        CLIPReranker.from_pretrained(tmp_path / "missing")


def test_config_validation(tok):
    with pytest.raises(ValueError, match="text_heads"):
        SmallCLIPConfig(text_width=30, text_heads=4)
    with pytest.raises(ValueError, match="image_size"):
        build_small_clip(tok, CFG, image_size=30, text_len=T)


def test_contrastive_steps_lower_the_loss_and_retrieval(tok):
    torch.manual_seed(0)
    model, clip_tok, processor = build_small_clip(tok, CFG, image_size=S, text_len=T)
    images, caps, _ = batch()
    inputs = clip_inputs(images, caps, clip_tok, processor, text_len=T)
    model.eval()  # no dropout in CLIP; eval keeps it deterministic anyway
    first, parts = clip_loss(model, **inputs)
    first = first.detach()
    assert set(parts) == {"loss_clip", "image_to_text_top1", "text_to_image_top1"}
    assert first.item() > 0 and parts["loss_clip"].item() == first.item()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(30):
        loss, _ = clip_loss(model, **inputs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = clip_loss(model, **inputs)[0].detach()
    assert last.item() < 0.5 * first.item()
    m = retrieval_metrics(model, **inputs)
    assert set(m) == {"image_to_text_top1", "text_to_image_top1", "mean_top1"}
    assert all(0.0 <= v <= 1.0 for v in m.values())
    acc = retrieval_accuracy(model, **inputs)
    assert isinstance(acc, float) and acc == m["mean_top1"] and acc > 0.5  # chance is 1/8
