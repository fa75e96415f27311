"""Broken and hostile input against convert, verify and quantize: one clean error, nothing lost,
nothing written outside its place. Each case runs the real `plm-gguf` command in a child process.

The device commands and the sweep have their own files (tests/devices/test_hostile.py,
tests/test_sweep_inputs.py)."""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plm_gguf.fixtures.checkpoint import write_tiny_checkpoint
from plm_gguf.fixtures.gguf_file import write_tiny_plm_gguf

from .conftest import ODD_CONFIG, assert_clean_error, run_cli


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return write_tiny_checkpoint(tmp_path / "ck", ODD_CONFIG)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _convert_fails(tmp_path: Path, ckpt: Path, *needles: str, extra=()) -> None:
    """convert refuses CKPT with one line holding NEEDLES; nothing is written, the input is intact."""
    before = _snapshot(ckpt)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    assert_clean_error(run_cli("convert", ckpt, "--outfile", out / "m.gguf", *extra), *needles)
    assert list(out.iterdir()) == []
    assert _snapshot(ckpt) == before


# ------------------------------------------------------------------ safetensors headers

def _rewrite_header(file: Path, edit) -> None:
    """Apply EDIT to a safetensors file's JSON header, keeping the data bytes as they are."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    header, data = edit(header, data)
    text = json.dumps(header).encode() if isinstance(header, (dict, list)) else header
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _first_two(header: dict) -> tuple[str, str]:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[0], names[1]


def _overlap(header, data):
    a, b = _first_two(header)
    begin, end = header[b]["data_offsets"]
    shift = 2 * (header[a]["data_offsets"][1] - header[a]["data_offsets"][0]) // 3  # into a's bytes
    header[b]["data_offsets"] = [begin - shift, end - shift]
    return header, data


def _negative_begin(header, data):
    a, _ = _first_two(header)
    begin, end = header[a]["data_offsets"]
    header[a]["data_offsets"] = [-8, end]
    return header, data


def _short_span(header, data):
    a, _ = _first_two(header)
    header[a]["shape"] = [header[a]["shape"][0] - 1, *header[a]["shape"][1:]]
    return header, data


def _trailing_bytes(header, data):
    return header, data + b"\0" * 64


def _duplicate_name(header, data):
    a, b = _first_two(header)
    text = json.dumps(header)
    return text.replace(f'"{b}"', f'"{a}"', 1).encode(), data


def _not_an_object(header, data):
    return [1, 2, 3], data


def _string_shape(header, data):
    a, _ = _first_two(header)
    header[a]["shape"] = ["80", 80]
    return header, data


@pytest.mark.parametrize(("edit", "needle"), [
    (_overlap, "overlapping"), (_negative_begin, "begin must be >= 0"), (_short_span, "spans"),
    (_trailing_bytes, "bytes after the last tensor"), (_duplicate_name, "appears twice"),
    (_not_an_object, "not an object"), (_string_shape, "non-negative integers"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_safetensors_header_is_validated_before_use(tmp_path, ckpt, edit, needle):
    _rewrite_header(ckpt / "model.safetensors", edit)
    _convert_fails(tmp_path, ckpt, "model.safetensors", needle)


def test_index_naming_a_shard_outside_the_folder(tmp_path, ckpt):
    outside = tmp_path / "elsewhere.safetensors"
    (ckpt / "model.safetensors").rename(outside)
    header_names = json.loads((outside.read_bytes()[8 : 8 + struct.unpack("<Q", outside.read_bytes()[:8])[0]]))
    weight_map = {name: "../elsewhere.safetensors" for name in header_names if name != "__metadata__"}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _convert_fails(tmp_path, ckpt, "../elsewhere.safetensors", "not a file name")


# ------------------------------------------------------------------ config.json

def _edit_config(ckpt: Path, **values) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config.update(values)
    (ckpt / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("values", "needles"), [
    ({"num_hidden_layers": 1e9}, ("num_hidden_layers", "an integer")),
    ({"num_hidden_layers": 10**9}, ("num_hidden_layers", "1 to 1,024")),
    ({"num_hidden_layers": 2}, ("num_hidden_layers=2", "layers 0..2")),
    ({"hidden_size": "80"}, ("hidden_size", "'80'")),
    ({"vocab_size": True}, ("vocab_size", "an integer")),
    ({"rms_norm_eps": -1}, ("rms_norm_eps", "a number between")),
    ({"qk_rope_head_dim": 5}, ("qk_rope_head_dim", "even")),
    ({"eos_token_id": 10**6}, ("eos_token_id", "a token id")),
], ids=["layers-float", "layers-huge", "layers-disagree", "string-size", "bool-size", "negative-eps", "odd-rope",
        "eos-outside-vocab"])
def test_config_types_ranges_and_agreement(tmp_path, ckpt, values, needles):
    _edit_config(ckpt, **values)
    _convert_fails(tmp_path, ckpt, "config.json" if "layers-disagree" not in str(values) else "", *needles)


def test_huge_layer_count_fails_before_allocating(tmp_path, ckpt):
    """num_hidden_layers 1e9 as an integer under a 1 GiB address-space limit: the range check comes first."""
    _edit_config(ckpt, num_hidden_layers=999_999_999)
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # noqa: E731 - torch maps ~2 GiB
    proc = subprocess.run([sys.executable, "-m", "plm_gguf.cli", "convert", str(ckpt), "--outfile", str(tmp_path / "m.gguf")],
                          capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert "num_hidden_layers" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m.gguf").exists()


def test_config_that_is_not_an_object(tmp_path, ckpt):
    (ckpt / "config.json").write_text("[1, 2]")
    _convert_fails(tmp_path, ckpt, "not an object")


# ------------------------------------------------------------------ tokenizer files

def _edit_tokenizer(ckpt: Path, edit) -> None:
    body = json.loads((ckpt / "tokenizer.json").read_text())
    edit(body)
    (ckpt / "tokenizer.json").write_text(json.dumps(body))


def _duplicate_vocab_id(body):
    vocab = body["model"]["vocab"]
    first, second = list(vocab)[10:12]
    vocab[second] = vocab[first]


def _incomplete_added(body):
    del body["added_tokens"][0]["id"]


def _colliding_added(body):
    body["added_tokens"][0]["id"] = 5  # a byte token's id


def _string_id(body):
    vocab = body["model"]["vocab"]
    vocab[next(iter(vocab))] = "0"


@pytest.mark.parametrize(("edit", "needles"), [
    (_duplicate_vocab_id, ("gives id", "both")), (_incomplete_added, ("incomplete added token",)),
    (_colliding_added, ("gives id 5 to both",)), (_string_id, ("not a token id",)),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_tokenizer_ids_are_unique_and_complete(tmp_path, ckpt, edit, needles):
    _edit_tokenizer(ckpt, edit)
    _convert_fails(tmp_path, ckpt, "tokenizer.json", *needles)


def test_vocab_json_with_duplicate_ids(tmp_path, ckpt):
    vocab = json.loads((ckpt / "tokenizer.json").read_text())["model"]["vocab"]
    first, second = list(vocab)[20:22]
    (ckpt / "vocab.json").write_text(json.dumps({**vocab, second: vocab[first]}))
    _convert_fails(tmp_path, ckpt, "vocab.json", "gives id")


# ------------------------------------------------------------------ GGUF headers

def _patched_gguf(path: Path, old: bytes, new: bytes) -> Path:
    write_tiny_plm_gguf(path)
    raw = path.read_bytes()
    assert raw.count(old) == 1, old
    path.write_bytes(raw.replace(old, new))
    return path


def _str(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


@pytest.mark.parametrize(("make", "needles"), [
    (lambda p: _patched_gguf(p, _str("plm"), _str("xyz")), ("not a PLM GGUF", "architecture xyz")),
    (lambda p: _patched_gguf(p, _str("plm.block_count") + struct.pack("<I", 4),
                             _str("plm.block_count") + struct.pack("<I", 6)), ("plm.block_count", "not an int")),
    (lambda p: p.write_bytes(write_tiny_plm_gguf(p).read_bytes()[:-4096]) and p, ("runs past the end",)),
    (lambda p: p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 10**15)) and p, ("more than the file holds",)),
], ids=["architecture", "key-type", "truncated", "huge-counts"])
def test_gguf_headers_are_checked(tmp_path, make, needles):
    """quantize --type reads a PLM GGUF: every key it reads is type-checked, its data must be in
    the file, its architecture must be plm. Nothing is written."""
    bad = make(tmp_path / "bad.gguf")
    before = bad.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli("quantize", bad, "--type", "q8_0", "--outfile", out / "q.gguf")
    assert_clean_error(result, *needles)
    assert list(out.iterdir()) == [] and bad.read_bytes() == before


def test_gguf_alignment_is_checked(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "odd-align.gguf"
    w = gguf.GGUFWriter(str(path), "plm")
    w.add_custom_alignment(64)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    key = _str("general.alignment") + struct.pack("<I", gguf.GGUFValueType.UINT32)
    path.write_bytes(path.read_bytes().replace(key + struct.pack("<I", 64), key + struct.pack("<I", 24)))
    assert_clean_error(run_cli("quantize", path, "--type", "q8_0", "--outfile", tmp_path / "q.gguf"),
                       "general.alignment", "power of two")
    assert not (tmp_path / "q.gguf").exists()


# ------------------------------------------------------------------ outputs never clobber

@pytest.mark.parametrize("which", ["model.safetensors", "config.json", "tokenizer.json"])
def test_output_that_is_an_input_is_refused_even_with_force(tmp_path, ckpt, which):
    before = _snapshot(ckpt)
    result = run_cli("convert", ckpt, "--outfile", ckpt / which, "--force")
    assert_clean_error(result, "is one of the inputs")
    assert _snapshot(ckpt) == before


def test_output_through_a_link_to_an_input_is_refused(tmp_path, ckpt):
    before = _snapshot(ckpt)
    (tmp_path / "sym.gguf").symlink_to(ckpt / "model.safetensors")
    os.link(ckpt / "config.json", tmp_path / "hard.gguf")
    for target in ("sym.gguf", "hard.gguf"):
        assert_clean_error(run_cli("convert", ckpt, "--outfile", tmp_path / target, "--force"), "is one of the inputs")
    assert _snapshot(ckpt) == before and (tmp_path / "sym.gguf").is_symlink()


def test_output_that_is_not_a_regular_file_is_refused_even_with_force(tmp_path, ckpt):
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    (tmp_path / "null.gguf").symlink_to("/dev/null")
    assert_clean_error(run_cli("convert", ckpt, "--outfile", fifo, "--force"), "not a regular file", "a FIFO")
    assert_clean_error(run_cli("convert", ckpt, "--outfile", tmp_path / "null.gguf", "--force"),
                       "not a regular file", "character device")
    assert Path("/dev/null").is_char_device() and (tmp_path / "null.gguf").is_symlink()
    assert fifo.is_fifo()


def test_two_conversions_to_one_target_cannot_both_succeed(tmp_path):
    from plm_gguf.fixtures.checkpoint import tiny_config

    big = tiny_config(hidden_size=512, num_hidden_layers=8, intermediate_size=2048, num_attention_heads=8,
                      kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, vocab_size=16384)
    ckpt = write_tiny_checkpoint(tmp_path / "big", big)
    out = tmp_path / "out"
    out.mkdir()
    target = out / "m.gguf"
    first = subprocess.Popen([sys.executable, "-m", "plm_gguf.cli", "convert", str(ckpt), "--outtype", "q4_k_m",
                              "--outfile", str(target)], stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (out / ".m.gguf.lock").exists(), first)
    second = run_cli("convert", ckpt, "--outtype", "f32", "--outfile", target, "--force")
    assert_clean_error(second, "another plm-gguf command is writing")
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["m.gguf"]


# ------------------------------------------------------------------ errors from the OS and from bugs

def test_name_too_long(tmp_path, ckpt):
    result = run_cli("convert", ckpt, "--outfile", tmp_path / ("m" * 300 + ".gguf"))
    assert_clean_error(result, "File name too long")
    assert list(tmp_path.iterdir()) == [tmp_path / "ck"]


def test_non_utf8_paths_work(tmp_path):
    ckpt = Path(os.fsdecode(bytes(tmp_path) + b"/ck-\xff\xfe"))
    write_tiny_checkpoint(tmp_path / "ck", ODD_CONFIG).rename(ckpt)
    target = Path(os.fsdecode(bytes(tmp_path) + b"/out-\xe9.gguf"))
    result = run_cli("convert", ckpt, "--outfile", target)
    assert result.code == 0, result.stderr
    assert target.read_bytes()[:4] == b"GGUF"
    assert "\\udce9" in result.stdout or "\\xe9" in result.stdout  # printed escaped, never a crash


def test_write_error_midway_leaves_nothing(tmp_path, ckpt):
    """A file-size limit makes the write fail part way (EFBIG), as a full disk does (ENOSPC)."""
    out = tmp_path / "out"
    out.mkdir()

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))

    proc = subprocess.run([sys.executable, "-m", "plm_gguf.cli", "convert", str(ckpt), "--outtype", "f32",
                           "--outfile", str(out / "m.gguf")], capture_output=True, text=True, preexec_fn=limit)
    assert proc.returncode == 74, proc.stderr
    assert "error: File too large" in proc.stderr and "hint:" in proc.stderr and "Traceback" not in proc.stderr
    assert list(out.iterdir()) == []


_BUG = """
import sys
import plm_gguf.convert.writer as writer
from plm_gguf import cli
def boom(*args, **kwargs):
    raise RuntimeError("an invariant broke")
writer.convert = boom
sys.exit(cli.main(sys.argv[1:]))
"""


def test_unexpected_exception_is_one_line_and_a_saved_traceback(tmp_path, ckpt):
    env = os.environ | {"PLM_GGUF_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", _BUG, "convert", str(ckpt)], capture_output=True, text=True, env=env)
    assert proc.returncode == 70
    assert "Traceback" not in proc.stderr
    error = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert error == ["error: internal error: RuntimeError: an invariant broke"], proc.stderr
    saved = next((tmp_path / "cache" / "logs").glob("crash-*.txt"))
    assert str(saved) in proc.stderr.replace("\n", "") and "an invariant broke" in saved.read_text()
    debug = subprocess.run([sys.executable, "-c", _BUG, "convert", str(ckpt), "--debug"], capture_output=True, text=True,
                           env=env)
    assert debug.returncode == 70 and "Traceback" in debug.stderr and "def boom" not in debug.stdout


# ------------------------------------------------------------------ signals

def _wait_for(condition, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None and time.monotonic() < deadline, "the command ended before the moment came"
        time.sleep(0.05)


def _processes_naming(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _children_of(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return kids


def _partial_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.partial"))


@pytest.mark.slow
@pytest.mark.parametrize("sig,moment", [(signal.SIGTERM, "dry-run"), (signal.SIGHUP, "quantizing")],
                         ids=["SIGTERM-dry-run", "SIGHUP-quantizing"])
def test_sigterm_and_sighup_end_children_and_leave_nothing(tmp_path, big_checkpoint, sig, moment):
    """The signal arrives while llama.cpp's dry run (which picks the tensor types) runs in its
    worker, or while the tensors are being quantized into the .partial: the worker is ended, the
    partial file removed, the exit status is 128 + the signal."""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "plm_gguf.cli", "convert", str(big_checkpoint), "--outtype",
                             "q4_k_m", "--outfile", str(out / "m.gguf")], stderr=subprocess.PIPE, text=True)
    if moment == "dry-run":
        _wait_for(lambda: any(b"--types-out" in Path(f"/proc/{pid}/cmdline").read_bytes()
                              for pid in _children_of(proc.pid)), proc)
        workers = _children_of(proc.pid)
    else:
        _wait_for(lambda: _partial_bytes(out) > 4 << 20, proc)
        workers = []
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr and sig.name in stderr
    assert list(out.iterdir()) == []
    time.sleep(0.5)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "the llama.cpp worker outlived the command"


def test_quantize_onto_its_own_source_is_refused(tmp_path):
    source = write_tiny_plm_gguf(tmp_path / "tiny.gguf")
    before = source.read_bytes()
    assert_clean_error(run_cli("quantize", source, "--type", "q8_0", "--outfile", source, "--force"),
                       "is one of the inputs")
    assert source.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_verify_refuses_a_file_of_another_model_and_a_device(tmp_path, ckpt):
    other = write_tiny_plm_gguf(tmp_path / "other.gguf")
    assert_clean_error(run_cli("verify", ckpt, other), "not a conversion of this checkpoint", "hidden_size 64")
    assert_clean_error(run_cli("verify", ckpt, "/dev/null"), "/dev/null is not a regular file")


@pytest.mark.parametrize("command", ["convert", "verify"])
def test_threads_are_validated(tmp_path, ckpt, command):
    extra = (tmp_path / "x.gguf",) if command == "verify" else ("--outfile", tmp_path / "x.gguf")
    assert_clean_error(run_cli(command, ckpt, *extra, "--threads", "0"), "--threads 0 is out of range")
    assert not (tmp_path / "x.gguf").exists()
