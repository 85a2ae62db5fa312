"""The checks behind "one clear line before any start-up", in process: the typed config (as the Python API and
YAML files reach it), thresholds files, what a checkpoint's config tells without its weights, --out paths,
URLs and the image pixel limit. tests/test_bad_input_cli.py runs the same through the CLI."""
from __future__ import annotations

import json
import math
import os

import pytest
from PIL import Image

from dymu.config import VideoQAConfig, make_config
from dymu.errors import DymuError
from dymu.frames import MAX_PIXELS_ENV, MediaNotFound, UnsupportedMedia, load_image, media_kind
from dymu.thresholds import EncoderFingerprint, Thresholds, ThresholdsError
from dymu.files import MAX_NESTING, TooDeeplyNested, check_cache_dir, check_nesting, parse_json, parse_yaml
from dymu.files import write_text_atomic
from pipeline.validate import check_model, check_thresholds_out, check_writable, reject_url


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("device", "banana", "device must be auto, cpu, cuda, cuda:N or mps, got 'banana'"),
        ("device", "cuda:x", "device must be"),
        ("dtype", "banana", "dtype must be one of"),
        ("num_frames", 0, "num_frames must be an integer >= 1"),
        ("max_frames", 0, "max_frames must be an integer >= 1"),
        ("max_frames", 2.5, "max_frames must be an integer"),
        ("fps", 0.0, "fps must be a number > 0"),
        ("fps", math.inf, "fps must be a number > 0"),
        ("keep", 0, "keep must be an integer >= 1"),
        ("keep", True, "keep must be an integer"),
        ("keep_fraction", 1.0, "keep_fraction must be a number in (0, 1)"),
        ("temporal_threshold", -5.0, "temporal_threshold must be a cosine in [-1, 1]"),
        ("temporal_threshold", math.nan, "temporal_threshold must be"),
        ("reuse_threshold", -0.1, "reuse_threshold must be a number >= 0"),
        ("max_new_tokens", 0, "max_new_tokens must be an integer >= 1"),
        ("max_new_tokens", "lots", "max_new_tokens must be an integer >= 1, got 'lots'"),
        ("temperature", -1.0, "temperature must be a number >= 0"),
        ("top_p", 2.0, "top_p must be a number in (0, 1]"),
        ("top_p", 0.0, "top_p must be a number in (0, 1]"),
        ("seed", "x", "seed must be an integer"),
        ("vtu", "yes", "vtu must be true or false"),
        ("model", "", "model must be a Hugging Face model id"),
        ("prune", 5, "prune must be a mapping of pruning options"),
        ("prune", {"layer": "two"}, "prune.layer must be an integer, got 'two'"),
        ("prune", {"min_keep": 2.0}, "prune min_keep must be in [0, 1]"),
        ("prune", {"bogus": 1}, "unknown prune option(s): bogus"),
    ],
)
def test_bad_config_values_are_refused_with_their_name(option, value, message):
    with pytest.raises(DymuError) as caught:
        make_config(**{option: value})
    assert message in str(caught.value)
    with pytest.raises(DymuError):  # the Python API's dataclass checks the same, without make_config
        VideoQAConfig(**{option: value})


def test_a_yaml_file_is_checked_like_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("max_new_tokens: lots\n")
    with pytest.raises(DymuError, match="max_new_tokens must be an integer >= 1, got 'lots'"):
        make_config(config_file=tmp_path / "c.yaml")


@pytest.mark.parametrize("preset", ["off", "low", "mid", "high"])
def test_every_preset_is_valid(preset):
    config = make_config(preset, device="cuda:1", dtype="bf16", fps=2, keep_fraction=0.3, seed=3)
    assert config.preset == preset and config.device == "cuda:1"


def test_keep_must_leave_something_to_merge():
    assert make_config(keep=728).tokens_to_keep(729) == 728
    with pytest.raises(DymuError, match="between 1 and 728"):
        make_config(keep=729).tokens_to_keep(729)


def _thresholds_json(fingerprint: EncoderFingerprint) -> dict:
    return Thresholds(taus=[0.9] * fingerprint.num_layers, model_id="m", encoder=fingerprint, target_keep=200.0,
                      achieved_mean=210.0, achieved_std=4.0).to_json()


FINGERPRINT = EncoderFingerprint(family="siglip", num_layers=4, feature_layer=-1, image_size=384, patch_size=14,
                                 hidden_size=64)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(achieved=None), '"achieved" must be a mapping'),
        (lambda d: d["achieved"].update(mean="lots"), "achieved.mean must be a number >= 0"),
        (lambda d: d["taus"].__setitem__(0, math.nan), '"taus" must be a list of cosines in [-1, 1]'),
        (lambda d: d["taus"].__setitem__(0, math.inf), '"taus" must be a list of cosines'),
        (lambda d: d["taus"].__setitem__(0, 1.5), '"taus" must be a list of cosines'),
        (lambda d: d["taus"].__setitem__(0, -1.5), '"taus" must be a list of cosines'),
        (lambda d: d["taus"].__setitem__(0, "0.9"), '"taus" must be a list of cosines'),
        (lambda d: d.update(taus=None), '"taus" must be a list'),
        (lambda d: d.update(target_keep=math.nan), "target_keep must be a number >= 0"),
        (lambda d: d["achieved"].update(std=math.inf), "achieved.std must be a number >= 0"),
        (lambda d: d.update(model=None), '"model" must be a mapping'),
        (lambda d: d["model"].update(num_layers="4"), "model.num_layers is '4'"),
    ],
)
def test_unsound_thresholds_files_are_refused(tmp_path, edit, message):
    data = _thresholds_json(FINGERPRINT)
    edit(data)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))  # NaN and Infinity are written as Python's json reads them
    with pytest.raises(ThresholdsError) as caught:
        Thresholds.load(path)
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_sound_thresholds_at_the_edges_load(tmp_path):
    data = _thresholds_json(FINGERPRINT)
    data["taus"] = [-1.0, 1.0, 0, 1.004]  # a bf16 cosine may round a hair past 1
    data["achieved"] = {"mean": None, "std": None}
    (tmp_path / "t.json").write_text(json.dumps(data))
    assert Thresholds.load(tmp_path / "t.json").taus == [-1.0, 1.0, 0.0, 1.004]


@pytest.mark.parametrize("family_fixture", ["tiny_ov", "tiny_llava"])
def test_the_fingerprint_from_a_checkpoint_config_is_the_encoders(family_fixture, request):
    """The cheap check reads the checkpoint's config alone; it must agree with the loaded encoder's, or good
    thresholds would be refused before the model ever loads."""
    from dymu.families import checkpoint_config
    from dymu.vision.load import load_vision_model

    path = str(request.getfixturevalue(family_fixture))
    from_config = EncoderFingerprint.from_model_config(checkpoint_config(path))
    assert from_config == EncoderFingerprint.of(load_vision_model(path, "cpu", "float32").encoder())


def test_check_model_reads_no_weights_and_checks_the_thresholds_family(tiny_ov, tmp_path):
    fingerprint = EncoderFingerprint.from_model_config(check_model(str(tiny_ov)))
    good = _thresholds_json(fingerprint)
    (tmp_path / "good.json").write_text(json.dumps(good))
    assert check_model(str(tiny_ov), device="cpu", thresholds=str(tmp_path / "good.json"), keep=728)
    good["model"]["family"] = "clip"
    (tmp_path / "clip.json").write_text(json.dumps(good))
    with pytest.raises(ThresholdsError, match="family clip"):
        check_model(str(tiny_ov), thresholds=str(tmp_path / "clip.json"))
    with pytest.raises(DymuError, match="between 1 and 728"):
        check_model(str(tiny_ov), keep=729)
    config = json.loads((tiny_ov / "config.json").read_text())
    del config["model_type"]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(DymuError, match='config.json has no "model_type"'):
        check_model(str(tmp_path / "m"))


@pytest.mark.parametrize("family_fixture", ["tiny_ov", "tiny_llava"])
def test_the_plain_json_config_tells_the_fingerprint_transformers_does(family_fixture, request):
    """check_model reads a local config.json without transformers; it must find the fingerprint transformers
    finds, and where the file leaves a field to its class default (absent), ask transformers instead of
    skipping the check."""
    from dymu.checkpoint import local_config
    from dymu.families import checkpoint_config

    path = request.getfixturevalue(family_fixture)
    stock = EncoderFingerprint.from_model_config(checkpoint_config(str(path)))
    assert EncoderFingerprint.from_model_config(local_config(str(path))) == stock


def test_a_config_field_left_to_its_default_is_read_through_transformers(tiny_ov, tmp_path):
    """A config.json may leave a field at its class default (absent from the file): the plain JSON reading
    cannot know it, so check_model asks transformers rather than skip the check."""
    config = json.loads((tiny_ov / "config.json").read_text())
    assert config.pop("vision_feature_layer") == -1  # LLaVA-OneVision's default
    (tmp_path / "defaults").mkdir()
    (tmp_path / "defaults" / "config.json").write_text(json.dumps(config))
    (tmp_path / "defaults" / "model.safetensors").symlink_to(tiny_ov / "model.safetensors")
    with pytest.raises(DymuError, match="between 1 and 728"):
        check_model(str(tmp_path / "defaults"), keep=729)


def test_a_device_this_machine_lacks_is_refused():
    import torch

    from dymu.families import check_device

    assert check_device("cpu").type == "cpu"
    with pytest.raises(DymuError, match="CUDA GPU"):
        check_device(f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    with pytest.raises(DymuError, match="unknown device"):
        check_device("banana")


def test_check_writable_changes_nothing(tmp_path):
    existing = tmp_path / "results.jsonl"
    existing.write_bytes(b'{"a": 1}\n{"b": 2')  # no final newline: it must stay exactly so
    before = existing.stat()
    assert check_writable(existing) == existing
    assert existing.read_bytes() == b'{"a": 1}\n{"b": 2' and existing.stat().st_mtime_ns == before.st_mtime_ns
    assert check_writable(tmp_path / "new" / "deeper" / "t.json")
    assert sorted(os.listdir(tmp_path)) == ["results.jsonl"]  # no probe file, no folder left behind


@pytest.mark.parametrize(
    "name, message",
    [("results.jsonl/t.json", "is a file, not a folder"), (".", "is a folder, not a file")],
)
def test_check_writable_refuses(tmp_path, name, message):
    (tmp_path / "results.jsonl").write_text("{}\n")
    with pytest.raises(DymuError, match=message):
        check_writable(tmp_path / name)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_check_writable_refuses_a_read_only_folder(tmp_path):
    os.chmod(tmp_path, 0o500)
    try:
        with pytest.raises(DymuError, match="cannot be written"):
            check_writable(tmp_path / "t.json")
    finally:
        os.chmod(tmp_path, 0o700)


def test_urls_are_named_as_urls(tmp_path):
    with pytest.raises(DymuError, match="^http://127.0.0.1:8000/a.mp4: URLs are not accepted by `dymu-video ask`"):
        reject_url("http://127.0.0.1:8000/a.mp4", "ask")
    reject_url(str(tmp_path / "http:" / "a.mp4"), "ask")  # a local name with a colon is a file
    with pytest.raises(MediaNotFound, match="^rtsp://cam/s: a URL"):  # the Python API says the same
        media_kind("rtsp://cam/s")


def test_the_pixel_limit_is_named_and_can_be_raised(tmp_path, monkeypatch):
    Image.new("RGB", (40, 30)).save(tmp_path / "small.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000")
    with pytest.raises(UnsupportedMedia, match=f"40x30 image .* over the limit .*; set {MAX_PIXELS_ENV}=1200"):
        media_kind(tmp_path / "small.png")
    with pytest.raises(UnsupportedMedia, match="over the limit"):
        load_image(tmp_path / "small.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "1200")
    assert media_kind(tmp_path / "small.png") == "image"
    assert load_image(tmp_path / "small.png").size == (40, 30)


def test_images_over_pillows_own_limit_are_read_when_the_limit_is_raised(tmp_path, monkeypatch):
    Image.new("1", (16000, 12000)).save(tmp_path / "huge.png")  # 192 Mpx, over Pillow's 179 Mpx refusal
    with pytest.raises(UnsupportedMedia, match=f"16000x12000 image .* set {MAX_PIXELS_ENV}=192000000"):
        media_kind(tmp_path / "huge.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "192000000")
    assert media_kind(tmp_path / "huge.png") == "image"  # the header only: nothing is decoded
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's own setting is left as it was


def test_a_checkpoint_folder_without_config_or_weights_says_which(tiny_ov, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DymuError, match=r"empty: the folder has no config.json, so it is not a checkpoint$"):
        check_model(str(tmp_path / "empty"))
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text((tiny_ov / "config.json").read_text())
    with pytest.raises(DymuError, match="bare: the folder has a config.json but no weights"):
        check_model(str(tmp_path / "bare"))
    index = {"weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                            "b.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "bare" / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "bare" / "model-00001-of-00002.safetensors").symlink_to(tiny_ov / "model.safetensors")
    with pytest.raises(DymuError, match=r"names 1 weight file\(s\) the folder does not have \(model-00002-of-00002"):
        check_model(str(tmp_path / "bare"))
    (tmp_path / "bare" / "model-00002-of-00002.safetensors").symlink_to(tiny_ov / "model.safetensors")
    assert check_model(str(tmp_path / "bare")).model_type == "llava_onevision"  # shards all there: sound


def test_nesting_is_limited_in_json_and_yaml_without_recursion():
    deep = "[" * 100_000 + "]" * 100_000  # json.loads and yaml.safe_load raise RecursionError on this
    with pytest.raises(TooDeeplyNested, match="^x.json nests lists or mappings more than 64 levels deep$"):
        parse_json(deep, "x.json")
    with pytest.raises(TooDeeplyNested, match="^x.yaml nests"):
        parse_yaml(f"a: {deep}", "x.yaml")
    at_limit = "[" * MAX_NESTING + "]" * MAX_NESTING
    assert parse_json(at_limit, "x") == json.loads(at_limit)
    with pytest.raises(TooDeeplyNested):  # under Python's recursion limit, but over ours
        parse_json("[" + at_limit + "]", "x")
    with pytest.raises(TooDeeplyNested):
        parse_yaml("\n".join(" " * i + "a:" for i in range(MAX_NESTING + 1)) + " 1", "x")  # block style
    with pytest.raises(TooDeeplyNested):
        parse_yaml("a: &a [*a]", "x")  # a list that holds itself
    # An alias bomb: 2**40 paths through 40 shared lists, each walked once.
    bomb = "l0: &l0 [1]\n" + "".join(f"l{i}: &l{i} [*l{i - 1}, *l{i - 1}]\n" for i in range(1, 41))
    assert len(parse_yaml(bomb, "x")) == 41
    assert check_nesting({"a": [{"b": 1}]}, "x") == {"a": [{"b": 1}]}


def test_a_config_file_too_deeply_nested_is_one_error(tmp_path):
    (tmp_path / "deep.yaml").write_text("prune: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(TooDeeplyNested, match="deep.yaml nests"):
        make_config("mid", tmp_path / "deep.yaml")
    (tmp_path / "deep.json").write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(TooDeeplyNested, match="deep.json nests"):
        Thresholds.load(tmp_path / "deep.json")


def test_a_file_written_atomically_is_whole_or_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    path.write_text("old\n")
    assert write_text_atomic(path, "new\n") == path and path.read_text() == "new\n"
    assert os.listdir(tmp_path) == ["t.json"]  # no temp file left
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # a plain new file's mode, not mkstemp's 0600

    def fail(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        write_text_atomic(path, "half")
    assert path.read_text() == "new\n" and os.listdir(tmp_path) == ["t.json"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_calibrate_out_replaces_only_thresholds_and_only_with_overwrite(tmp_path):
    video = tmp_path / "video.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42 a video")
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"format": "dymu-thresholds", "version": 0}))  # an old version is still ours
    for overwrite in (False, True):
        with pytest.raises(DymuError, match="exists and is not a thresholds file; refusing to replace it"):
            check_thresholds_out(video, overwrite)
    with pytest.raises(DymuError, match="already holds thresholds; pass --overwrite"):
        check_thresholds_out(old, False)
    assert check_thresholds_out(old, True) == old
    assert check_thresholds_out(tmp_path / "new" / "t.json", False) == tmp_path / "new" / "t.json"
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(DymuError, match="not a thresholds file"):  # refused unopened: opening would block
        check_thresholds_out(tmp_path / "fifo", True)
    (tmp_path / "big.json").write_text(json.dumps({"format": "dymu-thresholds", "pad": "x" * (2 << 20)}))
    with pytest.raises(DymuError, match="not a thresholds file"):  # read no further than a thresholds file's size
        check_thresholds_out(tmp_path / "big.json", True)
    assert video.read_bytes() == b"\x00\x00\x00\x18ftypmp42 a video"
    assert sorted(os.listdir(tmp_path)) == ["big.json", "fifo", "old.json", "video.mp4"]


def test_a_cache_folder_that_is_a_file_is_named(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("DYMU_CACHE", str(tmp_path / "a-file"))
    with pytest.raises(DymuError, match=f"^DYMU_CACHE {tmp_path}/a-file is a file, not a folder$"):
        check_cache_dir()
    monkeypatch.setenv("DYMU_CACHE", str(tmp_path / "a-file" / "deeper"))
    with pytest.raises(DymuError, match=f"cannot be made: {tmp_path}/a-file is a file, not a folder$"):
        check_cache_dir()
    monkeypatch.setenv("DYMU_CACHE", str(tmp_path / "new" / "cache"))
    assert check_cache_dir() == tmp_path / "new" / "cache" and not (tmp_path / "new").exists()
