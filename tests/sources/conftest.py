"""The trace-source tests use the optional-runtime fixtures of tests/conftest.py
(`llama_cpp_installed`, `hf_installed`: skipped locally, required under CI)."""
