"""Tiny transformers models with random weights (Llama, Qwen2, Qwen3, Mistral,
LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL)
and matching inputs, shared by the model-level tests, and the skip reason the
CUDA kernel tests share. Nothing is downloaded."""
from __future__ import annotations

import torch
from torch import nn

VOCAB = 128
IMAGE_TOKEN = 120
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)


# ---------------------------------------------------------------------------
# Tiny models and inputs
# ---------------------------------------------------------------------------

def _randomise_biases(model: nn.Module) -> None:
    """HF initialises biases to zero; give them values so bias handling is tested."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0.0, 0.1)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def rel_error(a, b):
    return float((a - b).norm() / b.norm())


def second_sample(inputs):
    """A second calibration sample: the same structure, other text tokens."""
    other = dict(inputs)
    ids = inputs["input_ids"].clone()
    ids[:, -3:] = (ids[:, -3:] + 7) % 100 + 3
    other["input_ids"] = ids
    return other


def state_of(model):
    """A detached copy of the model's state_dict, to compare runs bitwise."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def _text_ids(gen, batch, length):
    return torch.randint(3, 100, (batch, length), generator=gen)


def build_llama(seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TEXT, **overrides})).eval()
    gen = torch.Generator().manual_seed(100)
    return model, {"input_ids": _text_ids(gen, 2, 7)}


def build_qwen2(seed=0):
    # hidden 96: in_features not a multiple of 64 (short last group for g64),
    # intermediate 160: two binary blocks of 128 and 32 columns.
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(**{**TEXT, "hidden_size": 96, "intermediate_size": 160})
    model = Qwen2ForCausalLM(cfg).eval()
    _randomise_biases(model)
    gen = torch.Generator().manual_seed(101)
    return model, {"input_ids": _text_ids(gen, 2, 7)}


def build_llava(seed=0):
    # CLIP tower: 32x32 image, 8x8 patches -> 16 patch features (the CLS token is
    # dropped by the default feature-select strategy), so 16 image tokens.
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=32, patch_size=8,
                              projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**TEXT),
                      image_token_id=IMAGE_TOKEN, vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(cfg).eval()
    _randomise_biases(model)
    gen = torch.Generator().manual_seed(102)
    n_img = (32 // 8) ** 2
    ids = torch.cat([torch.ones(2, 1, dtype=torch.long),
                     torch.full((2, n_img), IMAGE_TOKEN), _text_ids(gen, 2, 5)], dim=1)
    pixels = torch.randn(2, 3, 32, 32, generator=gen)
    return model, {"input_ids": ids, "pixel_values": pixels}


def build_qwen2vl(seed=0):
    # Vision: 4x4 grid of 4x4 patches (temporal patch 2), merged 2x2 -> 4 image
    # tokens per image. M-RoPE sections sum to head_dim / 2 = 8. transformers 5
    # requires mm_token_type_ids (1 = image token) whenever image_grid_thw is given.
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    torch.manual_seed(seed)
    text = {**TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                        "mrope_section": [2, 3, 3]}}
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                        video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    _randomise_biases(model)
    gen = torch.Generator().manual_seed(103)
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])
    pixels = torch.randn(2 * 16, 3 * 2 * 4 * 4, generator=gen)
    ids = torch.cat([torch.tensor([[1, 122]] * 2), torch.full((2, 4), IMAGE_TOKEN),
                     torch.tensor([[123]] * 2), _text_ids(gen, 2, 5)], dim=1)
    return model, {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": grid,
                   "mm_token_type_ids": (ids == IMAGE_TOKEN).long()}


def build_text(kind, seed=0):
    """Qwen3 or Mistral: Llama's layout under other class names."""
    import transformers
    config_cls, model_cls = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
                             "mistral": ("MistralConfig", "MistralForCausalLM")}[kind]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(**TEXT, head_dim=16)
    model = getattr(transformers, model_cls)(cfg).eval()
    gen = torch.Generator().manual_seed(104)
    return model, {"input_ids": _text_ids(gen, 2, 7)}


def build_llava_tiled(kind, seed=0):
    """LLaVA-NeXT (Llama) or LLaVA-OneVision (Qwen2): the tiny CLIP tower of
    build_llava on a base view plus one 32 px tile (36 image tokens with the
    row-end tokens)."""
    import transformers
    from transformers import CLIPVisionConfig
    config_cls, model_cls, text_cls = {
        "llava_next": ("LlavaNextConfig", "LlavaNextForConditionalGeneration", "LlamaConfig"),
        "llava_onevision": ("LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration",
                            "Qwen2Config")}[kind]
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=32, patch_size=8,
                              projection_dim=32)
    cfg = getattr(transformers, config_cls)(
        vision_config=vision, text_config=getattr(transformers, text_cls)(**TEXT),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-1,
        vision_feature_select_strategy="default", image_grid_pinpoints=[[32, 32]])
    model = getattr(transformers, model_cls)(cfg).eval()
    _randomise_biases(model)
    gen = torch.Generator().manual_seed(105)
    ids = torch.cat([torch.ones(2, 1, dtype=torch.long), torch.full((2, 36), IMAGE_TOKEN),
                     _text_ids(gen, 2, 5)], dim=1)
    return model, {"input_ids": ids, "pixel_values": torch.randn(2, 2, 3, 32, 32, generator=gen),
                   "image_sizes": torch.tensor([[32, 32], [32, 32]])}


def build_qwen3vl(seed=0):
    """Qwen3-VL, whose language model adds deepstack visual features to the
    image tokens after its first layers (layer-by-layer replay cannot serve it)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    torch.manual_seed(seed)
    text = {**TEXT, "head_dim": 16,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": [2, 3, 3], "mrope_interleaved": True}}
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
              "out_hidden_size": 64, "patch_size": 4, "spatial_merge_size": 2,
              "temporal_patch_size": 2, "in_channels": 3, "num_position_embeddings": 16,
              "deepstack_visual_indexes": [1]}
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                        video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(106)
    ids = torch.cat([torch.tensor([[1, 122]] * 2), torch.full((2, 4), IMAGE_TOKEN),
                     torch.tensor([[123]] * 2), _text_ids(gen, 2, 5)], dim=1)
    return model, {"input_ids": ids, "pixel_values": torch.randn(32, 96, generator=gen),
                   "image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 4]]),
                   "mm_token_type_ids": (ids == IMAGE_TOKEN).long()}


def build_gemma3_text(seed=0):
    """Gemma 3's language model: sliding-window and global layers get
    different attention masks and rotary tables (replay cannot serve it)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(**{**TEXT, "head_dim": 16, "num_hidden_layers": 3, "sliding_window": 4,
                              "layer_types": ["sliding_attention", "sliding_attention",
                                              "full_attention"]})
    gen = torch.Generator().manual_seed(107)
    return Gemma3ForCausalLM(cfg).eval(), {"input_ids": _text_ids(gen, 2, 9)}


BUILDERS = {"llama": build_llama, "qwen2": build_qwen2, "llava": build_llava,
            "qwen2vl": build_qwen2vl}


def llava_processor():
    """A LlavaProcessor for build_llava(): word-level tokenizer over w0..w127
    with "<image>" at IMAGE_TOKEN, a 32 px CLIP image processor and a small
    chat template (16 image tokens per image, as the tiny tower makes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB) if i != IMAGE_TOKEN}
    vocab["<image>"] = IMAGE_TOKEN
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    template = ("{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}"
                "{{ m['content'] }}{% else %}{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}"
                "{% endfor %}{% endif %} {% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=8,
                          vision_feature_select_strategy="default", chat_template=template,
                          image_token="<image>", num_additional_image_tokens=1)


def padded_llama():
    """A right-padded batch of two sequences whose pad embedding is large (so
    any statistic that sees pads changes), and the same sequences unpadded."""
    model, _ = build_llama()
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():      # HF zeroes the padding row: give it large values
        emb = model.get_input_embeddings().weight
        emb[0] = 50.0 * torch.randn(emb.shape[1], generator=gen)
    long, short = (torch.randint(3, 100, (1, n), generator=gen) for n in (9, 5))
    padded = {"input_ids": torch.cat([long, torch.cat([short, torch.zeros(1, 4,
                                                                          dtype=torch.long)], 1)]),
              "attention_mask": torch.tensor([[1] * 9, [1] * 5 + [0] * 4])}
    return model, padded, [{"input_ids": long}, {"input_ids": short}]


def crash_on_call(real, n: int, exc: BaseException):
    """``real`` wrapped to raise ``exc`` on its n-th call (a simulated crash);
    ``wrapper.calls`` counts the calls so far."""
    def wrapper(*args, **kwargs):
        wrapper.calls += 1
        if wrapper.calls == n:
            raise exc
        return real(*args, **kwargs)
    wrapper.calls = 0
    return wrapper


# ---------------------------------------------------------------------------
# CUDA kernel tests
# ---------------------------------------------------------------------------

def kernel_op_reason(op: str, source: str, need_gpu: bool = True) -> str | None:
    """Why a test of torch.ops.vlmkern.<op> (built from csrc/<source>) cannot
    run here, or None."""
    if need_gpu and not torch.cuda.is_available():
        return "needs a CUDA GPU"
    from vlmkern.ext import load_extension
    module, reason = load_extension()
    if module is None:
        return f"vlmkern._C is not built: {reason}"
    if not hasattr(torch.ops.vlmkern, op):
        return f"vlmkern._C was built without csrc/{source}"
    return None
