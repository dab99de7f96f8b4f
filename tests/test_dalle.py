"""The prior: masks, KV-cached decoding == full forward, sampling, guidance, priming, training, I/O."""

import json

import pytest
import torch
from safetensors.torch import load_file

import dalle_ar.transformer
from dalle_ar.dalle import DALLE, DALLEConfig, sample_logits
from dalle_ar.engine import param_groups
from dalle_ar.transformer import build_mask

T, G = 5, 4  # text_len, image grid (16 image tokens)
MIXED = ("row", "column", "row", "conv")


def make(attn_types=("full",), **kw):
    torch.manual_seed(0)
    cfg = dict(text_vocab_size=40, text_len=T, image_vocab_size=24, image_grid=G, dim=32, depth=4, heads=4,
               attn_types=attn_types, conv_kernel=3, null_prob=0.0)
    cfg.update(kw)
    return DALLE(DALLEConfig(**cfg)).eval()


def batch(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 40, (b, T), generator=g)
    text[:, 3:] = 0  # padded captions
    text[0, 1:] = 0
    return text, torch.randint(0, 24, (b, G, G), generator=g)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine OpenMP's
    barriers make them many times slower: run this file single-threaded, then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- masks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["full", "row", "column", "conv"])
def test_masks_are_causal_and_split_text_from_image(kind):
    m = build_mask(kind, 3, 4, conv_kernel=3)
    n = 3 + 16 - 1
    assert m.shape == (n, n) and m.dtype == torch.bool
    assert not (m & ~torch.ones(n, n, dtype=torch.bool).tril()).any()  # nothing from the future
    assert m.diagonal().all()  # every position sees itself (no empty softmax row)
    assert not m[:3, 3:].any()  # text never attends to image
    assert m[:3, :3].equal(torch.ones(3, 3, dtype=torch.bool).tril())  # text: causal over text
    assert m[3:, :3].all()  # every image token sees all of the text


def image_keys(mask, text_len, i):
    """Image indices that image token i attends to."""
    return set((mask[text_len + i, text_len:text_len + i + 1].nonzero().flatten()).tolist())


def test_mask_patterns_follow_the_paper():
    # 4 x 4 grid, 3 text tokens; image token 6 sits at row 1, column 2.
    assert image_keys(build_mask("full", 3, 4), 3, 6) == set(range(7))
    assert image_keys(build_mask("row", 3, 4), 3, 6) == {2, 3, 4, 5, 6}  # previous `grid` tokens
    assert image_keys(build_mask("row", 3, 4), 3, 13) == {9, 10, 11, 12, 13}
    assert image_keys(build_mask("column", 3, 4), 3, 14) == {2, 6, 10, 14}
    conv = build_mask("conv", 3, 4, conv_kernel=3)
    assert image_keys(conv, 3, 6) == {1, 2, 3, 5, 6}
    assert image_keys(conv, 3, 4) == {0, 1, 4}  # row 1 col 0: token 3 (row 0 col 3) is no neighbour
    assert image_keys(build_mask("conv", 3, 8, conv_kernel=5), 3, 8 * 4 + 4) == {
        r * 8 + c for r in (2, 3, 4) for c in range(2, 7) if r * 8 + c <= 36}


def test_masks_are_buffers_built_once(monkeypatch):
    model = make(MIXED)
    assert not any(k.startswith("transformer.mask") for k in model.state_dict())
    ptrs = {k: v.data_ptr() for k, v in model.named_buffers()}
    assert set(ptrs) == {"transformer.mask_row", "transformer.mask_column", "transformer.mask_conv"}

    def no_new_masks(*args, **kwargs):
        raise AssertionError("a mask was built after construction")

    monkeypatch.setattr(dalle_ar.transformer, "build_mask", no_new_masks)
    model.generate(batch()[0], guidance_scale=2.0, prime=batch()[1][:, :1], generator=seeded(0))
    model(*batch())
    assert ptrs == {k: v.data_ptr() for k, v in model.named_buffers()}


# ---- forward / cache -------------------------------------------------------------------------

def test_loss_and_logit_shapes():
    model = make()
    text, codes = batch()
    loss, parts = model(text, codes)
    assert loss.dim() == 0 and set(parts) == {"loss_text", "loss_image"}
    assert torch.allclose(loss, parts["loss_text"] / 8 + parts["loss_image"] * 7 / 8)
    text_logits, image_logits = model.logits(text, codes)
    assert text_logits.shape == (3, T - 1, 40 + T)  # pads are per-position tokens 40..44
    assert image_logits.shape == (3, G * G, 24)
    loss.backward()


@pytest.mark.parametrize("attn_types", [("full",), ("row",), ("column",), ("conv",), MIXED],
                         ids=lambda t: ",".join(t))
@pytest.mark.parametrize("primed", [0, 5])
@pytest.mark.parametrize("static", [False, True], ids=["written-slots", "static"])
def test_cached_decoding_equals_full_forward(attn_types, primed, static):
    model = make(attn_types)
    text, codes = batch()
    _, full = model.logits(text, codes)
    flat = codes.flatten(1)
    cache = model.new_cache(static)
    steps = [model.prefill(text, cache, flat[:, :primed])]
    storage = cache.kv.data_ptr()
    for i in range(primed, G * G - 1):
        steps.append(model.step(flat[:, i], i, cache))
    cached = torch.stack(steps, 1)
    # One preallocated tensor for every layer, written in place (never grown or reallocated).
    assert cache.kv.shape == (4, 2, 3, 4, T + G * G - 1, 8) and cache.kv.data_ptr() == storage
    assert torch.allclose(cached, full[:, primed:], atol=1e-5, rtol=0), (cached - full[:, primed:]).abs().max()


@pytest.mark.parametrize("static", [False, True], ids=["written-slots", "static"])
def test_flat_cpu_step_equals_the_module_path(static):
    """`Transformer.step` on CPU (flat ops, in-place residual) == `forward` with one position (the
    path CUDA and autocast take), for every mask type at once."""
    model = make(MIXED)
    text, codes = batch()
    flat = codes.flatten(1)
    caches = [model.new_cache(static), model.new_cache(static)]
    for cache in caches:
        model.prefill(text, cache)
    for i in range(G * G - 1):
        x = model.embed_image(flat[:, i:i + 1], i)
        fast = model.transformer.step(x[:, 0].clone(), caches[0], T + i)  # overwrites its input
        slow = model.transformer(x, caches[1], start=T + i)[:, 0]
        assert torch.allclose(fast, slow, atol=1e-5, rtol=0), (i, (fast - slow).abs().max())
    assert torch.allclose(caches[0].kv, caches[1].kv, atol=1e-5, rtol=0)


def test_static_cache_steps_all_have_one_shape(monkeypatch):
    """With a static cache (the CUDA default) each step attends over every slot (the mask hides
    later ones): one shape for all steps, so backends that plan per shape (cuDNN) and CUDA graphs
    see one shape, not one per token. CPU steps attend over the written slots only."""
    model = make(MIXED)
    shapes = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        shapes.append((q.shape[2], k.shape[2]))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    text, codes = batch()
    flat = codes.flatten(1)
    cache = model.new_cache(static=True)
    model.prefill(text, cache)
    for i in range(G * G - 1):  # the module path of a step, as CUDA runs it
        model.transformer(model.embed_image(flat[:, i:i + 1], i), cache, start=T + i)
    assert set(shapes) == {(T, T), (1, T + G * G - 1)}
    assert cache.static is True
    dynamic = model.new_cache()
    model.prefill(text, dynamic)
    assert dynamic.static is False  # CPU default: uninitialised, only written slots are read


def test_tied_heads():
    tied, untied = make(tie_heads=True), make()
    assert tied.num_parameters() == untied.num_parameters() - 32 * (40 + T + 24)
    assert tied.num_parameters(exclude_embeddings=True) < untied.num_parameters(exclude_embeddings=True)
    text, codes = batch()
    _, full = tied.logits(text, codes)
    cache = tied.new_cache()
    assert torch.allclose(tied.prefill(text, cache), full[:, 0], atol=1e-5)


# ---- sampling --------------------------------------------------------------------------------

def test_same_seed_same_tokens_different_seed_different_tokens():
    model = make(MIXED)
    text = batch(4)[0]
    a = model.generate(text, generator=seeded(7))
    assert a.shape == (4, G, G) and a.dtype == torch.long
    assert a.equal(model.generate(text, generator=seeded(7)))
    assert not a.equal(model.generate(text, generator=seeded(8)))
    # A sample's draws do not depend on how many samples share the batch.
    assert a[:2].equal(model.generate(text[:2], generator=seeded(7)))


@pytest.mark.parametrize("guidance_scale, top_p", [(1.0, None), (2.0, 0.9)])
def test_noise_rows_from_different_seeds_batch_like_separate_calls(guidance_scale, top_p):
    """Rows of one batch sampled with other seeds' uniforms (what the server's dynamic batching
    does) give each row the codes its own seed gives it alone."""
    model = make(MIXED)
    text = batch(4)[0]
    kw = dict(guidance_scale=guidance_scale, top_p=top_p)
    alone = [model.generate(text[i:i + 1], generator=seeded(10 + i), **kw) for i in range(4)]
    noise = torch.cat([torch.rand(1, G * G, generator=seeded(10 + i)) for i in range(4)])
    assert model.generate(text, noise=noise, **kw).equal(torch.cat(alone))
    assert model.generate(text[1:3], noise=noise[1:3], **kw).equal(torch.cat(alone[1:3]))


def test_top_k_1_is_greedy_argmax_of_full_forward():
    model = make(MIXED)
    text = batch()[0]
    codes = model.generate(text, top_k=1, generator=seeded(0))
    _, logits = model.logits(text, codes)
    assert logits.argmax(-1).equal(codes.flatten(1))
    assert len(codes.unique()) > 1


def test_sample_logits_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    u = torch.rand(2000, generator=seeded(0))
    assert sample_logits(logits, u, top_k=2).unique().tolist() == [0, 1]
    p = logits[0].softmax(-1)  # 0.64, 0.23, 0.09, ...
    assert sample_logits(logits, u, top_p=0.8).unique().tolist() == [0, 1]
    assert sample_logits(logits, u, top_p=float(p[0]) - 0.01).unique().tolist() == [0]
    assert len(sample_logits(logits, u).unique()) == 5
    freq = torch.bincount(sample_logits(logits, u), minlength=5).float() / 2000
    assert torch.allclose(freq, p, atol=0.04)
    cold = torch.bincount(sample_logits(logits, u, temperature=0.3), minlength=5).float() / 2000
    assert cold[0] > 0.9


def test_guidance():
    model = make(MIXED)
    text = batch()[0]
    null = torch.zeros_like(text)
    plain = model.generate(text, generator=seeded(3))
    assert plain.equal(model.generate(text, guidance_scale=1.0, generator=seeded(3)))
    # Scale 0 (batched 2B pass) samples from the unconditional branch alone.
    assert model.generate(text, guidance_scale=0.0, generator=seeded(3)).equal(model.generate(null, generator=seeded(3)))
    # Greedy guided codes are the argmax of uncond + s * (cond - uncond) from full forward passes.
    s = 3.0
    codes = model.generate(text, guidance_scale=s, top_k=1, generator=seeded(0))
    _, cond = model.logits(text, codes)
    _, uncond = model.logits(null, codes)
    assert (uncond + s * (cond - uncond)).argmax(-1).equal(codes.flatten(1))
    assert not codes.equal(model.generate(text, top_k=1))


@pytest.mark.parametrize("guidance_scale, primed", [(1.0, False), (2.5, False), (2.5, True)])
def test_generate_returns_the_priors_log_likelihoods(guidance_scale, primed):
    """return_log_probs: the sampled codes' log-likelihood given the caption and given the null caption
    (a negative prompt here), at temperature 1 without truncation, whatever the sampling knobs."""
    model = make(MIXED)
    text = batch()[0]
    null = torch.randint(1, model.config.text_vocab_size, text.shape)
    prime = model.generate(text, generator=seeded(1))[:, :1] if primed else None
    kw = dict(guidance_scale=guidance_scale, temperature=0.7, top_k=5, prime=prime, null_text=null)
    codes, lp = model.generate(text, generator=seeded(2), return_log_probs=True, **kw)
    assert codes.equal(model.generate(text, generator=seeded(2), **kw))  # same draws with or without
    start = 0 if prime is None else prime[0].numel()
    assert lp[:, 0].tolist() == pytest.approx(model.log_likelihood(text, codes, start).tolist(), abs=1e-4)
    if guidance_scale == 1.0:
        assert lp[:, 1].isnan().all()  # the unconditional branch did not run
    else:
        assert lp[:, 1].tolist() == pytest.approx(model.log_likelihood(null, codes, start).tolist(), abs=1e-4)
    # by hand: the sum of the log softmax of teacher-forced logits at the codes
    _, logits = model.logits(text, codes)
    hand = logits.log_softmax(-1).gather(-1, codes.flatten(1)[..., None]).squeeze(-1)[:, start:].sum(1)
    assert lp[:, 0].tolist() == pytest.approx(hand.tolist(), abs=1e-4)


def test_null_text_and_callback():
    model = make(MIXED)
    text = batch()[0]
    null = torch.zeros_like(text)
    guided = model.generate(text, guidance_scale=2.0, generator=seeded(4))
    assert guided.equal(model.generate(text, guidance_scale=2.0, null_text=null, generator=seeded(4)))
    other = torch.full_like(text, 7)
    codes = model.generate(text, guidance_scale=2.0, top_k=1, null_text=other, generator=seeded(4))
    _, cond = model.logits(text, codes)
    _, uncond = model.logits(other, codes)
    assert (uncond + 2.0 * (cond - uncond)).argmax(-1).equal(codes.flatten(1))
    seen = []
    out = model.generate(text, prime=batch()[1][:, :1], generator=seeded(0),
                         callback=lambda i, c: seen.append((i, c[:, i].clone())))
    assert [i for i, _ in seen] == list(range(G, G * G))
    assert all(tok.equal(out.flatten(1)[:, i]) for i, tok in seen)


def test_priming_keeps_rows_and_continues():
    model = make(MIXED)
    text, prime_codes = batch()
    prime = prime_codes[:, :2]
    out = model.generate(text, prime=prime, top_k=1, generator=seeded(0))
    assert out[:, :2].equal(prime)
    _, logits = model.logits(text, out)
    assert logits.argmax(-1)[:, 2 * G:].equal(out.flatten(1)[:, 2 * G:])
    assert model.generate(text, prime=prime[:, :0], generator=seeded(1)).equal(model.generate(text, generator=seeded(1)))
    guided = model.generate(text, prime=prime, guidance_scale=2.0, generator=seeded(0))
    assert guided[:, :2].equal(prime)


def test_generate_restores_training_mode():
    model = make().train()
    model.generate(batch()[0], generator=seeded(0))
    assert model.training
    model.eval().generate(batch()[0], generator=seeded(0))
    assert not model.training


# ---- training --------------------------------------------------------------------------------

def test_overfits_four_pairs_and_greedy_generation_reproduces_them():
    """Four prompts that differ only in text -> four different code grids: needs working conditioning."""
    torch.manual_seed(0)
    model = DALLE(DALLEConfig(text_vocab_size=30, text_len=6, image_vocab_size=16, image_grid=4, dim=64, depth=3,
                              heads=4, attn_types=("row", "column", "conv"), conv_kernel=3, null_prob=0.0))
    text = torch.tensor([[5, 6, 7, 0, 0, 0], [5, 6, 8, 0, 0, 0], [9, 6, 7, 3, 0, 0], [9, 4, 0, 0, 0, 0]])
    codes = torch.randint(0, 16, (4, 4, 4), generator=seeded(5))
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=3e-3)
    model.train()
    for _ in range(200):
        loss, parts = model(text, codes)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert parts["loss_image"] < 0.05, parts
    out = model.generate(text, top_k=1)
    assert out.equal(codes), (out != codes).sum()


def test_caption_dropout_rate_and_null_caption():
    model = make(null_prob=0.3).train()
    text = torch.randint(1, 40, (20000, T))
    torch.manual_seed(0)
    dropped_text, dropped = model.drop_captions(text)
    assert abs(dropped.float().mean().item() - 0.3) < 0.015
    assert (dropped_text[dropped] == 0).all() and dropped_text[~dropped].equal(text[~dropped])
    # In training, null_prob=1 trains every sample on the null caption (and no text loss).
    always = make(null_prob=1.0).train()
    text, codes = batch()
    _, parts = always(text, codes)
    _, null_parts = always.eval()(torch.zeros_like(text), codes)
    assert torch.allclose(parts["loss_image"], null_parts["loss_image"]) and parts["loss_text"] == 0
    # Evaluation never drops captions.
    assert not torch.allclose(always(text, codes)[1]["loss_image"], null_parts["loss_image"])


def test_optimizer_groups():
    model = make(tie_heads=True)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert not ids(decay["params"]) & ids(no_decay["params"])
    assert ids(decay["params"]) | ids(no_decay["params"]) == ids(model.parameters())
    assert all(p.dim() == 2 for p in decay["params"])
    assert id(model.text_emb.weight) in ids(no_decay["params"])
    assert id(model.transformer.blocks[0].attn.qkv.weight) in ids(decay["params"])
    assert id(model.transformer.blocks[0].ln1.weight) in ids(no_decay["params"])


# ---- save / load -----------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip(tmp_path, tie):
    model = make(MIXED, tie_heads=tie)
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["attn_types"] == list(MIXED)
    assert not any("mask" in k for k in load_file(str(tmp_path / "m" / "model.safetensors")))
    loaded = DALLE.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and loaded.config.attn_types == MIXED
    text, codes = batch()
    assert torch.equal(loaded.logits(text, codes)[1], model.logits(text, codes)[1])
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "z", state_dict=state)
    assert all((v == 0).all() for v in DALLE.from_pretrained(tmp_path / "z").state_dict().values()
               if v.is_floating_point())


# ---- invalid arguments -----------------------------------------------------------------------

GOOD_TEXT = torch.ones(2, T, dtype=torch.long)


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(temperature="1"), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_k=-2), "top_k"), (dict(top_k=1.5), "top_k"), (dict(top_k=True), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"),
    (dict(guidance_scale=-1.0), "guidance_scale"), (dict(guidance_scale=float("inf")), "guidance_scale"),
    (dict(generator=0), "generator"),
    (dict(noise=torch.rand(2, G * G - 1)), "noise"), (dict(noise=torch.zeros(2, G * G, dtype=torch.long)), "noise"),
    (dict(prime=torch.zeros(2, G, G, dtype=torch.long)), "prime"),       # every row primed
    (dict(prime=torch.zeros(2, 1, G + 1, dtype=torch.long)), "prime"),   # wrong width
    (dict(prime=torch.zeros(3, 1, G, dtype=torch.long)), "prime"),       # wrong batch
    (dict(prime=torch.full((2, 1, G), 24)), "prime"),                    # code out of range
    (dict(prime=torch.zeros(2, 1, G)), "prime"),                         # float
    (dict(text=torch.ones(2, T + 1, dtype=torch.long)), "text"),
    (dict(text=torch.ones(2, T)), "text"),
    (dict(text=torch.full((2, T), 40)), "text"),
    (dict(text=torch.full((2, T), -1)), "text"),
    (dict(text=[[1] * T]), "text"),
    (dict(null_text=torch.ones(3, T, dtype=torch.long)), "null_text"),
    (dict(null_text=torch.full((2, T), 40)), "null_text"),
    (dict(callback=3), "callback"),
])
def test_generate_rejects_invalid_arguments(kwargs, name):
    model = make()
    kwargs = {"text": GOOD_TEXT, **kwargs}
    with pytest.raises(ValueError, match=name):
        model.generate(kwargs.pop("text"), **kwargs)


@pytest.mark.parametrize("text, codes, name", [
    (GOOD_TEXT, torch.zeros(2, G * G, dtype=torch.long), "codes"),
    (GOOD_TEXT, torch.zeros(3, G, G, dtype=torch.long), "codes"),
    (GOOD_TEXT, torch.full((2, G, G), 24), "codes"),
    (GOOD_TEXT, torch.zeros(2, G, G), "codes"),
    (GOOD_TEXT[:, :-1], torch.zeros(2, G, G, dtype=torch.long), "text"),
    (GOOD_TEXT.bool(), torch.zeros(2, G, G, dtype=torch.long), "text"),
])
def test_forward_rejects_invalid_inputs(text, codes, name):
    with pytest.raises(ValueError, match=name):
        make()(text, codes)


@pytest.mark.parametrize("change, name", [
    (dict(attn_types=("row", "diagonal")), "attn_types"), (dict(attn_types=()), "attn_types"),
    (dict(attn_types="row"), "attn_types"), (dict(dim=30), "dim"), (dict(conv_kernel=4), "conv_kernel"),
    (dict(text_vocab_size=0), "text_vocab_size"), (dict(image_grid=0), "image_grid"),
    (dict(null_prob=1.5), "null_prob"), (dict(loss_text_weight=-0.1), "loss_text_weight"),
    (dict(pad_id=40), "pad_id"), (dict(guidance_scale=-2.0), "guidance_scale"),
    (dict(temperature=0.0), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(depth=2.0), "depth"),
])
def test_config_rejects_invalid_fields(change, name):
    with pytest.raises(ValueError, match=name):
        make(**change)
