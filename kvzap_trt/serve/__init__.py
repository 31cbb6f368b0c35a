"""Serving over Triton Inference Server: protocol, engine loop, Python-backend models, repository, launcher."""
