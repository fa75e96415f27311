"""The sweep's table reads at 80 columns: no column cut to an ellipsis, no line wider than the terminal."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from plm_gguf.quant_eval.report import table


def _row(name: str, mib: float, kl: float, **extra) -> dict:
    return {"recipe": name, "status": "ok", "bpw": 4.87, "file_bytes": int(mib * 2**20), "kl_mean": kl,
            "kl_p99": kl * 9, "top1": 0.912, "ppl_ratio": 1.0123, "memory_mib": 1234.0, "prompt_tps": 12345.0,
            "gen_tps": 412.3, "imatrix": True, "overrides": {}, **extra}


REPORT = {
    "source": "/somewhere/long/path/trained-plm", "ctx": 256, "text": "built-in corpus",
    "recommendation": {"recipe": "q4_k_s+mla6"},
    "rows": {
        "q8_0": _row("q8_0", 5.2, 0.0012),
        "q4_k_s+mla6": _row("q4_k_s+mla6", 3.08, 0.0588),
        "q4_k_m": _row("q4_k_m", 3.08, 0.0657),
        "iq2_xxs+mla-q8": {"recipe": "iq2_xxs+mla-q8", "status": "failed",
                           "reason": "llama.cpp failed during quantize: this type needs an importance matrix"},
    },
}


@pytest.mark.parametrize("width", [80, 100, 160])
def test_table_is_readable_at_the_terminals_width(width):
    out = io.StringIO()
    Console(file=out, width=width, highlight=False, color_system=None).print(table(REPORT, width))
    text = out.getvalue()
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= width, text
    for header in ("recipe", "MiB", "KL mean", "top-1", "PPL ×", "mem MiB", "tg t/s"):
        assert header in text, text
    assert "q4_k_s+mla6 ★ ◆" in text and "0.0588" in text and "12,345" in text
    assert ("KL p99" in text) == (width >= 110)
    assert "needs an" in text  # a failed recipe's reason is shown, not cut
