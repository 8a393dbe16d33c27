import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.errors import CheckpointError
from lowbit.eval import bits_per_weight, model_bytes


class FakeQuantLinear(nn.Module):
    """Stands in for a packed lowbit.nn module: 4-bit weights, one fp16 scale and zero per 32 inputs."""

    def __init__(self, linear: nn.Linear, group: int = 32):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", torch.zeros(self.out_features, self.in_features // 8, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(self.out_features, self.in_features // group, dtype=torch.float16))
        self.register_buffer("qzeros", torch.zeros(self.out_features, self.in_features // group, dtype=torch.float16))
        self.bias = None

    def storage_bits(self) -> int:
        return sum(t.numel() * t.element_size() * 8 for t in (self.qweight, self.scales, self.qzeros))

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def test_model_bytes_sums_the_weight_files(tmp_path):
    save_file({"a": torch.zeros(10)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(20)}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "config.json").write_text("{}")
    expected = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert model_bytes(tmp_path) == expected
    assert model_bytes(tmp_path / "model-00001-of-00002.safetensors") < expected


def test_model_bytes_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        model_bytes(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no weight files"):
        model_bytes(tmp_path)


def test_float_model_is_32_bits_per_weight(make_llama):
    m = make_llama()
    r = bits_per_weight(m)
    assert r["bits_per_weight"] == 32.0
    assert r["bits_per_weight_all"] == 32.0
    assert r["float_linears"] == 2 * 7 and r["quantized_linears"] == 0
    # the lm_head is excluded, the embeddings are not linears
    assert r["linear_weights"] == sum(
        mod.weight.numel() for name, mod in m.named_modules() if isinstance(mod, nn.Linear) and "layers." in name
    )
    m16 = make_llama().half()
    assert bits_per_weight(m16)["bits_per_weight"] == 16.0


def test_quantized_modules_report_their_storage_bits(make_llama):
    m = make_llama()
    float_all = bits_per_weight(m)
    swapped_weights = 0
    for layer in m.model.layers:
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(layer.mlp, name)
            swapped_weights += lin.weight.numel()
            setattr(layer.mlp, name, FakeQuantLinear(lin))
    r = bits_per_weight(m)
    assert r["quantized_linears"] == 6 and r["float_linears"] == 8
    # 4 bits + 2 x 16 bits per 32 weights = 5 bits for the MLP, 32 for attention
    attn_weights = r["linear_weights"] - swapped_weights
    expected = (5 * swapped_weights + 32 * attn_weights) / r["linear_weights"]
    assert r["bits_per_weight"] == pytest.approx(expected)
    assert r["linear_weights"] == float_all["linear_weights"]
    assert r["total_weights"] == float_all["total_weights"]
    assert r["total_bits"] == float_all["total_bits"] - (32 - 5) * swapped_weights


def test_tied_embeddings_count_once(make_llama):
    tied = make_llama(tie_word_embeddings=True)
    untied = make_llama(tie_word_embeddings=False)
    emb = tied.get_input_embeddings().weight.numel()
    assert bits_per_weight(untied)["total_weights"] - bits_per_weight(tied)["total_weights"] == emb
