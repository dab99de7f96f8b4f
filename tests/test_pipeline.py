"""The Python pipeline and `dalle-ar generate`, on tiny real parts saved to disk."""

import json

import pytest
import torch

from dalle_ar.cli import main as cli_main
from dalle_ar.dalle import DALLE, DALLEConfig
from dalle_ar.dvae import DiscreteVAE, DVAEConfig
from dalle_ar.pipeline import TextToImagePipeline
from dalle_ar.generate import generate_to_folder, read_prompts

CAPTIONS = ["a small red circle in the top left", "a large blue square in the center",
            "a small green triangle in the bottom right", "red circle left of blue square"] * 4


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """tokenizer, dVAE, prior and a small CLIP, each saved in its own directory."""
    from dalle_ar.clip import SmallCLIPConfig, build_small_clip
    from dalle_ar.tokenizer import TextTokenizer

    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    tok = TextTokenizer.train(CAPTIONS, vocab_size=64, min_frequency=1)
    tok.save_pretrained(root / "tokenizer")
    dvae = DiscreteVAE(DVAEConfig(image_size=16, n_hid=8, group_count=2, vocab_size=16, n_init=8))
    dvae.save_pretrained(root / "dvae")
    dalle = DALLE(DALLEConfig(text_vocab_size=tok.vocab_size, text_len=12, image_vocab_size=16,
                              image_grid=dvae.grid_size, dim=32, depth=2, heads=2))
    dalle.save_pretrained(root / "dalle")
    clip, clip_tok, processor = build_small_clip(tok, SmallCLIPConfig(), image_size=16, text_len=12)
    clip.save_pretrained(root / "clip")
    clip_tok.save_pretrained(root / "clip")
    processor.save_pretrained(root / "clip")
    return root


@pytest.fixture(scope="module")
def pipe_dir(parts, tmp_path_factory):
    pipe = TextToImagePipeline.from_pretrained_parts(parts / "tokenizer", parts / "dvae", parts / "dalle",
                                                     parts / "clip")
    d = tmp_path_factory.mktemp("pipe") / "pipeline"
    pipe.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def pipe(pipe_dir):
    return TextToImagePipeline.from_pretrained(pipe_dir)


def test_layout_and_reload(pipe_dir, pipe):
    meta = json.loads((pipe_dir / "pipeline.json").read_text())
    assert meta["components"] == ["tokenizer", "dvae", "dalle", "clip"]
    for f in ("tokenizer/tokenizer.json", "dvae/config.json", "dvae/model.safetensors", "dalle/config.json",
              "dalle/model.safetensors", "clip/config.json", "clip/model.safetensors"):
        assert (pipe_dir / f).is_file(), f
    assert pipe.reranker is not None


def test_kept_images_are_the_best_scored_candidates(pipe):
    (res,) = pipe(["a small red circle in the top left"], num_candidates=6, keep=2, seed=3,
                  return_candidates=True, progress=False)
    assert len(res.images) == 2 and res.ranks == [0, 1]
    assert res.images[0].size == (16, 16)
    assert res.scores[0] >= res.scores[1]
    assert len(res.candidates) == 6
    best = sorted(res.candidate_scores, reverse=True)[:2]
    assert res.scores == pytest.approx(best)
    # The kept images are those candidates, and the reranker agrees when asked directly.
    order, direct = pipe.reranker.rerank(res.prompt, res.candidates, keep=6)
    assert direct.tolist() == pytest.approx([res.candidate_scores[i] for i in order], abs=1e-3)
    first = res.candidates[int(order[0])]
    assert list(first.getdata()) == list(res.images[0].getdata())
    # consensus=0 ranks by the CLIP score alone
    (plain,) = pipe(["a small red circle in the top left"], num_candidates=6, keep=2, seed=3, consensus=0.0,
                    return_candidates=True, progress=False)
    clip = pipe.reranker.score(plain.prompt, plain.candidates)
    assert clip.tolist() == pytest.approx(plain.candidate_scores, abs=1e-4)
    assert plain.scores == pytest.approx(sorted(clip.tolist(), reverse=True)[:2], abs=1e-4)


def test_same_seed_same_images(pipe):
    a = pipe(["a large blue square in the center", "red circle"], num_candidates=3, keep=3, seed=7,
             batch_size=2, progress=False)
    b = pipe(["a large blue square in the center"], num_candidates=3, keep=3, seed=7, batch_size=3,
             progress=False)
    c = pipe(["a large blue square in the center"], num_candidates=3, keep=3, seed=8, progress=False)
    pixels = lambda r: [list(im.getdata()) for im in r.images]  # noqa: E731
    # A prompt's images depend on its seed only, not on batching or on the other prompts.
    assert pixels(a[0]) == pixels(b[0])
    assert pixels(a[0]) != pixels(c[0])


@pytest.mark.parametrize("name, configured, other", [("guidance_scale", 3.0, 1.0), ("temperature", 0.5, 1.0)])
def test_sampling_defaults_to_the_priors_configured_values(pipe, name, configured, other):
    run = lambda **kw: [list(im.getdata()) for im in pipe(  # noqa: E731
        ["red circle"], num_candidates=4, keep=4, seed=3, progress=False, **kw)[0].images]
    saved = getattr(pipe.dalle.config, name)
    try:
        setattr(pipe.dalle.config, name, configured)
        default, explicit, plain = run(), run(**{name: configured}), run(**{name: other})
    finally:
        setattr(pipe.dalle.config, name, saved)
    assert default == explicit and default != plain


@pytest.mark.parametrize("kwargs, name", [
    (dict(prompts=[]), "prompts"),
    (dict(prompts=["   "]), "prompts"),
    (dict(prompts=["red"], num_candidates=2, keep=3), "keep"),
    (dict(prompts=["red"], num_candidates=0), "num_candidates"),
    (dict(prompts=["red"], temperature=0.0), "temperature"),
    (dict(prompts=["red"], top_k=0), "top_k"),
    (dict(prompts=["red"], consensus=-1.0), "consensus"),
])
def test_invalid_arguments(pipe, kwargs, name):
    prompts = kwargs.pop("prompts")
    with pytest.raises(ValueError, match=name):
        pipe(prompts, progress=False, **kwargs)


def test_missing_component_and_non_clip_directory(pipe_dir, parts, tmp_path):
    with pytest.raises(ValueError, match="pipeline"):
        TextToImagePipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="clip|CLIP"):
        TextToImagePipeline.from_pretrained(pipe_dir, clip=parts / "dvae")
    broken = tmp_path / "broken"
    TextToImagePipeline.from_pretrained(pipe_dir).save_pretrained(broken)
    import shutil

    shutil.rmtree(broken / "dalle")
    with pytest.raises(ValueError, match="dalle"):
        TextToImagePipeline.from_pretrained(broken)


def test_pipeline_cli_assembles_parts(parts, tmp_path, capsys):
    from dalle_ar.cli import main

    argv = ["pipeline", "--tokenizer", str(parts / "tokenizer"), "--dvae", str(parts / "dvae"),
            "--dalle", str(parts / "dalle"), "--out", str(tmp_path / "p")]
    assert main([*argv, "--clip", str(parts / "clip")]) == 0
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "p")
    assert pipe.reranker is not None and (tmp_path / "p" / "clip" / "model.safetensors").is_file()
    assert main([*argv, "--clip", str(tmp_path / "nowhere")]) == 2
    assert "--clip" in capsys.readouterr().err


def test_mismatched_parts_are_refused(parts, tmp_path):
    other = DiscreteVAE(DVAEConfig(image_size=16, n_hid=8, group_count=2, vocab_size=32, n_init=8))
    other.save_pretrained(tmp_path / "dvae")
    with pytest.raises(ValueError, match="vocab"):
        TextToImagePipeline.from_pretrained_parts(parts / "tokenizer", tmp_path / "dvae", parts / "dalle")


def test_read_prompts_reports_bad_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"red circle\n\n  \nblue \xff square\ngreen square\n")
    prompts, problems = read_prompts(f)
    assert prompts == [(1, "red circle"), (5, "green square")]
    assert [p.split(":")[1] for p in problems] == ["2", "3", "4"]


def test_generate_cli_writes_images_grid_jsonl_and_resumes(pipe_dir, tmp_path, caplog):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a small red circle in the top left\n\nblue \xff\na large blue square in the center\n")
    out = tmp_path / "out"
    args = ["generate", "--model", str(pipe_dir), "--prompts", str(prompts), "--out", str(out),
            "--candidates", "4", "--keep", "2", "--seed", "5", "--device", "cpu"]
    assert cli_main(args) == 0
    rows = [json.loads(r) for r in (out / "prompts.jsonl").read_text().splitlines()]
    assert [(r["line"], r["rank"]) for r in rows] == [(1, 0), (1, 1), (4, 0), (4, 1)]
    assert {"image", "prompt", "score", "rank", "seed"} <= set(rows[0])
    for r in rows:
        assert (out / r["image"]).is_file()
    assert rows[0]["score"] >= rows[1]["score"]
    assert (out / "grid.png").is_file()
    assert any(":2:" in m or ":3:" in m for m in caplog.messages)

    # Resume: drop the last prompt's rows and image files, run again: only it is redone, identically.
    first_image = (out / rows[0]["image"]).read_bytes()
    last = (out / rows[3]["image"]).read_bytes()
    (out / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    for r in rows[2:]:
        (out / r["image"]).unlink()
    assert cli_main(args) == 0
    again = [json.loads(r) for r in (out / "prompts.jsonl").read_text().splitlines()]
    assert [(r["line"], r["rank"]) for r in again] == [(1, 0), (1, 1), (4, 0), (4, 1)]
    assert (out / rows[0]["image"]).read_bytes() == first_image
    assert (out / rows[3]["image"]).read_bytes() == last


def test_generate_without_any_usable_prompt(pipe, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n \n")
    with pytest.raises(ValueError, match="prompt"):
        generate_to_folder(pipe, f, tmp_path / "out", progress=False)
