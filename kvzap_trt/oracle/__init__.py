"""Oracles for what a model needs of its KV cache (KVzip+), the targets KVzap's surrogates learn."""
