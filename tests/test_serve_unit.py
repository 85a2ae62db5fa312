"""The server's pieces without a server: the chat format, streamed text, URL safety, media fetching limits,
the command's checks (before Ray starts) and the `serve deploy` config."""
from __future__ import annotations

import asyncio
import base64
import functools
import http.server
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
