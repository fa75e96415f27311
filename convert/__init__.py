"""Checkpoint -> GGUF: the streaming writer, the verifier and their commands."""
