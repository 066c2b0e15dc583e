"""The weak text encoder of the embedder ablation: all-MiniLM-L6-v2's architecture and
tokenizer with random weights.

Same tokens, same dimension, same pooling, no training: whatever neighbour quality MiniLM adds
over this encoder comes from what it learnt. The model is built locally from a fixed seed (no
hub) and saved as an ordinary sentence-transformers directory, which the trainer's
``--embedder PATH`` accepts like any other.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from roma_trainer.neighbours import default_embedder_path

_TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def build_random_minilm(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised MiniLM sentence encoder to ``out_dir`` (idempotent)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    out = Path(out_dir)
    if (out / "modules.json").exists():
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    source = default_embedder_path()
    backbone = out / "backbone"
    backbone.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, backbone / name)
    config = BertConfig.from_pretrained(source)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(backbone)
    transformer = Transformer(str(backbone), max_seq_length=128)
    # sentence-transformers 6 renamed the method; 5.x only has the old name
    dimension = getattr(transformer, "get_embedding_dimension", None)
    dimension = dimension or transformer.get_word_embedding_dimension
    pooling = Pooling(dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu").save(str(out))
    shutil.rmtree(backbone)
    return out
