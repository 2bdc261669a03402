"""The database migrations and wire-format JSON Schemas, shipped as the package ``ingest.schemas``.

pyproject.toml maps this directory into the wheel (package-dir), so ``migrations/*.sql`` and ``json/*.json``
are package data found with ``importlib.resources.files("ingest.schemas")``. This file holds no code: it
exists because setuptools' editable install can map only a regular package (one with ``__init__.py``) that
lives outside its parent's directory; without it the editable import of ``ingest.schemas`` fails.
"""
