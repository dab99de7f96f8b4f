"""`dalle-ar serve`: the API (TestClient), dynamic batching, a real uvicorn called by the official
`openai` client, and the web page in headless Chromium. All on a tiny untrained pipeline."""

import asyncio
import base64
import io
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

fastapi = pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e .[serve]")
import httpx  # noqa: E402
import uvicorn  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from dalle_ar.cli import main as cli_main  # noqa: E402
from dalle_ar.pipeline import TextToImagePipeline  # noqa: E402
from dalle_ar.serve import create_app  # noqa: E402
from dalle_ar.serve.batcher import Batcher, Job, QueueFull  # noqa: E402
from dalle_ar.serve.metrics import Metrics  # noqa: E402
from run_harness import free_port, stop_process  # noqa: E402
from tiny import save_tiny_parts  # noqa: E402

PROMPT = "a small red circle"  # 8 of the 12 tokens the tiny prior reads
GEN = "/v1/images/generations"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    parts = save_tiny_parts(tmp_path_factory.mktemp("parts"))
    pipe = TextToImagePipeline.from_pretrained_parts(parts / "tokenizer", parts / "dvae", parts / "dalle",
                                                     parts / "clip")
    return pipe.save_pretrained(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def pipe(pipe_dir):
    return TextToImagePipeline.from_pretrained(pipe_dir)


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(create_app(pipe, model_name="tiny", max_batch=8, default_candidates=4)) as c:
        yield c


def png(data: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    assert im.format == "PNG"
    return np.asarray(im.convert("RGB"))


def expected(pipe, prompt, candidates, keep, seed, **sampling):
    """What the Python pipeline gives for the same request: (pixel arrays, scores)."""
    (res,) = pipe([prompt], num_candidates=candidates, keep=keep, seed=seed, progress=False, **sampling)
    return [np.asarray(im) for im in res.images], res.scores


def metric(text: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(name)


class ServerThread:
    """A real uvicorn server on a free 127.0.0.1 port, in this process (so a test can reach its app)."""

    def __init__(self, app, **config):
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def blocked(app) -> threading.Event:
    """Hold the app's sampling thread until the returned event is set (requests queue up meanwhile)."""
    gate = threading.Event()
    app.state.server.batcher._executor.submit(gate.wait, 60)
    return gate


def wait_for(condition, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ---- the API ---------------------------------------------------------------------------------

def test_generation_returns_the_pipelines_reranked_images(client, pipe):
    r = client.post(GEN, json={"prompt": PROMPT, "n": 2, "candidates": 4, "seed": 3, "response_format": "b64_json"},
                    headers={"X-Request-ID": "req-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-request-id"] == "req-1"
    assert {"created", "data"} <= set(body) and body["seed"] == 3 and body["candidates"] == 4
    assert body["size"] == "16x16" and body["model"] == "tiny"
    pixels, scores = expected(pipe, PROMPT, 4, 2, 3)
    assert [d["rank"] for d in body["data"]] == [0, 1]
    assert [d["revised_prompt"] for d in body["data"]] == [PROMPT, PROMPT]
    assert [d["score"] for d in body["data"]] == pytest.approx(scores, abs=1e-4)
    assert body["data"][0]["score"] >= body["data"][1]["score"]
    for d, want in zip(body["data"], pixels):
        assert np.array_equal(png(base64.b64decode(d["b64_json"])), want)


def test_url_format_is_served_by_the_server(client, pipe):
    r = client.post(GEN, json={"prompt": PROMPT, "candidates": 2, "seed": 5, "temperature": 0.7, "top_p": 0.9,
                               "top_k": 8, "guidance_scale": 2.0})  # OpenAI's default format: url
    assert r.status_code == 200, r.text
    (item,) = r.json()["data"]
    assert "b64_json" not in item and item["url"].startswith("http://testserver/v1/images/files/")
    image = client.get(item["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    pixels, _ = expected(pipe, PROMPT, 2, 1, 5, temperature=0.7, top_p=0.9, top_k=8, guidance_scale=2.0)
    assert np.array_equal(png(image.content), pixels[0])
    missing = client.get("/v1/images/files/nothing-here.png")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "   "}, 400, "prompt"),
    ({"prompt": "red " * 40}, 400, "prompt"),        # more tokens than the model reads
    ({"prompt": "x" * 1001}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": PROMPT, "n": 0}, 400, "n"),
    ({"prompt": PROMPT, "n": 11}, 400, "n"),
    ({"prompt": PROMPT, "n": "2"}, 400, "n"),
    ({"prompt": PROMPT, "n": 3, "candidates": 2}, 400, "n"),
    ({"prompt": PROMPT, "candidates": 0}, 400, "candidates"),
    ({"prompt": PROMPT, "candidates": 1000}, 400, "candidates"),
    ({"prompt": PROMPT, "size": "1024x1024"}, 400, "size"),
    ({"prompt": PROMPT, "response_format": "jpeg"}, 400, "response_format"),
    ({"prompt": PROMPT, "temperature": 0}, 400, "temperature"),
    ({"prompt": PROMPT, "top_p": 1.5}, 400, "top_p"),
    ({"prompt": PROMPT, "top_k": 0}, 400, "top_k"),
    ({"prompt": PROMPT, "guidance_scale": -1}, 400, "guidance_scale"),
    ({"prompt": PROMPT, "seed": -1}, 400, "seed"),
    ({"prompt": PROMPT, "style": "vivid"}, 400, "style"),   # unknown field
    ({"prompt": PROMPT, "model": "dall-e-3"}, 404, "model"),
])
def test_bad_requests_get_openai_shaped_errors(client, body, status, param):
    r = client.post(GEN, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_unparsable_body_and_unknown_route(client):
    r = client.post(GEN, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_models_healthz_page_and_metrics(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["size"] == "16x16" and models["data"][0]["reranker"] is True
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"
    assert client.get("/v1/models/other").status_code == 404
    assert client.get("/healthz").json() == {"status": "ok", "model": "tiny"}
    page = client.get("/")
    assert page.status_code == 200 and 'id="prompt"' in page.text and "static/app.js" in page.text
    for asset in ("static/app.js", "static/style.css"):
        r = client.get("/" + asset)
        assert r.status_code == 200
        assert "http://" not in r.text and "https://" not in r.text  # works offline: no CDN
    assert "http://" not in page.text and "https://" not in page.text
    client.post(GEN, json={"prompt": PROMPT, "candidates": 1, "seed": 0})
    client.post(GEN, json={"prompt": ""})
    text = client.get("/metrics").text
    assert metric(text, "dalle_ar_ready") == 1
    assert metric(text, "dalle_ar_queue_requests") == 0
    assert metric(text, "dalle_ar_batch_candidates_count") >= 1
    assert metric(text, "dalle_ar_request_seconds_count") >= 1
    assert metric(text, "dalle_ar_requests_total", code="200") >= 1
    assert metric(text, "dalle_ar_requests_total", code="400") >= 1


def test_api_key(pipe, monkeypatch):
    monkeypatch.setenv("DALLE_AR_API_KEY", "sekret")
    with TestClient(create_app(pipe, model_name="tiny")) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.post(GEN, json={"prompt": PROMPT}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200
    with TestClient(create_app(pipe, api_key="other")) as c:  # the argument wins over the environment
        assert c.get("/v1/models", headers={"Authorization": "Bearer other"}).status_code == 200


def test_healthz_is_ready_only_once_the_model_loaded(pipe):
    gate = threading.Event()

    def load():
        gate.wait(60)
        return pipe

    with TestClient(create_app(load, model_name="tiny")) as c:
        r = c.get("/healthz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = c.post(GEN, json={"prompt": PROMPT})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        assert metric(c.get("/metrics").text, "dalle_ar_ready") == 0
        gate.set()
        wait_for(lambda: c.get("/healthz").status_code == 200, what="the model to load")
        assert c.post(GEN, json={"prompt": PROMPT, "candidates": 1}).status_code == 200

    def broken():
        raise ValueError("no such checkpoint")

    with TestClient(create_app(broken)) as c:
        wait_for(lambda: c.get("/healthz").json()["status"] == "error", what="the load to fail")
        assert "no such checkpoint" in c.get("/healthz").json()["error"]


def test_full_queue_answers_429_with_retry_after(pipe):
    app = create_app(pipe, max_batch=1, max_queue=1)
    with TestClient(app) as c:
        gate = blocked(app)
        batcher = app.state.server.batcher
        answers = {}

        def send(name):
            answers[name] = c.post(GEN, json={"prompt": PROMPT, "candidates": 1, "seed": 1},
                                   headers={"X-Request-ID": name})

        first = threading.Thread(target=send, args=("first",))
        first.start()
        wait_for(lambda: "first" in batcher.jobs and not batcher.queue, what="the first request's batch")
        second = threading.Thread(target=send, args=("second",))
        second.start()
        wait_for(lambda: len(batcher.queue) == 1, what="the second request to queue")
        progress = c.get("/v1/images/progress/second").json()
        assert progress["state"] == "queued" and progress["requests_ahead"] == 0
        assert c.get("/v1/images/progress/first").json()["state"] == "sampling"
        r = c.post(GEN, json={"prompt": PROMPT, "candidates": 1})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "queue_full"
        gate.set()
        first.join(60)
        second.join(60)
        assert answers["first"].status_code == 200 and answers["second"].status_code == 200
        assert metric(c.get("/metrics").text, "dalle_ar_requests_total", code="429") == 1


# ---- dynamic batching ------------------------------------------------------------------------

def test_batches_merge_requests_and_keep_each_requests_images(pipe):
    """Requests queued together share batches (split across batches where they don't fit, never
    mixed with other sampling settings), and each gets the images it gets alone."""
    specs = [  # prompt, candidates, keep, seed, sampling
        ("a small red circle", 3, 1, 1, {}),
        ("blue square", 1, 1, 9, {"temperature": 0.5}),
        ("red circle", 2, 2, 2, {}),
        ("a small red circle", 4, 2, 3, {}),
    ]
    metrics = Metrics()

    async def run():
        batcher = Batcher(pipe, max_batch=4, max_queue=8, metrics=metrics)
        futures = [batcher.submit(Job(id=str(i), prompt=p, text=pipe.encode_prompts([p]), keep=k, candidates=c,
                                      seed=s, sampling=pipe.sampling_options(**kw)))
                   for i, (p, c, k, s, kw) in enumerate(specs)]
        with pytest.raises(QueueFull):  # submitted beyond max_queue
            for i in range(5):
                batcher.submit(Job(id=f"x{i}", prompt="x", text=pipe.encode_prompts(["x"]), keep=1, candidates=1,
                                   seed=0, sampling=pipe.sampling_options()))
        for i in range(4):
            batcher.cancel(batcher.jobs[f"x{i}"])
        batcher.start()
        answers = await asyncio.gather(*futures)
        await batcher.stop()
        return answers

    answers = asyncio.run(run())

    # Batches: [#0 3 + #2 1], [#1 1 (another temperature)], [#2 1 + #3 3], [#3 1].
    reg = metrics.registry
    assert reg.get_sample_value("dalle_ar_batch_candidates_count") == 4
    assert reg.get_sample_value("dalle_ar_batch_candidates_sum") == 10
    assert reg.get_sample_value("dalle_ar_batch_requests_sum") == 6
    for (prompt, c, keep, seed, kw), answer in zip(specs, answers):
        res = answer.result
        pixels, scores = expected(pipe, prompt, c, keep, seed, **kw)
        got = [np.asarray(im) for im in res.images]
        assert all(np.array_equal(png(data), want) for data, want in zip(answer.pngs, got))
        assert len(got) == keep and all(np.array_equal(a, b) for a, b in zip(got, pixels))
        # Scores hold the z-scored likelihood ratio: sums of 64 log-probabilities from batches of
        # another make-up differ in the 5th digit, and z-scoring over few candidates magnifies that.
        assert res.scores == pytest.approx(scores, abs=1e-3)


# ---- a real server ---------------------------------------------------------------------------

def test_disconnected_clients_are_dropped(pipe):
    app = create_app(pipe, max_batch=2)
    with ServerThread(app) as server:
        gate = blocked(app)
        batcher = app.state.server.batcher
        for name in ("inflight", "queued"):  # the first is taken into a batch, the second waits
            with pytest.raises(httpx.TimeoutException):
                httpx.post(server.url + GEN, json={"prompt": PROMPT, "candidates": 2, "seed": 1},
                           headers={"X-Request-ID": name}, timeout=0.5)
        wait_for(lambda: not batcher.jobs and not batcher.queue, what="both requests to be dropped")
        gate.set()
        r = httpx.post(server.url + GEN, json={"prompt": PROMPT, "candidates": 1, "seed": 1}, timeout=60)
        assert r.status_code == 200
        text = httpx.get(server.url + "/metrics").text
        assert metric(text, "dalle_ar_requests_dropped_total") == 2
        assert metric(text, "dalle_ar_candidates_total") == 1  # nothing sampled for the dropped ones


def test_behind_a_proxy_that_strips_a_path_prefix(pipe):
    """nginx `location /dalle/ { proxy_pass http://127.0.0.1:PORT/; }` + --root-path /dalle: image URLs
    and the page's relative calls carry the prefix."""
    with ServerThread(create_app(pipe), root_path="/dalle") as server:
        r = httpx.post(server.url + GEN, json={"prompt": PROMPT, "candidates": 1},
                       headers={"X-Forwarded-Proto": "https", "Host": "example.org"}, timeout=60)
        assert r.status_code == 200, r.text
        url = r.json()["data"][0]["url"]
        assert url.startswith("https://example.org/dalle/v1/images/files/"), url
        image = httpx.get(server.url + url.removeprefix("https://example.org/dalle"))
        assert image.status_code == 200 and png(image.content).shape == (16, 16, 3)


@pytest.mark.slow
def test_openai_client_against_dalle_ar_serve(pipe_dir, pipe, tmp_path):
    """`dalle-ar serve` in its own process, called by the official openai client, unchanged."""
    openai = pytest.importorskip("openai")
    port = free_port()
    exe = Path(sys.executable).with_name("dalle-ar")
    proc = subprocess.Popen([str(exe), "serve", "--model", str(pipe_dir), "--port", str(port), "--api-key", "k",
                             "--max-batch", "4"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                return httpx.get(url + "/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=180, what="dalle-ar serve to load its model")
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny"]
        r = client.images.generate(model="tiny", prompt=PROMPT, n=2, size="16x16", response_format="b64_json",
                                   extra_body={"candidates": 4, "seed": 3})
        pixels, scores = expected(pipe, PROMPT, 4, 2, 3)
        assert len(r.data) == 2
        for item, want in zip(r.data, pixels):
            assert np.array_equal(png(base64.b64decode(item.b64_json)), want)
            assert item.revised_prompt == PROMPT
        assert [item.model_extra["score"] for item in r.data] == pytest.approx(scores, abs=1e-4)
        assert [item.model_extra["rank"] for item in r.data] == [0, 1]
        r = client.images.generate(prompt=PROMPT, extra_body={"candidates": 2})  # OpenAI's default: a URL
        assert png(httpx.get(r.data[0].url).content).shape == (16, 16, 3)
        with pytest.raises(openai.BadRequestError) as e:
            client.images.generate(prompt=PROMPT, size="1024x1024")
        assert e.value.param == "size"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).images.generate(prompt=PROMPT)
    finally:
        stop_process(proc)


def test_serve_cli_errors(tmp_path, capsys):
    assert cli_main(["serve", "--model", str(tmp_path)]) == 2
    assert "dalle-ar serve: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["serve", "--help"])
    assert "--max-batch" in capsys.readouterr().out


# ---- the web page in a real browser ----------------------------------------------------------

def chromium():
    """(browser binary, chromedriver) of the system, or skip saying how to get them."""
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
                   None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("no headless Chromium here: apt-get install -y chromium chromium-driver (.ci/run does)")
    return browser, driver


def test_web_page_in_headless_chromium(pipe, tmp_path):
    """Type a prompt, press Generate, see the progress indicator, then the ranked grid with scores
    and download links. DALLE_AR_SERVE_MODEL=DIR serves another pipeline (e.g. the demo's) and
    DALLE_AR_SCREENSHOT=PATH keeps the screenshot (docs/serve.png is made this way)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By

    browser, driver_path = chromium()
    model = os.environ.get("DALLE_AR_SERVE_MODEL")
    app = create_app(TextToImagePipeline.from_pretrained(model) if model else pipe,
                     model_name=Path(model).name if model else "tiny", max_batch=16)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(arg)
    with ServerThread(app) as server:
        driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
        try:
            driver.get(server.url + "/")
            wait_for(lambda: "16x16" in driver.find_element(By.ID, "model").text or model is not None,
                     what="the page to read the model")
            prompt = driver.find_element(By.ID, "prompt")
            prompt.clear()
            prompt.send_keys(os.environ.get("DALLE_AR_SCREENSHOT_PROMPT", PROMPT))
            driver.find_element(By.ID, "candidates").send_keys("16")
            driver.find_element(By.ID, "seed").send_keys("7")
            gate = blocked(app)  # hold sampling so that the progress indicator can be seen
            driver.find_element(By.ID, "generate").click()
            status = driver.find_element(By.ID, "status")
            wait_for(lambda: status.is_displayed() and ("queued" in status.text or "sampling" in status.text),
                     what="the progress indicator")
            assert not driver.find_element(By.ID, "generate").is_enabled()
            gate.set()
            wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#grid .card img")) == 4, timeout=120,
                     what="the grid")
            images = driver.find_elements(By.CSS_SELECTOR, "#grid .card img")
            wait_for(lambda: all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                                       im) for im in images), what="the images to render")
            widths = [driver.execute_script("return arguments[0].naturalWidth", im) for im in images]
            assert len(set(widths)) == 1 and widths[0] > 0
            assert not status.is_displayed() and driver.find_element(By.ID, "error").text == ""
            cards = driver.find_elements(By.CSS_SELECTOR, "#grid .card")
            assert [c.find_element(By.CSS_SELECTOR, ".rank").text for c in cards] == ["#1", "#2", "#3", "#4"]
            scores = [float(c.find_element(By.CSS_SELECTOR, ".score").text.split()[-1]) for c in cards]
            assert scores == sorted(scores, reverse=True)
            links = [c.find_element(By.TAG_NAME, "a") for c in cards]
            assert all(a.get_attribute("href").startswith("data:image/png;base64,") for a in links)
            assert all(a.get_attribute("download").endswith(".png") for a in links)
            assert "seed 7" in driver.find_element(By.ID, "summary").text
            shot = tmp_path / "serve.png"
            driver.save_screenshot(str(shot))
            assert Image.open(shot).size[0] > 500
            if os.environ.get("DALLE_AR_SCREENSHOT"):
                shutil.copy(shot, os.environ["DALLE_AR_SCREENSHOT"])
            # A bad request shows the server's error message.
            prompt.clear()
            prompt.send_keys("red " * 40)
            driver.find_element(By.ID, "generate").click()
            wait_for(lambda: "tokens long" in driver.find_element(By.ID, "error").text, what="the error message")
        finally:
            driver.quit()
