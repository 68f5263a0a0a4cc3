"""Adapters for frameworks: :mod:`fastattn.integrations.transformers` (Hugging Face transformers).

Each adapter imports its framework lazily, on import of its own module only.
"""
