"""``python -m torchserve_cam_cli``: the same as the ``torchserve-cam`` console script."""

from .main import entry_point

entry_point()
