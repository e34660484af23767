"""The calibration work dir: every file names its run and its layer (or
block), so nothing of another run, layer or version is ever resumed; damage
is one clear error naming the file and the remedy; files are written
atomically, with the user's usual permissions."""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

from tiny_models import build_llama, build_llava, second_sample

from vlmkern import QuantConfig
from vlmkern.calib import quantize_model
from vlmkern.calib.engine import Settings, WorkDir, _fingerprint
from vlmkern.calib.methods import LayerMethod
from vlmkern.calib.qvlm import ActChoice, QVLMConfig, qvlm_quantize
from vlmkern.calib.qvlm_resume import QVLMWorkDir
from vlmkern.calib.qvlm_vision import VisionOptConfig
from vlmkern.io import atomic_save

pytestmark = pytest.mark.usefixtures("one_thread")

W3, W4 = QuantConfig(3, 32), QuantConfig(4, 32)
L0, L1 = "layer_0000.safetensors", "layer_0001.safetensors"


@pytest.fixture(scope="module")
def llama():
    model, inputs = build_llama()
    return model, [inputs, second_sample(inputs)]


def _run(llama, work_dir, method=W3):
    model, samples = llama
    return quantize_model(copy.deepcopy(model), samples, method, work_dir=work_dir,
                          progress=False)


def _edit_metadata(file: Path, **changes) -> None:
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(file))
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    save_file(tensors, str(file), metadata=meta)


# ---------------------------------------------------------------------------
# Files carry their identity
# ---------------------------------------------------------------------------

def test_layer_files_without_their_manifest_are_refused(llama, tmp_path):
    _run(llama, tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ValueError, match="but no manifest.json"):
        _run(llama, tmp_path, W4)
    assert not (tmp_path / "manifest.json").exists()     # nothing was overwritten


def test_a_layer_file_of_another_layer_is_refused(llama, tmp_path):
    _run(llama, tmp_path)
    shutil.copy(tmp_path / L0, tmp_path / L1)
    with pytest.raises(ValueError, match=f"{L1}: it holds layer 0, not layer 1; delete {L1}"):
        _run(llama, tmp_path)


def test_a_layer_file_of_another_run_is_refused(llama, tmp_path):
    _run(llama, tmp_path / "a")
    _run(llama, tmp_path / "b", W4)
    shutil.copy(tmp_path / "b" / L1, tmp_path / "a" / L1)
    with pytest.raises(ValueError, match=f"{L1}: it was not written by this run"):
        _run(llama, tmp_path / "a")


def test_a_layer_file_must_hold_exactly_the_layers_linears(llama, tmp_path):
    _run(llama, tmp_path)
    _edit_metadata(tmp_path / L1, modules="{}")
    with pytest.raises(ValueError, match=r"do not match layer 1: missing \['mlp.down_proj'"):
        _run(llama, tmp_path)


def test_a_work_dir_of_an_older_version_is_refused(llama, tmp_path):
    model, samples = llama
    fingerprint = _fingerprint(model, samples, Settings("any"))
    (tmp_path / "manifest.json").write_text(json.dumps({"fingerprint": fingerprint}))
    with pytest.raises(ValueError, match="another version of vlmkern; delete the work dir"):
        WorkDir(tmp_path, fingerprint)


# ---------------------------------------------------------------------------
# The fingerprint sees every byte, shape and dtype
# ---------------------------------------------------------------------------

def test_the_fingerprint_covers_whole_weights_and_sample_shapes(llama):
    model, samples = llama
    method = Settings("method")
    base = _fingerprint(model, samples, method)
    assert _fingerprint(copy.deepcopy(model), samples, method) == base

    changed = copy.deepcopy(model)
    with torch.no_grad():        # all but the first row: far past the first 64 elements
        changed.model.layers[1].self_attn.q_proj.weight[1:] *= -1.0
    assert _fingerprint(changed, samples, method) != base

    reshaped = [{"input_ids": s["input_ids"].reshape(7, 2)} for s in samples]
    assert _fingerprint(model, reshaped, method) != base
    as_int32 = [{"input_ids": s["input_ids"].int()} for s in samples]
    assert _fingerprint(model, as_int32, method) != base

    bf16 = copy.deepcopy(model).to(torch.bfloat16)      # no numpy dtype for it
    assert _fingerprint(bf16, samples, method) == _fingerprint(bf16, samples, method)


# ---------------------------------------------------------------------------
# Damage: one ValueError naming the file and the remedy
# ---------------------------------------------------------------------------

def _truncate(d):
    file = d / L1
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size // 2)


def _folder_at_layer(d):
    (d / L1).unlink()
    (d / L1).mkdir()


def _flip_a_data_bit(d):
    # the last byte of the file is tensor data; the header stays intact
    data = bytearray((d / L1).read_bytes())
    data[-1] ^= 1
    (d / L1).write_bytes(bytes(data))


def _drop_a_tensor(d, suffix):
    with safe_open(str(d / L1), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(d / L1))
    dropped = [k for k in tensors if k.endswith(suffix)]
    assert dropped
    del tensors[dropped[0]]
    save_file(tensors, str(d / L1), metadata=meta)


def _drop_a_tensor_and_its_checksum(d, suffix):
    # what the module records must catch on their own
    _drop_a_tensor(d, suffix)
    with safe_open(str(d / L1), framework="pt") as f:
        meta = f.metadata()
    sums = json.loads(meta["checksums"])
    kept = load_file(str(d / L1))
    _edit_metadata(d / L1, checksums=json.dumps({k: v for k, v in sums.items() if k in kept}))


DAMAGE = {
    "truncated": (_truncate, L1),
    "zero-length": (lambda d: (d / L1).write_bytes(b""), L1),
    "folder": (_folder_at_layer, L1),
    "no-results": (lambda d: _edit_metadata(d / L1, results=None), L1),
    "no-modules": (lambda d: _edit_metadata(d / L1, modules=None), L1),
    "unknown-format": (lambda d: _edit_metadata(
        d / L1, modules='{"self_attn.q_proj": {"format": "zzz", "meta": {}}}'), L1),
    # the file stays readable: only its checksums and records show the damage
    "flipped-bit": (_flip_a_data_bit, L1),
    "zeros-missing": (lambda d: _drop_a_tensor(d, ".qzeros"), L1),
    "zeros-and-checksum-missing": (lambda d: _drop_a_tensor_and_its_checksum(d, ".qzeros"), L1),
    "no-checksums": (lambda d: _edit_metadata(d / L1, checksums=None), L1),
    "manifest-garbage": (lambda d: (d / "manifest.json").write_text("{not json"),
                         "manifest.json"),
    "manifest-list": (lambda d: (d / "manifest.json").write_text("[1, 2]"), "manifest.json"),
}


@pytest.fixture(scope="module")
def finished(llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished")
    _run(llama, folder)
    return folder


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_work_dir_names_the_file_and_the_remedy(llama, finished, tmp_path, damage):
    mutate, name = DAMAGE[damage]
    work = tmp_path / "run"
    shutil.copytree(finished, work)
    mutate(work)
    remedy = f"delete {L1} to recalibrate that layer" if name == L1 else "delete the work dir"
    with pytest.raises(ValueError, match=rf"{name}\b.*{remedy}") as info:
        _run(llama, work)
    assert type(info.value) is ValueError


def test_a_layer_file_that_cannot_be_read_is_not_called_missing(llama, finished, tmp_path,
                                                                 monkeypatch):
    # safetensors reports a file it may not open as "No such file"; deleting an
    # intact result would be the wrong remedy (root reads anything: simulated)
    from vlmkern.calib import engine
    work = tmp_path / "run"
    shutil.copytree(finished, work)

    def no_read(file, *args, **kwargs):
        if Path(file) == work / L1:
            raise PermissionError(13, "Permission denied", str(file))
        return open(file, *args, **kwargs)

    monkeypatch.setattr(engine, "open", no_read, raising=False)
    with pytest.raises(ValueError, match=f"{L1}: cannot be read .*Permission denied.*give this "
                                         f"user read access") as info:
        _run(llama, work)
    assert "delete" not in str(info.value)


def test_a_killed_write_leaves_no_temporary_file_behind_the_next(llama, finished, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(finished, work)
    (work / L1).unlink()
    leftover = work / f"{L1}.0123456789ab.tmp"         # as a killed save leaves it
    leftover.write_bytes(b"partial")
    unrelated = work / "notes.0123456789ab.tmp"
    unrelated.write_bytes(b"kept")
    _run(llama, work)
    assert (work / L1).is_file() and not leftover.exists() and unrelated.exists()


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------

def test_a_work_dir_that_cannot_be_written_fails_before_calibrating(llama, tmp_path,
                                                                    monkeypatch):
    work = tmp_path / "run"
    _run(llama, work)
    (work / L1).unlink()
    # A folder refusing new files (root ignores permission bits, so simulated).
    real_mkstemp = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == work:
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    calls = []
    real_quantize = LayerMethod.quantize
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(LayerMethod, "quantize",
                        lambda *a, **k: (calls.append(1), real_quantize(*a, **k))[1])
    with pytest.raises(ValueError, match="cannot write there"):
        _run(llama, work)
    assert not calls


def test_an_empty_work_dir_path_is_refused(llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="empty path"):
        _run(llama, "")
    with pytest.raises(ValueError, match="empty path"):     # AWQ and Q-VLM create it directly
        WorkDir("", "fingerprint")
    assert not list(tmp_path.iterdir())


def test_written_files_follow_the_umask(llama, tmp_path):
    old = os.umask(0o022)
    try:
        atomic_save({"x": torch.zeros(2)}, tmp_path / "file.safetensors", {})
        _run(llama, tmp_path / "run")
    finally:
        os.umask(old)
    for file in (tmp_path / "file.safetensors", tmp_path / "run" / "manifest.json",
                 tmp_path / "run" / L0):
        assert file.stat().st_mode & 0o777 == 0o644, file


def test_the_manifest_is_written_durably(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    WorkDir(tmp_path / "run", "fingerprint")
    assert synced and (tmp_path / "run" / "manifest.json").exists()


# ---------------------------------------------------------------------------
# Q-VLM's blocks and vision tower
# ---------------------------------------------------------------------------

def test_a_qvlm_block_of_another_run_is_refused(llama, tmp_path):
    model, samples = llama
    for folder, a_bits in (("a", 8), ("b", 6)):
        qvlm_quantize(copy.deepcopy(model), samples, QVLMConfig(8, a_bits, max_depth=1),
                      progress=False, work_dir=tmp_path / folder)
    shutil.copy(tmp_path / "b" / "block_0000.json", tmp_path / "a" / "block_0000.json")
    with pytest.raises(ValueError, match="block_0000.json: not block 0 of this run.*delete "
                                         "block_0000.json"):
        qvlm_quantize(copy.deepcopy(model), samples, QVLMConfig(8, 8, max_depth=1),
                      progress=False, work_dir=tmp_path / "a")


def _edit_block(edit):
    def mutate(file: Path):
        data = json.loads(file.read_text())
        edit(data)
        file.write_text(json.dumps(data))
    return mutate


BLOCK_DAMAGE = {
    "garbage": lambda file: file.write_text("{oops"),
    "no-units": _edit_block(lambda d: d.pop("units")),
    "bad-group": _edit_block(lambda d: d["units"][0].__setitem__(1, 7)),
    "foreign-percentile": _edit_block(lambda d: d["units"][0].__setitem__(2, 0.5)),
}


@pytest.mark.parametrize("damage", sorted(BLOCK_DAMAGE))
def test_a_damaged_qvlm_block_names_the_file_and_the_remedy(llama, tmp_path, damage):
    model, samples = llama
    cfg = QVLMConfig(8, 8, max_depth=1)
    qvlm_quantize(copy.deepcopy(model), samples, cfg, progress=False, work_dir=tmp_path)
    BLOCK_DAMAGE[damage](tmp_path / "block_0000.json")
    with pytest.raises(ValueError, match="block_0000.json: .*delete block_0000.json to "
                                         "search that block again") as info:
        qvlm_quantize(copy.deepcopy(model), samples, cfg, progress=False, work_dir=tmp_path)
    assert type(info.value) is ValueError


def test_a_qvlm_block_that_fails_to_write_leaves_no_temporary_file(llama, tmp_path):
    model, samples = llama
    work = QVLMWorkDir(tmp_path, model, samples, QVLMConfig(8, 8), None)
    with pytest.raises(TypeError):
        work.save_block(0, (0, 0), {(0, None): ActChoice(None)}, object(), [("q",)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_a_vision_file_missing_a_linear_is_refused(tmp_path):
    model, inputs = build_llava()
    cfg, vision = QVLMConfig(8, 8, max_depth=1), VisionOptConfig(epochs=1)
    qvlm_quantize(copy.deepcopy(model), [inputs], cfg, progress=False, vision=vision,
                  work_dir=tmp_path)
    file = tmp_path / "vision.safetensors"
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(file))
    modules = json.loads(meta["modules"])
    dropped = min(modules)
    del modules[dropped]
    kept = {k: t for k, t in tensors.items() if not k.startswith(dropped + ".")}
    sums = {k: v for k, v in json.loads(meta["checksums"]).items() if k in kept}
    save_file(kept, str(file), metadata={**meta, "modules": json.dumps(modules),
                                         "checksums": json.dumps(sums)})
    with pytest.raises(ValueError, match=rf"vision.safetensors: .*missing \['{dropped}'\]"):
        qvlm_quantize(copy.deepcopy(model), [inputs], cfg, progress=False, vision=vision,
                      work_dir=tmp_path)
