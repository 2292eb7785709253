"""Agents: given the state of the research (program.md, train.py, results), propose the next
experiment. All of them follow the small protocol in `base.py`:

    agent.name                -> "offline", "openai", "scripted" or "human"
    agent.propose(state)      -> Proposal(description, train_py, usage), or raises ProposalError

- OfflineAgent: hill-climbs train.py's hyperparameters; no network, no key (the default).
- OpenAIAgent:  any OpenAI-compatible LLM server; unusable replies are fed back and retried.
- ScriptedAgent: replays prepared edits (demos, tests).
- HumanAgent:   an instructor types or approves each edit.

`fake_server.FakeChatServer` is a scripted OpenAI-compatible chat server on 127.0.0.1: it lets
OpenAIAgent run end to end with no key and no network (notebook 06, the tests).
"""

from .base import Agent, MissingAPIKeyError, Proposal, ProposalError, State
from .edits import EditError, apply_reply
from .human import HumanAgent
from .offline import OfflineAgent
from .openai_agent import OpenAIAgent
from .scripted import ScriptedAgent

AGENTS = {"offline": OfflineAgent, "openai": OpenAIAgent, "scripted": ScriptedAgent, "human": HumanAgent}


def make_agent(name: str = "offline", **kwargs) -> Agent:
    """Build an agent by name, e.g. make_agent("openai", model="llama3.2", base_url=...)."""
    key = str(name).strip().lower()
    if key not in AGENTS:
        raise ValueError(f"Unknown agent {name!r}: choose one of {', '.join(AGENTS)}.")
    return AGENTS[key](**kwargs)


__all__ = ["State", "Proposal", "Agent", "ProposalError", "MissingAPIKeyError", "EditError",
           "apply_reply", "OfflineAgent", "OpenAIAgent", "ScriptedAgent", "HumanAgent", "make_agent"]
