"""A tiny CLIP that loads like a real one: random weights, byte-level tokenizer, ``save_pretrained`` layout.

Built offline (no hub): :func:`save_tiny_clip` writes ``CLIPModel`` + ``CLIPProcessor`` into a directory;
:func:`session_tiny_clip` builds one per process (for the session's TorchServe archive), removed at exit.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_tiny_clip", "session_tiny_clip", "tiny_tokenizer", "TINY_VISION", "VIT_B16_VISION"]

#: the tiny vision tower of /work/shared/FACTS.md: 16x16 patches of 14 px at 224
TINY_VISION: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=224, patch_size=14
)
#: the vision tower of ViT-B/16 (CLIP ViT-B/16): 14x14 patches of 16 px at 224
VIT_B16_VISION: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=16
)


def tiny_tokenizer():
    """A byte-level CLIPTokenizer without merges: every prompt tokenises (one token per byte)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def save_tiny_clip(directory: Path, vision: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """Write a random-init CLIP (text tower: hidden 64, 2 layers) and its processor to ``directory``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    vision = dict(TINY_VISION if vision is None else vision)
    side = vision["image_size"]
    tokenizer = tiny_tokenizer()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=tokenizer,
    )
    config = CLIPConfig(
        text_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            vocab_size=len(tokenizer.get_vocab()), max_position_embeddings=77,
            bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=vision,
        projection_dim=32,
    )  # fmt: skip
    torch.manual_seed(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    CLIPModel(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@functools.cache
def session_tiny_clip() -> Path:
    """The tiny CLIP directory of this process, built on first use and removed at exit."""
    root = Path(tempfile.mkdtemp(prefix="tiny-clip-"))
    atexit.register(shutil.rmtree, root, True)
    return save_tiny_clip(root / "clip")
