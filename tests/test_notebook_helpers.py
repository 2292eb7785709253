"""The small library helpers the notebooks use: the unigram baseline, the machine line, two drawings."""

import math
from collections import Counter

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import autoresearch_lib as ar  # noqa: E402
from autoresearch_lib import config, evaluation, plots  # noqa: E402


def test_unigram_bpb_is_the_frequency_model_by_hand(monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_QUICK", "1")
    prepared = ar.prepare(preset="quick", verbose=False)
    train, val = list(prepared.tokens("train")), list(prepared.tokens("val"))[:3000]
    lengths, counts, V = prepared.token_bytes(), Counter(train), prepared.vocab_size
    scored = [t for t in val if lengths[t] > 0]  # <|bos|> stands for no text: skipped
    bits = -sum(math.log2((counts[t] + 1) / (len(train) + V)) for t in scored)
    by_hand = bits / sum(int(lengths[t]) for t in scored)
    assert math.isclose(evaluation.unigram_bpb(prepared, 3000), by_hand, rel_tol=1e-9)
    uniform = math.log2(V - 1) * len(scored) / sum(int(lengths[t]) for t in scored)
    assert evaluation.unigram_bpb(prepared, 3000) < uniform  # frequencies beat uniform guessing


def test_describe_machine_says_mode_preset_device_and_torch(monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_QUICK", "1")
    monkeypatch.setenv("AUTORESEARCH_DEVICE", "cpu")
    line = config.describe_machine()
    assert line.startswith("quick mode (preset 'quick') on CPU (") and f"torch {torch.__version__}" in line
    monkeypatch.setenv("AUTORESEARCH_QUICK", "0")
    assert config.describe_machine().startswith("full mode (preset ")


def test_token_boundaries_draws_one_box_per_piece_and_wraps_at_newlines():
    pieces = ["ROMEO", ".\n", "But", ",", " soft", "!"]
    ax = plots.token_boundaries(pieces)
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["ROMEO", ".", "But", ",", "·soft", "!"]  # a newline starts a row, spaces show as ·
    rows = sorted({t.get_position()[1] for t in ax.texts})
    assert len(rows) == 2
    colours = [t.get_bbox_patch().get_facecolor() for t in ax.texts]
    assert all(a != b for a, b in zip(colours, colours[1:]))  # neighbours never share a colour
    plt.close("all")


def test_loop_diagram_names_every_step():
    ax = plots.loop_diagram()
    text = " ".join(t.get_text().replace("\n", " ") for t in ax.texts)
    for step in ("edits train.py", "git commit", "fixed budget", "val_bpb", "keep", "reset", "results.tsv"):
        assert step in text, step
    plt.close("all")
