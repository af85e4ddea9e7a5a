"""A tiny, randomly initialised Qwen2-VL / Qwen2.5-VL built offline, saved and loaded back
through the same ``from_pretrained`` path a real checkpoint takes.

What is built (``build_tiny_vlm``):

- a word-level tokenizer (``tokenizers`` WordLevel, lower-casing, whitespace/punctuation
  pre-tokenizer) holding the given words plus the Qwen2-VL special tokens, wrapped in
  transformers' fast tokenizer with eos ``<|im_end|>``, pad ``<|endoftext|>``, left padding
  and a Qwen-style chat template (``CHAT_TEMPLATE``);
- ``Qwen2VLImageProcessorPil`` (the image processor that works without torchvision);
- an image-only processor, ``ImageOnlyQwen2VLProcessor`` / ``ImageOnlyQwen2_5_VLProcessor``:
  the stock processors also want a video processor, which needs torchvision. transformers
  derives a processor's parts from its ``__init__`` signature, so a subclass whose
  ``__init__`` takes only ``(image_processor, tokenizer, chat_template)`` drops the video part.
  Both are registered with ``AutoProcessor`` when this module is imported; without that,
  ``AutoProcessor.from_pretrained`` silently returns the bare tokenizer;
- a ~200k-parameter model (text hidden 64, 2 layers; vision depth 2) whose M-RoPE sections fit
  its head size, with the special token ids and the generation config taken from the tokenizer.

``load_vlm(path)`` is the one loader for tiny and real checkpoints alike; it raises if the
processor that comes back cannot process images.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
UNK_TOKEN = "<unk>"
TEMPLATE_WORDS = ("system", "user", "assistant", "you", "are", "a", "helpful", ".", ",", "?", "!", ":")
FAMILIES = ("qwen2_vl", "qwen2_5_vl")

# Qwen-style chat template: content is a string or a list of {"type": "image"} /
# {"type": "text", "text": ...} parts; an image becomes <|vision_start|><|image_pad|><|vision_end|>
# (the processor expands the single pad to one per merged patch).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _processor_classes():
    """The image-only processor subclasses (defined lazily so that importing this module's
    constants does not import transformers)."""
    global _CLASSES
    if _CLASSES is None:
        from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLConfig, Qwen2VLProcessor

        class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
            """Qwen2VLProcessor without its video processor (which needs torchvision)."""

            def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
                super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
            """Qwen2_5_VLProcessor without its video processor (which needs torchvision)."""

            def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
                super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        # A saved processor_config.json names the class; AutoProcessor finds a registered class
        # by that name. exist_ok: the stock Qwen2-VL processors are registered already.
        AutoProcessor.register(Qwen2VLConfig, ImageOnlyQwen2VLProcessor, exist_ok=True)
        AutoProcessor.register(Qwen2_5_VLConfig, ImageOnlyQwen2_5_VLProcessor, exist_ok=True)
        _CLASSES = {"qwen2_vl": ImageOnlyQwen2VLProcessor, "qwen2_5_vl": ImageOnlyQwen2_5_VLProcessor}
    return _CLASSES


_CLASSES = None


def register_processors() -> dict:
    """Register the image-only processors with ``AutoProcessor`` (idempotent); returns
    ``{"qwen2_vl": cls, "qwen2_5_vl": cls}``. Call before any ``AutoProcessor`` call."""
    return _processor_classes()


def build_tokenizer(words):
    """Word-level fast tokenizer over ``words`` (lower-cased) + template words + specials."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in (UNK_TOKEN, *TEMPLATE_WORDS, *(str(w).lower() for w in words)):
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(WordLevel(vocab, unk_token=UNK_TOKEN))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token=UNK_TOKEN, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        padding_side="left", additional_special_tokens=list(SPECIAL_TOKENS[1:2] + SPECIAL_TOKENS[3:]),
        chat_template=CHAT_TEMPLATE, model_max_length=4096,
    )
    for t in SPECIAL_TOKENS:
        if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id):
            raise RuntimeError(f"special token {t!r} did not make it into the tokenizer")
    return tok


def tiny_config(family: str, tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, vision_width: int = 32, vision_depth: int = 2):
    """Config of a tiny model of ``family`` whose vocabulary and special ids come from
    ``tokenizer``. M-RoPE sections sum to head_dim / 2 (the default fits head_dim 128 only)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    if family not in FAMILIES:
        raise ValueError(f"family={family!r}; choose one of {', '.join(FAMILIES)}")
    head_dim = hidden // heads
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]  # e.g. [2, 3, 3] for head_dim 16
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=2048, use_sliding_window=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
                bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if family == "qwen2_vl":
        vision = dict(depth=vision_depth, embed_dim=vision_width, hidden_size=hidden, num_heads=2,
                      mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        cls = Qwen2VLConfig
    else:
        vision = dict(depth=vision_depth, hidden_size=vision_width, intermediate_size=2 * vision_width,
                      num_heads=2, out_hidden_size=hidden, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=56, fullatt_block_indexes=[vision_depth - 1])
        cls = Qwen2_5_VLConfig
    return cls(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def build_tiny_vlm(out_dir, *, words, family: str = "qwen2_vl", seed: int = 0,
                   max_image_pixels: int = 112 * 112) -> Path:
    """Build a random tiny model + processor for ``words`` and ``save_pretrained`` both into
    ``out_dir``; returns the directory. Load it with ``load_vlm(out_dir)``."""
    from transformers import AutoModelForImageTextToText, GenerationConfig, Qwen2VLImageProcessorPil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(words)
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": max_image_pixels})
    processor = register_processors()[family](image_processor=image_processor, tokenizer=tok,
                                              chat_template=CHAT_TEMPLATE)
    config = tiny_config(family, tok)
    with torch.random.fork_rng(devices=[]):  # CPU weights: no CUDA stream to save (nor to touch)
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=config.text_config.bos_token_id)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def load_vlm(path, *, dtype: torch.dtype = torch.float32, device=None):
    """``(model, processor)`` from a directory or hub id through the real path:
    ``AutoProcessor.from_pretrained`` and ``AutoModelForImageTextToText.from_pretrained``.

    ``device``: a CUDA device loads the weights straight onto it (``device_map``), so that no
    process holds a full copy in host memory first (8 ranks x 15 GB for a 7B model in bf16);
    None or a CPU device: loaded on the CPU.

    Raises TypeError if the processor is a bare tokenizer (or has no image processor): a
    model loaded that way would silently be trained as text-only.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    register_processors()
    processor = check_processor(AutoProcessor.from_pretrained(str(path)), str(path))
    kw = {}
    if device is not None and torch.device(device).type == "cuda":
        kw["device_map"] = str(torch.device(device))
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype, **kw)
    model.eval()
    return model, processor


def check_processor(processor, source: str = "the checkpoint"):
    """Return ``processor`` if it is a multimodal processor with an image processor and a
    tokenizer; raise TypeError otherwise (``AutoProcessor`` falls back to the bare tokenizer
    without a word when it cannot build the processor class a checkpoint names)."""
    from transformers import ProcessorMixin

    if (not isinstance(processor, ProcessorMixin) or getattr(processor, "image_processor", None) is None
            or getattr(processor, "tokenizer", None) is None):
        raise TypeError(
            f"AutoProcessor.from_pretrained({source!r}) returned {type(processor).__name__}, not a "
            "processor with an image processor and a tokenizer; an image-text model would be trained "
            "as text-only. Is processor_config.json missing, or its processor class not registered "
            "(adapters.vlm_tiny.register_processors)?")
    return processor
