"""The server's pieces without a server: the chat format, streamed text, URL safety, media fetching limits,
the command's checks (before Ray starts) and the `serve deploy` config."""
from __future__ import annotations

import asyncio
import base64
import functools
import http.server
import json
import threading
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.serve.media import MediaFetcher, MediaLimits, is_public_address
from pipeline.serve.protocol import ApiError, ChatRequest, StreamText, parse_request, read_prompt

ROOT = Path(__file__).resolve().parents[1]


def streamed(pieces: list[str], stop: list[str], final: str) -> str:
    text = StreamText(stop)
    return "".join(text.add(p) for p in pieces) + text.finish(final)


@pytest.mark.parametrize("pieces, stop, final", [
    ([" Hello", " wor", "ld ", "\n"], [], "Hello world"),  # the final answer is stripped
    ([" a b", " ST", "OP c"], ["STOP"], "a b"),  # cut before a stop string split over pieces
    ([" a b", " ST", "X c "], ["STOP"], "a b STX c"),  # a held-back tail that was no stop string after all
    ([" x", "y. ", "END", " more"], ["END", "."], "xy"),  # the first of several stop strings
])
def test_streamed_pieces_add_up_to_the_final_answer(pieces, stop, final):
    assert streamed(pieces, stop, final) == final


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("10.0.0.7", False),
    ("192.168.1.1", False), ("172.16.0.1", False), ("169.254.169.254", False), ("::1", False), ("fe80::1", False),
    ("fd00::1", False), ("::ffff:127.0.0.1", False), ("::ffff:8.8.8.8", True), ("0.0.0.0", False), ("100.64.0.1", False), ("224.0.0.1", False),
])
def test_only_public_addresses_are_fetched(address, public):
    assert is_public_address(address) is public


def chat(content, **extra) -> ChatRequest:
    return ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": content}], **extra})


def test_the_question_is_the_last_user_text_and_media_come_from_every_user_message():
    request = ChatRequest.model_validate({"model": "m", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/b.png"}},
                                     {"type": "text", "text": "What changes?"}]}]})
    prompt = read_prompt(request)
    assert prompt.question == "What changes?"
    assert prompt.media == [("image", "http://x/a.png"), ("image", "http://x/b.png")]
    assert chat("x", max_tokens=5, stop="a", seed=3).options() == {"max_new_tokens": 5, "stop": ["a"], "seed": 3}
    assert chat("x", max_tokens=5, max_completion_tokens=7).options()["max_new_tokens"] == 7


@pytest.mark.parametrize("content, code", [
    ("no media here", "no_media"),
    ([{"type": "video_url", "video_url": {"url": "http://x/v.mp4"}}], "no_question"),
    ([{"type": "video_url", "video_url": {"url": "http://x/v.mp4"}},
      {"type": "image_url", "image_url": {"url": "http://x/a.png"}}, {"type": "text", "text": "?"}], "too_many_media"),
])
def test_requests_that_ask_nothing_answerable_are_refused(content, code):
    with pytest.raises(ApiError) as error:
        read_prompt(chat(content))
    assert (error.value.status, error.value.code) == (400, code)


def test_bodies_that_do_not_parse_or_fit_are_400_and_422():
    with pytest.raises(ApiError) as bad_json:
        parse_request(b"{nope")
    with pytest.raises(ApiError) as bad_shape:
        parse_request(b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 3}')
    assert (bad_json.value.status, bad_shape.value.status) == (400, 422)
    assert bad_shape.value.param == "top_p"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def loopback_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fetch")
    (root / "small.bin").write_bytes(b"x" * 1000)
    (root / "big.bin").write_bytes(b"x" * 5000)
    handler = functools.partial(QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def fetch(limits: MediaLimits, url: str, spool: Path):
    return asyncio.run(MediaFetcher(limits, spool).fetch(url))


def test_private_urls_are_refused_unless_allowed(loopback_files, tmp_path):
    _, base = loopback_files
    with pytest.raises(ApiError) as refused:
        fetch(MediaLimits(), f"{base}/small.bin", tmp_path)
    assert (refused.value.status, refused.value.code) == (400, "private_url")
    fetched = fetch(MediaLimits(allow_private_urls=True), f"{base}/small.bin", tmp_path)
    assert fetched.path.read_bytes() == b"x" * 1000 and fetched.path.name == fetched.digest


def test_size_limits_hold_for_every_kind_of_url(loopback_files, tmp_path):
    root, base = loopback_files
    limits = MediaLimits(max_bytes=2000, allow_private_urls=True, allowed_media_dir=str(root))
    inline = "data:application/octet-stream;base64," + base64.b64encode(b"x" * 5000).decode()
    for url in (f"{base}/big.bin", inline, f"file://{root}/big.bin"):
        with pytest.raises(ApiError) as error:
            fetch(limits, url, tmp_path)
        assert error.value.status == 413, url
    same = [fetch(limits, url, tmp_path).digest for url in (
        f"{base}/small.bin", f"file://{root}/small.bin",
        "data:x;base64," + base64.b64encode(b"x" * 1000).decode())]
    assert len(set(same)) == 1  # one content hash, however it came


def test_file_urls_stay_inside_the_allowed_folder(loopback_files, tmp_path):
    root, _ = loopback_files
    (tmp_path / "secret.bin").write_bytes(b"s")
    (root / "link.bin").symlink_to(tmp_path / "secret.bin")
    for limits, url in ((MediaLimits(), f"file://{root}/small.bin"),
                        (MediaLimits(allowed_media_dir=str(root)), f"file://{root}/../secret.bin"),
                        (MediaLimits(allowed_media_dir=str(root)), f"file://{root}/link.bin")):
        with pytest.raises(ApiError) as error:
            fetch(limits, url, tmp_path / "spool")
        assert error.value.code == "file_url_not_allowed", url


@pytest.mark.parametrize("args, message", [
    (["--host", "0.0.0.0"], "loopback only"),
    (["--allowed-media-dir", "/no/such/dir"], "no such folder"),
    (["--port", "70000"], "not a port"),
    (["--max-media-mb", "0"], "must be positive"),
    (["--max-request-mb", "0"], "--max-request-mb must be positive"),
    (["--media-cache-mb", "-1"], "--media-cache-mb must not be negative"),
])
def test_serve_checks_its_options_before_starting_anything(tiny_ov, args, message, capsys, monkeypatch):
    def runtime_started(*_args, **_kwargs):
        raise AssertionError("Ray and Redis started before the options were checked")

    monkeypatch.delenv("DYMU_API_KEY", raising=False)
    monkeypatch.setattr("pipeline.runtime.open_runtime", runtime_started)
    assert main(["serve", "--model", str(tiny_ov), *args]) == 2
    assert message in capsys.readouterr().err


def test_the_serve_deploy_config_parses_and_builds(tiny_ov, monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    from pipeline.serve.app import ChatServer, app_builder
    from pipeline.serve.deployments import ENCODER_NAME, LLM_NAME

    config = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    app = schema.applications[0]
    assert app.import_path == "pipeline.serve.app:app_builder"
    monkeypatch.setenv("DYMU_API_KEY", "k")
    built = app_builder({**app.args, "model": str(tiny_ov)})
    settings, encoder, llm = built._bound_deployment.init_args
    assert settings.api_key == "k" and settings.config.preset == "mid" and settings.config.max_batch == 8
    assert built._bound_deployment.name == ChatServer.name
    # The encoder and the LLM engine are deployments of their own, bound into the application (the ingress
    # gets handles to them), sized by the args: replicas, and what each replica takes.
    assert (encoder._bound_deployment.name, llm._bound_deployment.name) == (ENCODER_NAME, LLM_NAME)
    assert encoder._bound_deployment.num_replicas == llm._bound_deployment.num_replicas == 1
    assert llm._bound_deployment.max_ongoing_requests == app.args["max_concurrency"]
    sized = app_builder({**app.args, "model": str(tiny_ov), "encoders": 2, "llms": 3, "model_worker_cpus": 4,
                         "model_worker_gpus": 0.5, "max_concurrency": 16})
    _, encoder, llm = sized._bound_deployment.init_args
    assert (encoder._bound_deployment.num_replicas, llm._bound_deployment.num_replicas) == (2, 3)
    for deployment in (encoder._bound_deployment, llm._bound_deployment):
        assert deployment.ray_actor_options == {"num_cpus": 4, "num_gpus": 0.5}
        assert deployment.init_args[1] == 4  # torch threads: the replica's CPUs
    assert llm._bound_deployment.max_ongoing_requests == 16


# --- request bodies: size, nesting, part types ------------------------------------------------------------
def http_request(body_chunks: list[bytes], headers: dict[str, str] | None = None):
    """A Starlette request whose body arrives in ``body_chunks``; ``.reads`` counts the chunks read."""
    from starlette.requests import Request

    chunks = list(body_chunks)

    async def receive():
        request.reads += 1
        part = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": part, "more_body": bool(chunks)}

    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    request = Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": raw}, receive)
    request.reads = 0
    return request


def test_a_body_over_the_limit_is_413_before_it_is_read_or_parsed():
    from pipeline.serve.app import read_body

    limit, chunk = 1 << 20, b"x" * (64 << 10)
    declared = http_request([chunk] * 100, {"content-length": str(100 * len(chunk))})
    with pytest.raises(ApiError) as error:
        asyncio.run(read_body(declared, limit))
    assert (error.value.status, error.value.code, declared.reads) == (413, "request_too_large", 0)
    chunked = http_request([chunk] * 100, {"transfer-encoding": "chunked"})  # no Content-Length: counted
    with pytest.raises(ApiError) as error:
        asyncio.run(read_body(chunked, limit))
    assert error.value.status == 413 and chunked.reads == limit // len(chunk) + 1
    assert asyncio.run(read_body(http_request([b"{}", b"[]"]), limit)) == b"{}[]"


def test_deeply_nested_json_is_a_400_not_a_crash():
    for where in ('"x": {}', '"messages": [{"role": "user", "content": [{}]}]'):
        nested = where.replace("{}", "[" * 100_000 + "]" * 100_000)
        with pytest.raises(ApiError) as error:
            parse_request(('{"model": "m", "messages": [{"role": "user", "content": "x"}], ' + nested + "}").encode())
        assert (error.value.status, error.value.code) == (400, "invalid_json")
        assert "nests lists or mappings more than 64 levels deep" in error.value.message


def test_an_unknown_content_part_type_is_named_with_the_allowed_ones():
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is it?"}, {"type": "input_audio", "input_audio": {"data": "AAAA"}}]}]}
    with pytest.raises(ApiError) as error:
        parse_request(json.dumps(body).encode())
    assert (error.value.status, error.value.code) == (422, "invalid_request")
    assert "'input_audio'" in error.value.message and "text, image_url, video_url" in error.value.message
    assert "valid string" not in error.value.message


class CountingTokenizer:
    """The model's tokenizer, counting the characters it is asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer, self.characters = tokenizer, 0

    def __call__(self, text, *args, **kwargs):
        self.characters += len(text)
        return self.tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_question_over_the_context_is_refused_before_it_is_all_tokenized(tiny_ov, tmp_path):
    from dymu.errors import DymuError
    from dymu.videoqa import VideoQA
    from media import changing_video

    qa = VideoQA.from_pretrained(str(tiny_ov), preset="off", num_frames=2, device="cpu")
    tokens = qa.encode(qa.read(changing_video(tmp_path / "clip.mp4", num_frames=2, size=64)))
    counting = qa.family.tokenizer = CountingTokenizer(qa.family.tokenizer)
    huge = "why " * 2_500_000  # 10 MB: over the tiny model's 32768 positions hundreds of times
    with pytest.raises(DymuError, match="context"):
        qa.answer_request(tokens, huge)
    assert counting.characters < len(huge) // 20
    counting.characters = 0
    qa.answer_request(tokens, "why " * 100)  # one that fits is tokenized whole, and goes on
    assert counting.characters >= 400


# --- the ingress's own checks, without Serve: fake handles on the encoder and the LLM -------------------------
class Remote:
    """A deployment method as a handle offers it (``.remote(...)``), answering ``value``; calls are counted."""

    def __init__(self, value=None):
        self.value, self.calls = value, 0

    def remote(self, *args, **kwargs):
        self.calls += 1

        async def answer():
            return self.value

        return answer()


class FakeHandle:
    def __init__(self):
        self.cache_settings, self.encode, self.stream = Remote(), Remote(), Remote()

    def options(self, **_):
        return self


@pytest.fixture
def ingress(tiny_ov, tmp_path):
    from pipeline.serve.app import ChatService, settings_from_options

    settings = settings_from_options(str(tiny_ov), api_key="k", allow_private_urls=True, max_frames=8,
                                     media_dir=str(tmp_path / "media"))
    service = ChatService(settings, FakeHandle(), FakeHandle())
    yield service
    service.__del__()


def post_chat(service, body: dict, key: str | None = "k"):
    headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {key}"} if key else {})
    return asyncio.run(service._chat(http_request([json.dumps(body).encode()], headers)))


def image_body(url: str, **extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]}], **extra}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("key, code", [(None, "missing_api_key"), ("wrong", "invalid_api_key")])
def test_the_api_key_is_checked_on_streaming_requests_too(ingress, stream, key, code):
    body = image_body("data:image/png;base64,AAAA", model=ingress.settings.served_name, stream=stream)
    with pytest.raises(ApiError) as error:
        post_chat(ingress, body, key)
    assert (error.value.status, error.value.code) == (401, code)
    llm = ingress.backend.llm
    assert (llm.stream.calls, ingress.backend.encoder.cache_settings.calls) == (0, 0)  # nothing started


def test_refused_uploads_leave_nothing_in_the_media_folder(ingress):
    spool = ingress.fetcher.spool
    for i in range(20):  # 20 distinct garbage uploads of 66 KB: each is refused, and goes at once
        garbage = "data:video/mp4;base64," + base64.b64encode(f"garbage {i:02d} ".encode() * 6000).decode()
        with pytest.raises(ApiError) as error:
            post_chat(ingress, image_body(garbage, model=ingress.settings.served_name))
        assert error.value.code == "invalid_media"
        assert list(spool.iterdir()) == []
    assert ingress.fetcher.cached_bytes() == 0
    ingress.__del__()  # the replica stops: its folder goes
    assert not spool.exists()


# --- the media folder: an LRU by size that never drops a held file --------------------------------------------
def inline(data: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


def test_the_media_cache_keeps_the_latest_files_within_its_size_and_never_a_held_one(tmp_path):
    fetcher = MediaFetcher(MediaLimits(max_bytes=1000, cache_bytes=2500), tmp_path / "spool")

    async def scenario():
        a = await fetcher.fetch(inline(b"a" * 1000))
        b = await fetcher.fetch(inline(b"b" * 1000))
        fetcher.release([a, b])
        again = await fetcher.fetch(inline(b"a" * 1000))  # a is used again: b is now the least recent
        fetcher.release([again])
        c = await fetcher.fetch(inline(b"c" * 1000))
        fetcher.release([c])
        assert sorted(p.name for p in fetcher.spool.iterdir()) == sorted([a.digest, c.digest])
        held = await fetcher.fetch(inline(b"d" * 1000))  # held through the next evictions
        for fill in (b"e", b"f", b"g"):
            fetcher.release([await fetcher.fetch(inline(fill * 1000))])
            assert held.path.read_bytes() == b"d" * 1000
            assert fetcher.cached_bytes() <= 2500 + 1000  # over the bound only by the held file
        fetcher.release([held])
        assert fetcher.cached_bytes() <= 2500
        refused = await fetcher.fetch(inline(b"h" * 10))
        twice = await fetcher.fetch(inline(b"h" * 10))  # a second request holds the same file
        fetcher.release([refused], refused=True)
        assert twice.path.exists()  # not while the other request still uses it
        fetcher.release([twice])
        assert not twice.path.exists()

    asyncio.run(scenario())
    assert all(not p.name.endswith(".part") for p in fetcher.spool.iterdir())
    fetcher.close()
    assert not fetcher.spool.exists()


def test_file_urls_are_never_removed_from_the_users_folder(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.bin").write_bytes(b"a" * 100)
    fetcher = MediaFetcher(MediaLimits(allowed_media_dir=str(root), cache_bytes=0), tmp_path / "spool")
    fetched = asyncio.run(fetcher.fetch(f"file://{root}/a.bin"))
    fetcher.release([fetched], refused=True)
    fetcher.close()
    assert (root / "a.bin").read_bytes() == b"a" * 100


# --- redirects: every hop's host must be public --------------------------------------------------------------
class Redirect(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/small.bin")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_a_public_host_redirecting_to_loopback_is_refused(loopback_files, tmp_path):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    seen: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:  # "localhost" passes for a public host
        seen.append(host)
        return ["93.184.216.34"] if host == "localhost" else ["127.0.0.1"]

    try:
        fetcher = MediaFetcher(MediaLimits(), tmp_path / "spool", resolve=resolve)
        with pytest.raises(ApiError) as error:
            asyncio.run(fetcher.fetch(f"http://localhost:{httpd.server_address[1]}/clip.mp4"))
    finally:
        httpd.shutdown()
    assert (error.value.status, error.value.code) == (400, "private_url")
    assert seen == ["localhost", "127.0.0.1"]  # refused at the second hop, before it was fetched
    assert list((tmp_path / "spool").iterdir()) == []


def test_a_caller_cancelled_while_its_upload_is_written_does_not_pin_it_in_the_cache(tmp_path):
    fetcher = MediaFetcher(MediaLimits(max_bytes=1 << 20, cache_bytes=0), tmp_path / "spool")

    async def scenario():
        task = asyncio.ensure_future(fetcher.fetch(inline(b"z" * (1 << 20))))
        await asyncio.sleep(0)  # the write has started in its thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.get_running_loop().shutdown_default_executor()  # the write in its thread is done
        deadline = asyncio.get_running_loop().time() + 10  # and then its hold is released, on this loop
        while fetcher.cached_bytes() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert fetcher.cached_bytes() == 0 and list(fetcher.spool.iterdir()) == []
