"""Speed and memory benchmarks of plm-gguf against llama.cpp's own tools (not part of the tests)."""
