"""Helpers the tests share: independent dumps from real runtimes and GGUF surgery."""
