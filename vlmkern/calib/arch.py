"""Model knowledge as a table: where each architecture keeps its decoder
layers, vision tower and projector, and how a decoder layer's linears are
calibrated in order (inputs of later sub-groups come from already-quantized
earlier ones).

Paths are tried in order, so one entry covers the module layouts of several
transformers releases. Describe a new architecture with ``register_arch``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

# q/k/v share one input, o reads attention output, gate/up share one input,
# down reads the MLP activation: four sequential sub-groups.
LLAMA_SEQUENCE = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  ("self_attn.o_proj",),
                  ("mlp.gate_proj", "mlp.up_proj"),
                  ("mlp.down_proj",))


@dataclass(frozen=True)
class ArchSpec:
    """Where things live in one model family.

    layers: candidate dotted paths of the decoder-layer ModuleList.
    vision: candidate paths of the vision tower (empty for text models).
    projector: candidate paths of the multimodal projector.
    sequence: the decoder layer's linears, as sequential sub-groups.
    """

    name: str
    layers: tuple[str, ...]
    vision: tuple[str, ...] = ()
    projector: tuple[str, ...] = ()
    sequence: tuple[tuple[str, ...], ...] = LLAMA_SEQUENCE
    skip: tuple[str, ...] = field(default=("lm_head",))


ARCHS: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec, *class_names: str) -> ArchSpec:
    """Describe an architecture; keys are model class names (type(model).__name__)."""
    for name in class_names or (spec.name,):
        ARCHS[name] = spec
    return spec


_TEXT_LAYERS = ("model.layers",)
_VLM_LAYERS = ("model.language_model.layers", "language_model.model.layers",
               "model.language_model.model.layers")

register_arch(ArchSpec("llama", _TEXT_LAYERS), "LlamaForCausalLM", "LlamaModel")
register_arch(ArchSpec("qwen2", _TEXT_LAYERS), "Qwen2ForCausalLM", "Qwen2Model")
register_arch(ArchSpec("qwen3", _TEXT_LAYERS), "Qwen3ForCausalLM", "Qwen3Model")
register_arch(ArchSpec("mistral", _TEXT_LAYERS), "MistralForCausalLM", "MistralModel")
# LLaVA-NeXT and LLaVA-OneVision tile images differently but keep LLaVA's modules
register_arch(ArchSpec("llava", _VLM_LAYERS,
                       vision=("model.vision_tower", "vision_tower"),
                       projector=("model.multi_modal_projector", "multi_modal_projector")),
              "LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
              "LlavaOnevisionForConditionalGeneration")
for _cls in ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"):
    register_arch(ArchSpec("qwen2_vl", _VLM_LAYERS,
                           vision=("model.visual", "visual"),
                           projector=("model.visual.merger", "visual.merger")), _cls)


class UnknownArchitectureError(ValueError):
    pass


def arch_of(model: nn.Module) -> ArchSpec:
    cls = type(model).__name__
    spec = ARCHS.get(cls)
    if spec is None:
        raise UnknownArchitectureError(
            f"vlmkern does not know the architecture {cls}. Describe it with "
            f"vlmkern.calib.register_arch(ArchSpec(name=..., layers=('path.to.layers',), "
            f"vision=(...), projector=(...), sequence=((...),...)), '{cls}'); known: "
            f"{sorted(ARCHS)}")
    return spec


def find_path(model: nn.Module, candidates: tuple[str, ...]) -> str | None:
    for path in candidates:
        try:
            model.get_submodule(path)
            return path
        except AttributeError:
            continue
    return None


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, ModuleList) of the language model's decoder layers."""
    spec = arch_of(model)
    path = find_path(model, spec.layers)
    if path is None:
        raise UnknownArchitectureError(f"{type(model).__name__}: none of {spec.layers} exists; "
                                       f"this transformers release lays the model out differently")
    return path, model.get_submodule(path)


def default_skip(model: nn.Module) -> tuple[str, ...]:
    """Name patterns left in full precision by default: lm_head, vision tower, projector."""
    spec = arch_of(model)
    out = list(spec.skip)
    for candidates in (spec.vision, spec.projector):
        path = find_path(model, candidates)
        if path is not None:
            out.append(path + ".*")
    return tuple(out)
