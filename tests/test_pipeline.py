"""The Python pipeline and `dalle-ar generate`, on tiny real parts saved to disk."""

import json

import pytest
import torch

from dalle_ar.cli import main as cli_main
from dalle_ar.dvae import DiscreteVAE, DVAEConfig
from dalle_ar.pipeline import TextToImagePipeline
from dalle_ar.generate import generate_to_folder, read_prompts
from tiny import save_tiny_parts


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """tokenizer, dVAE, prior and a small CLIP, each saved in its own directory."""
    return save_tiny_parts(tmp_path_factory.mktemp("parts"))


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
    (res,) = pipe(["a small red circle in the top left"], num_candidates=6, keep=2, seed=3, likelihood=0.0,
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
                    likelihood=0.0, return_candidates=True, progress=False)
    clip = pipe.reranker.score(plain.prompt, plain.candidates)
    assert clip.tolist() == pytest.approx(plain.candidate_scores, abs=1e-4)
    assert plain.scores == pytest.approx(sorted(clip.tolist(), reverse=True)[:2], abs=1e-4)


@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_likelihood_ratio_joins_the_ranking(pipe, guidance_scale):
    """likelihood=w ranks by CLIP + consensus + w * z(log p(x | prompt) - log p(x | null caption)), the
    log-likelihoods being the prior's own (teacher-forced pass = what sampling accumulated); off by default."""
    from dalle_ar.rerank import LIKELIHOOD, _zscore

    assert LIKELIHOOD == 0.0

    prompt = "a small red circle in the top left"
    kw = dict(num_candidates=6, keep=6, seed=3, guidance_scale=guidance_scale, output_type="codes",
              return_candidates=True, progress=False)
    (mixed,) = pipe([prompt], likelihood=2.0, **kw)
    (clip,) = pipe([prompt], **kw)
    codes = torch.stack(mixed.candidates)
    text = pipe.encode_prompts([prompt]).expand(6, -1)
    cond = pipe.dalle.log_likelihood(text, codes)
    null = pipe.dalle.log_likelihood(torch.full_like(text, pipe.dalle.config.pad_id), codes)
    lp = torch.tensor(mixed.candidate_log_probs)
    assert lp[:, 0].tolist() == pytest.approx(cond.tolist(), abs=1e-3)
    assert lp[:, 1].tolist() == pytest.approx(null.tolist(), abs=1e-3)
    pmi = lp[:, 0] - lp[:, 1]
    expected = torch.tensor(clip.candidate_scores) + 2.0 * _zscore(pmi)
    assert mixed.candidate_scores == pytest.approx(expected.tolist(), abs=1e-4)
    order = torch.argsort(expected, descending=True, stable=True).tolist()
    assert [c.tolist() for c in mixed.images] == [codes[j].tolist() for j in order]
    # Without a CLIP, the likelihood ratio ranks alone (and 0 keeps the sampling order).
    bare = TextToImagePipeline(pipe.tokenizer, pipe.image_tokenizer, pipe.dalle, reranker=None)
    (alone,) = bare([prompt], likelihood=1.0, **kw)
    assert [c.tolist() for c in alone.images] == \
        [codes[j].tolist() for j in torch.argsort(pmi, descending=True, stable=True)]
    (unranked,) = bare([prompt], **kw)
    assert [c.tolist() for c in unranked.images] == [c.tolist() for c in codes]


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
    (dict(prompts=["red"], top_p=0.0), "top_p"),
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


# ---- diffusers-style knobs (issue 20) ---------------------------------------------------------

def test_public_classes_import_from_the_package_lazily():
    import subprocess
    import sys

    code = ("import sys, dalle_ar; assert 'torch' not in sys.modules, 'import dalle_ar loaded torch'; "
            "from dalle_ar import TextToImagePipeline, DALLE, DALLEConfig, DiscreteVAE, CLIPReranker, TextTokenizer; "
            "import dalle_ar.pipeline as p; assert TextToImagePipeline is p.TextToImagePipeline; "
            "assert 'transformers' not in sys.modules; assert 'TextToImagePipeline' in dir(dalle_ar)")
    subprocess.run([sys.executable, "-c", code], check=True)
    import dalle_ar

    with pytest.raises(AttributeError):
        dalle_ar.NoSuchThing


def test_output_types_agree(pipe):
    run = lambda kind: pipe(["red circle"], num_candidates=3, keep=2, seed=4, output_type=kind,  # noqa: E731
                            return_candidates=True, progress=False)[0]
    pil, arr, pt, codes = run("pil"), run("np"), run("pt"), run("codes")
    assert pil.codes[0].shape == (8, 8) and all(c.dtype == torch.long for c in codes.images)
    assert all(a.equal(b) for a, b in zip(codes.images, pil.codes))
    assert arr.images[0].shape == (16, 16, 3) and arr.images[0].dtype.name == "float32"
    assert pt.images[0].shape == (3, 16, 16) and pt.images[0].dtype == torch.float32
    assert torch.allclose(torch.from_numpy(arr.images[0]).permute(2, 0, 1), pt.images[0])
    assert torch.allclose(pt.images[0], pipe.dvae.decode(pil.codes[0][None])[0], atol=1e-5)
    assert list(pil.images[0].getdata()) == list(to_pil_images(pt.images[:1])[0].getdata())
    assert len(codes.candidates) == 3 and pil.scores == pytest.approx(codes.scores)


def to_pil_images(images):
    from dalle_ar.pipeline import to_pil

    return to_pil(torch.stack(images))


def test_generator_is_an_alternative_to_seed(pipe):
    codes = lambda r: [c.tolist() for c in r[0].codes]  # noqa: E731
    kw = dict(num_candidates=2, keep=2, progress=False, output_type="codes")
    by_seed = pipe(["red circle"], seed=11, **kw)
    by_gen = pipe(["red circle"], generator=torch.Generator().manual_seed(11), **kw)
    assert codes(by_seed) == codes(by_gen) and by_gen[0].seed is None and by_seed[0].seed == 11
    two = pipe(["red circle", "blue square"], generator=[torch.Generator().manual_seed(11),
                                                          torch.Generator().manual_seed(3)], **kw)
    assert codes(two[:1]) == codes(by_seed) and codes(two[1:]) == codes(pipe(["blue square"], seed=3, **kw))
    with pytest.raises(ValueError, match="seed or generator"):
        pipe(["red"], seed=1, generator=torch.Generator(), **kw)
    with pytest.raises(ValueError, match="generator"):
        pipe(["red", "blue"], generator=[torch.Generator()], **kw)


def test_callback_on_step_end_sees_every_token(pipe):
    seen = []

    def cb(p, step, total, kw):
        assert p is pipe
        seen.append((step, total, kw["prompt_index"], kw["batch_start"], kw["token"], kw["codes"].shape))

    pipe(["red", "blue"], num_candidates=3, keep=1, batch_size=2, seed=0, progress=False,
         callback_on_step_end=cb)
    total = 2 * 2 * 64  # prompts x batches x image tokens
    assert [s[0] for s in seen] == list(range(total)) and {s[1] for s in seen} == {total}
    assert seen[-1][2:] == (1, 2, 63, (1, 64)) and seen[0][2:] == (0, 0, 0, (2, 64))
    with pytest.raises(ValueError, match="callback_on_step_end"):
        pipe(["red"], callback_on_step_end=3, progress=False)


def test_negative_prompt_conditions_the_unconditional_branch(pipe, caplog):
    kw = dict(num_candidates=2, keep=2, seed=5, guidance_scale=3.0, top_k=1, output_type="codes", progress=False)
    codes = lambda r: [c.tolist() for c in r[0].codes]  # noqa: E731
    plain = pipe(["red circle"], **kw)
    # The empty negative prompt is all pads: the null caption that guidance uses by default.
    assert codes(pipe(["red circle"], negative_prompt="", **kw)) == codes(plain)
    other = pipe(["red circle"], negative_prompt="a large blue square in the center", **kw)
    assert codes(other) != codes(plain)
    # Greedy guided codes == argmax of uncond + s (cond - uncond), uncond on the negative prompt.
    text = pipe.encode_prompts(["red circle"])
    neg = pipe.encode_prompts(["a large blue square in the center"])
    z = other[0].codes[0][None]
    _, cond = pipe.dalle.logits(text, z)
    _, uncond = pipe.dalle.logits(neg, z)
    assert (uncond + 3.0 * (cond - uncond)).argmax(-1).equal(z.flatten(1))
    with caplog.at_level("WARNING"):
        long = pipe(["red circle"], negative_prompt=" ".join(["red circle"] * 20), **kw)
    assert "truncated" in caplog.text and len(long[0].codes) == 2
    for bad in (3, ["a", "b"]):
        with pytest.raises(ValueError, match="negative_prompt"):
            pipe(["red circle"], negative_prompt=bad, **kw)


def test_image_completion_keeps_the_init_images_rows(pipe):
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    arr = (torch.rand(16, 16, 3, generator=rng) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(arr)
    want = pipe.encode_image(image)
    assert want.shape == (8, 8)
    kw = dict(num_candidates=3, keep=3, seed=1, output_type="codes", progress=False)
    res = pipe(["red circle"], init_image=image, keep_rows=3, **kw)[0]
    assert all(c[:3].equal(want[:3]) for c in res.codes)
    assert not all(c[3:].equal(want[3:]) for c in res.codes)
    half = pipe(["red circle"], init_image=image, **kw)[0]  # default: half the rows
    assert all(c[:4].equal(want[:4]) for c in half.codes)
    # Other sizes and modes are resized / converted; a tensor of the right shape is taken as is.
    big = image.resize((40, 40))
    assert pipe.encode_image(big).equal(pipe.encode_image(big.convert("RGBA")))
    assert pipe(["red circle"], init_image=big.convert("L"), keep_rows=2, **kw)[0].codes[0].shape == (8, 8)
    t = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    assert pipe.encode_image(t).equal(want)


@pytest.mark.parametrize("kwargs, name", [
    (dict(init_image="x.png"), "init_image"),
    (dict(init_image=torch.rand(3, 8, 8)), "init_image"),
    (dict(init_image=torch.rand(3, 16, 16) * 2), "init_image"),
    (dict(init_image="nonsquare"), "init_image"),
    (dict(init_image="ok", keep_rows=0), "keep_rows"),
    (dict(init_image="ok", keep_rows=8), "keep_rows"),
    (dict(keep_rows=2), "keep_rows"),
    (dict(output_type="latent"), "output_type"),
    (dict(seed="1"), "seed"),
    (dict(likelihood=-1.0), "likelihood"),
    (dict(likelihood="1"), "likelihood"),
])
def test_invalid_knobs(pipe, kwargs, name):
    from PIL import Image

    images = {"ok": Image.new("RGB", (16, 16)), "nonsquare": Image.new("RGB", (16, 12))}
    if isinstance(kwargs.get("init_image"), str) and kwargs["init_image"] in images:
        kwargs["init_image"] = images[kwargs["init_image"]]
    with pytest.raises(ValueError, match=name):
        pipe(["red"], num_candidates=1, progress=False, **kwargs)


def test_torch_dtype_casts_the_prior_only(pipe_dir):
    bf = TextToImagePipeline.from_pretrained(pipe_dir, torch_dtype="bf16")
    assert bf.dtype == torch.bfloat16 and bf.dalle.text_emb.weight.dtype == torch.bfloat16
    assert next(bf.dvae.parameters()).dtype == torch.float32
    (res,) = bf(["red circle"], num_candidates=2, keep=1, seed=0, progress=False)
    assert res.images[0].size == (16, 16)
    bf.to(torch.float32)
    assert bf.dtype == torch.float32
    bf.to("cpu", "float16", decoder_dtype="float32")
    assert bf.dtype == torch.float16 and bf.device == torch.device("cpu")
    for bad in ("bfloat", "int8", torch.int64):
        with pytest.raises(ValueError, match="torch_dtype"):
            TextToImagePipeline.from_pretrained(pipe_dir, torch_dtype=bad)
    with pytest.raises(ValueError, match="to()"):
        bf.to(3)


def test_model_card(pipe, tmp_path):
    import yaml

    d = pipe.save_pretrained(tmp_path / "p", card={"datasets": ["shapes (built-in)"], "license": "apache-2.0",
                                                   "quality": {"reranked exact": 0.61},
                                                   "training": {"prior": "1000 steps x 32"}})
    text = (d / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "dalle-ar" and meta["pipeline_tag"] == "text-to-image"
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["shapes (built-in)"]
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.61
    assert "from dalle_ar import TextToImagePipeline" in text and '"dim": 32' in text
    # The card's fields travel with the pipeline: a reload and a new save keep them.
    again = TextToImagePipeline.from_pretrained(d).save_pretrained(tmp_path / "q")
    assert (again / "README.md").read_text() == text


def test_threads_policy(monkeypatch, pipe):
    import dalle_ar.threads as th

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(th, "available_cores", lambda: 4)
    monkeypatch.setattr(th, "own_load", lambda: 0.0)  # this test process's own CPU use: below
    for load, want in ((0.2, 4), (1.5, 3), (3.9, 1), (9.0, 1)):
        monkeypatch.setattr(th, "load_average", lambda load=load: load)
        assert th.pick_threads() == want
    assert th.pick_threads(3) == 3
    monkeypatch.setattr(th, "load_average", lambda: 0.0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes of one launch share the 4 cores
    assert th.pick_threads() == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert th.pick_threads() == torch.get_num_threads()
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="num_threads"):
            th.pick_threads(bad)
    with pytest.raises(ValueError, match="num_threads"):
        TextToImagePipeline(pipe.tokenizer, pipe.dvae, pipe.dalle, num_threads=0)
    # A call runs with the pipeline's threads and gives torch's setting back afterwards.
    before = torch.get_num_threads()
    seen = []
    pipe.num_threads = 1
    try:
        pipe(["red"], num_candidates=1, progress=False,
             callback_on_step_end=lambda *a: seen.append(torch.get_num_threads()))
    finally:
        pipe.num_threads = None
    assert set(seen) == {1} and torch.get_num_threads() == before


def test_threads_policy_does_not_count_its_own_process(monkeypatch):
    """A process that kept 2 cores busy since its previous pick sees a load average of ~2 from itself:
    the next pick (the demo's next stage, a server's next batch) keeps 2 threads; other jobs' load still
    counts."""
    import types

    import dalle_ar.threads as th

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(th, "available_cores", lambda: 2)
    monkeypatch.setattr(th, "_own", {"at": None, "cpu": 0.0, "load": 0.0})
    clock = {"wall": 100.0, "cpu": 5.0}
    monkeypatch.setattr(th, "time", types.SimpleNamespace(monotonic=lambda: clock["wall"],
                                                          process_time=lambda: clock["cpu"]))
    monkeypatch.setattr(th, "load_average", lambda: 0.1)
    assert th.pick_threads() == 2  # first pick: nothing to subtract
    clock["wall"] += 600
    clock["cpu"] += 1140  # 1.9 cores busy for 10 minutes
    monkeypatch.setattr(th, "load_average", lambda: 2.0)
    assert th.own_load() == pytest.approx(1.9) and th.pick_threads() == 2
    clock["wall"] += 60  # idle for a minute while another job keeps a core busy
    monkeypatch.setattr(th, "load_average", lambda: 1.2)
    assert th.pick_threads() == 1


def test_generate_cli_image_completion_threads_and_errors(pipe_dir, pipe, tmp_path, capsys):
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red circle\n")
    rng = torch.Generator().manual_seed(2)
    image = Image.fromarray((torch.rand(32, 32, 3, generator=rng) * 255).to(torch.uint8).numpy())
    image.save(tmp_path / "init.png")
    base = ["generate", "--model", str(pipe_dir), "--prompts", str(prompts), "--candidates", "2", "--keep", "2",
            "--device", "cpu"]
    assert cli_main([*base, "--out", str(tmp_path / "o"), "--init-image", str(tmp_path / "init.png"),
                     "--keep-rows", "3", "--threads", "1", "--guidance-scale", "2",
                     "--negative-prompt", "blue square"]) == 0
    rows = [json.loads(r) for r in (tmp_path / "o" / "prompts.jsonl").read_text().splitlines()]
    pipe.num_threads = 1
    try:  # the same as the library call (prompt on line 1: seed 0 + 1)
        (lib,) = pipe(["red circle"], num_candidates=2, keep=2, seed=1, init_image=image, keep_rows=3,
                      guidance_scale=2.0, negative_prompt="blue square", progress=False)
    finally:
        pipe.num_threads = None
    assert all(c[:3].equal(pipe.encode_image(image)[:3]) for c in lib.codes)
    assert [list(Image.open(tmp_path / "o" / r["image"]).getdata()) for r in rows] == \
        [list(im.getdata()) for im in lib.images]
    for extra, message in ((["--keep-rows", "2"], "--keep-rows needs --init-image"),
                           (["--init-image", str(tmp_path / "none.png")], "init_image"),
                           (["--init-image", str(prompts)], "init_image"),
                           (["--init-image", str(tmp_path / "init.png"), "--keep-rows", "8"], "keep_rows"),
                           (["--dtype", "int8"], "torch_dtype")):
        assert cli_main([*base, "--out", str(tmp_path / "bad"), *extra]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
        assert len(err) == 1 and err[0].startswith("dalle-ar generate: error:") and message in err[0], err


def test_demo_generation_sheet_check_and_last_lines(pipe_dir, tmp_path):
    """The demo's last stage on a tiny pipeline: every candidate kept and ranked, the sheet shows the
    best few with each image's verdict, and the last lines say where things are and how it scored."""
    import numpy as np
    from PIL import Image

    from dalle_ar.demo import final_lines, generate_and_check
    from dalle_ar.images import FAIL, PASS

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle in the top left\nred circle left of blue square\n")
    gen = tmp_path / "generated"
    info = generate_and_check(pipe_dir, prompts, gen, data="shapes", candidates=3, sheet=2, seed=1)
    rows = [json.loads(r) for r in (gen / "prompts.jsonl").read_text().splitlines()]
    assert [(r["line"], r["rank"]) for r in rows] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    check = info["check"]
    assert check["prompts"] == 2 and check["candidates"] == 3
    assert check["reranked"] in (0.0, 0.5, 1.0)
    assert 0 <= check["single_sample"] <= check["best_of_n"] <= 1 and check["reranked"] <= check["best_of_n"]
    sheet = np.asarray(Image.open(info["grid"]))
    framed = sum(int((sheet == np.array(c, np.uint8)).all(-1).sum()) for c in (PASS, FAIL))
    assert framed >= 4 * 4 * 32  # 2 prompts x 2 shown, each framed by its verdict
    lines = final_lines({"minutes": 1.5, "generate": info}, tmp_path / "pipeline", gen)
    assert lines[1:4] == [f"[demo] pipeline:      {tmp_path / 'pipeline'}", f"[demo] grid.png:      {gen / 'grid.png'}",
                          f"[demo] prompts.jsonl: {gen / 'prompts.jsonl'}"]
    assert lines[-1].startswith("[demo] check: ") and "single sample" in lines[-1] and "shapes checker" in lines[-1]
    assert all(line.startswith("[demo] ") for line in lines)  # nothing stray (a JSON dump) among them


def test_demo_generation_checks_digits_with_the_scan_reader(pipe_dir, tmp_path):
    pytest.importorskip("sklearn")
    from dalle_ar.demo import generate_and_check, quality_line

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit 7\n")
    info = generate_and_check(pipe_dir, prompts, tmp_path / "gen", data="digits", candidates=2, sheet=2)
    assert info["check"]["prompts"] == 1 and info["check"]["candidates"] == 2
    assert "read as the prompted digit" in quality_line(info["check"])


def test_demo_does_not_mark_an_interrupted_stage_done(monkeypatch, tmp_path):
    """SIGTERM/SIGINT stop a stage's engine after a checkpoint (the run returns interrupted): the demo
    stops there (KeyboardInterrupt: the CLI's exit 130) and leaves no done.json, so a re-run resumes the
    stage instead of skipping it with no export."""
    import dalle_ar.demo as demo

    calls = []

    def stopped(stage, shards, folder, **kw):
        calls.append(stage)
        return {"steps": 3, "interrupted": True, "final_loss": 1.0}

    monkeypatch.setattr(demo, "run_stage", stopped)
    with pytest.raises(KeyboardInterrupt, match="dvae stopped at step 3"):
        demo.run_demo(tmp_path / "d", budget="fast", image_tokenizer="dvae-fsq")
    assert calls == ["dvae"]
    assert (tmp_path / "d" / "data" / "done.json").is_file()
    assert not (tmp_path / "d" / "runs" / "dvae-fsq" / "done.json").exists()
