"""Frame decoding: sampling, timestamps, decord/PyAV agreement, and one clear error per kind of bad input."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dymu.errors import DymuError
from dymu.frames import (
    CorruptMedia,
    MediaNotFound,
    NoFramesSampled,
    NoVideoStream,
    UnsupportedMedia,
    is_image_path,
    is_video_path,
    load_image,
    media_kind,
    read_video_frames,
    sample_indices,
)
from tests import media


@pytest.fixture(scope="module")
def counter(tmp_path_factory):
    """24 frames at 8 fps; frame i is flat grey 10*i, so a decoded frame tells which one it is."""
    return media.counter_video(tmp_path_factory.mktemp("frames") / "counter.mp4", num_frames=24, fps=8.0)


def _source_index(frames: np.ndarray) -> list[int]:
    return [int(round(float(f.mean()) / 10)) for f in frames]


@pytest.mark.parametrize("num_frames", [1, 5, 8, 24])
def test_uniform_sampling(counter, num_frames):
    video = read_video_frames(counter, num_frames=num_frames)
    assert video.frames.shape == (num_frames, 64, 64, 3) and video.frames.dtype == np.uint8
    assert video.total_frames == 24 and video.source_fps == pytest.approx(8.0)
    assert video.duration == pytest.approx(3.0)
    assert video.indices[0] == 0 and (num_frames == 1 or video.indices[-1] == 23)
    assert _source_index(video.frames) == video.indices  # the frames really are the ones it says
    ts = np.asarray(video.timestamps)
    assert len(ts) == num_frames and np.all(np.diff(ts) > 0) and 0.0 <= ts[0] and ts[-1] < video.duration
    assert ts == pytest.approx(np.asarray(video.indices) / 8.0)


def test_more_frames_than_the_video_has(counter):
    video = read_video_frames(counter, num_frames=100)
    assert video.indices == list(range(24))


def test_fps_sampling(counter):
    video = read_video_frames(counter, fps=2.0)
    assert video.indices == [0, 4, 8, 12, 16, 20]
    assert video.timestamps == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    assert _source_index(video.frames) == video.indices
    capped = read_video_frames(counter, fps=8.0, max_frames=4)
    assert capped.num_frames == 4 and capped.indices[0] == 0 and capped.indices[-1] == 23


def test_sample_indices_edge_cases():
    assert sample_indices(0, 8.0, 8).tolist() == []
    assert sample_indices(10, 8.0, None).tolist() == list(range(10))
    assert sample_indices(10, 8.0, None, max_frames=3).tolist() == [0, 4, 9]
    assert sample_indices(3, 8.0, fps=100.0).tolist() == [0, 1, 2]  # never beyond the last frame


@pytest.mark.parametrize("fps", [1e5, 1e9, 1e300])
def test_sampling_a_huge_fps_never_lists_more_than_max_frames(fps):
    import tracemalloc

    tracemalloc.start()  # numpy reports its allocations to tracemalloc
    try:
        indices = sample_indices(3000, 30.0, fps=fps, max_frames=32)  # 100 s of video
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 10  # a few arrays of 32 indices, not one of fps * 100 sample times
    assert len(indices) == 32 and indices[0] == 0 and indices[-1] == 2999
    assert np.all(np.diff(indices) > 0)
    assert sample_indices(3000, 30.0, fps=fps, max_frames=32).tolist() == sample_indices(
        3000, 30.0, None, max_frames=32).tolist()  # faster than the video: every frame, thinned alike


def test_decord_and_pyav_agree(tmp_path):
    path = media.changing_video(tmp_path / "changing.mp4", num_frames=10, seed=3)
    fast = read_video_frames(path, num_frames=4)
    slow = read_video_frames(path, num_frames=4, backend="av")
    assert (fast.backend, slow.backend) == ("decord", "av")
    assert fast.indices == slow.indices and fast.total_frames == slow.total_frames == 10
    assert fast.timestamps == pytest.approx(slow.timestamps)
    diff = np.abs(fast.frames.astype(np.int16) - slow.frames.astype(np.int16))
    assert diff.mean() < 1.0 and diff.max() <= 8  # two FFmpeg builds, colour conversion may round apart


def test_pyav_reads_what_decord_cannot_open(tmp_path):
    # decord refuses animated GIFs ("broken metadata"); PyAV decodes them, counting frames from packets.
    images = [Image.fromarray(media.textured_frame(64, seed=i)) for i in range(5)]
    gif = tmp_path / "anim.gif"
    images[0].save(gif, save_all=True, append_images=images[1:], duration=100, loop=0)
    assert media_kind(gif) == "video"
    video = read_video_frames(gif, num_frames=3)
    assert video.backend == "av" and video.indices == [0, 2, 4] and video.total_frames == 5
    assert video.timestamps == pytest.approx([0.0, 0.2, 0.4])


def test_decoded_video_keeps_its_content(tmp_path):
    path = media.static_video(tmp_path / "static.mp4", num_frames=3, noise=0.0)
    video = read_video_frames(path, num_frames=3)
    source = media.textured_frame(64, seed=0).astype(np.float32)
    assert np.abs(video.frames.astype(np.float32) - source).mean() < 8  # yuv420p chroma subsampling


def test_images(tmp_path):
    textured = media.textured_image(tmp_path / "photo.png")
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (32, 16), (10, 20, 30, 128)).save(rgba)
    image = load_image(textured)
    assert image.mode == "RGB" and image.size == (64, 64)
    assert load_image(rgba).mode == "RGB" and load_image(rgba).size == (32, 16)
    disguised = tmp_path / "photo.mp4"  # content, not the extension, decides
    disguised.write_bytes(textured.read_bytes())
    assert is_image_path(disguised) and not is_video_path(disguised) and media_kind(disguised) == "image"
    video = media.flat_video(tmp_path / "clip.jpg", num_frames=2)
    assert is_video_path(video) and not is_image_path(video)


def test_missing_file(tmp_path):
    with pytest.raises(MediaNotFound, match="nope.mp4"):
        read_video_frames(tmp_path / "nope.mp4")
    with pytest.raises(MediaNotFound, match="nope.png"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(MediaNotFound):
        read_video_frames(tmp_path)  # a directory
    assert not is_video_path(tmp_path / "nope.mp4") and not is_image_path(tmp_path / "nope.mp4")


def test_not_media(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("this is not a video\n" * 20)
    with pytest.raises(UnsupportedMedia, match="notes.txt: neither an image nor a video"):
        read_video_frames(text)
    with pytest.raises(UnsupportedMedia, match="notes.txt"):
        load_image(text)
    image = media.flat_image(tmp_path / "flat.png")
    with pytest.raises(UnsupportedMedia, match="is an image, not a video"):
        read_video_frames(image)
    video = media.flat_video(tmp_path / "flat.mp4", num_frames=2)
    with pytest.raises(UnsupportedMedia, match="is a video, not an image"):
        load_image(video)


def test_truncated_mp4(tmp_path):
    # The encoder writes the index (moov) at the end, so the cut file does not even open.
    src = media.changing_video(tmp_path / "full.mp4", num_frames=8)
    cut = media.truncated_copy(src, tmp_path / "cut.mp4")
    with pytest.raises(CorruptMedia, match="cut.mp4: truncated or corrupt video"):
        read_video_frames(cut)
    with pytest.raises(CorruptMedia):
        read_video_frames(media.truncated_copy(src, tmp_path / "cut.bin", fraction=0.3))  # by signature
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(CorruptMedia, match="empty file"):
        read_video_frames(empty)


def test_truncated_faststart_mp4(tmp_path):
    # Index at the front: the file opens and decord gives up, then PyAV runs into the missing data.
    frames = np.stack([media.textured_frame(64, seed=i) for i in range(16)])
    src = media.write_video(tmp_path / "full.mp4", frames, faststart=True)
    cut = media.truncated_copy(src, tmp_path / "cut.mp4")
    with pytest.raises(CorruptMedia, match="cut.mp4: truncated or corrupt video"):
        read_video_frames(cut)
    with pytest.raises(CorruptMedia):
        read_video_frames(cut, backend="av")


def test_truncated_image(tmp_path):
    src = media.textured_image(tmp_path / "photo.png")
    with pytest.raises(CorruptMedia, match="cut.png: truncated or corrupt image"):
        load_image(media.truncated_copy(src, tmp_path / "cut.png"))


@pytest.mark.parametrize("name", ["tone.m4a", "tone.wav"])
def test_audio_only(tmp_path, name):
    path = media.audio_only_file(tmp_path / name)
    with pytest.raises(NoVideoStream, match=f"{name}: no video stream .*audio"):
        read_video_frames(path)
    assert not is_video_path(path) and not is_image_path(path)


def test_zero_frames(counter, tmp_path):
    with pytest.raises(NoFramesSampled, match="num_frames=0"):
        read_video_frames(counter, num_frames=0)
    with pytest.raises(NoFramesSampled):
        read_video_frames(counter, num_frames=None, max_frames=0)
    with pytest.raises(NoFramesSampled):
        read_video_frames(counter, fps=0.0)
    # A container closed before its first frame has no usable video stream at all.
    with pytest.raises(NoVideoStream, match="empty_video.mp4"):
        read_video_frames(media.empty_video(tmp_path / "empty_video.mp4"))


def test_errors_are_one_line_dymu_errors(tmp_path):
    for make in (lambda: read_video_frames(tmp_path / "x.mp4"), lambda: load_image(tmp_path / "x.png")):
        with pytest.raises(DymuError) as info:
            make()
        assert "\n" not in str(info.value)
