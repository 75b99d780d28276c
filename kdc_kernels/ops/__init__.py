"""One folder per op: ``api.py`` (validation, impl choice), ``reference.py`` (the oracle),
``_triton.py`` / ``_cuda.py`` (fast paths)."""
