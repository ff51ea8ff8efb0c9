"""Why a build failed: :class:`BuildError` with a structured ``reason`` that each CLI words itself."""

from __future__ import annotations

from handlers.config import ConfigError

__all__ = ["REASONS", "BuildError", "ConfigBuildError"]

#: why a build failed (``BuildError.reason``): each CLI words the fix for its own flags
REASONS = ("no_config", "no_weights", "weights", "labels", "config", "check", "files", "archiver")


class BuildError(RuntimeError):
    """The archive cannot be built; ``reason`` (one of :data:`REASONS`) says why, the message is one line.

    ``str(error)`` words the fix for ``python -m model_store.build``; another CLI (the gallery) words
    its own from ``reason``."""

    def __init__(self, message: str, reason: str = "config") -> None:
        super().__init__(message)
        self.reason = reason

    @classmethod
    def of(cls, error: Exception, name: str, reason: str = "config") -> BuildError:
        """``error`` as a build error of model ``name``; a ConfigError stays one (:class:`ConfigBuildError`)."""
        message = f"{name}: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}"
        if isinstance(error, ConfigError):
            labels = str(error).startswith("handler.labels")
            weights = str(error).startswith(("handler.weights", "handler.model_file"))
            return ConfigBuildError(message, "labels" if labels else "weights" if weights else reason)
        return cls(message, reason)


class ConfigBuildError(BuildError, ConfigError):
    """A build error caused by the config (also a :class:`ConfigError`, as the handler raises it)."""


