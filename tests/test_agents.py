"""Tests for the agents: offline hill-climber, scripted, human, and OpenAI-compatible (against
a real HTTP server on 127.0.0.1, driven through the real `openai` client)."""

import ast
import logging
import time
import traceback

import pytest

from autoresearch_lib.agents import (Agent, HumanAgent, MissingAPIKeyError, OfflineAgent, OpenAIAgent,
                                     ProposalError, ScriptedAgent, State, make_agent)
from autoresearch_lib.agents.offline import parse_description, read_constants, set_constants

TRAIN_PY = '''"""A tiny GPT training script (test fixture, shaped like the baseline)."""
from dataclasses import dataclass

import torch.nn as nn

# Model architecture
ASPECT_RATIO = 64        # model_dim = depth * ASPECT_RATIO
HEAD_DIM = 128           # target head dimension for attention
WINDOW_PATTERN = "SSSL"  # sliding window pattern: L=full, S=half context

# Optimization
TOTAL_BATCH_SIZE = 2**19  # tokens per optimizer step
EMBEDDING_LR = 0.6       # token embeddings (Adam)
UNEMBEDDING_LR = 0.004   # lm_head (Adam)
MATRIX_LR = 0.04         # matrix parameters (Muon)
SCALAR_LR = 0.5          # per-layer scalars (Adam)
WEIGHT_DECAY = 0.2       # cautious weight decay for Muon
ADAM_BETAS = (0.8, 0.95) # Adam beta1, beta2
WARMUP_RATIO = 0.0       # fraction of the budget for LR warmup
WARMDOWN_RATIO = 0.5     # fraction of the budget for LR warmdown
FINAL_LR_FRAC = 0.0      # final LR as a fraction of the initial one

# Model size
DEPTH = 8                # number of transformer layers
DEVICE_BATCH_SIZE = 128  # per-device batch size (reduce if out of memory)


@dataclass
class GPTConfig:
    n_layer: int = DEPTH
    n_embd: int = DEPTH * ASPECT_RATIO


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Identity() for _ in range(config.n_layer))

    def forward(self, idx):
        for block in self.blocks:
            idx = block(idx)
        return idx
'''
PROGRAM = "Lower val_bpb. Keep the model small."
KEY = "sk-test-SECRET-0123456789"


def state(train_py=TRAIN_PY, results=(), **kw) -> State:
    return State(PROGRAM, train_py, list(results), experiment=len(results) + 1, **kw)


def row(description, status="discard", val_bpb=1.0) -> dict:
    return {"commit": "abc1234", "val_bpb": val_bpb, "memory_gb": 1.0, "status": status,
            "description": description}


def changed_lines(old: str, new: str) -> list[str]:
    a, b = old.split("\n"), new.split("\n")
    assert len(a) == len(b)
    return [y for x, y in zip(a, b) if x != y]


# --- offline -------------------------------------------------------------------------------

def test_offline_agent_is_reproducible_with_a_seed():
    s = state(results=[row("baseline", "keep")])
    assert OfflineAgent(seed=3).propose(s) == OfflineAgent(seed=3).propose(s)
    picks = {OfflineAgent(seed=seed).propose(s).description for seed in range(10)}
    assert len(picks) > 1  # the seed matters


def test_offline_agent_changes_one_constant_line_and_keeps_valid_python():
    for seed in range(40):
        proposal = OfflineAgent(seed=seed).propose(state())
        changes = parse_description(proposal.description)
        lines = changed_lines(TRAIN_PY, proposal.train_py)
        # one line per change; two only when both batch sizes move together
        assert len(lines) == len(changes) == len(proposal.description.split("; "))
        names = {name for name, _, _ in changes}
        assert len(changes) == 1 or names == {"TOTAL_BATCH_SIZE", "DEVICE_BATCH_SIZE"}
        for (name, old, new), line in zip(sorted(changes), sorted(lines)):
            assert line.startswith(f"{name} = ") and "#" in line  # the comment survives
            assert read_constants(TRAIN_PY)[name] == old
            assert read_constants(proposal.train_py)[name] == new
        ast.parse(proposal.train_py)
        assert proposal.usage == {} and proposal.original == TRAIN_PY
        assert proposal.diff.startswith("--- a/train.py")


def test_offline_batch_moves_keep_the_total_a_multiple_of_the_device_batch():
    for seed in range(60):
        c = read_constants(OfflineAgent(seed=seed).propose(state()).train_py)
        assert c["TOTAL_BATCH_SIZE"] % (c["DEVICE_BATCH_SIZE"] * 2048) == 0  # seq_len 2048 fits


def test_offline_agent_never_repeats_a_discarded_or_crashed_change():
    results, seen, agent = [row("baseline", "keep")], set(), OfflineAgent(seed=1)
    for i in range(25):
        proposal = agent.propose(state(results=results))
        pairs = {(name, repr(new)) for name, _, new in parse_description(proposal.description)}
        assert not pairs & seen, f"step {i} repeated {pairs & seen}"
        seen |= pairs
        results.append(row(proposal.description, "crash" if i % 3 == 0 else "discard"))
    assert len({r["description"] for r in results}) == len(results)


def test_offline_agent_hill_climbs_from_the_best_kept_text():
    def val_bpb(text):  # a made-up landscape: best at MATRIX_LR 0.08, DEPTH 10
        c = read_constants(text)
        return 1.0 + abs(c["MATRIX_LR"] - 0.08) + 0.01 * abs(c["DEPTH"] - 10)

    best_text, best = TRAIN_PY, val_bpb(TRAIN_PY)
    results, agent = [row("baseline", "keep", best)], OfflineAgent(seed=0)
    for _ in range(20):
        proposal = agent.propose(state(best_text, results))
        score = val_bpb(proposal.train_py)
        status = "keep" if score < best else "discard"
        if status == "keep":
            best_text, best = proposal.train_py, score
        results.append(row(proposal.description, status, score))
    assert best < val_bpb(TRAIN_PY)
    assert len({r["description"] for r in results}) == len(results)


def test_offline_agent_prefers_directions_that_helped_and_never_goes_back():
    kept = set_constants(TRAIN_PY, {"MATRIX_LR": 0.056})
    s = state(kept, [row("baseline", "keep"), row("MATRIX_LR 0.04 -> 0.056", "keep")])
    moves = [parse_description(OfflineAgent(seed).propose(s).description)[0] for seed in range(1000)]
    lr_moves = [(old, new) for name, old, new in moves if name == "MATRIX_LR"]
    assert all(new != 0.04 for _, new in lr_moves)
    assert sum(new > old for old, new in lr_moves) > 2 * sum(new < old for old, new in lr_moves)


def test_offline_agent_works_on_the_real_baseline():
    from autoresearch_lib.baseline import render_train_py

    text, results = render_train_py("quick"), []
    for i in range(10):
        proposal = OfflineAgent(seed=i).propose(state(text, results))
        assert len(changed_lines(text, proposal.train_py)) in (1, 2)
        ast.parse(proposal.train_py)
        results.append(row(proposal.description))


def test_offline_agent_says_when_it_has_nothing_left_to_try():
    tiny = "DEPTH = 1\n\nclass GPTConfig: pass\nclass GPT: pass\n"
    assert OfflineAgent().propose(state(tiny)).description == "DEPTH 1 -> 2"
    with pytest.raises(ProposalError, match="run out of new changes"):
        OfflineAgent().propose(state(tiny, [row("DEPTH 1 -> 2")]))


def program_exploring(*names: str) -> str:
    return "Lower val_bpb.\n\n## Constants to explore\n" + "".join(f"- {n}: a note\n" for n in names)


def test_program_md_restricts_the_offline_agent_to_the_constants_it_lists():
    results = [row("baseline", "keep")]
    for seed in range(30):
        s = State(program_exploring("MATRIX_LR"), TRAIN_PY, results, experiment=1)
        changes = parse_description(OfflineAgent(seed=seed).propose(s).description)
        assert [name for name, _, _ in changes] == ["MATRIX_LR"]
    # two names: both get explored, nothing else does
    s = lambda seed: State(program_exploring("`DEPTH`", "WARMDOWN_RATIO"), TRAIN_PY, results, experiment=1)
    moved = {parse_description(OfflineAgent(seed=seed).propose(s(seed)).description)[0][0] for seed in range(40)}
    assert moved == {"DEPTH", "WARMDOWN_RATIO"}


def test_without_the_section_every_constant_is_in_play_and_the_default_program_lists_none():
    from autoresearch_lib.agents.offline import explore_list
    from autoresearch_lib.baseline import default_program

    assert "## Constants to explore" in default_program() and explore_list(default_program()) == []
    moved = {parse_description(OfflineAgent(seed=seed).propose(state()).description)[0][0] for seed in range(60)}
    assert len(moved) > 5


def test_explore_list_reads_only_its_section_and_skips_comments_and_code():
    from autoresearch_lib.agents.offline import explore_list

    program = ("# Goal\n- DEPTH is not listed here\n\n## Constants to explore\n"
               "- `MATRIX_LR` (Muon)\n<!-- - EMBEDDING_LR -->\n```\n- SCALAR_LR\n```\n"
               "* solve.py:DEGREE\n- lower_case\nfree text MENTIONING_A_NAME\n## Ideas\n- WARMUP_RATIO\n")
    assert explore_list(program) == ["MATRIX_LR", "solve.py:DEGREE"]


def test_a_listed_name_that_train_py_lacks_is_a_clear_proposal_error():
    s = State(program_exploring("MATRIX_LR", "MATRX_LR"), TRAIN_PY, [row("baseline", "keep")], experiment=1)
    with pytest.raises(ProposalError, match=r"lists MATRX_LR.*no such one-line UPPERCASE constant.*"
                                            r"MATRIX_LR.*Fix the name in program.md"):
        OfflineAgent().propose(s)


def test_the_offline_agent_says_when_the_listed_constants_are_used_up():
    tiny = "DEPTH = 1\nLR = 0.5\n"
    s = State(program_exploring("DEPTH"), tiny, [row("baseline", "keep"), row("DEPTH 1 -> 2")], experiment=2)
    with pytest.raises(ProposalError, match=r"constants program.md lets it explore \(DEPTH\).*List more names"):
        OfflineAgent().propose(s)
    s.program = "no section"  # LR is still free
    assert OfflineAgent().propose(s).description.startswith("LR 0.5 -> ")


def test_set_constants_rewrites_only_the_literal_in_its_own_style():
    new = set_constants(TRAIN_PY, {"TOTAL_BATCH_SIZE": 2**18, "WINDOW_PATTERN": "L",
                                   "ADAM_BETAS": (0.9, 0.99)})
    assert "TOTAL_BATCH_SIZE = 2**18  # tokens per optimizer step" in new
    assert 'WINDOW_PATTERN = "L"  # sliding' in new and "ADAM_BETAS = (0.9, 0.99) # Adam" in new
    with pytest.raises(ProposalError, match="no top-level constant LEARNING_RATE"):
        set_constants(TRAIN_PY, {"LEARNING_RATE": 0.1})


# --- scripted and human ---------------------------------------------------------------------

REPLY = "Deeper model\n<<<<<<< SEARCH\nDEPTH = 8 \n=======\nDEPTH = 9 \n>>>>>>> REPLACE\n"


def test_scripted_agent_replays_replies_callables_and_constant_pairs_then_stops():
    def no_warmdown(s):
        return "no warmdown", s.train_py.replace("WARMDOWN_RATIO = 0.5", "WARMDOWN_RATIO = 0.0")

    agent = ScriptedAgent([REPLY, no_warmdown, ("bigger LR", {"MATRIX_LR": 0.08})])
    assert isinstance(agent, Agent)
    first, second, third = (agent.propose(state()) for _ in range(3))
    assert first.description == "Deeper model" and "DEPTH = 9 " in first.train_py
    assert second.description == "no warmdown" and "WARMDOWN_RATIO = 0.0 " in second.train_py
    assert third.description == "bigger LR" and "MATRIX_LR = 0.08 " in third.train_py
    with pytest.raises(ProposalError, match="no edits left"):
        agent.propose(state())


def test_scripted_agent_reports_an_edit_that_does_not_apply():
    with pytest.raises(ProposalError, match="Scripted edit 1 does not apply.*0 times"):
        ScriptedAgent([REPLY.replace("DEPTH = 8", "DEPTH = 80")]).propose(state())


def test_human_agent_accepts_the_suggestion_or_a_typed_reply():
    seen = []
    def approve_suggestion(s, suggestion):
        seen.append(suggestion)
        return suggestion

    approve = HumanAgent(approve_suggestion, suggest_with=OfflineAgent(seed=2))
    assert approve.propose(state()) == OfflineAgent(seed=2).propose(state()) == seen[0]
    typed = HumanAgent(lambda s, suggestion: REPLY).propose(state())
    assert typed.description == "Deeper model" and typed.original == TRAIN_PY


def test_human_agent_rejection_is_a_proposal_error():
    with pytest.raises(ProposalError, match="rejected by the instructor"):
        HumanAgent(lambda s, suggestion: None).propose(state())


def test_make_agent_builds_each_agent_by_name(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert make_agent("offline", seed=4).seed == 4
    assert make_agent("Scripted", edits=[REPLY]).name == "scripted"
    assert make_agent("human", callback=lambda s, p: p).name == "human"
    assert make_agent("openai", base_url="http://127.0.0.1:9/v1").name == "openai"
    with pytest.raises(ValueError, match="choose one of offline, openai, scripted, human"):
        make_agent("gpt")


# --- OpenAI-compatible, against a real HTTP server -------------------------------------------

def agent_for(llm, **kw) -> OpenAIAgent:
    kw = {"max_retries": 0, **kw}
    return OpenAIAgent(model="fake-model", base_url=llm.url, api_key=KEY, timeout=10, **kw)


def crash_state() -> State:
    results = [row("baseline", "keep", 0.9979), row("DEPTH 8 -> 9", "crash", 0.0)]
    log = "...\nRuntimeError: CUDA out of memory"
    return state(results=results, best_val_bpb=0.9979, last_crash_log=log)


def test_openai_agent_applies_a_good_reply_and_sends_the_whole_context(llm):
    llm.reply(REPLY)
    proposal = agent_for(llm).propose(crash_state())
    assert proposal.description == "Deeper model" and "DEPTH = 9 " in proposal.train_py
    assert proposal.usage == {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
    request = llm.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["body"]["model"] == "fake-model"
    assert request["body"]["temperature"] == 0.7
    system, user = request["body"]["messages"]
    assert "train.py" in system["content"] and "lower is better" in system["content"]
    assert "<<<<<<< SEARCH" in system["content"]
    assert PROGRAM in user["content"] and TRAIN_PY.strip() in user["content"]
    assert "commit\tval_bpb\tmemory_gb\tstatus\tdescription" in user["content"]
    assert "abc1234\t0.997900\t1.0\tkeep\tbaseline" in user["content"]
    assert "CUDA out of memory" in user["content"] and "0.997900" in user["content"]


@pytest.mark.parametrize("bad_reply, error", [
    ("Deeper\n<<<<<<< SEARCH\nDEPTH = 80\n=======\nDEPTH = 9\n>>>>>>> REPLACE\n", "matched 0 times"),
    ("Cheat\nprepare.py\n<<<<<<< SEARCH\nDEPTH = 8\n=======\nDEPTH = 9\n>>>>>>> REPLACE\n", "only train.py"),
    ("Break\n<<<<<<< SEARCH\nDEPTH = 8 \n=======\nDEPTH = (8 \n>>>>>>> REPLACE\n", "not valid Python"),
])
def test_openai_agent_feeds_the_error_back_and_sums_usage(llm, bad_reply, error):
    llm.reply(bad_reply, prompt_tokens=100, completion_tokens=20)
    llm.reply(REPLY, prompt_tokens=150, completion_tokens=30)
    proposal = agent_for(llm).propose(state())
    assert proposal.description == "Deeper model"
    assert proposal.usage == {"prompt_tokens": 250, "completion_tokens": 50, "total_tokens": 300}
    messages = llm.requests[1]["body"]["messages"]
    assert len(messages) == 4 and messages[2] == {"role": "assistant", "content": bad_reply}
    assert messages[3]["role"] == "user" and error in messages[3]["content"]


def test_openai_agent_gives_up_after_max_attempts(llm):
    for _ in range(3):
        llm.reply("I think you should raise the learning rate.")
    with pytest.raises(ProposalError, match="no usable edit in 3 attempts.*no SEARCH/REPLACE"):
        agent_for(llm, max_attempts=3).propose(state())
    assert len(llm.requests) == 3


def test_the_client_retries_rate_limits_and_server_errors(llm):
    llm.error(429, "slow down")
    llm.error(500, "overloaded")
    llm.reply(REPLY)
    start = time.monotonic()
    assert agent_for(llm, max_retries=2).propose(state()).description == "Deeper model"
    assert len(llm.requests) == 3 and time.monotonic() - start < 5


def test_server_errors_after_the_retries_become_a_proposal_error_without_the_key(llm):
    for _ in range(2):
        llm.error(503, f"unavailable for key {KEY}")
    with pytest.raises(ProposalError, match="failed, even after 1 retries") as err:
        agent_for(llm, max_retries=1).propose(state())
    assert KEY not in str(err.value) and "<redacted>" in str(err.value)


def test_a_rejected_key_is_reported_and_never_shown(llm, caplog):
    caplog.set_level(logging.DEBUG)
    llm.error(401, f"Incorrect API key provided: {KEY}")
    agent = agent_for(llm, max_retries=3)
    with pytest.raises(ProposalError, match="API key was rejected") as err:
        agent.propose(state())
    assert len(llm.requests) == 1  # a 401 is not retried
    shown = [str(err.value), repr(agent), "".join(traceback.format_exception(err.value)), caplog.text]
    assert not any(KEY in text for text in shown)


def test_a_missing_key_fails_before_any_run(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(MissingAPIKeyError, match="OPENAI_API_KEY.*Ollama"):
        OpenAIAgent(base_url="http://127.0.0.1:9/v1")
    with pytest.raises(ProposalError):
        make_agent("openai")


def test_model_server_and_key_come_from_the_environment(llm, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", llm.url)
    monkeypatch.setenv("OPENAI_MODEL", "llama3.2")
    llm.reply(REPLY)
    agent = OpenAIAgent(max_retries=0)
    assert agent.propose(state()).description == "Deeper model"
    assert llm.requests[0]["body"]["model"] == "llama3.2" and KEY not in repr(agent)


def test_the_fake_server_records_requests_and_says_when_no_reply_is_queued():
    from autoresearch_lib.agents.fake_server import FakeChatServer

    with FakeChatServer() as server:
        server.reply("Raise MATRIX_LR\ntrain.py\n<<<<<<< SEARCH\nMATRIX_LR = 0.04\n=======\n"
                     "MATRIX_LR = 0.05\n>>>>>>> REPLACE")
        agent = OpenAIAgent(model="demo", base_url=server.url, api_key="no-key-needed", max_retries=0)
        assert agent.propose(state()).description == "Raise MATRIX_LR"
        assert server.messages()[0]["role"] == "system" and server.requests[0]["path"] == "/v1/chat/completions"
        with pytest.raises(ProposalError, match="no reply queued"):
            agent.propose(state())
    with pytest.raises(Exception):  # closed: nothing listens any more
        OpenAIAgent(model="demo", base_url=server.url, api_key="x", max_retries=0, timeout=2).client.chat \
            .completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])


def test_with_several_files_a_listed_name_may_say_its_file():
    files = {"a.py": "X = 1\nY = 0.5\n", "b.py": "X = 4\nZ = 3\n"}
    for listed, expected in (("b.py:X", {"b.py:X"}), ("Y", {"a.py:Y"}), ("X", {"a.py:X", "b.py:X"})):
        s = State(program_exploring(listed), files["a.py"], [row("baseline", "keep")], experiment=1,
                  task="demo", metric="score", files=files)
        moved = {parse_description(OfflineAgent(seed).propose(s).description)[0][0] for seed in range(30)}
        assert moved == expected, listed
