"""The VQ tokenizer: taming's layout and outputs, the quantizers, save/load, learning, bad input."""

import json

import pytest
import torch
import torch.nn as nn

from dalle_ar.image_tokenizer import load_image_tokenizer, tokenizer_kind
from dalle_ar.vqgan import VQGAN, VQGANConfig, edge_map

TINY = dict(image_size=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4, z_channels=8, embed_dim=8, n_embed=32)


def make(seed=0, quantizer="vq", **kw):
    torch.manual_seed(seed)
    return VQGAN(VQGANConfig.for_quantizer(quantizer, **{**TINY, **kw}))


def blocks_images(n=4, size=16, seed=0):
    """Black images with two flat-coloured squares each."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 3, size, size)
    for i in range(n):
        for _ in range(2):
            a, b = torch.randint(0, size - size // 3, (2,), generator=g).tolist()
            x[i, :, a:a + size // 3, b:b + size // 3] = torch.rand(3, 1, 1, generator=g)
    return x


# ---- against taming-transformers' own modules (random weights) --------------------------------------

TAMING = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=16, embed_dim=12,
              n_embed=40, image_size=32)


def taming_model(gumbel=False):
    """taming's Encoder / Decoder / quantizer / 1x1 convs under VQModel's attribute names (without Lightning)."""
    model = pytest.importorskip("taming.modules.diffusionmodules.model")
    quantize = pytest.importorskip("taming.modules.vqvae.quantize")
    c = TAMING
    dd = dict(ch=c["ch"], out_ch=3, ch_mult=c["ch_mult"], num_res_blocks=c["num_res_blocks"],
              attn_resolutions=list(c["attn_resolutions"]), dropout=0.0, in_channels=3, resolution=c["image_size"],
              z_channels=c["z_channels"], double_z=False)
    m = nn.Module()
    m.encoder, m.decoder = model.Encoder(**dd), model.Decoder(**dd)
    embed_dim = c["z_channels"] if gumbel else c["embed_dim"]
    m.quant_conv = nn.Conv2d(c["z_channels"], embed_dim, 1)
    m.post_quant_conv = nn.Conv2d(embed_dim, c["z_channels"], 1)
    m.quantize = (quantize.GumbelQuantize(c["z_channels"], embed_dim, c["n_embed"]) if gumbel
                  else quantize.VectorQuantizer2(c["n_embed"], embed_dim, beta=0.25, sane_index_shape=True))
    torch.manual_seed(1)
    with torch.no_grad():  # weights of a trained scale, so codes and images are not all alike
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()


@pytest.mark.parametrize("gumbel", [False, True])
def test_layout_and_outputs_match_taming(gumbel):
    theirs = taming_model(gumbel)
    kw = dict(TAMING, embed_dim=TAMING["z_channels"]) if gumbel else TAMING
    ours = VQGAN(VQGANConfig(quantizer="gumbel" if gumbel else "vq", **kw)).eval()
    sd = theirs.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    ours.load_state_dict(sd, strict=True)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        h = theirs.quant_conv(theirs.encoder(2 * x - 1))
        if gumbel:
            codes = theirs.quantize.proj(h).argmax(1)  # their eval forward samples noise; argmax is the code
            z_q = theirs.quantize.get_codebook_entry(codes.flatten(), (3, 8, 8, None))
        else:
            z_q, _, (_, _, codes) = theirs.quantize(h)
        images = ((theirs.decoder(theirs.post_quant_conv(z_q)) + 1) / 2).clamp(0, 1)
    assert torch.equal(ours.encode(x), codes)
    assert len(codes.unique()) > 3
    torch.testing.assert_close(ours.decode(codes), images, rtol=1e-4, atol=1e-5)
    assert "quantize.embedding.weight" in sd or "quantize.embed.weight" in sd


def test_taming_names():
    sd = make(**TAMING).state_dict()
    for key in ("encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
                "encoder.down.1.block.0.nin_shortcut.weight", "encoder.mid.attn_1.q.weight", "encoder.norm_out.bias",
                "decoder.up.0.block.1.conv2.weight", "decoder.up.2.attn.0.proj_out.weight", "decoder.up.1.upsample.conv.weight",
                "quant_conv.weight", "post_quant_conv.bias", "quantize.embedding.weight"):
        assert key in sd, key
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.2.downsample.conv.weight" not in sd
    fsq = make(quantizer="fsq").state_dict()
    assert not any(k.startswith("quantize.") for k in fsq)  # FSQ has no codebook


# ---- shapes, ranges, the quantizers ---------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(),
    dict(quantizer="gumbel"),
    dict(quantizer="fsq", fsq_levels=(4, 3, 2)),
    dict(codebook_ema=0.9, dead_code_threshold=0.5, l2_norm_codes=True, embed_dim=4),
    dict(image_size=32, ch_mult=(1, 2, 2), num_res_blocks=(0, 1, 2), attn_resolutions=(8,), resamp_with_conv=False,
         recon_loss="l2", edge_weight=2.0),
])
def test_shapes_ranges_and_gradients(kw):
    model = make(**kw).eval()
    c = model.config
    x = blocks_images(3, c.image_size)
    codes = model.encode(x)
    g = c.image_size // 2 ** (len(c.ch_mult) - 1)
    assert codes.shape == (3, g, g) and codes.dtype == torch.long and model.grid_size == g == model.grid()
    assert model.grid(64) == 64 // 2 ** (len(c.ch_mult) - 1)
    assert 0 <= int(codes.min()) and int(codes.max()) < model.vocab_size == c.n_embed
    images = model.decode(codes.to(torch.int16))
    assert images.shape == x.shape and images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1
    model.train()
    loss, parts = model(x, step=0)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss) and set(parts) == {"recon", "quant", "psnr", "used"}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_fsq_codes_round_trip_and_every_code_is_reachable():
    model = make(quantizer="fsq", fsq_levels=(5, 4, 3))
    q = model.quantize
    every = torch.arange(60).view(1, 6, 10)
    z = q.embed_codes(every)
    assert z.shape == (1, 3, 6, 10) and z.abs().max() <= 1
    # the rounded value of an embedded code is the code itself: inverting tanh recovers it
    L = torch.tensor([5., 4., 3.]).view(1, 3, 1, 1)
    half = (L - 1) * (1 + 1e-3) / 2
    offset = torch.where(L % 2 == 0, 0.5, 0.0)
    pre = torch.atanh((z * (L // 2) + offset) / half) - torch.atanh(offset / half)
    assert torch.equal(q.codes(pre), every)
    zq, loss, codes = q(pre.requires_grad_())
    zq.sum().backward()
    assert torch.equal(codes, every) and pre.grad is not None and float(loss) == 0


def test_vq_nearest_code_and_straight_through():
    model = make(embed_dim=2, n_embed=3)
    q = model.quantize
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0., 0.], [1., 0.], [0., 1.]]))
    z = torch.tensor([[0.9, 0.1], [0.1, 0.8], [0.1, 0.1]]).t().reshape(1, 2, 1, 3).requires_grad_()
    q.eval()
    zq, loss, codes = q(z)
    assert codes.tolist() == [[[1, 2, 0]]]
    torch.testing.assert_close(zq.detach(), q.embedding.weight[codes].permute(0, 3, 1, 2))
    zq.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # straight-through
    # loss = codebook + beta * commitment, both the same mean squared distance here
    d = (z.detach() - zq.detach()).pow(2).mean()
    torch.testing.assert_close(loss, d * 1.25)


def test_ema_codebook_moves_to_assigned_means_and_dead_codes_restart():
    model = make(embed_dim=2, n_embed=4, codebook_ema=0.5, dead_code_threshold=0.5)
    q = model.quantize.train()
    assert not q.embedding.weight.requires_grad
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0., 0.], [1., 1.], [50., 50.], [60., 60.]]))
    z = torch.tensor([[0.2, 0.2], [0.8, 0.8]] * 4).t().reshape(1, 2, 2, 4)
    for _ in range(12):
        q(z)
    w = q.embedding.weight
    # codes 0 and 1 moved to their vectors; codes 2 and 3 were never used and restarted at batch vectors
    torch.testing.assert_close(w[0], torch.tensor([0.2, 0.2]), atol=0.02, rtol=0)
    torch.testing.assert_close(w[1], torch.tensor([0.8, 0.8]), atol=0.02, rtol=0)
    assert w[2:].abs().max() < 1.5


def test_gumbel_inference_is_argmax_without_noise():
    model = make(quantizer="gumbel").eval()
    x = blocks_images(2)
    assert torch.equal(model.encode(x), model.encode(x))
    logits = model.quantize.proj(model.latents(x))
    assert torch.equal(model.encode(x), logits.argmax(1))
    model.set_step(0)
    assert model.quantize.temperature == 1.0
    model.set_step(10 ** 6)
    assert model.quantize.temperature == pytest.approx(1 / 16)


def test_edge_map():
    x = torch.zeros(1, 3, 6, 6)
    x[..., 2:4, 2:4] = 1
    e = edge_map(x)[0, 0]
    assert e[2, 2] == 1 and e[1, 2] == 1 and e[0, 0] == 0 and e.sum() == 4 + 8


# ---- learning, save / load, the one loader --------------------------------------------------------

@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_overfits_a_few_images(quantizer):
    model = make(quantizer=quantizer, embed_dim=8 if quantizer == "vq" else 4, n_embed=64, fsq_levels=(4, 4, 4, 4),
                 attn_resolutions=())
    x = blocks_images(4)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    first = None
    for _ in range(60):
        loss, parts = model(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or float(parts["psnr"])
    model.eval()
    from dalle_ar.dvae import psnr
    assert float(psnr(model.decode(model.encode(x)), x)) > first + 6


def test_save_load_round_trip_and_loader(tmp_path):
    model = make(quantizer="fsq", fsq_levels=(3, 3, 2)).eval()
    x = blocks_images(2)
    model.save_pretrained(tmp_path / "vq")
    config = json.loads((tmp_path / "vq" / "config.json").read_text())
    assert config["kind"] == "vqgan" and config["quantizer"] == "fsq" and config["fsq_levels"] == [3, 3, 2]
    assert tokenizer_kind(tmp_path / "vq") == "vqgan"
    loaded = load_image_tokenizer(tmp_path / "vq")
    assert isinstance(loaded, VQGAN) and loaded.config == model.config
    assert torch.equal(loaded.encode(x), model.encode(x))
    torch.testing.assert_close(loaded.decode(model.encode(x)), model.decode(model.encode(x)))


def test_old_dvae_directory_without_kind_loads_as_dvae(tmp_path):
    from dalle_ar.dvae import DiscreteVAE, DVAEConfig

    dvae = DiscreteVAE(DVAEConfig(image_size=16, n_hid=8, group_count=2, vocab_size=32, n_init=8))
    dvae.save_pretrained(tmp_path / "dvae")
    path = tmp_path / "dvae" / "config.json"
    config = json.loads(path.read_text())
    assert config.pop("kind") == "dvae"
    path.write_text(json.dumps(config))  # as written by dalle-ar 0.1
    loaded = load_image_tokenizer(tmp_path / "dvae")
    assert isinstance(loaded, DiscreteVAE) and loaded.vocab_size == 32 and loaded.grid(16) == 8 == loaded.grid_size
    x = blocks_images(2)
    assert torch.equal(loaded.encode(x), dvae.eval().encode(x))


def test_bad_input_is_a_value_error_naming_it(tmp_path):
    model = make().eval()
    with pytest.raises(ValueError, match=r"shape \[B, 3, 16, 16\]"):
        model.encode(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="float"):
        model.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.encode(torch.rand(1, 3, 16, 16) * 255)
    with pytest.raises(ValueError, match="vocab_size=32"):
        model.decode(torch.full((1, 8, 8), 32))
    with pytest.raises(ValueError, match=r"\[\*, 8, 8\]"):
        model.decode(torch.zeros(1, 4, 4, dtype=torch.long))
    for bad, what in [(dict(quantizer="lfq"), "quantizer"), (dict(ch_mult=(1, 2, 2, 2, 2, 2)), "image_size"),
                      (dict(norm_groups=3), "norm_groups"), (dict(num_res_blocks=(1, 1, 1)), "num_res_blocks"),
                      (dict(quantizer="fsq", fsq_levels=(4, 4), n_embed=10, embed_dim=2), "fsq"),
                      (dict(codebook_ema=1.5), "codebook_ema"), (dict(recon_loss="huber"), "recon_loss")]:
        with pytest.raises(ValueError, match=what):
            VQGANConfig(**{**TINY, **bad})
    model.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps({**config, "n_embed": 16}))
    with pytest.raises(ValueError, match="shape mismatch"):
        VQGAN.from_pretrained(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps({**config, "kind": "vqvae2"}))
    with pytest.raises(ValueError, match="unknown image tokenizer kind"):
        load_image_tokenizer(tmp_path / "a")
    with pytest.raises(ValueError, match="state_dict does not match"):
        model.save_pretrained(tmp_path / "b", state_dict={"encoder.conv_in.weight": torch.zeros(1)})
    assert not (tmp_path / "b" / "model.safetensors").exists()
