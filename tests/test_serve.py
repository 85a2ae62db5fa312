"""`dymu-video serve` for real: a Ray Serve app on loopback (one per module), the tiny checkpoint, a real Redis,
media served by a loopback HTTP server, and real clients (the openai package, httpx, curl)."""
from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from media import changing_video, static_video, textured_image

KEY = "test-key"
QUESTION = "What happens in this video?"
FRAMES = 4
MAX_TOKENS = 12


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Files served over HTTP on loopback (the server may fetch them: --allow-private-urls)."""
    root = tmp_path_factory.mktemp("serve-media")
    for i in range(4):
        changing_video(root / f"clip{i}.mp4", num_frames=6, size=96, seed=7 * i)
    static_video(root / "still.mp4", num_frames=6, size=96)
    textured_image(root / "a.png", size=96, seed=1)
    textured_image(root / "b.png", size=96, seed=2)
    (root / "notes.txt").write_text("not a video at all\n" * 20)
    (root / "big.mp4").write_bytes(b"\0" * (300 << 10))  # over the 256 KiB limit below
    handler = functools.partial(QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def serve_redis():
    """The server's own Redis, on a fixed port, so that a test can stop it and bring it back at the same URL."""
    from workers.redis_server import EmbeddedRedis

    with EmbeddedRedis(maxmemory="64mb", port=free_port()) as redis:
        yield redis


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    """Where the ingress keeps its media folder (as `dymu-video serve` sets it)."""
    return tmp_path_factory.mktemp("serve-spool")


@pytest.fixture(scope="module")
def server(ray_local, serve_redis, tiny_ov, media, media_dir):
    from ray import serve

    from pipeline.serve.app import build_app, settings_from_options

    root, _ = media
    settings = settings_from_options(
        str(tiny_ov), preset="mid", api_key=KEY, allow_private_urls=True, allowed_media_dir=str(root),
        max_media_mb=0.25, max_frames=8, redis_url=serve_redis.url, num_frames=FRAMES, max_new_tokens=MAX_TOKENS,
        max_request_mb=1, media_cache_mb=1, media_dir=str(media_dir),
        model_worker_cpus=0.5)  # half the session's 2 CPUs: `ask` starts its own actors beside them
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(settings), name="dymu-test", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    yield base
    serve.shutdown()


def headers(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def video_request(url: str, question: str = QUESTION, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": question}]}], **extra}


def openai_client(server: str):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def served_model(server: str) -> str:
    return httpx.get(f"{server}/v1/models", headers=headers()).json()["data"][0]["id"]


def post(server: str, body: dict, key: str = KEY) -> httpx.Response:
    return httpx.post(f"{server}/v1/chat/completions", json=body, headers=headers(key), timeout=120)


def ask_cli(tiny_ov, path, question: str, capsys, monkeypatch, redis_url: str) -> str:
    from pipeline.cli import main

    monkeypatch.setenv("REDIS_URL", redis_url)
    assert main(["ask", str(path), question, "--model", str(tiny_ov), "--preset", "mid", "--frames", str(FRAMES),
                 "--max-new-tokens", str(MAX_TOKENS), "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["answer"]


def test_openai_client_plain_and_streaming_answer_as_ask_does(server, media, tiny_ov, capsys, monkeypatch,
                                                              redis_server):
    root, base = media
    client = openai_client(server)
    model = served_model(server)
    messages = video_request(f"{base}/clip0.mp4")["messages"]
    plain = client.chat.completions.create(model=model, messages=messages)
    pieces = [c for c in client.chat.completions.create(model=model, messages=messages, stream=True)]
    streamed = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    expected = ask_cli(tiny_ov, root / "clip0.mp4", QUESTION, capsys, monkeypatch, redis_server.url)
    assert plain.choices[0].message.content == expected
    assert streamed == expected
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")
    report = plain.usage.model_extra["dymu"]
    assert report["preset"] == "mid" and report["frames"] == FRAMES
    assert report["visual_tokens"]["after_temporal"] < report["visual_tokens"]["llm_positions"]
    assert plain.usage.completion_tokens >= 1


def test_curl_streams_server_sent_events(server, media):
    _, base = media
    body = video_request(f"{base}/clip1.mp4", stream=True) | {"model": served_model(server)}
    plain = post(server, body | {"stream": False}).json()["choices"][0]["message"]["content"]
    out = subprocess.run(
        ["curl", "-sS", "-N", f"{server}/v1/chat/completions", "-H", "Content-Type: application/json",
         "-H", f"Authorization: Bearer {KEY}", "-d", json.dumps(body)],
        capture_output=True, text=True, timeout=120, check=True).stdout
    events = [line[len("data: "):] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == plain
    assert chunks[-1]["usage"]["dymu"]["token_cache"] == "hit"  # the plain request cached the tokens


def test_second_question_on_a_video_is_a_token_cache_hit(server, media):
    _, base = media
    model = served_model(server)
    first = post(server, video_request(f"{base}/still.mp4", "What is there?", model=model)).json()
    second = post(server, video_request(f"{base}/still.mp4", "Is it moving?", model=model)).json()
    assert first["usage"]["dymu"]["token_cache"] == "miss"
    assert second["usage"]["dymu"]["token_cache"] == "hit"
    assert "encode" in first["usage"]["dymu"]["seconds"] and "encode" not in second["usage"]["dymu"]["seconds"]


def test_eight_concurrent_clients_get_the_answers_they_get_alone(server, media):
    _, base = media
    model = served_model(server)
    bodies = [video_request(f"{base}/clip{i % 4}.mp4", f"Question {i}: what is shown?", model=model,
                            max_tokens=8, stream=i % 2 == 1) for i in range(8)]

    def answer(body: dict) -> str:
        if not body["stream"]:
            return post(server, body).json()["choices"][0]["message"]["content"]
        client = openai_client(server)
        chunks = client.chat.completions.create(**{k: v for k, v in body.items() if k != "stream"}, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    alone = [answer(body) for body in bodies]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(answer, bodies))
    assert together == alone
    assert len(set(alone)) > 1  # different questions, different answers: the comparison means something


def test_bad_requests_are_openai_errors_and_the_server_keeps_serving(server, media):
    root, base = media
    model = served_model(server)
    good = video_request(f"{base}/clip2.mp4", model=model, max_tokens=4)
    raw = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", headers=headers(), timeout=60)
    too_big_inline = "data:video/mp4;base64," + base64.b64encode(b"\0" * (300 << 10)).decode()
    too_big_body = good | {"padding": "x" * (2 << 20)}  # over --max-request-mb 1
    nested = json.dumps(good)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    audio = good | {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}},
                                                             {"type": "text", "text": "?"}]}]}
    stream = good | {"stream": True}
    cases = {
        "malformed JSON": (raw, 400, "invalid_json"),
        "unknown model": (post(server, good | {"model": "gpt-4o"}), 404, "model_not_found"),
        "missing API key": (httpx.post(f"{server}/v1/chat/completions", json=good, timeout=60), 401,
                            "missing_api_key"),
        "wrong API key": (post(server, good, key="wrong"), 401, "invalid_api_key"),
        "streaming without an API key": (httpx.post(f"{server}/v1/chat/completions", json=stream, timeout=60), 401,
                                         "missing_api_key"),
        "streaming with a wrong API key": (post(server, stream, key="wrong"), 401, "invalid_api_key"),
        "body over --max-request-mb": (post(server, too_big_body), 413, "request_too_large"),
        "deeply nested JSON": (httpx.post(f"{server}/v1/chat/completions", content=nested.encode(),
                                          headers=headers(), timeout=60), 400, "invalid_json"),
        "unknown content-part type": (post(server, audio), 422, "invalid_request"),
        "unreachable video_url": (post(server, video_request("http://127.0.0.1:1/clip.mp4", model=model)), 400,
                                  "media_unreachable"),
        "missing file on the media server": (post(server, video_request(f"{base}/gone.mp4", model=model)), 400,
                                             "media_unreachable"),
        "not a video": (post(server, video_request(f"{base}/notes.txt", model=model)), 400, "invalid_media"),
        "over the size limit": (post(server, video_request(f"{base}/big.mp4", model=model)), 413, "media_too_large"),
        "inline media over the size limit": (post(server, video_request(too_big_inline, model=model)), 413,
                                             "media_too_large"),
        "file:// outside the allowed folder": (post(server, video_request("file:///etc/hostname", model=model)),
                                               400, "file_url_not_allowed"),
        "question over the context": (post(server, good | {"messages": video_request(
            f"{base}/clip2.mp4", "why " * 33000)["messages"]}), 400, "context_length_exceeded"),
        "question over the context, streaming": (post(server, good | {"stream": True, "messages": video_request(
            f"{base}/clip2.mp4", "why " * 33000)["messages"]}), 400, "context_length_exceeded"),
        "preset the server does not run": (post(server, good | {"dymu": {"preset": "off"}}), 400,
                                           "preset_not_served"),
        "more frames than the limit": (post(server, good | {"dymu": {"frames": 99}}), 400, "too_many_frames"),
        "no media": (post(server, good | {"messages": [{"role": "user", "content": "hi"}]}), 400, "no_media"),
        "wrong field type": (post(server, good | {"max_tokens": "lots"}), 422, "invalid_request"),
    }
    for name, (response, status, code) in cases.items():
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), name
        assert response.json()["error"]["message"], name
    ok = post(server, good)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None


def test_file_url_under_the_allowed_folder_and_images_as_a_clip(server, media):
    root, base = media
    model = served_model(server)
    by_file = post(server, video_request(f"file://{root}/clip3.mp4", model=model, max_tokens=4)).json()
    assert by_file["usage"]["dymu"]["kind"] == "video"
    images = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," +
                                                  base64.b64encode((root / name).read_bytes()).decode()}}
              for name in ("a.png", "b.png", "a.png")]
    ask = {"type": "text", "text": "What changes?"}
    clip = post(server, {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": images + [ask]}]})
    assert clip.status_code == 200, clip.text
    assert clip.json()["usage"]["dymu"]["kind"] == "video" and clip.json()["usage"]["dymu"]["frames"] == 3
    single = post(server, {"model": model, "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"{base}/a.png"}}, ask]}]})
    assert single.json()["usage"]["dymu"]["kind"] == "image"


def test_generation_options_are_applied(server, media):
    _, base = media
    body = video_request(f"{base}/clip0.mp4", model=served_model(server), max_tokens=40)
    long = post(server, body).json()
    short = post(server, body | {"max_completion_tokens": 2}).json()
    assert short["usage"]["completion_tokens"] == 2 and short["choices"][0]["finish_reason"] == "length"
    text = long["choices"][0]["message"]["content"]
    stop = text.split()[1]  # cut at the second word
    stopped = post(server, body | {"stop": [stop]}).json()["choices"][0]["message"]["content"]
    assert stopped == text[: text.index(stop)].strip()
    sampled = [post(server, body | {"temperature": 1.5, "seed": s}).json()["choices"][0]["message"]["content"]
               for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_client_disconnect_mid_stream_cancels_its_request(server, media):
    _, base = media
    body = video_request(f"{base}/clip1.mp4", model=served_model(server), max_tokens=20000, stream=True)
    before = httpx.get(f"{server}/health").json()["llm"]
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers=headers(), timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the first chunk: the answer is being written
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = httpx.get(f"{server}/health").json()["llm"]
        if stats["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.1)
    assert stats["cancelled"] == before["cancelled"] + 1
    assert stats["finished"] == before["finished"]  # it never ran to its end
    assert stats["running"] == stats["waiting"] == 0


def stream_usage(server: str, body: dict) -> tuple[int, dict | None]:
    """(status, the usage of the last chunk) of a streamed request."""
    usage = None
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body | {"stream": True}, headers=headers(),
                      timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[len("data: "):]).get("usage") or usage
        return response.status_code, usage


def test_redis_going_away_and_coming_back(server, media, serve_redis):
    _, base = media
    model = served_model(server)
    body = video_request(f"{base}/clip3.mp4", "Is the cache there?", model=model, max_tokens=4)
    assert post(server, body).status_code == 200  # cached while Redis runs
    serve_redis.stop()
    try:
        assert not serve_redis.running
        gone = [post(server, body), post(server, body | {"messages": video_request(
            f"{base}/clip0.mp4", "And now?")["messages"]})]
        streamed_status, streamed_usage = stream_usage(server, body)
        health = httpx.get(f"{server}/health", timeout=60)
    finally:
        serve_redis.start()  # same port, empty
    for response in gone:
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["dymu"]["token_cache"] == "unavailable"
        assert response.json()["choices"][0]["message"]["content"] is not None
    assert streamed_status == 200 and streamed_usage["dymu"]["token_cache"] == "unavailable"
    assert health.status_code == 200
    assert 'dymu_serve_token_cache_total{result="unavailable"}' in httpx.get(f"{server}/metrics").text
    # Back: the first request stores the tokens again, the second reads them.
    back = [post(server, body).json()["usage"]["dymu"]["token_cache"] for _ in range(2)]
    assert back == ["miss", "hit"]


def test_models_health_and_metrics(server):
    assert httpx.get(f"{server}/v1/models").status_code == 401
    models = httpx.get(f"{server}/v1/models", headers=headers()).json()
    assert models["object"] == "list" and len(models["data"]) == 1
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and set(health["llm"]) >= {"running", "waiting"}
    metrics = httpx.get(f"{server}/metrics").text
    for name in ("dymu_serve_requests_total", "dymu_serve_time_to_first_token_seconds_bucket",
                 "dymu_serve_token_cache_total", "dymu_serve_visual_tokens_total"):
        assert name in metrics


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as in a terminal's foreground job (see tests/test_stream.py)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_the_serve_command_removes_its_media_folder_when_stopped(tiny_ov, media, tmp_path, stop):
    """`dymu-video serve` as a user runs it, stopped by Ctrl-C (to its process group) or SIGTERM."""
    root, _ = media
    temp = Path(tempfile.mkdtemp(prefix="ds", dir="/tmp"))  # short: Ray puts its sockets under $TMPDIR too
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TMPDIR=str(temp))
    env.pop("DYMU_API_KEY", None)
    with open(tmp_path / "serve.log", "w") as log:
        command = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "serve", "--model", str(tiny_ov), "--port", str(port),
             "--cache", "off", "--model-worker-cpus", "0.5", "--max-new-tokens", "2"],
            cwd=Path(__file__).resolve().parents[1], env=env, stdout=log, stderr=log, start_new_session=True,
            preexec_fn=default_sigint)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
        while time.monotonic() < deadline and command.poll() is None:
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        png = "data:image/png;base64," + base64.b64encode((root / "a.png").read_bytes()).decode()
        body = {"model": str(tiny_ov), "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png}}, {"type": "text", "text": "What is it?"}]}]}
        answer = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
        assert answer.status_code == 200, (answer.text, (tmp_path / "serve.log").read_text()[-3000:])
        assert [p for p in temp.glob("dymu-serve-media-*/**/*") if p.is_file()]  # the upload is kept
        if stop == signal.SIGINT:
            os.killpg(command.pid, signal.SIGINT)
        else:
            command.send_signal(signal.SIGTERM)
        expected = 130 if stop == signal.SIGINT else 0  # Ctrl-C exits 130, as the other commands do
        code = command.wait(timeout=120)
        assert code == expected, (code, (tmp_path / "serve.log").read_text()[-3000:])
        assert list(temp.glob("dymu-serve-media-*")) == []
    finally:
        if command.poll() is None:
            os.killpg(command.pid, signal.SIGKILL)
            command.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_the_media_folder_stays_bounded_and_goes_when_the_server_stops(server, media, media_dir):
    """Runs last in this module: it stops the application (the fixture's teardown then finds it gone)."""
    from ray import serve

    root, base = media
    model = served_model(server)
    for i in range(6):  # 6 distinct uploads of ~200 KiB of garbage, refused: none is kept
        garbage = "data:video/mp4;base64," + base64.b64encode(f"junk {i} ".encode() * 25_000).decode()
        assert post(server, video_request(garbage, model=model)).json()["error"]["code"] == "invalid_media"
    for name in ("clip0.mp4", "clip1.mp4", "clip2.mp4", "clip3.mp4", "still.mp4"):
        assert post(server, video_request(f"{base}/{name}", model=model, max_tokens=2)).status_code == 200
    files = [p for p in media_dir.rglob("*") if p.is_file()]
    assert files and sum(p.stat().st_size for p in files) <= 1 << 20  # --media-cache-mb 1
    serve.delete("dymu-test")
    deadline = time.monotonic() + 60
    while any(media_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(media_dir.iterdir())
