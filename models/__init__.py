"""Reference models for onnxlr, built reproducibly into a local cache (``.cache/models/<name>/``).

CLI: ``python -m models build NAME [--cache DIR] [--force]`` and ``python -m models list``.
API: ``models.build(name, cache=None, force=False)`` returns the model's folder.

Heavy libraries (torch, transformers) are imported only by the builder that needs them.
"""

from models.cache import ALL, BUILDERS, build, cache_root, model_dir, read_manifest

__all__ = ["ALL", "BUILDERS", "build", "cache_root", "model_dir", "read_manifest"]
