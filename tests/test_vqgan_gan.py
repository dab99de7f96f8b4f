"""The VQGAN's patch-GAN discriminator and perceptual loss (dalle_ar/vqgan_loss.py), and the engine's
auxiliary model that trains the discriminator on a second DeepSpeed engine (real engines on CPU/gloo)."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dalle_ar.engine import weights_only_loads
from dalle_ar.image_tokenizer import load_image_tokenizer
from dalle_ar.train import config_path
from dalle_ar.train.stages import STAGES, export_run, run_stage
from dalle_ar.vqgan import VQGAN
from dalle_ar.vqgan_loss import (PatchDiscriminator, VQGANLossConfig, VQGANTrainingConfig, adaptive_weight,
                                 d_loss, g_loss, load_perceptual, perceptual_state_dict_shapes)

from test_stages import scalars

TINY = dict(image_size=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4, z_channels=8, quantizer="fsq",
            fsq_levels=(5, 5), embed_dim=2, n_embed=25)
GAN = dict(disc_weight=0.8, disc_ndf=8, disc_layers=2)


# ---- losses -----------------------------------------------------------------------------------------

def test_hinge_vanilla_and_generator_losses_on_hand_made_logits():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # hinge: relu(1 - real) = [0, .5, 2] (mean 5/6); relu(1 + fake) = [0, 1, 2.5] (mean 7/6)
    assert d_loss(real, fake, "hinge").item() == pytest.approx(0.5 * (5 / 6 + 7 / 6))
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    vanilla = 0.5 * (sum(sp(-r) for r in (2.0, 0.5, -1.0)) / 3 + sum(sp(f) for f in (-2.0, 0.0, 1.5)) / 3)
    assert d_loss(real, fake, "vanilla").item() == pytest.approx(vanilla)
    assert d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0  # confident and right: no loss
    assert g_loss(fake).item() == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3)
    assert adaptive_weight(torch.tensor(1e9), torch.tensor(0.0), 0.5).item() == pytest.approx(0.5e4)  # clamped
    with pytest.raises(ValueError, match="kind"):
        d_loss(real, fake, "wasserstein")


def test_discriminator_is_taming_nlayer_layout():
    disc = PatchDiscriminator(VQGANLossConfig(disc_ndf=8, disc_layers=3))
    names = [k for k in disc.state_dict() if k.endswith("weight")]
    assert names == ["main.0.weight", "main.2.weight", "main.3.weight", "main.5.weight", "main.6.weight",
                     "main.8.weight", "main.9.weight", "main.11.weight"]  # conv, (conv, norm) x 3, conv
    assert disc(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # 64 / 2**3 = 8 -> two stride-1 4x4 convs
    assert isinstance(disc.main[3], torch.nn.GroupNorm)  # the default: per-sample, no buffers
    bn = PatchDiscriminator(VQGANLossConfig(disc_norm="batch", disc_ndf=8))  # taming's, computed in fp32
    assert isinstance(bn.main[3], torch.nn.BatchNorm2d) and "main.3.running_mean" in bn.state_dict()
    bn.main[3].weight.data = bn.main[3].weight.data.bfloat16()  # as DeepSpeed leaves it under bf16: fp32 buffers
    assert bn.main[3](torch.randn(2, 16, 8, 8).bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [dict(disc_loss="wgan"), dict(disc_norm="layer"), dict(disc_weight=-1),
                                 dict(disc_start=-1), dict(disc_layers=0), dict(perceptual_weight=1.0)])
def test_bad_loss_config_is_a_value_error(bad):
    with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
        VQGANLossConfig(**bad)


class _Engine:
    """Stands for the discriminator's DeepSpeed engine in a plain forward (`.module`, as the stage uses it)."""

    def __init__(self, module):
        self.module = module


def _stage(tmp_path, **loss):
    cfg = VQGANTrainingConfig(**TINY, **loss)
    data = STAGES["vqgan"].data_config_cls()
    from dalle_ar.engine import TrainConfig
    st = STAGES["vqgan"](cfg, TrainConfig(), data, [], None, tmp_path)
    torch.manual_seed(0)
    return st, st.build()


def test_adaptive_weight_is_the_grad_norm_ratio_and_the_gan_gradient_reaches_the_generator_only(tmp_path):
    st, built = _stage(tmp_path, **GAN)
    model, disc = built.model, built.aux.model
    x = torch.rand(4, 3, 16, 16)
    batch = {"image": x}
    loss, parts = built.loss_fn(model, batch, 0, _Engine(disc))
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert all(p.grad is None for p in disc.parameters())  # the generator's loss leaves the discriminator alone
    assert set(batch) == {"image", "real", "fake"} and not batch["fake"].requires_grad

    # By hand: the grads of the reconstruction loss and of the GAN loss w.r.t. the decoder's last layer weight.
    model.zero_grad()
    target = 2 * x - 1
    recon, q_loss, _ = model.reconstruct(x)
    nll = model.recon_loss(recon, target)
    g = -disc(recon).mean()
    w = model.decoder.conv_out.weight
    (g_nll,), (g_gan,) = torch.autograd.grad(nll, w, retain_graph=True), torch.autograd.grad(g, w, retain_graph=True)
    expected = (g_nll.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4) * 0.8
    assert parts["g_weight"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert parts["g_loss"].item() == pytest.approx(g.item(), rel=1e-6)
    direct = nll + q_loss + expected.detach() * g
    assert loss.item() == pytest.approx(direct.item(), rel=1e-6)
    direct.backward()
    for n, p in model.named_parameters():  # the surrogate GAN term has the GAN loss's gradient
        if p.grad is not None:
            assert torch.allclose(ours[n], p.grad, rtol=1e-4, atol=1e-7), n

    # Fixed weight (adaptive_weight=False): the GAN term is disc_weight x g_loss.
    st, built = _stage(tmp_path, **GAN, adaptive_weight=False)
    _, parts = built.loss_fn(built.model, {"image": x}, 0, _Engine(built.aux.model))
    assert parts["g_weight"].item() == pytest.approx(0.8)
    # Without the discriminator (before disc_start the engine passes none): the plain VQGAN loss.
    loss, parts = built.loss_fn(built.model, {"image": x}, 0, None)
    assert "g_loss" not in parts and set(parts) == {"recon", "quant", "psnr", "used"}


# ---- the perceptual loss ---------------------------------------------------------------------------------

def _perceptual_files(tmp_path):
    """Random weights in the released files' layouts: torchvision's VGG16 (features.* and a classifier) as
    safetensors, LPIPS's heads as a torch state dict (.pth)."""
    g = torch.Generator().manual_seed(0)
    shapes = perceptual_state_dict_shapes()
    rand = {k: torch.randn(s, generator=g) * (0.05 if k.startswith("features") else 0.1) for k, s in shapes.items()}
    vgg = {k: v for k, v in rand.items() if k.startswith("features.")}
    vgg["classifier.0.weight"] = torch.randn(8, 4)  # ignored
    save_file(vgg, str(tmp_path / "vgg16.safetensors"))
    torch.save({k: v.abs() for k, v in rand.items() if k.startswith("lin")}, tmp_path / "lpips_vgg.pth")
    return [str(tmp_path / "vgg16.safetensors"), str(tmp_path / "lpips_vgg.pth")]


def test_perceptual_loss_loads_local_files_and_refuses_bad_ones(tmp_path):
    files = _perceptual_files(tmp_path)
    assert set(perceptual_state_dict_shapes()) >= {"features.0.weight", "features.28.bias", "lin4.model.1.weight"}
    net = load_perceptual(files)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    assert net(x, x).abs().max().item() < 1e-6
    d = net(x, y)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert y.grad.abs().sum() > 0 and all(p.grad is None for p in net.parameters())  # frozen

    with pytest.raises(ValueError, match="nope.pth"):
        load_perceptual([files[0], str(tmp_path / "nope.pth")])
    with pytest.raises(ValueError, match=r"vgg16.safetensors lack 5 of 31 tensors, e.g. \['lin0.model.1.weight'"):
        load_perceptual(files[:1])
    bad = load_file(files[0])
    bad["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"bad.safetensors: features.0.weight has shape \(64, 3, 5, 5\)"):
        load_perceptual([str(tmp_path / "bad.safetensors"), files[1]])
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_perceptual([files[0], str(tmp_path / "junk.pth")])
    torch.save({"lin0.model.1.weight": torch.zeros(1), "evil": _Engine(None)}, tmp_path / "pickle.pth")
    with pytest.raises(ValueError, match="pickle.pth"):  # weights_only: a pickled object is refused, never run
        load_perceptual([files[0], str(tmp_path / "pickle.pth")])

    # In the stage: the perceptual term joins the reconstruction loss (and the adaptive weight's nll).
    st, built = _stage(tmp_path, perceptual_weight=1.0, perceptual_weights=tuple(files))
    loss, parts = built.loss_fn(built.model, {"image": torch.rand(2, 3, 16, 16)}, 0)
    assert parts["perceptual"] > 0 and loss.item() == pytest.approx(
        (parts["recon"] + parts["quant"] + parts["perceptual"]).item(), rel=1e-5)


# ---- through the engine --------------------------------------------------------------------------------

STEPS, DISC_START = 4, 2
RUN = ["model.image_size=16", "model.ch=8", "model.ch_mult=[1,2]", "model.num_res_blocks=[1,1]", "model.norm_groups=4",
       "model.z_channels=8", "model.disc_ndf=16", f"model.disc_start={DISC_START}", "data.num_workers=0",
       f"train.steps={STEPS}", "train.batch_size=4", "train.save_every=1", "train.keep_last=10", "train.warmup=1",
       "train.log_every=1", "data.sample_count=2"]
# ZeRO-3 with every parameter partitioned (the tiny models' tensors are below zero3.json's persistence threshold)
ZERO3 = ["train.zero_stage=3", "ds.zero_optimization.stage3_param_persistence_threshold=0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from dalle_ar.data.shapes import generate_shapes

    root = tmp_path_factory.mktemp("gan_data")
    generate_shapes(root, train_size=32, val_size=4, shard_size=16, seed=1)
    return sorted(str(p) for p in root.glob("shapes-train-*.tar"))


def _train(shards, out, *extra, resume=False):
    return run_stage("vqgan", shards, out, config_file=config_path("vqgan-shapes-gan.json"),
                     overrides=[*RUN, *extra], resume=resume)


def disc_weights(tag_dir) -> dict:
    """The discriminator's fp32 weights in one checkpoint tag (its aux/ folder), whatever the ZeRO stage."""
    aux = tag_dir / "aux"
    if list(aux.glob("*optim_states.pt")) and json.loads((tag_dir / "trainer_state.json").read_text())["cfg"]["zero_stage"]:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with weights_only_loads():
            return {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(tag_dir), tag="aux").items()}
    sd = torch.load(aux / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    return {k: v.float() for k, v in sd.items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def zero0(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("gan0") / "run"
    return out, _train(shards, out)


def test_gan_is_off_before_disc_start_and_on_after(zero0):
    out, result = zero0
    assert result["steps"] == STEPS and result["nonfinite"] == 0
    tags = [out / "checkpoints" / f"step{s:08d}" for s in range(1, STEPS + 1)]
    w = [disc_weights(t) for t in tags]
    assert any(k.startswith("main.") for k in w[0])
    assert _same(w[0], w[1])  # steps 0 and 1: the discriminator is not updated
    assert not _same(w[1], w[2]) and not _same(w[2], w[3])  # from step DISC_START on it is
    logged, _ = scalars(out)
    for name in ("d_loss", "g_loss", "g_weight", "logits_real", "logits_fake"):
        assert [s for s, _ in logged[f"train/{name}"]] == list(range(DISC_START + 1, STEPS + 1)), name
    assert all(v > 0 for _, v in logged["train/g_weight"])
    assert [s for s, _ in logged["train/recon"]] == list(range(1, STEPS + 1))


def test_export_is_the_tokenizer_only(zero0, tmp_path):
    out, result = zero0
    export = out / "export"
    model = load_image_tokenizer(export)
    assert isinstance(model, VQGAN)
    saved = load_file(str(export / "model.safetensors"))
    assert saved.keys() == model.state_dict().keys() and not any(k.startswith("main.") for k in saved)
    config = json.loads((export / "config.json").read_text())
    assert not any(k.startswith(("disc_", "perceptual", "adaptive")) for k in config)
    assert json.loads((out / "stage.json").read_text())["config"]["model"]["disc_start"] == DISC_START
    export_run(out, tmp_path / "again")  # `dalle-ar export` of the run: the same tokenizer
    assert _same(load_file(str(tmp_path / "again" / "model.safetensors")), saved)
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(p.name for p in export.iterdir())


@pytest.mark.parametrize("zero", [0, 3])
def test_resume_restores_the_discriminator_bitwise(zero, zero0, shards, tmp_path):
    """A run resumed from its step-3 checkpoint (GAN on since step 2) ends with the same tokenizer and
    discriminator, bitwise, as the uninterrupted run."""
    extra = ZERO3 if zero == 3 else []
    if zero == 0:
        full, result = zero0
    else:
        full, result = tmp_path / "full", _train(shards, tmp_path / "full", *extra)
        assert result["zero_stage"] == 3
    half = tmp_path / "half"
    shutil.copytree(full, half)
    shutil.rmtree(half / "checkpoints" / f"step{STEPS:08d}")
    shutil.rmtree(half / "export")
    resumed = _train(shards, half, *extra, resume=True)
    assert resumed["start_step"] == STEPS - 1 and resumed["steps"] == STEPS
    last = f"checkpoints/step{STEPS:08d}"
    assert _same(disc_weights(half / last), disc_weights(full / last))
    assert _same(load_file(str(half / "export" / "model.safetensors")), load_file(str(full / "export" / "model.safetensors")))


def test_zero3_trains_the_same_gan_as_zero0(zero0, shards, tmp_path):
    """Under ZeRO-3 (every tensor partitioned) the adaptive weight, the losses and the weights follow ZeRO-0's."""
    out0, _ = zero0
    out = tmp_path / "run3"
    result = _train(shards, out, *ZERO3)
    assert result["steps"] == STEPS and result["zero_stage"] == 3
    assert "zero_optimization.stage3_param_persistence_threshold=0" in json.loads((out / "stage.json").read_text())["ds_overrides"]
    a, b = scalars(out0)[0], scalars(out)[0]
    for name in ("loss", "g_weight", "d_loss", "logits_fake"):
        assert [v for _, v in b[f"train/{name}"]] == pytest.approx([v for _, v in a[f"train/{name}"]], rel=1e-3), name
    model = load_image_tokenizer(out / "export")
    ref = load_file(str(out0 / "export" / "model.safetensors"))
    assert all(torch.allclose(v, ref[k], rtol=1e-3, atol=1e-5) for k, v in model.state_dict().items())
    d0, d3 = disc_weights(out0 / f"checkpoints/step{STEPS:08d}"), disc_weights(out / f"checkpoints/step{STEPS:08d}")
    assert d3.keys() == d0.keys() and all(torch.allclose(d3[k], d0[k], rtol=1e-3, atol=1e-5) for k in d3)


def test_grad_accum_under_zero2_and_zero3_follows_zero0(shards, tmp_path):
    """Two micro-batches a step: the discriminator accumulates over both and steps once, after the tokenizer;
    ZeRO-2 (gradients reduced by hooks on its own engine only) and ZeRO-3 (every tensor partitioned) train
    the same GAN as ZeRO-0."""
    extra = ["train.grad_accum=2", "train.batch_size=2", "train.save_every=0"]
    runs = {z: _train(shards, tmp_path / f"z{z}", *extra, *(ZERO3 if z == 3 else [f"train.zero_stage={z}"]))
            for z in (0, 2, 3)}
    assert all(r["steps"] == STEPS and r["samples_seen"] == STEPS * 4 for r in runs.values())
    assert [r["zero_stage"] for r in runs.values()] == [0, 2, 3]
    a = scalars(tmp_path / "z0")[0]
    assert [s for s, _ in a["train/d_loss"]] == list(range(DISC_START + 1, STEPS + 1))
    last = f"checkpoints/step{STEPS:08d}"
    d0 = disc_weights(tmp_path / "z0" / last)
    for z in (2, 3):
        b = scalars(tmp_path / f"z{z}")[0]
        for name in ("loss", "g_weight", "d_loss", "logits_real"):
            assert [v for _, v in b[f"train/{name}"]] == pytest.approx([v for _, v in a[f"train/{name}"]], rel=1e-3), \
                (z, name)
        dz = disc_weights(tmp_path / f"z{z}" / last)
        assert dz.keys() == d0.keys() and all(torch.allclose(dz[k], d0[k], rtol=1e-3, atol=1e-5) for k in dz), z
