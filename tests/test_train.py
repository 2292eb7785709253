"""train: a real (quick) run learns, respects its budget, and every way of failing is named."""

import math
import os
import re

import pytest
import torch

import autoresearch_lib as ar
from autoresearch_lib import harness
from autoresearch_lib.baseline import render_train_py
from autoresearch_lib.evaluation import load_model


def untrained_bpb(checkpoint):
    """val_bpb of the same model freshly initialised (the baseline's init, no training)."""
    model, settings, prepared = load_model(checkpoint, "cpu")
    torch.manual_seed(0)
    model.init_weights()
    rows = harness.validation_rows(prepared, settings)
    return harness.evaluate_bpb(model, rows, prepared.token_bytes(), torch.device("cpu"))


def test_a_few_seconds_of_training_beat_the_untrained_model(trained):
    assert trained.ok, trained.error_tail
    before = untrained_bpb(trained.checkpoint)
    assert before == pytest.approx(math.log2(512) / 2.2, rel=0.25)  # ≈ uniform over the vocab
    assert trained.val_bpb < 0.85 * before
    first, last = trained.losses[0][1], trained.losses[-1][1]
    assert last < first  # and the loss fell while it trained


def test_the_budget_is_respected(trained):
    budget = 4
    assert budget <= trained.training_seconds < budget + 3  # stops at the first step past it
    log = open(trained.log_path).read()
    summary = log.rsplit("\n---\n", 1)[1]
    for key in ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth", "startup_seconds"]:
        assert re.search(rf"^{key}:\s+\S+$", summary, re.MULTILINE), key
    assert trained.startup_seconds > 0 and trained.total_seconds >= trained.training_seconds


def test_the_log_says_where_the_start_up_went(trained):
    """One line, printed as the clock starts: its parts add up to its total, and the total is
    the time from asking for the run to its first timed step (the runner's clock)."""
    line = next(line for line in open(trained.log_path) if line.startswith("start-up:"))
    total, parts = re.match(r"start-up: ([\d.]+)s = (.*)$", line.strip()).groups()
    seconds = {name: float(t) for name, t in re.findall(r"([a-z ()-]+?) ([\d.]+)(?: \+ |$)", parts)}
    assert {"python and imports", "model", "first step", "warm-up"} <= set(seconds), seconds
    assert sum(seconds.values()) == pytest.approx(float(total), abs=0.1 * len(seconds))
    assert trained.startup_seconds <= float(total) + 0.5


def test_the_log_names_the_attention_kernel_that_ran(trained):
    """The params line says which kernel ran attention: a GPU user whose flash-attn-4 the run
    can't import (installed only on PYTHONPATH, which runs don't inherit) sees "flex" there instead
    of "fa4". On a CPU every layer runs through the mask kernel."""
    line = next(line for line in open(trained.log_path) if line.startswith("params: "))
    assert line.rstrip().endswith("| attention mask"), line


def test_evaluate_scores_the_checkpoint_and_samples(trained):
    result = ar.evaluate(trained.checkpoint, prompt="ROMEO:", num_samples=2, max_new_tokens=20)
    assert result.val_bpb == pytest.approx(trained.val_bpb, rel=1e-3)  # the same fixed val set
    assert len(result.samples) == 2 and all(s.startswith("ROMEO:") for s in result.samples)
    greedy = [ar.evaluate(trained.checkpoint, prompt="The", temperature=0, bpb=False,
                          max_new_tokens=10).samples[0] for _ in range(2)]
    assert greedy[0] == greedy[1] and len(greedy[0]) > 3


def run_script(tmp_path, cache, script, **kw):
    path = tmp_path / "train.py"
    path.write_text(script)
    return ar.train(preset="quick", budget=kw.pop("budget", 2), script=path, run_dir=tmp_path / "run",
                    cache_dir=str(cache), checkpoint=False, **kw)


def baseline_with(body_edit):
    source = render_train_py("quick")
    return body_edit(source)


@pytest.mark.parametrize("edit, reason", [
    (lambda s: s.replace("    run.finish(model, config)", "    raise ValueError('agent bug')"),
     "exception: ValueError: agent bug"),
    (lambda s: re.sub(r"^MATRIX_LR = .*$", "MATRIX_LR = float('nan')", s, flags=re.M), "nan"),
    (lambda s: s.replace("    run.finish(model, config)",
                         "    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2 GiB')"),
     "oom"),
    (lambda s: s.replace("    run.finish(model, config)", "    print('bye')"), "no summary"),
])
def test_crashes_are_classified(tmp_path, cache, edit, reason):
    result = run_script(tmp_path, cache, baseline_with(edit))
    assert result.status == "crash" and result.reason.startswith(reason), result.reason
    assert result.val_bpb is None and result.error_tail


def alive(marker: str) -> list[str]:
    """Processes (of this machine, whatever their PID namespace) whose command line holds `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline and "pytest" not in cmdline:
            found.append(f"{entry}: {cmdline}")
    return found


def test_a_hung_run_is_killed_at_the_timeout(tmp_path, cache):
    hang = ("import subprocess, time\nsubprocess.Popen(['sleep', '600.4242'])\n"
            "time.sleep(600)\n")
    result = run_script(tmp_path, cache, hang, timeout=3)
    assert result.status == "crash" and result.reason == "timeout"
    assert result.wall_seconds < 15
    assert "killed" in open(result.log_path).read()  # the log says why
    assert not alive("600.4242")  # the run and everything it started are gone


def test_training_subprocess_gets_no_secrets(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-very-secret")
    monkeypatch.setenv("HF_TOKEN", "hf-secret")
    script = baseline_with(lambda s: s.replace(
        "    run.finish(model, config)",
        "    import os; print('ENV', sorted(os.environ)); run.finish(model, config)"))
    result = run_script(tmp_path, cache, script)
    log = open(result.log_path).read()
    assert result.ok and "ENV" in log
    assert "OPENAI_API_KEY" not in log and "HF_TOKEN" not in log and "sk-test" not in log


def test_bad_corpus_fails_before_any_run(tmp_path, cache):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ar.DataError, match="empty"):
        ar.train(preset="quick", text=str(empty), run_dir=tmp_path / "run", cache_dir=str(cache))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("line", ["step 00001 (5.0%) | loss: 3", "step 00001 (5.0%) | foo: bar",
                                  "step 00001 (5.0%) | tok/sec: fast | loss: x", "step 00001 (5.0%) |"])
def test_a_malformed_progress_line_never_breaks_the_reader(line):
    """A train.py may print anything that looks like a progress line; the runner's reader parses
    it or skips it, and never raises (a dead reader would leave the run blocked on its output)."""
    from autoresearch_lib.runner import parse_progress

    progress = parse_progress(line)
    assert progress is None or progress.step == 1


def test_an_output_reader_whose_callback_fails_still_drains_the_pipe():
    import os

    from autoresearch_lib.output import OutputCapture

    r, w = os.pipe()
    capture = OutputCapture(r, on_line=lambda line: 1 / 0)
    os.write(w, b"".join(b"line %d\n" % i for i in range(5000)))
    os.close(w)
    assert capture.wait(10) and "line 4999" in capture.text()
