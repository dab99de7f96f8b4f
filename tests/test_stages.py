"""The three trainers end to end on real shapes shards: dVAE -> encode -> CLIP -> prior -> pipeline.

Tiny models and a few steps each; every stage goes through the real DeepSpeed engine.
"""

import json

import numpy as np
import pytest
import torch

from dalle_ar.cli import main as cli_main
from dalle_ar.train.stages import export_run, load_stage_config, route_overrides, run_stage
from dalle_ar.train import config_path

TINY = {
    "dvae": ["model.n_hid=8", "model.n_init=8", "model.vocab_size=32", "data.num_workers=0"],
    "clip": ["model.embed_dim=16", "model.text_width=16", "model.vision_width=16", "model.text_layers=1",
             "model.vision_layers=1", "model.text_heads=2", "model.vision_heads=2", "data.num_workers=0"],
    "dalle": ["model.dim=32", "model.depth=2", "model.heads=2", "data.num_workers=0"],
}
COMMON = ["train.steps=3", "train.batch_size=8", "train.save_every=2", "train.warmup=1", "data.sample_count=4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Shards, tokenizer and a trained tiny dVAE shared by the tests below."""
    from dalle_ar.data.shapes import generate_shapes
    from dalle_ar.tokenizer import TextTokenizer, read_captions

    root = tmp_path_factory.mktemp("stages")
    generate_shapes(root / "data", train_size=48, val_size=16, shard_size=16, seed=1)
    train = sorted(str(p) for p in (root / "data").glob("shapes-train-*.tar"))
    val = sorted(str(p) for p in (root / "data").glob("shapes-val-*.tar"))
    tok = TextTokenizer.train(read_captions(train), vocab_size=96, min_frequency=1)
    tok.save_pretrained(root / "tokenizer")
    result = run_stage("dvae", train, root / "dvae", val_shards=val, config_file=config_path("dvae-shapes.json"),
                       overrides=[*TINY["dvae"], *COMMON, "train.eval_every=2"])
    return {"root": root, "train": train, "val": val, "dvae_result": result}


def test_dvae_stage_exports_checkpoints_samples_and_metrics(run):
    d = run["root"] / "dvae"
    r = run["dvae_result"]
    assert r["steps"] == 3
    assert (d / "export" / "config.json").is_file() and (d / "export" / "model.safetensors").is_file()
    assert sorted(p.name for p in (d / "samples").glob("*.png")) == ["step00000002.png", "step00000003.png"]
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["val_images"] == 16 and metrics["val_psnr"] > 0
    stage = json.loads((d / "stage.json").read_text())
    assert stage["config"]["model"]["vocab_size"] == 32


def scalars(run_dir) -> dict:
    """{tag: [(step, value), ...]} from a run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc.Tags()["images"]


def test_dvae_stage_with_the_fsq_quantizer(run, tmp_path, capsys):
    """The shipped FSQ config trains through `dalle-ar train dvae` (no KL / temperature warnings), and its
    export is an image tokenizer whose codes index prod(fsq_levels) = 1000 codes."""
    from dalle_ar.image_tokenizer import load_image_tokenizer

    result = run_stage("dvae", run["train"], tmp_path / "fsq", val_shards=run["val"],
                       config_file=config_path("dvae-fsq-shapes.json"),
                       overrides=["model.n_hid=8", "model.n_init=8", "data.num_workers=0", *COMMON])
    assert result["steps"] == 3 and result["metrics"]["val_psnr"] > 0
    out = capsys.readouterr().out  # its schedules' warnings ran (hard codes) but name no KL / temperature
    assert "model.hard_codes_from_step=1600 >= train.steps=3" in out
    assert "kl_warmup_steps" not in out and "temp_anneal_steps" not in out
    model = load_image_tokenizer(tmp_path / "fsq" / "export")
    assert model.config.quantizer == "fsq" and model.vocab_size == 1000 and model.grid_size == 8
    x = torch.rand(2, 3, 64, 64)
    codes = model.encode(x)
    assert codes.shape == (2, 8, 8) and int(codes.max()) < 1000 and model.decode(codes).shape == (2, 3, 64, 64)


def test_validation_curves_every_eval_every_steps(run):
    """Issue 22, item 5: train.eval_every=2 evaluates the val shards at steps 2 and 3 (the last) through the
    engine's on_eval hook and logs val/* to TensorBoard, beside the sample grids."""
    found, images = scalars(run["root"] / "dvae")
    assert [s for s, _ in found["val/psnr"]] == [2, 3] and all(v > 0 for _, v in found["val/psnr"])
    assert [s for s, _ in found["val/codebook_used_fraction"]] == [2, 3]
    assert "dvae/originals_vs_reconstructions" in images
    final = json.loads((run["root"] / "dvae" / "metrics.json").read_text())
    assert found["val/psnr"][-1][1] == pytest.approx(final["val_psnr"], rel=1e-5)  # the same model, the same data


def test_encode_gives_the_codes_of_the_dvae(run):
    from dalle_ar.data import ShardLoader
    from dalle_ar.dvae import DiscreteVAE
    from dalle_ar.train.encode import encode_shards

    dvae_dir = run["root"] / "dvae" / "export"
    summary = encode_shards(dvae_dir, run["val"], run["root"] / "codes-val", batch_size=5, shard_size=8)
    assert summary["written"] == 16
    dvae = DiscreteVAE.from_pretrained(dvae_dir).eval()
    raw = ShardLoader(run["val"], batch_size=16, shuffle_buffer=0, shardshuffle=False, drop_last=False)
    coded = ShardLoader(sorted(str(p) for p in (run["root"] / "codes-val").glob("*.tar")), batch_size=16,
                        decode_images=False, shuffle_buffer=0, shardshuffle=False, drop_last=False)
    a, b = next(iter(raw)), next(iter(coded))
    assert a["key"] == b["key"]
    with torch.no_grad():
        assert torch.equal(dvae.encode(a["image"]), b["codes"])


def test_clip_and_dalle_stages_then_pipeline(run, tmp_path):
    from dalle_ar.pipeline import TextToImagePipeline
    from dalle_ar.train.encode import encode_shards

    root = run["root"]
    tok, dvae_dir = root / "tokenizer", root / "dvae" / "export"
    clip = run_stage("clip", run["train"], tmp_path / "clip", val_shards=run["val"],
                     config_file=config_path("clip-shapes.json"),
                     overrides=[*TINY["clip"], *COMMON, f"data.tokenizer={tok}"])
    assert 0 <= clip["metrics"]["val_retrieval_top1"] <= 1
    encode_shards(dvae_dir, run["train"], tmp_path / "codes", shard_size=16)
    codes = sorted(str(p) for p in (tmp_path / "codes").glob("*.tar"))
    dalle = run_stage("dalle", codes, tmp_path / "dalle", val_shards=run["val"],
                      config_file=config_path("dalle-shapes.json"),
                      overrides=[*TINY["dalle"], *COMMON, f"data.tokenizer={tok}", f"data.dvae={dvae_dir}"])
    assert dalle["steps"] == 3 and np.isfinite(dalle["metrics"]["val_loss_image"])
    assert (tmp_path / "dalle" / "samples" / "step00000003.txt").is_file()

    pipe = TextToImagePipeline.from_pretrained_parts(tok, dvae_dir, tmp_path / "dalle" / "export",
                                                     tmp_path / "clip" / "export")
    pipe.save_pretrained(tmp_path / "pipeline")
    (res,) = TextToImagePipeline.from_pretrained(tmp_path / "pipeline")(
        ["a small red circle in the top left"], num_candidates=3, keep=2, progress=False)
    assert len(res.images) == 2 and res.images[0].size == (64, 64)


def test_train_cli_on_raw_shards_then_resume_and_export(run, tmp_path, capsys):
    """`dalle-ar train dalle` encodes raw shards on the fly; --resume continues; export reproduces it."""
    from safetensors.torch import load_file

    root = run["root"]
    out = tmp_path / "dalle"
    args = ["train", "dalle", "--train-shards", ",".join(run["train"]), "--out", str(out),
            "--config", str(config_path("dalle-shapes.json")), "--batch-size", "8", "--save-every", "2",
            *TINY["dalle"], "train.warmup=1", "data.sample_count=2",
            f"data.tokenizer={root / 'tokenizer'}", f"data.dvae={root / 'dvae' / 'export'}"]
    assert cli_main([*args, "--steps", "2"]) == 0
    assert cli_main([*args, "--steps", "3", "--resume"]) == 0  # the whole command again: still fine
    # Issue 22, item 1: a resume reads the run's stage.json; only what may change is accepted, the rest is
    # refused by name (exit 2) before anything is loaded or written.
    stage_json = (out / "stage.json").read_bytes()
    for extra, named in ((["model.dim=64"], "model.dim=64 (the run has 32)"), (["train.lr=0.1"], "train.lr=0.1"),
                         (["--batch-size", "4"], "train.batch_size=4"), (["--config", "dalle-digits"], "model.")):
        capsys.readouterr()
        assert cli_main(["train", "dalle", "--out", str(out), "--resume", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dalle-ar train: error: --resume:") and named in err and "Traceback" not in err, err
    assert cli_main(["train", "dvae", "--out", str(out), "--resume"]) == 2
    assert "records a dalle run, not dvae" in capsys.readouterr().err
    assert (out / "stage.json").read_bytes() == stage_json
    assert cli_main(["train", "dalle", "--out", str(out), "--resume", "--steps", "4", "train.log_every=1"]) == 0
    stage = json.loads((out / "stage.json").read_text())
    assert stage["config"]["train"]["steps"] == 4 and stage["train_shards"] == run["train"]
    assert stage["config"]["data"]["tokenizer"] == str(root / "tokenizer")
    assert cli_main(["export", str(out), "--out", str(tmp_path / "again")]) == 0
    a = load_file(out / "export" / "model.safetensors")
    b = load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage_config_overrides():
    model, train, data, ds = load_stage_config(
        "dalle", config_path("dalle-shapes.json"),
        ["dim=64", "train.lr=1e-3", "attn_types=[\"row\",\"column\"]", "ds.zero_optimization.stage=2",
         "num_workers=0"])
    assert model.dim == 64 and train.lr == 1e-3 and model.attn_types == ("row", "column")
    assert data.num_workers == 0 and ds == ["zero_optimization.stage=2"]
    with pytest.raises(ValueError, match="nonsense"):
        load_stage_config("dalle", None, ["nonsense=1"])
    with pytest.raises(ValueError, match="ambiguous"):
        route_overrides(["x=1"], {"model": {"x"}, "train": {"x"}})
    with pytest.raises(ValueError, match="key=value"):
        load_stage_config("dvae", None, ["steps"])
    with pytest.raises(ValueError, match="stage"):
        load_stage_config("vqvae2")  # not a stage (vqgan became one)


def test_dvae_stage_restarts_the_lr_for_the_decoder_only_phase(tmp_path):
    from dalle_ar.train.stages import STAGES

    def stage(overrides, config=config_path("dvae-shapes.json")):
        return STAGES["dvae"](*load_stage_config("dvae", config, overrides)[:3], [], None, tmp_path)

    assert stage([]).train_cfg.restart_at == 1600  # the shipped config's hard_codes_from_step
    assert stage(["model.hard_codes_from_step=900", "train.restart_at=1000"]).train_cfg.restart_at == 1000
    assert stage([], config=None).train_cfg.restart_at == 0  # no decoder-only phase, no restart


def test_stages_refuse_missing_inputs(run, tmp_path):
    with pytest.raises(ValueError, match="tokenizer"):
        run_stage("dalle", run["train"], tmp_path / "x", overrides=["train.steps=1"])
    with pytest.raises(ValueError, match="tokenizer"):
        run_stage("clip", run["train"], tmp_path / "y", overrides=["train.steps=1"])
    with pytest.raises(ValueError, match="training run"):
        export_run(tmp_path, tmp_path / "z")


def test_init_from_an_export_fine_tunes_with_a_fresh_schedule(run, tmp_path):
    """--init-from: the run starts from the export's weights (a near-zero LR keeps them), records it,
    and refuses an export of another kind or shape, naming --init-from and the differing field."""
    from safetensors.torch import load_file

    src = run["root"] / "dvae" / "export"
    args = dict(val_shards=None, config_file=config_path("dvae-shapes.json"))
    over = [*TINY["dvae"], *COMMON, "train.lr=1e-12", "train.min_lr=0", "model.ema_decay=null"]
    result = run_stage("dvae", run["train"], tmp_path / "ft", overrides=over, init_from=src, **args)
    assert result["steps"] == 3
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "ft" / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert json.loads((tmp_path / "ft" / "stage.json").read_text())["init_from"] == str(src)
    with pytest.raises(ValueError, match=r"--init-from.*n_hid: export 8, run 16"):
        run_stage("dvae", run["train"], tmp_path / "x", overrides=[*over, "model.n_hid=16"], init_from=src, **args)
    tok = run["root"] / "tokenizer"
    with pytest.raises(ValueError, match="--init-from.*holds a dvae export, not a dalle one"):
        run_stage("dalle", run["train"], tmp_path / "y", config_file=config_path("dalle-shapes.json"),
                  overrides=[*TINY["dalle"], *COMMON, f"data.tokenizer={tok}", f"data.dvae={src}"], init_from=src)
    with pytest.raises(ValueError, match="--init-from.*not an export"):
        run_stage("dvae", run["train"], tmp_path / "z", overrides=over, init_from=tok, **args)


def test_train_cli_init_from_and_threads_errors(run, tmp_path, capsys):
    base = ["train", "dvae", "--train-shards", ",".join(run["train"]), "--out", str(tmp_path / "o"),
            "--config", str(config_path("dvae-shapes.json")), *TINY["dvae"], *COMMON]
    assert cli_main([*base, "--init-from", str(tmp_path / "missing")]) == 2
    assert "dalle-ar train: error: --init-from:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main([*base, "--threads", "0"])
    assert e.value.code == 2 and "--threads" in capsys.readouterr().err


def test_vqgan_stage_then_encode_prior_and_pipeline(run, tmp_path):
    """The VQ tokenizer trains through the engine, and the prior, `encode` and the pipeline take it
    like the dVAE (the pipeline keeps it under vqgan/)."""
    from dalle_ar.image_tokenizer import load_image_tokenizer
    from dalle_ar.pipeline import TextToImagePipeline
    from dalle_ar.train.encode import encode_shards
    from dalle_ar.vqgan import VQGAN

    root = run["root"]
    vq = run_stage("vqgan", run["train"], tmp_path / "vqgan", val_shards=run["val"],
                   config_file=config_path("vqgan-shapes.json"),
                   overrides=["model.ch=8", "model.norm_groups=4", "model.z_channels=8", "data.num_workers=0", *COMMON])
    assert vq["steps"] == 3 and vq["final_loss"] < vq["first_loss"] * 1.5
    assert 0 < vq["metrics"]["val_psnr"] and vq["metrics"]["val_images"] == 16
    assert (tmp_path / "vqgan" / "samples" / "step00000003.png").is_file()
    vq_dir = tmp_path / "vqgan" / "export"
    model = load_image_tokenizer(vq_dir)
    assert isinstance(model, VQGAN) and model.vocab_size == 1000 and model.grid_size == 8
    # --init-from takes a VQGAN export (its config.json names its kind)
    ft = run_stage("vqgan", run["train"], tmp_path / "vq_ft", config_file=config_path("vqgan-shapes.json"),
                   overrides=["model.ch=8", "model.norm_groups=4", "model.z_channels=8", "data.num_workers=0",
                              *COMMON, "train.lr=1e-12", "train.min_lr=0"], init_from=vq_dir)
    assert ft["steps"] == 3
    assert json.loads((tmp_path / "vq_ft" / "stage.json").read_text())["init_from"] == str(vq_dir)
    with pytest.raises(ValueError, match="--init-from.*holds a vqgan export, not a dvae one"):
        run_stage("dvae", run["train"], tmp_path / "x", config_file=config_path("dvae-shapes.json"),
                  overrides=[*TINY["dvae"], *COMMON], init_from=vq_dir)
    encode_shards(vq_dir, run["train"], tmp_path / "codes", shard_size=16)
    codes = sorted(str(p) for p in (tmp_path / "codes").glob("*.tar"))
    tok = root / "tokenizer"
    dalle = run_stage("dalle", codes, tmp_path / "dalle", val_shards=run["val"],
                      config_file=config_path("dalle-shapes.json"),
                      overrides=[*TINY["dalle"], *COMMON, f"data.tokenizer={tok}", f"data.dvae={vq_dir}"])
    assert dalle["steps"] == 3
    stage = json.loads((tmp_path / "dalle" / "stage.json").read_text())
    assert stage["config"]["model"]["image_vocab_size"] == 1000
    pipe = TextToImagePipeline.from_pretrained_parts(tok, vq_dir, tmp_path / "dalle" / "export")
    pipe.save_pretrained(tmp_path / "pipeline")
    assert (tmp_path / "pipeline" / "vqgan" / "config.json").is_file() and not (tmp_path / "pipeline" / "dvae").exists()
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "pipeline")
    assert isinstance(loaded.image_tokenizer, VQGAN)
    (res,) = loaded(["a small red circle in the top left"], num_candidates=2, keep=1, progress=False)
    assert res.images[0].size == (64, 64)
