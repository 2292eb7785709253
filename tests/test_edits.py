"""Tests for agents/edits.py: the reply format an LLM (or instructor) uses to edit train.py."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoresearch_lib.agents.edits import EditError, apply_reply

TRAIN_PY = '''"""A tiny GPT training script (test fixture)."""
from dataclasses import dataclass

import torch.nn as nn

DEPTH = 4               # number of transformer layers
MATRIX_LR = 0.02        # Muon learning rate
EMBEDDING_LR = 0.3      # Adam learning rate
WINDOW_PATTERN = "L"    # attention windows


@dataclass
class GPTConfig:
    n_layer: int = DEPTH
    n_embd: int = 128


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Identity() for _ in range(config.n_layer))

    def forward(self, idx):
        for block in self.blocks:
            idx = block(idx)
        return idx
'''


def block(search: str, replace: str, filename: str | None = None) -> str:
    head = f"{filename}\n" if filename is not None else ""
    return f"{head}<<<<<<< SEARCH\n{search}\n=======\n{replace}\n>>>>>>> REPLACE\n"


def test_search_replace_changes_only_the_matched_lines():
    line = "MATRIX_LR = 0.02        # Muon learning rate"
    reply = "Raise the matrix LR\n" + block(line, "MATRIX_LR = 0.03")
    description, new = apply_reply(reply, TRAIN_PY)
    assert description == "Raise the matrix LR"
    assert new == TRAIN_PY.replace(line, "MATRIX_LR = 0.03")


def test_several_blocks_apply_in_order_with_the_train_py_filename_line():
    reply = ("**Deeper and faster**\n\n"
             + block("DEPTH = 4", "DEPTH = 6", filename="train.py") + "\n"
             + "```python\n" + block("EMBEDDING_LR = 0.3", "EMBEDDING_LR = 0.5", filename="`train.py`")
             + "```\n")
    description, new = apply_reply(reply, TRAIN_PY)
    assert description == "Deeper and faster"
    assert "DEPTH = 6 " in new and "EMBEDDING_LR = 0.5 " in new and "MATRIX_LR = 0.02" in new


def test_search_text_not_found_names_the_block_and_the_closest_line():
    reply = "two\n" + block("DEPTH = 4", "DEPTH = 5") + block("MATRIX_LR = 0.05", "MATRIX_LR = 0.03")
    with pytest.raises(EditError, match="block 2 matched 0 times") as err:
        apply_reply(reply, TRAIN_PY)
    assert "MATRIX_LR = 0.02" in str(err.value)  # the hint shows the line it probably meant


def test_search_text_found_twice_asks_for_more_context():
    with pytest.raises(EditError, match="block 1 matched 2 times"):
        apply_reply("rename\n" + block("n_layer", "n_layers"), TRAIN_PY)


@pytest.mark.parametrize("filename", ["prepare.py", "harness.py", "../x", "/etc/passwd",
                                      "../train.py", "autoresearch_lib/harness.py"])
def test_edits_of_any_other_file_are_refused(filename):
    with pytest.raises(EditError, match="only train.py may be edited") as err:
        apply_reply("cheat\n" + block("DEPTH = 4", "DEPTH = 5", filename=filename), TRAIN_PY)
    assert repr(filename) in str(err.value)


def test_a_full_file_in_a_python_fence_replaces_train_py():
    new_text = TRAIN_PY.replace("DEPTH = 4", "DEPTH = 3")
    description, new = apply_reply(f"Shallower model\nHere it is:\n```python\n{new_text}```\n", TRAIN_PY)
    assert (description, new) == ("Shallower model", new_text)


def test_a_full_file_for_another_path_is_refused():
    with pytest.raises(EditError, match="only train.py"):
        apply_reply(f"x\nprepare.py\n```python\n{TRAIN_PY}```\n", TRAIN_PY)


def test_a_syntax_error_is_reported_with_its_line():
    with pytest.raises(EditError, match="not valid Python.*line 6") as err:
        apply_reply("oops\n" + block("DEPTH = 4 ", "DEPTH = = 4 "), TRAIN_PY)
    assert "DEPTH = = 4" in str(err.value)


def test_an_edit_that_changes_nothing_is_rejected():
    with pytest.raises(EditError, match="changes nothing"):
        apply_reply("nothing\n" + block("DEPTH = 4", "DEPTH = 4"), TRAIN_PY)


def test_a_partial_file_that_drops_the_model_is_rejected():
    with pytest.raises(EditError, match="no longer defines GPT, GPTConfig"):
        apply_reply("just the constants\n```python\nDEPTH = 5\n```\n", TRAIN_PY)


@pytest.mark.parametrize("reply, problem", [
    ("", "empty"),
    ("Make it better, please.", "no SEARCH/REPLACE block"),
    (block("DEPTH = 4", "DEPTH = 5"), "must start with a one-line description"),
    ("x\n<<<<<<< SEARCH\nDEPTH = 4\n>>>>>>> REPLACE\n", "expected a '=======' line"),
    ("x\n<<<<<<< SEARCH\nDEPTH = 4\n=======\nDEPTH = 5\n", "not closed"),
    ("x\n" + block("", "DEPTH = 5"), "empty SEARCH section"),
    ("x\n```python\nDEPTH = 5\n", "not closed"),
    ("x\n```python\na = 1\n```\n```python\nb = 2\n```\n", "more than one code block"),
    ("prepare.py\n" + block("DEPTH = 4", "DEPTH = 5"), "not with a file name"),
    ("<think>hmm</think>\n  \n", "nothing after its <think> section"),
])
def test_malformed_replies_explain_what_to_fix(reply, problem):
    with pytest.raises(EditError, match=problem):
        apply_reply(reply, TRAIN_PY)


def test_the_description_is_one_clean_line_without_tabs():
    reply = "## Raise\tthe LR  \n" + block("DEPTH = 4", "DEPTH = 5")
    assert apply_reply(reply, TRAIN_PY)[0] == "Raise the LR"


def test_a_reasoning_models_thinking_is_skipped():
    reply = "<think>\nMaybe DEPTH?\n<<<<<<< SEARCH\n</think>\nDeeper\n" + block("DEPTH = 4", "DEPTH = 5")
    assert apply_reply(reply, TRAIN_PY)[0] == "Deeper"


def test_edit_error_is_a_value_error_and_a_proposal_error():
    from autoresearch_lib.agents import ProposalError

    assert issubclass(EditError, ValueError) and issubclass(EditError, ProposalError)


# a reply built from pieces the parser cares about, so the fuzzer reaches every branch
PIECES = st.sampled_from(["<<<<<<< SEARCH", "=======", ">>>>>>> REPLACE", "```python", "```",
                          "train.py", "prepare.py", "../x", "", "DEPTH = 4", "DEPTH = 5", "n_layer",
                          "def f(:", "class GPT:", "    pass", "\t", "\r", "((((", "\x00"])
PIECED = st.lists(st.one_of(PIECES, st.text(max_size=20)), max_size=30).map("\n".join)
REPLIES = st.one_of(st.text(), PIECED)


@settings(max_examples=300, deadline=None)
@given(REPLIES)
def test_any_reply_gives_an_edit_or_an_edit_error(reply):
    try:
        description, new = apply_reply(reply, TRAIN_PY)
    except EditError as err:
        assert str(err)
    else:
        assert description and "\n" not in description and "\t" not in description
        assert new != TRAIN_PY
