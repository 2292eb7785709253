"""Metric integrity: a train.py cannot look ahead, train past the budget or change the data."""

import re

import numpy as np
import pytest
import torch

import autoresearch_lib as ar
from autoresearch_lib import harness, sandbox
from autoresearch_lib.baseline import render_train_py


def run(tmp_path, cache, script, budget=2, **settings):
    path = tmp_path / "train.py"
    path.write_text(script)
    return ar.train(preset="quick", budget=budget, script=path, run_dir=tmp_path / "run",
                    cache_dir=str(cache), checkpoint=False, **settings)


def test_a_model_that_looks_ahead_is_rejected(tmp_path, cache):
    cheat = render_train_py("quick").replace(
        "        x = x0 = norm(self.wte(idx).to(dtype))",
        "        peek = torch.roll(idx, -1, dims=1)  # the next token: the answer\n"
        "        x = x0 = norm((self.wte(idx) + self.wte(peek)).to(dtype))")
    result = run(tmp_path, cache, cheat)
    assert result.status == "crash" and result.reason == "non-causal"
    assert result.val_bpb is None


def test_causality_probe_accepts_causal_and_rejects_peeking_models():
    class Causal(torch.nn.Module):
        def forward(self, idx):  # a running mean of embeddings: only the past
            e = torch.nn.functional.one_hot(idx, 10).float()
            return e.cumsum(1) / torch.arange(1, idx.size(1) + 1)[None, :, None]

    class Peeking(Causal):
        def forward(self, idx):
            return super().forward(idx.flip(1))

    row = torch.randint(0, 10, (33,))
    harness.causality_probe(Causal(), row, "cpu")
    with pytest.raises(harness.IntegrityError, match="non-causal"):
        harness.causality_probe(Peeking(), row, "cpu")


def test_training_past_the_budget_is_rejected(tmp_path, cache):
    greedy = render_train_py("quick").replace("    while not run.done:",
                                              "    while run.training_seconds < 3 * run.settings.budget:")
    result = run(tmp_path, cache, greedy, budget=2)
    assert result.status == "crash" and result.reason == "over budget"


def test_training_off_the_clock_is_rejected(tmp_path, cache):
    sneaky = render_train_py("quick").replace(
        "    run.finish(model, config)",
        "    import time\n    t = time.time()\n"
        "    while time.time() - t < 14:  # more training, without telling the harness\n"
        "        loss = compiled_model(x, y); loss.backward()\n"
        "        adamw.step(); muon.step(); model.zero_grad()\n"
        "    run.finish(model, config)")
    # a long outside clock, so the harness's own check (which explains the mistake) speaks first
    result = run(tmp_path, cache, sneaky, budget=2, startup_limit=120)
    assert result.status == "crash" and result.reason == "off the clock"


@pytest.mark.parametrize("sandboxed", [True, False])
def test_changing_the_validation_data_is_caught(tmp_path, monkeypatch, sandboxed):
    if sandboxed and sandbox.mode() != "bwrap":
        pytest.skip("no bubblewrap sandbox on this machine")
    monkeypatch.setenv("AUTORESEARCH_SANDBOX", "auto" if sandboxed else "0")
    tamper = render_train_py("quick").replace(
        "    run.finish(model, config)",
        "    import glob, numpy as np\n"
        "    for path in glob.glob(run.settings.cache_dir + '/*/val.npy'):  # the real cache\n"
        "        np.save(open(path, 'wb'), np.full(1000, 5, dtype=np.uint16))  # an easy 'validation set'\n"
        "    run.finish(model, config)")
    cache = tmp_path / "own-cache"  # its own cache: it may get spoiled
    result = run(tmp_path, cache, tamper)
    val = next(cache.glob("*/val.npy"))
    if sandboxed:  # the cache is not even visible: the run trains and is scored honestly
        assert result.ok and result.sandbox == "bwrap" and result.val_bpb > 1.0
        assert np.load(val).size > 1000
    else:  # without a sandbox the write succeeds, and the runner's fingerprint catches it
        assert result.status == "crash" and result.reason == "data changed"
        assert result.sandbox == "none" and np.load(val).size == 1000


def test_tampered_cache_is_detected_by_prepare_users(tmp_path):
    from autoresearch_lib import data
    from autoresearch_lib.config import make_settings

    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"Line {i} of a small corpus." for i in range(100)))
    settings = make_settings("quick", text=str(text), cache_dir=str(tmp_path / "c"))
    prepared = data.prepare(settings, verbose=False)
    (prepared.dir / "token_bytes.npy").write_bytes(b"garbage")
    with pytest.raises(data.DataError, match="changed"):
        data.prepare(settings, verbose=False).verify(prepared.expected_fingerprint)
