"""Video files (PyAV, the `video` extra): clips written with PyAV in tmp, decoded and sampled as GLM-4.1V's and
GLM-4.6V's processors do (frame indices equal to transformers' samplers, decoded frames equal to transformers' PyAV
reader), the GLM-4.6V timestamps in the prompt, and the server taking a video file as a data: URI and as a local path
(and a 400 naming PyAV when it is not installed)."""

from __future__ import annotations

import base64
import fractions
import sys
from types import SimpleNamespace

import numpy as np
import openai
import pytest

from glm4.media.image import MediaError, VisionSpec
from glm4.media.prompt import expand_placeholders
from glm4.media.video import load_video, preprocess_videos, sample_frame_indices, sample_frame_indices_glm46v

av = pytest.importorskip("av")


def write_clip(path, n: int, fps: float, w: int = 64, h: int = 48, codec: str = "ffv1"):
    """n frames; frame i is a flat colour whose red channel is i % 256 (exact with the lossless ffv1)."""
    container = "mkv" if codec == "ffv1" else "mp4"
    path = path.with_suffix("." + container)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = w, h
        stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        for i in range(n):
            arr = np.zeros((h, w, 3), np.uint8)
            arr[..., 0], arr[..., 1], arr[..., 2] = i % 256, (7 * i) % 256, 200
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


# ---- sampling ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("total,fps,duration", [
    (100, 30.0, None), (50, 10.0, 5.0), (7, 25.0, None), (1, 30.0, None), (900, 30.0, 30.0), (2000, 25.0, 80.0),
    (9000, 24.0, 375.0), (72000, 24.0, 3000.0), (61, 2.0, 30.5),
])
def test_glm46v_sampler_matches_transformers(total, fps, duration):
    from transformers.video_utils import VideoMetadata

    meta = VideoMetadata(total_num_frames=total, fps=fps, duration=duration)
    ref = _hf_glm46v_sample_frames()(SimpleNamespace(temporal_patch_size=2), meta)
    assert sample_frame_indices_glm46v(total, fps, duration) == ref.tolist()


def _hf_glm46v_sample_frames():
    """transformers' Glm46VVideoProcessor.sample_frames, compiled from its source file on its own: the module
    imports torchvision, whose CPU wheel does not load here, and the method needs nothing of it."""
    import ast
    from pathlib import Path

    transformers = pytest.importorskip("transformers")
    path = Path(transformers.__file__).parent / "models" / "glm46v" / "video_processing_glm46v.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "sample_frames")
    ns = {"np": np, "VideoMetadata": object}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), ns)
    return ns["sample_frames"]


def test_glm46v_differs_from_glm41v_where_it_should():
    # a 20 s clip at 30 fps: GLM-4.1V takes 2 frames per second, GLM-4.6V 3 pairs per second
    assert len(sample_frame_indices(600, 30.0, 2.0, 300.0, 20.0)) == 40
    assert len(sample_frame_indices_glm46v(600, 30.0, 20.0)) == 120


# ---- decoding ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["glm4v", "glm46v"])
def test_load_video_picks_the_sampled_frames(tmp_path, sampler):
    path = write_clip(tmp_path / "clip", 50, 10.0)  # 5 s at 10 fps, frame count not in the mkv header
    video = load_video(path, sampler=sampler)
    want = sample_frame_indices(50, 10.0, 2.0, 300.0, 5.0) if sampler == "glm4v" else sample_frame_indices_glm46v(50, 10.0, 5.0)
    assert [f.getpixel((0, 0))[0] for f in video.frames] == want  # each frame's red value is its index
    assert video.timestamps == pytest.approx([i / 10.0 for i in want])
    assert video.frames[0].size == (64, 48) and video.frames[0].mode == "RGB"


@pytest.mark.parametrize("sampler", ["glm4v", "glm46v"])
def test_frames_equal_transformers_pyav_reader(tmp_path, sampler):
    pytest.importorskip("transformers")
    from transformers.video_utils import load_video as hf_load_video

    path = write_clip(tmp_path / "clip", 37, 12.0, codec="mpeg4")  # lossy; both readers share the decoder
    indices = []

    def pick(metadata, **_):
        fn = sample_frame_indices_glm46v if sampler == "glm46v" else (
            lambda n, f, d: sample_frame_indices(n, f, 2.0, 300.0, d))
        indices[:] = fn(metadata.total_num_frames, metadata.fps, metadata.duration)
        return np.array(indices)

    ref, meta = hf_load_video(str(path), backend="pyav", sample_indices_fn=pick)
    video = load_video(path, sampler=sampler)
    assert len(video.frames) == len(indices) == len(ref)
    assert all(np.array_equal(np.asarray(f), r) for f, r in zip(video.frames, ref))
    assert video.timestamps == pytest.approx(meta.timestamps)


def test_bad_video_files_are_media_errors(tmp_path):
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 10)
    with pytest.raises(MediaError, match="not a readable video"):
        load_video(tmp_path / "junk.mp4")
    with pytest.raises(MediaError, match="not a readable video"):
        load_video(tmp_path / "missing.mp4")
    with pytest.raises(MediaError, match="over the limit of 4"):
        load_video(write_clip(tmp_path / "clip", 50, 10.0), max_frames=4)


def test_missing_pyav_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av -> ImportError
    with pytest.raises(MediaError, match=r"needs PyAV \(pip install 'glm4\[video\]'"):
        load_video(tmp_path / "clip.mp4")


# ---- GLM-4.6V's timestamps in the prompt --------------------------------------------------------------------------

def test_glm46v_spec_and_timestamp_text(tmp_path):
    spec = VisionSpec.from_config({"image_processor_type": "Glm46VImageProcessor"},
                                  {"video_processor_type": "Glm46VVideoProcessor", "fps": 2})
    assert spec.video_sampler == "glm46v" and VisionSpec.from_config({}, {}).video_sampler == "glm4v"
    assert spec.timestamp_text(1.5) == "1.5 seconds" and VisionSpec().timestamp_text(1.5) == "1"
    video = load_video(write_clip(tmp_path / "clip", 30, 10.0), sampler="glm46v")
    v = preprocess_videos([video], spec)
    text = expand_placeholders("<|video|>", (), v["video_grid_thw"], v["video_timestamps"], 2, spec.timestamp_text)
    stamps = v["video_timestamps"][0]
    assert text.count("<|begin_of_image|>") == v["video_grid_thw"][0][0] == len(stamps)
    assert text.endswith(f"<|end_of_image|>{stamps[-1]:.1f} seconds") and "0.0 seconds" in text


def test_glm46v_processor_text_matches_transformers():
    pytest.importorskip("transformers")
    from transformers.models.glm46v.processing_glm46v import Glm46VProcessor

    spec = VisionSpec(video_sampler="glm46v")
    fake = SimpleNamespace(image_token="<|image|>")
    for t in (0.0, 0.25, 1.5, 12.96):
        ref = Glm46VProcessor.replace_frame_token_id(fake, t, num_image_tokens=2)
        assert expand_placeholders("<|video|>", (), [(1, 2, 4)], [[t]], 2, spec.timestamp_text) == ref


# ---- the server ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("transformers")
    from test_serve_util import ServerThread
    from vision_checkpoint import write_checkpoint

    from glm4.serve.app import build_state, create_app

    tmp = tmp_path_factory.mktemp("video")
    st = build_state(str(write_checkpoint(tmp / "glm4v")), model_name="m", kv_cache_tokens=4096,
                     media={"allowed_local_path": str(tmp)})
    srv = ServerThread(create_app(st)).start()
    yield tmp, openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
    srv.stop()


def _ask(client, url: str):
    msgs = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": "What happens?"}]}]
    return client.chat.completions.create(model="m", messages=msgs, max_tokens=4, temperature=0)


def test_server_takes_a_video_as_data_uri_and_as_local_path(served):
    tmp, client = served
    path = write_clip(tmp / "clip", 20, 10.0, w=56, h=56)
    uri = "data:video/x-matroska;base64," + base64.b64encode(path.read_bytes()).decode()
    by_data, by_path = _ask(client, uri), _ask(client, str(path))
    for r in (by_data, by_path):
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0
    assert by_data.usage.prompt_tokens == by_path.usage.prompt_tokens
    assert by_data.choices[0].message.content == by_path.choices[0].message.content


def test_server_400s_for_videos(served, monkeypatch):
    tmp, client = served
    with pytest.raises(openai.BadRequestError, match="not a readable video"):
        _ask(client, "data:video/mp4;base64," + base64.b64encode(b"garbage" * 20).decode())
    path = write_clip(tmp / "clip2", 10, 10.0)
    monkeypatch.setitem(sys.modules, "av", None)  # the server runs in this process: PyAV gone
    with pytest.raises(openai.BadRequestError, match="needs PyAV"):
        _ask(client, str(path))
