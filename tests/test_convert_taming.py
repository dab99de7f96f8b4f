"""taming-transformers VQGAN checkpoints -> dalle-ar: Lightning files, the YAML, safety, the CLI."""

import os
from collections import OrderedDict

import pytest
import torch
import yaml

from dalle_ar import cli
from dalle_ar.convert_taming import config_from_yaml, convert_taming_vqgan, load_lightning_checkpoint
from dalle_ar.vqgan import VQGAN, VQGANConfig

DD = dict(double_z=False, z_channels=32, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
          num_res_blocks=1, attn_resolutions=[8], dropout=0.0)


def write_yaml(path, target="taming.models.vqgan.VQModel", **params):
    p = {"embed_dim": 6, "n_embed": 20, "ddconfig": dict(DD), "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                                                                             "params": {"disc_start": 10000}}}
    if target.endswith("GumbelVQ"):
        p.update(embed_dim=32, kl_weight=1e-8, temperature_scheduler_config={"target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler"})
    p.update(params)
    path.write_text(yaml.safe_dump({"model": {"base_learning_rate": 4.5e-6, "target": target, "params": p}}))
    return path


class ModelCheckpoint:
    """Pickled under a Lightning name below (Lightning stores its callbacks' classes in the checkpoint)."""


ModelCheckpoint.__module__ = "pytorch_lightning.callbacks.model_checkpoint"


def lightning_ckpt(path, config: VQGANConfig, extra=None):
    """A checkpoint as Lightning writes it: weights + loss.* under state_dict, optimizer and callback state."""
    torch.manual_seed(0)
    sd = OrderedDict((k, torch.randn_like(v) * 0.1) for k, v in VQGAN(config).state_dict().items())
    sd["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    sd["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 4, 1, 1)
    import sys
    import types
    added = []  # a stand-in module tree, so torch.save can pickle the class under Lightning's name
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"):
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
            added.append(name)
    sys.modules["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint = ModelCheckpoint
    ckpt = {"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.0.8", "state_dict": sd,
            "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6}]}], "lr_schedulers": []}
    ckpt.update(extra or {})
    try:
        torch.save(ckpt, path)
    finally:
        for name in added:
            del sys.modules[name]
    return sd


def test_yaml_to_config_for_vqmodel_and_gumbel(tmp_path):
    c = config_from_yaml(write_yaml(tmp_path / "m.yaml"))
    assert (c.quantizer, c.ch, c.ch_mult, c.num_res_blocks, c.attn_resolutions, c.z_channels, c.embed_dim, c.n_embed,
            c.image_size, c.grid_size, c.norm_groups) == ("vq", 32, (1, 2), 1, (8,), 32, 6, 20, 16, 8, 32)
    g = config_from_yaml(write_yaml(tmp_path / "g.yaml", "taming.models.vqgan.GumbelVQ"), image_size=32)
    assert g.quantizer == "gumbel" and g.image_size == 32 and g.gumbel_kl_weight == 1e-8


@pytest.mark.parametrize("target", ["taming.models.vqgan.VQModel", "taming.models.vqgan.GumbelVQ"])
def test_converts_a_lightning_checkpoint(tmp_path, target):
    yaml_path = write_yaml(tmp_path / "m.yaml", target)
    config = config_from_yaml(yaml_path)
    sd = lightning_ckpt(tmp_path / "last.ckpt", config)
    out = convert_taming_vqgan(tmp_path / "last.ckpt", yaml_path, tmp_path / "out")
    model = VQGAN.from_pretrained(out)
    assert model.config == config
    loaded = model.state_dict()
    assert set(loaded) == {k for k in sd if not k.startswith("loss.")}
    assert all(torch.equal(loaded[k], sd[k]) for k in loaded)
    x = torch.rand(2, 3, 16, 16)
    assert model.encode(x).shape == (2, 8, 8)


def test_cli_and_bad_inputs_write_nothing(tmp_path, capsys):
    yaml_path = write_yaml(tmp_path / "m.yaml")
    config = config_from_yaml(yaml_path)
    lightning_ckpt(tmp_path / "last.ckpt", config)
    assert cli.main(["convert", "taming-vqgan", "--ckpt", str(tmp_path / "last.ckpt"), "--config", str(yaml_path),
                     "--out", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "model.safetensors").is_file()
    # a YAML whose shapes disagree with the checkpoint
    wrong = write_yaml(tmp_path / "wrong.yaml", n_embed=30)
    # a file that is not a checkpoint
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    # a YAML that is not a taming model
    (tmp_path / "other.yaml").write_text("model:\n  target: foo.Bar\n  params: {}\n")
    for ckpt, cfg, msg in [("last.ckpt", wrong, "shape mismatch"), ("junk.ckpt", yaml_path, "not a PyTorch checkpoint"),
                           ("last.ckpt", tmp_path / "other.yaml", "not one of")]:
        rc = cli.main(["convert", "taming-vqgan", "--ckpt", str(tmp_path / ckpt), "--config", str(cfg),
                       "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("dalle-ar convert: error:") and msg in err, err
        assert not (tmp_path / "bad").exists()


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Evil.marker}",))


def test_a_malicious_pickle_fails_clearly_without_running(tmp_path):
    Evil.marker = tmp_path / "pwned"
    yaml_path = write_yaml(tmp_path / "m.yaml")
    lightning_ckpt(tmp_path / "evil.ckpt", config_from_yaml(yaml_path), extra={"hyper_parameters": Evil()})
    with pytest.raises(ValueError, match=r"refusing to load.*system"):
        load_lightning_checkpoint(tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="refusing"):
        convert_taming_vqgan(tmp_path / "evil.ckpt", yaml_path, tmp_path / "out")
    assert not Evil.marker.exists() and not (tmp_path / "out").exists()
    # a plain pickle (not torch's zip format) with the same payload
    import pickle
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(ValueError):
        load_lightning_checkpoint(tmp_path / "evil.pkl")
    assert not Evil.marker.exists()
