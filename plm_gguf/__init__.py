"""plm-gguf: PLM checkpoints to verified GGUF files, quantization sweeps and device deployment."""

__version__ = "0.1.0"
