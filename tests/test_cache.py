"""The cache layer: safe storage (no code runs on load), keys that do not collide, atomic writes,
damaged and foreign files, killed writers, read-only folders, fingerprints that follow the weights."""

from __future__ import annotations

import io
import os
import pickle
import stat
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import mechlens as ml
from mechlens.cache import (
    DiskCache,
    atomic_folder,
    atomic_write_text,
    model_fingerprint,
    remove_stale_temporaries,
    stable_hash,
)


def test_disk_cache_resumes_and_keys(tmp_path):
    cache = DiskCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.arange(3)}

    a = cache.cached("step", compute, n=1)
    b = cache.cached("step", compute, n=1)
    c = cache.cached("step", compute, n=2)
    assert len(calls) == 2 and torch.equal(a["x"], b["x"]) and c is not None
    assert not list(tmp_path.rglob(".*"))  # no temporary files left behind


def test_values_round_trip(tmp_path):
    cache = DiskCache(tmp_path)
    value = {
        "tensor": torch.randn(2, 3, dtype=torch.float64),
        "bf16": torch.ones(2, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "array": np.arange(6, dtype=np.int16).reshape(2, 3),
        "floats": [1.5, float("nan"), float("inf"), -0.0],
        "tuple": (1, "a", None),
        "int_keys": {1: "one", (2, 3): "pair"},
        "nested": [{"text": "é ✓ \u202e"}, [True, False]],
        "none": None,
    }
    cache.put("v", {"k": 1}, value)
    got = cache.get("v", {"k": 1})
    assert torch.equal(got["tensor"], value["tensor"]) and got["tensor"].dtype == torch.float64
    assert got["bf16"].dtype == torch.bfloat16 and got["empty"].shape == (0, 4)
    assert np.array_equal(got["array"], value["array"]) and got["array"].dtype == np.int16
    assert got["floats"][0] == 1.5 and np.isnan(got["floats"][1]) and got["floats"][2] == float("inf")
    assert got["tuple"] == (1, "a", None) and got["int_keys"] == {1: "one", (2, 3): "pair"}
    assert got["nested"] == value["nested"] and got["none"] is None


def test_none_is_cached_like_any_value(tmp_path):
    cache = DiskCache(tmp_path)
    calls = []
    for _ in range(3):
        assert cache.cached("s", lambda: calls.append(1), k=1) is None
    assert len(calls) == 1


def test_unstorable_value_raises_type_error(tmp_path):
    with pytest.raises(TypeError, match="cannot store a builtin_function"):
        DiskCache(tmp_path).put("s", {}, {"f": len})


def test_planted_pickle_runs_no_code(tmp_path):
    """A file planted where an entry would be (a pickle whose load runs a command) is never unpickled."""
    cache = DiskCache(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = cache.path("step", {"n": 1})
    path.parent.mkdir(parents=True)
    buffer = io.BytesIO()
    torch.save({"x": Evil()}, buffer)
    path.write_bytes(buffer.getvalue())
    with pytest.warns(UserWarning, match=str(path)):
        value = cache.cached("step", lambda: "recomputed", n=1)
    assert value == "recomputed" and not marker.exists()
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.warns(UserWarning, match="not a safetensors file"):
        assert cache.get("step", {"n": 1}) is None
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_damaged_files_are_named_and_recomputed(tmp_path, damage):
    cache = DiskCache(tmp_path)
    cache.put("step", {"n": 1}, {"x": torch.arange(100)})
    path = cache.path("step", {"n": 1})
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": os.urandom(300)}[damage])
    with pytest.warns(UserWarning, match=f"ignoring cache file {path}"):
        value = cache.cached("step", lambda: "fresh", n=1)
    assert value == "fresh"
    assert cache.get("step", {"n": 1}) == "fresh"  # the damaged file was replaced


def test_foreign_entry_under_another_name_is_rejected(tmp_path):
    """An entry copied over another key's file (same format, other key) is not returned."""
    cache = DiskCache(tmp_path)
    cache.put("step", {"n": 1}, "one")
    cache.put("step", {"n": 2}, "two")
    cache.path("step", {"n": 2}).write_bytes(cache.path("step", {"n": 1}).read_bytes())
    with pytest.warns(UserWarning, match="another key"):
        assert cache.get("step", {"n": 2}) is None


def test_entries_are_owner_only(tmp_path):
    cache = DiskCache(tmp_path)
    cache.put("step", {"n": 1}, 1)
    mode = stat.S_IMODE(cache.path("step", {"n": 1}).stat().st_mode)
    assert mode == 0o600


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_cache_keeps_the_result_and_warns(tmp_path):
    (tmp_path / "step").mkdir()
    os.chmod(tmp_path / "step", 0o500)
    try:
        with pytest.warns(UserWarning, match="could not write cache file"):
            assert DiskCache(tmp_path).cached("step", lambda: 42, n=1) == 42
    finally:
        os.chmod(tmp_path / "step", 0o700)


def test_unwritable_cache_keeps_the_result_and_warns(tmp_path):
    """Also as root: a cache 'folder' that is a file cannot be written."""
    blocker = tmp_path / "step"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="could not write cache file"):
        assert DiskCache(tmp_path).cached("step", lambda: 42, n=1) == 42


def test_killed_writer_leaves_nothing_readable_and_is_cleaned(tmp_path):
    """A writer killed mid-write leaves a temporary file that is never read and is removed later."""
    code = (
        "import os, sys, mechlens.cache as c\n"
        "real = os.replace\n"
        "def die(*a): os._exit(9)\n"
        "os.replace = die\n"
        f"c.DiskCache({str(tmp_path)!r}).put('step', {{'n': 1}}, 'value')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == 9
    leftovers = list((tmp_path / "step").glob(".*.tmp-*"))
    assert len(leftovers) == 1
    cache = DiskCache(tmp_path)
    assert cache.get("step", {"n": 1}) is None
    cache.put("step", {"n": 2}, "other")  # the next write in that folder cleans up
    assert not list((tmp_path / "step").glob(".*.tmp-*"))
    assert remove_stale_temporaries(tmp_path / "step") == 0


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    atomic_write_text(path, "old")

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", broken)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_atomic_folder_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("crash")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# ---------------------------------------------------------------- keys
def test_stable_hash_is_order_free_and_tensor_aware():
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})
    assert stable_hash(torch.ones(3)) != stable_hash(torch.zeros(3))


def test_tensor_keys_cover_dtype_and_shape():
    keys = [torch.zeros(4), torch.zeros(2, 2), torch.zeros(16, dtype=torch.uint8), torch.zeros(4).double()]
    assert len({stable_hash(k) for k in keys}) == len(keys)


def test_large_arrays_differing_in_the_middle_differ():
    a = np.zeros(100_000)
    b = a.copy()
    b[50_000] = 1
    assert stable_hash(a) != stable_hash(b)
    assert stable_hash(a) != stable_hash(a.astype(np.float32))


def test_key_types_are_kept():
    assert stable_hash({1: "x"}) != stable_hash({"1": "x"})
    assert stable_hash([1, 2]) != stable_hash((1, 2))
    assert stable_hash(1) != stable_hash(1.0) != stable_hash(True)
    assert stable_hash(["ab", "c"]) != stable_hash(["a", "bc"])


def test_sets_hash_the_same_in_every_process():
    code = "from mechlens.cache import stable_hash; print(stable_hash({'b', 'a', 'c', 1, (2, 3)}))"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": s},
        ).stdout
        for s in ("1", "2", "3")
    }
    assert len(outs) == 1


@pytest.mark.parametrize("bad", [lambda: 0, object(), len])
def test_unhashable_keys_are_rejected(bad):
    with pytest.raises(TypeError, match="cannot hash"):
        stable_hash({"f": bad})


def test_fingerprint_follows_the_weights():
    """Cached results of the old weights are not returned after a fine-tune."""
    from mechlens.ops.finetune import finetune

    model = ml.load_model("tiny-llama")
    before = model_fingerprint(model)
    assert model_fingerprint(model) == before
    finetune(model, ["Q: hi\nA:"], [" hello"], train_layers=1, epochs=1, progress=False)
    assert model_fingerprint(model)["weights_sha256"] != before["weights_sha256"]
    with torch.no_grad():
        next(model.hf_model.parameters()).add_(1.0)
    third = model_fingerprint(model)
    assert third["weights_sha256"] not in (before["weights_sha256"],)


def test_collect_activations_cache_is_invalidated_by_finetune(tmp_path):
    from mechlens.ops.finetune import finetune
    from mechlens.ops.probes import collect_activations

    model = ml.load_model("tiny-llama")
    old = collect_activations(model, ["a b c"], layers=[2], cache=tmp_path, progress=False)
    finetune(model, ["a b"], [" c"], train_layers=1, epochs=2, lr=1e-2, progress=False)
    fresh = collect_activations(model, ["a b c"], layers=[2], progress=False)
    cached = collect_activations(model, ["a b c"], layers=[2], cache=tmp_path, progress=False)
    assert not torch.allclose(old, fresh) and torch.equal(cached, fresh)


def test_no_warnings_on_a_clean_cache(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache = DiskCache(tmp_path)
        cache.cached("s", lambda: [1, 2], k=1)
        cache.cached("s", lambda: [1, 2], k=1)
