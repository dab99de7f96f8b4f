"""OpenAI dVAE -> dalle-ar: the pure state-dict mapping, and the CLI around OpenAI's pickles.

The layout below is written from OpenAI's `dall_e` v0.1 source (encoder.py / decoder.py), literally:
group widths 1,2,4,8 x n_hid (decoder 8,4,2,1), kernels 3,3,3,1 (decoder 1,3,3,3), 6 output channels.
Tests that need the `dall_e` package itself (real pickles, outputs compared) skip without it.
"""

import pytest
import torch

from dalle_ar import cli
from dalle_ar.convert import convert_openai_state_dicts
from dalle_ar.dvae import DiscreteVAE, DVAEConfig


def openai_shapes(n_hid=16, vocab=64, n_init=8, blocks=2, channels=3) -> tuple[dict, dict]:
    """{name: shape} of OpenAI's Encoder and Decoder state dicts."""
    def block(prefix, n_in, n_out, kernels):
        d = {} if n_in == n_out else {f"{prefix}.id_path.w": (n_out, n_in, 1, 1), f"{prefix}.id_path.b": (n_out,)}
        widths = [n_in, n_out // 4, n_out // 4, n_out // 4, n_out]
        for i, k in enumerate(kernels):
            d[f"{prefix}.res_path.conv_{i + 1}.w"] = (widths[i + 1], widths[i], k, k)
            d[f"{prefix}.res_path.conv_{i + 1}.b"] = (widths[i + 1],)
        return d

    def stack(n_in, n_first, mults, kernels, n_out):
        k = 7 if kernels[0] == 3 else 1  # encoder: 7x7 input conv; decoder: 1x1 from the one-hot codes
        d = {"blocks.input.w": (n_first, n_in, k, k), "blocks.input.b": (n_first,)}
        prev = n_first
        for g, mult in enumerate(mults, start=1):
            for i in range(blocks):
                d.update(block(f"blocks.group_{g}.block_{i + 1}", prev if i == 0 else mult * n_hid, mult * n_hid, kernels))
            prev = mult * n_hid
        d.update({"blocks.output.conv.w": (n_out, prev, 1, 1), "blocks.output.conv.b": (n_out,)})
        return d

    return (stack(channels, n_hid, (1, 2, 4, 8), (3, 3, 3, 1), vocab),
            stack(vocab, n_init, (8, 4, 2, 1), (1, 3, 3, 3), 2 * channels))


def openai_state_dicts(seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    enc, dec = openai_shapes(**kw)
    return ({k: torch.randn(s, generator=g) * 0.1 for k, s in enc.items()},
            {k: torch.randn(s, generator=g) * 0.1 for k, s in dec.items()})


def test_dvae_names_and_shapes_are_openais():
    enc, dec = openai_shapes(n_hid=16, vocab=64, n_init=8, blocks=2)
    model = DiscreteVAE(DVAEConfig(image_size=32, n_hid=16, vocab_size=64, n_init=8, group_count=4, n_blk_per_group=2))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {**{f"encoder.{k}": v for k, v in enc.items()}, **{f"decoder.{k}": v for k, v in dec.items()}}
    assert ours == theirs
    assert ours["decoder.blocks.output.conv.w"] == (6, 16, 1, 1)


def test_mapping_infers_config_and_loads_strictly():
    enc, dec = openai_state_dicts(n_hid=16, vocab=64, n_init=8, blocks=2)
    config, sd = convert_openai_state_dicts(enc, dec)
    assert (config.n_hid, config.vocab_size, config.group_count, config.n_blk_per_group, config.n_init,
            config.image_size, config.input_channels, config.loss) == (16, 64, 4, 2, 8, 256, 3, "logit_laplace")
    assert config.grid_size == 32
    model = DiscreteVAE(config)
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.encoder.blocks.group_2.block_1.id_path.w, enc["blocks.group_2.block_1.id_path.w"])
    assert torch.equal(model.decoder.blocks.output.conv.b, dec["blocks.output.conv.b"])
    # a different block count and image size come through too
    config, sd = convert_openai_state_dicts(*openai_state_dicts(n_hid=8, vocab=32, blocks=1), image_size=64)
    assert (config.n_blk_per_group, config.image_size, config.grid_size) == (1, 64, 8)
    DiscreteVAE(config).load_state_dict(sd, strict=True)


def test_mapping_rejects_what_is_not_openais_layout():
    enc, dec = openai_state_dicts(n_hid=8, vocab=32, blocks=1)
    with pytest.raises(ValueError, match="vocabulary"):
        convert_openai_state_dicts(enc, openai_state_dicts(n_hid=8, vocab=16, blocks=1)[1])
    with pytest.raises(ValueError, match="missing"):
        convert_openai_state_dicts({k: v for k, v in enc.items() if "conv_2" not in k}, dec)
    bad = dict(dec, **{"blocks.group_1.block_1.res_path.conv_2.w": torch.zeros(2, 2, 3, 3)})
    with pytest.raises(ValueError, match="shape mismatch"):
        convert_openai_state_dicts(enc, bad)
    with pytest.raises(ValueError, match="blocks.input.w"):
        convert_openai_state_dicts({"encoder." + k: v for k, v in enc.items()}, dec)


def test_cli_without_dall_e_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "dall_e", None)  # import dall_e -> ImportError
    for name in ("enc.pkl", "dec.pkl"):
        (tmp_path / name).write_bytes(b"not read")
    rc = cli.main(["convert", "openai-dvae", "--encoder", str(tmp_path / "enc.pkl"),
                   "--decoder", str(tmp_path / "dec.pkl"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install" in err and "DALL-E --no-deps" in err
    assert not (tmp_path / "out").exists()
    rc = cli.main(["convert", "openai-dvae", "--encoder", str(tmp_path / "missing.pkl"),
                   "--decoder", str(tmp_path / "dec.pkl"), "--out", str(tmp_path / "out")])
    assert rc == 2 and "missing.pkl" in capsys.readouterr().err


# ---- with OpenAI's own package -------------------------------------------------------------------

def test_cli_converts_dall_e_pickles_and_outputs_match(tmp_path):
    dall_e = pytest.importorskip("dall_e")
    torch.manual_seed(0)
    enc = dall_e.Encoder(n_hid=64, vocab_size=512, n_blk_per_group=1)
    dec = dall_e.Decoder(n_hid=64, vocab_size=512, n_blk_per_group=1, n_init=32)
    with torch.no_grad():  # non-zero biases, so a swapped bias would show
        for p in [*enc.parameters(), *dec.parameters()]:
            p.add_(torch.randn_like(p) * 0.05)
    torch.save(enc, tmp_path / "encoder.pkl")
    torch.save(dec, tmp_path / "decoder.pkl")
    rc = cli.main(["convert", "openai-dvae", "--encoder", str(tmp_path / "encoder.pkl"), "--decoder",
                   str(tmp_path / "decoder.pkl"), "--out", str(tmp_path / "out"), "--image-size", "32"])
    assert rc == 0
    model = DiscreteVAE.from_pretrained(tmp_path / "out")
    assert (model.config.n_hid, model.config.vocab_size, model.grid_size) == (64, 512, 4)

    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits = enc(dall_e.map_pixels(x))
        codes = logits.argmax(1)
        stats = dec(torch.nn.functional.one_hot(codes, 512).permute(0, 3, 1, 2).float())
        theirs = dall_e.unmap_pixels(torch.sigmoid(stats[:, :3]))
    torch.testing.assert_close(model.logits(x), logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.encode(x), codes)
    torch.testing.assert_close(model.decode(codes), theirs, rtol=1e-5, atol=1e-6)
