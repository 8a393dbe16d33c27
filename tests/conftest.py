"""Tiny random models built from configs (no downloads) and paths to the shared data."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "wikitext-2"
WIKI_TEST = SHARED_DATA / "wiki.test.joined.txt"
WIKI_VALID = SHARED_DATA / "wiki.valid.tokens"

# oneDNN's int8 GEMM is exact only on CPUs with VNNI or AMX (prepare_int8 refuses it elsewhere: its AVX2
# kernel saturates 16-bit pair sums)
ONEDNN = pytest.param("onednn", marks=pytest.mark.skipif(
    not importlib.import_module("lowbit.kernels.int8_gemm")._has_vnni(), reason="this CPU has no VNNI/AMX for oneDNN's int8 GEMM"))

# lowbit's AVX2 int8 kernel: any x86 CPU with AVX2 and a compiler (checked where the test runs, so that
# collecting the tests does not build it)
AVX2 = "avx2"


def need_backend(backend: str) -> None:
    """Skips (with the reason) a test of the AVX2 int8 backend where it cannot run."""
    if backend == AVX2 and importlib.import_module("lowbit.kernels.int8_gemm")._avx2_ext() is None:
        pytest.skip("lowbit's AVX2 int8 kernel is unavailable here (no AVX2, no compiler, or LOWBIT_I8_EXT=0)")


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    kw = dict(TINY)
    if model_type == "gpt2":
        kw = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=256)
    elif model_type == "opt":
        kw = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
                  max_position_embeddings=256, word_embed_proj_dim=64)
    elif model_type == "gpt_neox":
        kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=256, max_position_embeddings=256)
    elif model_type in ("gemma3_text",):
        kw.update(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    elif model_type in ("qwen3",):
        kw.update(head_dim=16)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    # Random init leaves tiny weights; widen them so quantization error is visible in the logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


def tiny_tokenizer():
    """A byte-level BPE trained here on a few sentences: offline, vocab under 256."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=250, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["The quick brown fox jumps over the lazy dog.", "Quantization maps weights to a few bits."] * 20
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny_checkpoint(path, model_type="llama", **overrides):
    model = tiny_model(model_type, **overrides)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def tiny_dir(tmp_path):
    return save_tiny_checkpoint(tmp_path / "tiny-llama")
