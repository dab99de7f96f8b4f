"""The discrete VAE: shapes, ranges, OpenAI's names, save/load, schedules, learning, bad input, the engine."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dalle_ar.dvae import DiscreteVAE, DVAEConfig, codebook_usage, cosine_ramp, psnr

TINY = dict(image_size=16, n_hid=8, group_count=2, vocab_size=32, n_init=8)


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return DiscreteVAE(DVAEConfig(**{**TINY, **kw}))


def blocks_images(n=4, size=16, channels=3, seed=0):
    """Black images with two flat-coloured squares each (what a dVAE learns fast)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, channels, size, size)
    for i in range(n):
        for _ in range(2):
            a, b = torch.randint(0, size - size // 3, (2,), generator=g).tolist()
            x[i, :, a:a + size // 3, b:b + size // 3] = torch.rand(channels, 1, 1, generator=g)
    return x


@pytest.mark.parametrize("kw, grid", [
    (dict(), 8),
    (dict(image_size=16, group_count=3, n_blk_per_group=2, vocab_size=16), 4),
    (dict(image_size=8, group_count=1, input_channels=1, n_hid=4), 8),
    (dict(image_size=16, group_count=4, loss="mse", straight_through=True), 2),
])
def test_shapes_ranges_and_dtypes(kw, grid):
    model = make(**kw).eval()
    c = model.config
    x = blocks_images(3, c.image_size, c.input_channels)
    codes = model.encode(x)
    assert codes.shape == (3, grid, grid) and codes.dtype == torch.long and model.grid_size == grid
    assert 0 <= int(codes.min()) and int(codes.max()) < c.vocab_size
    images = model.decode(codes.to(torch.int16))  # code shards store int16
    assert images.shape == x.shape and images.dtype == torch.float32
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    assert model.logits(x).shape == (3, c.vocab_size, grid, grid)
    model.train()
    loss, parts = model(x, step=0)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(parts) == {"recon", "kl", "kl_weight", "temperature", "psnr"}
    assert all(isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() == 0 for v in parts.values())
    assert all(p.grad is not None for p in model.parameters())


def test_decoder_takes_codes_like_one_hots():
    model = make().eval()
    codes = torch.randint(0, 32, (2, 8, 8))
    one_hot = torch.nn.functional.one_hot(codes, 32).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(model.decoder(codes), model.decoder(one_hot), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.decode(codes), model._pixels(model.decoder(one_hot)))


def test_openai_layout_names():
    model = make(image_size=32, group_count=4, n_blk_per_group=2, n_hid=8)
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sd["encoder.blocks.input.w"] == (8, 3, 7, 7)
    assert "encoder.blocks.group_1.block_1.id_path.w" not in sd  # same width: identity
    assert sd["encoder.blocks.group_2.block_1.id_path.w"] == (16, 8, 1, 1)
    assert sd["encoder.blocks.group_1.block_1.res_path.conv_1.w"] == (2, 8, 3, 3)
    assert sd["encoder.blocks.group_4.block_2.res_path.conv_4.w"] == (64, 16, 1, 1)
    assert sd["encoder.blocks.output.conv.w"] == (32, 64, 1, 1)
    assert sd["decoder.blocks.input.w"] == (8, 32, 1, 1)
    assert sd["decoder.blocks.group_1.block_1.id_path.w"] == (64, 8, 1, 1)
    assert sd["decoder.blocks.group_1.block_1.res_path.conv_1.w"] == (16, 8, 1, 1)
    assert sd["decoder.blocks.output.conv.w"] == (6, 8, 1, 1)
    assert all(k.endswith((".w", ".b")) for k in sd) and len(sd) == 2 * (2 + 2 + 4 * 2 * 8) + 2 * 3 + 2 * 4  # id_paths: 3 enc, 4 dec


def test_save_load_round_trip(tmp_path):
    model = make(seed=3).eval()
    x = blocks_images()
    out = model.save_pretrained(tmp_path / "dvae")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 32
    again = DiscreteVAE.from_pretrained(tmp_path / "dvae")
    assert again.config == model.config and not again.training
    codes = model.encode(x)
    assert torch.equal(again.encode(x), codes)
    assert torch.equal(again.decode(codes), model.decode(codes))
    # an explicit state dict (what the engine hands over) is what gets written
    sd = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "given", state_dict=sd)
    assert all(torch.equal(v, sd[k]) for k, v in load_file(str(tmp_path / "given" / "model.safetensors")).items())


def test_load_and_save_mismatches_are_value_errors(tmp_path):
    make().save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps({**config, "vocab_size": 64}))
    with pytest.raises(ValueError, match="shape mismatch"):
        DiscreteVAE.from_pretrained(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps({**config, "vocab_sz": 64}))
    with pytest.raises(ValueError, match="vocab_sz"):
        DiscreteVAE.from_pretrained(tmp_path / "a")
    with pytest.raises(FileNotFoundError):
        DiscreteVAE.from_pretrained(tmp_path / "nothing")
    with pytest.raises(ValueError, match="missing"):
        make().save_pretrained(tmp_path / "b", state_dict={})
    with pytest.raises(ValueError, match="shape mismatch"):
        make().save_pretrained(tmp_path / "b", state_dict=make(vocab_size=16).state_dict())


def test_schedules():
    model = make(kl_weight=6.6, kl_warmup_steps=5000, temp_start=1.0, temp_end=1 / 16, temp_anneal_steps=150000)
    assert model.kl_weight(0) == 0 and model.kl_weight(5000) == 6.6 and model.kl_weight(10**6) == 6.6
    assert model.kl_weight(2500) == pytest.approx(3.3)
    assert model.temperature(0) == 1 and model.temperature(150000) == 1 / 16
    assert model.temperature(75000) == pytest.approx((1 + 1 / 16) / 2)
    assert model.kl_weight(None) == 6.6 and model.temperature(None) == 1 / 16  # evaluation: end of schedule
    temps = [model.temperature(s) for s in range(0, 150001, 1000)]
    assert all(a >= b for a, b in zip(temps, temps[1:]))  # monotone
    assert cosine_ramp(5, 0, 1.0, 2.0) == 2.0  # zero-length ramp: the end value at once
    defaults = DVAEConfig()  # the paper's values
    assert (defaults.kl_weight, defaults.kl_warmup_steps, defaults.temp_anneal_steps, defaults.temp_end,
            defaults.logit_laplace_eps) == (6.6, 5000, 150000, 1 / 16, 0.1)
    _, parts = make(kl_warmup_steps=10, temp_anneal_steps=10)(blocks_images(), step=5)
    assert float(parts["kl_weight"]) == pytest.approx(3.3) and float(parts["temperature"]) < 1


def test_loss_parts_are_the_paper_objective():
    """logit-Laplace NLL of the mapped pixels + beta * KL-to-uniform scaled from latents to pixels."""
    model = make(kl_weight=2.0, kl_warmup_steps=0, temp_anneal_steps=0)
    x = blocks_images()
    torch.manual_seed(1)
    loss, parts = model(x, step=0)
    latents_per_pixel = 8 * 8 / (3 * 16 * 16)
    assert float(loss.detach()) == pytest.approx(float(parts["recon"] + 2.0 * latents_per_pixel * parts["kl"]), rel=1e-5)
    assert 0 <= float(parts["kl"]) <= math.log(32) + 1e-5
    with torch.no_grad():
        logits = model.logits(x)
    assert float(parts["kl"]) == pytest.approx(
        math.log(32) + float((logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()), rel=1e-4)


def fit(model, x, steps: int, check=None) -> float:
    """Adam on x for `steps` steps (check(loss, parts) on each) -> PSNR of decode(encode(x)) before."""
    before = float(psnr(model.eval().decode(model.encode(x)), x))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        loss, parts = model(x, step=step)
        if check is not None:
            check(loss, parts)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return before


def test_overfits_a_few_images():
    model = make(kl_weight=1.0, kl_warmup_steps=20, temp_anneal_steps=30, temp_end=0.25)
    x = blocks_images()
    before = fit(model, x, 30)
    codes = model.encode(x)
    after = float(psnr(model.decode(codes), x))
    assert after > before + 4, (before, after)
    usage = codebook_usage(codes, 32)
    assert 1 <= usage["perplexity"] <= 32 and 0 < usage["used_fraction"] <= 1


FSQ = dict(quantizer="fsq", fsq_levels=(4, 3, 3), vocab_size=36, loss="mse", logit_laplace_eps=1e-6)


def test_fsq_quantizer_learns_and_round_trips_codes(tmp_path):
    """quantizer="fsq": the encoder gives len(fsq_levels) channels, rounded to the levels; codes index
    the level grid (vocab = prod(levels)); the loss is the reconstruction alone; save/load keeps it."""
    model = make(**FSQ)
    assert model.encoder.blocks.output.conv.w.shape[0] == 3 and model.decoder.blocks.input.w.shape[1] == 3
    assert not any("fsq" in k for k in model.state_dict())  # the layout's weights only
    x = blocks_images()

    def check(loss, parts):
        assert set(parts) == {"recon", "psnr"} and float(loss.detach()) == pytest.approx(float(parts["recon"]))

    before = fit(model, x, 40, check)
    codes = model.encode(x)
    assert codes.dtype == torch.long and codes.shape == (4, 8, 8) and 0 <= int(codes.min()) <= int(codes.max()) < 36
    assert float(psnr(model.decode(codes), x)) > before + 4
    # decode(codes) is the decoder on the rounded latents the training pass used
    with torch.no_grad():
        q = model.fsq(model.encoder(model.map_pixels(x)).float())[0]
        assert torch.allclose(model.decode(codes), model._pixels(model.decoder(q)), atol=1e-5)
    model.save_pretrained(tmp_path / "fsq")
    loaded = DiscreteVAE.from_pretrained(tmp_path / "fsq")
    assert loaded.config.quantizer == "fsq" and loaded.config.fsq_levels == (4, 3, 3)
    assert loaded.encode(x).equal(codes) and torch.allclose(loaded.decode(codes), model.decode(codes))
    for kw, name in [(dict(fsq_levels=()), "fsq_levels"), (dict(fsq_levels=(4, 1)), "fsq_levels"),
                     (dict(vocab_size=32), "vocab_size"), (dict(quantizer="vq"), "quantizer")]:
        with pytest.raises(ValueError, match=name):
            DVAEConfig(**{**TINY, **FSQ, **kw})


def test_mse_decodes_linearly_and_logit_init_scale_scales_the_logits():
    torch.manual_seed(0)
    a = make(loss="mse")
    torch.manual_seed(0)
    b = make(loss="mse", logit_init_scale=10.0)
    x = blocks_images()
    with torch.no_grad():
        assert torch.allclose(b.logits(x), 10 * a.logits(x), atol=1e-4)  # the last conv starts with zero bias
        stats = a.decoder(a.encode(x))
        # mse: the decoder's output is the (mapped) pixel itself, no sigmoid
        assert torch.allclose(a.decode(a.encode(x)), a.unmap_pixels(stats[:, :3]))
    loss, parts = a(x, step=0)
    assert float(parts["recon"]) >= 0 and torch.isfinite(loss)


def test_metrics():
    x = torch.rand(2, 3, 4, 4)
    assert float(psnr(x, x)) == pytest.approx(100)
    assert float(psnr(torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.1))) == pytest.approx(20)
    u = codebook_usage(torch.tensor([[0, 1], [2, 3]]), 8)
    assert u == {"perplexity": pytest.approx(4), "used_fraction": 0.5}
    with pytest.raises(ValueError, match="vocab_size"):
        codebook_usage(torch.tensor([8]), 8)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(x, x[:1])


def test_bad_input_is_a_value_error_naming_it():
    model = make().eval()
    x = blocks_images()
    for bad, match in [(x[:, :, :8], "shape"), (x[:, :1], "shape"), (x[0], "shape"), ((x * 255).byte(), "float"),
                       (x * 2, r"\[0, 1\]"), (x - 0.5, r"\[0, 1\]"), (x * float("nan"), r"\[0, 1\]"),
                       (x.numpy(), "float tensor")]:
        with pytest.raises(ValueError, match=match):
            model.encode(bad)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.train()(x * 2)
    codes = torch.zeros(2, 8, 8, dtype=torch.long)
    for bad, match in [(codes + 32, "vocab_size"), (codes - 1, "vocab_size"), (codes[0], "shape"),
                       (codes[:, :4], "shape"), (codes.float(), "integer"), (codes.bool(), "integer")]:
        with pytest.raises(ValueError, match=match):
            model.decode(bad)
    for kw, name in [(dict(image_size=18, group_count=3), "image_size"), (dict(n_hid=10), "n_hid"),
                     (dict(loss="l1"), "loss"), (dict(vocab_size=0), "vocab_size"), (dict(kl_weight=-1), "kl_weight"),
                     (dict(temp_end=0), "temp_end"), (dict(ema_decay=1.0), "ema_decay"),
                     (dict(logit_laplace_eps=0.5), "logit_laplace_eps"), (dict(group_count=1.5), "group_count"),
                     (dict(logit_init_scale=0), "logit_init_scale")]:
        with pytest.raises(ValueError, match=name):
            DVAEConfig(**{**TINY, **kw})
    with pytest.raises(ValueError, match="DVAEConfig"):
        DiscreteVAE({"vocab_size": 32})


def test_hard_codes_phase_trains_the_decoder_alone_on_argmax_codes():
    model = make(loss="mse", hard_codes_from_step=5)
    x = blocks_images()
    assert not model.hard_codes(4) and model.hard_codes(5) and not model.hard_codes(None)
    model(x, step=4)[0].backward()  # relaxed: both halves learn
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    loss, parts = model(x, step=5)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())
    with torch.no_grad():  # the loss is the error of the decoder on exactly the codes encode(x) gives
        mse = (model.decoder(model.encode(x)) - model.map_pixels(x)).pow(2).mean()
    assert float(parts["recon"]) == pytest.approx(float(mse), rel=1e-4)
    with pytest.raises(ValueError, match="hard_codes_from_step"):
        DVAEConfig(**TINY, hard_codes_from_step=-1)


def test_ema_is_off_by_default_and_exported_when_on(tmp_path):
    x = blocks_images()
    plain = make()
    plain(x, step=0)[0].backward()
    assert plain.ema_state_dict() is None
    model = make(ema_decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(6):
        for _ in range(2):  # two micro-batches of one step: one EMA update
            loss, _ = model(x, step=step)
            loss.backward()
        opt.step()
        opt.zero_grad()
    assert model._ema_updates == 5  # the first step starts the average
    assert set(model.state_dict()) == set(model.ema_state_dict())  # EMA stays out of state_dict()
    model.save_pretrained(tmp_path / "ema", state_dict=model.state_dict())
    model.save_pretrained(tmp_path / "live", use_ema=False)
    ema, live = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("ema", "live"))
    key = "encoder.blocks.input.w"
    assert torch.equal(ema[key], model.ema_state_dict()[key]) and torch.equal(live[key], model.state_dict()[key])
    assert not torch.equal(ema[key], live[key])


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_trains_through_the_engine(tmp_path, zero_stage):
    """Relaxed steps, then the decoder-only phase, under ZeRO 0 and 2."""
    from dalle_ar.engine import TrainConfig, train

    model = make(n_hid=16, vocab_size=64, n_init=16, kl_weight=1.0, kl_warmup_steps=10, temp_anneal_steps=20,
                 hard_codes_from_step=12)
    x = blocks_images(8)

    def make_batches(epoch):
        g = torch.Generator().manual_seed(epoch)
        for _ in range(4):
            yield {"image": x[torch.randperm(8, generator=g)[:4]]}

    weights = {}

    def on_step(step, parts):
        if step in (11, 15):
            weights[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    cfg = TrainConfig(steps=16, batch_size=4, lr=3e-3, min_lr=1e-3, warmup=2, save_every=0, progress=False,
                      tensorboard=False, zero_stage=zero_stage)
    summary = train(model, lambda m, batch, step: m(batch["image"], step=step), make_batches, cfg, tmp_path,
                    hooks={"on_step": on_step})
    assert summary["steps"] == 16 and summary["final_loss"] < summary["first_loss"], summary
    def hard_psnr(step):
        probe = make(n_hid=16, vocab_size=64, n_init=16)
        probe.load_state_dict(weights[step])
        return float(psnr(probe.decode(probe.encode(x)), x))

    # The last 4 steps train the decoder on the codes of a frozen encoder. Under ZeRO 1-3 the
    # partitioned optimizer still moves it a little (zero gradients meet momentum and weight decay).
    changed = {k for k in weights[11] if not torch.equal(weights[11][k], weights[15][k])}
    assert any(k.startswith("decoder.") for k in changed)
    if zero_stage == 0:
        assert all(k.startswith("decoder.") for k in changed), sorted(changed)
    assert hard_psnr(15) > hard_psnr(11) + 0.3
    exported = DiscreteVAE.from_pretrained(summary["export_dir"])
    assert torch.equal(exported.encode(x), model.eval().encode(x))
