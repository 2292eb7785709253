"""The harness: the bpb metric on hand-computed cases, device and precision, MFU peaks."""

import math

import pytest
import torch

from autoresearch_lib import harness


class Uniform(torch.nn.Module):
    """A model whose logits are all equal: every token has probability 1/V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab)


class Oracle(torch.nn.Module):
    """Knows the next token of the rows it is given: a near-perfect model."""

    def __init__(self, rows, vocab):
        super().__init__()
        self.rows, self.vocab = rows, vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        nxt = self.rows[:, 1:]
        return torch.nn.functional.one_hot(nxt, self.vocab).float() * 100


def test_uniform_model_scores_log2_vocab_times_tokens_per_byte():
    vocab, bos = 8, 7
    token_bytes = torch.tensor([1, 2, 3, 1, 2, 3, 4, 0])  # BOS (7) stands for no bytes
    rows = torch.tensor([[7, 1, 2, 3, 7, 4], [7, 6, 5, 0, 7, 1]])
    targets = rows[:, 1:].flatten()
    real = targets[token_bytes[targets] > 0]
    expected = math.log2(vocab) * len(real) / token_bytes[real].sum().item()
    got = harness.evaluate_bpb(Uniform(vocab), rows, token_bytes, torch.device("cpu"), batch_size=1)
    assert got == pytest.approx(expected, rel=1e-6)


def test_perfect_model_scores_zero_and_special_tokens_are_skipped():
    vocab = 8
    token_bytes = torch.tensor([1, 2, 3, 1, 2, 3, 4, 0])
    rows = torch.tensor([[7, 1, 2, 3, 7, 4]])
    got = harness.evaluate_bpb(Oracle(rows, vocab), rows, token_bytes, torch.device("cpu"))
    assert got == pytest.approx(0.0, abs=1e-6)


def test_wrong_logit_shape_is_a_clear_error():
    class Bad(Uniform):
        def forward(self, idx):
            return torch.zeros(idx.shape[0], self.vocab)

    with pytest.raises(ValueError, match="expected"):
        harness.evaluate_bpb(Bad(8), torch.zeros(1, 5, dtype=torch.long), torch.ones(8), "cpu")


def test_validation_rows_are_fixed(prepared, quick_settings):
    a = harness.validation_rows(prepared, quick_settings)
    b = harness.validation_rows(prepared, quick_settings)
    assert torch.equal(a, b) and a.shape[1] == quick_settings.seq_len + 1
    assert a.shape[0] * quick_settings.seq_len <= quick_settings.eval_tokens
    assert (a[:, 0] == prepared.vocab_size - 1).all()


def test_device_and_precision(monkeypatch):
    monkeypatch.delenv("AUTORESEARCH_DEVICE", raising=False)
    monkeypatch.delenv("AUTORESEARCH_DTYPE", raising=False)
    if not torch.cuda.is_available():
        assert harness.detect_device().type in ("cpu", "mps")
    assert harness.detect_precision(torch.device("cpu")) == torch.float32
    monkeypatch.setenv("AUTORESEARCH_DTYPE", "bf16")
    assert harness.detect_precision(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setenv("AUTORESEARCH_DEVICE", "cpu")
    assert harness.detect_device("cuda").type == "cpu"


@pytest.mark.parametrize("name, capability, expected", [
    ("Tesla T4", (7, 5), torch.float16), ("NVIDIA A100-SXM4-80GB", (8, 0), torch.bfloat16),
    ("NVIDIA H100 80GB HBM3", (9, 0), torch.bfloat16), ("Tesla V100-SXM2-16GB", (7, 0), torch.float16),
])
def test_cuda_precision_and_peak_by_card(monkeypatch, name, capability, expected):
    monkeypatch.delenv("AUTORESEARCH_DTYPE", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    cuda = torch.device("cuda")
    assert harness.detect_precision(cuda) == expected  # a T4 gets fp16 even if bf16 "works"
    peak = harness.peak_flops(cuda)
    assert peak == {"Tesla T4": 65e12, "NVIDIA A100-SXM4-80GB": 312e12,
                    "NVIDIA H100 80GB HBM3": 989e12, "Tesla V100-SXM2-16GB": 125e12}[name]
    assert harness.peak_flops(torch.device("cpu")) is None
