"""The ``torchserve-cam`` command line: a client for the served models and an offline method gallery.

- :mod:`torchserve_cam_cli.client`: HTTP client (tokens, concurrency, server errors), no torch import;
- :mod:`torchserve_cam_cli.gallery`: every cam_engine method on one image, as one labelled grid
  (:mod:`torchserve_cam_cli.gallery_render` draws it);
- :mod:`torchserve_cam_cli.main`: the argument parser and the ``predict`` / ``explain`` commands.
"""

__all__ = ["main"]


def main(argv=None) -> int:
    """Run the CLI with ``argv``; returns the exit code (see :func:`torchserve_cam_cli.main.main`)."""
    from .main import main as _main

    return _main(argv)
