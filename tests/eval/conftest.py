import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

VOCAB = 96


class CharTokenizer:
    """Offline stand-in for a HF tokenizer: one id per character, BOS = 1."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True, **kwargs):
        ids = [2 + ord(c) % (VOCAB - 2) for c in text]
        if add_special_tokens:
            ids = [self.bos_token_id] + ids
        return {"input_ids": ids}


def tiny_llama(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **overrides,
    )
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def tokenizer():
    return CharTokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture
def make_llama():
    return tiny_llama
