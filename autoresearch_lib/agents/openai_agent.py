"""The LLM agent: asks any OpenAI-compatible chat server for the next edit of train.py.

Works with OpenAI, and with local or hosted servers that speak the same API (Ollama, vLLM,
LM Studio, OpenRouter): set `base_url`. The model, server and key come from the arguments or
from OPENAI_MODEL, OPENAI_BASE_URL and OPENAI_API_KEY.

One proposal is a short conversation: the rules, program.md, train.py and the results go
out; a reply comes back and goes through `edits.apply_reply`. If it cannot be applied, the
error goes back to the model, which gets `max_attempts` tries in all. Network trouble (429,
5xx, timeouts) is retried by the `openai` client itself, with backoff, `max_retries` times.

For another task (tasks.py) the prompt is built from the task: its program.md, its editable
files by name, its metric and direction, and the results with the metric's column name.
"""

from __future__ import annotations

import logging
import os

from .base import MissingAPIKeyError, Proposal, ProposalError, State
from .edits import EditError, apply_reply

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gpt-4o-mini"
RESULT_COLUMNS = ("commit", "val_bpb", "memory_gb", "status", "description")  # upstream's five
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")
NUMBER_FORMATS = {"val_bpb": "{:.6f}", "memory_gb": "{:.1f}"}  # as upstream writes them
MAX_RESULT_ROWS = 50  # the prompt shows the most recent rows only
CRASH_TAIL_CHARS = 3000

SYSTEM_PROMPT = """\
You are an autonomous ML researcher. You improve a small GPT language model by editing its \
training script, train.py. Each experiment trains for a fixed wall-clock budget, then the \
model is scored by val_bpb (validation bits per byte): lower is better. If your change lowers \
the best val_bpb so far it is kept; otherwise it is reverted. Crashes (errors, out of memory, \
NaN loss, running past the time limit) are reverted too.

Rules:
- Edit only train.py. Data, tokenizer, evaluation, the time budget and the harness are fixed.
- Make one focused change per experiment, so its effect can be measured.
- train.py must stay valid Python and keep defining GPTConfig and GPT.

Reply format: first a one-line description of the change (it goes in the results table), \
then either one or more SEARCH/REPLACE blocks:

train.py
<<<<<<< SEARCH
(lines copied exactly from the current train.py)
=======
(the new lines)
>>>>>>> REPLACE

or the complete new train.py in a single ```python block. Each SEARCH section must match \
exactly one place in train.py. Prefer SEARCH/REPLACE blocks for small changes."""


TASK_SYSTEM_PROMPT = """\
You are an autonomous researcher. You improve a program on the task "{task}" by editing \
{files}. Each experiment runs the task's fixed scorer on your version, which measures \
{metric}: {better} is better. If your change makes the best {metric} so far {better_word} it \
is kept; otherwise it is reverted. Crashes (errors, wrong answers, running past the time limit) \
are reverted too.

Rules:
- Edit only {files}. Everything else (the scorer, the data, the task's settings) is fixed; \
an edit of any other file is refused.
- Make one focused change per experiment, so its effect can be measured.
- Follow the rules in program.md.

Reply format: first a one-line description of the change (it goes in the results table), \
then one or more SEARCH/REPLACE blocks, each after a line naming its file:

{example}
<<<<<<< SEARCH
(lines copied exactly from the current {example})
=======
(the new lines)
>>>>>>> REPLACE

{whole}Each SEARCH section must match exactly one place in its file."""


def system_prompt(state: State) -> str:
    """The rules: GPT's own prompt, or one built from the task."""
    if state.task == "gpt":
        return SYSTEM_PROMPT
    names = list(state.files)
    whole = ("Or send the complete new file in a single ```python block after a line naming "
             "it. " if len(names) == 1 else "")
    return TASK_SYSTEM_PROMPT.format(
        task=state.task, files=" and ".join(names), metric=state.metric, better=state.better,
        better_word=state.better, example=names[0], whole=whole)


class OpenAIAgent:
    """Proposes edits with an LLM behind an OpenAI-compatible chat-completions API."""

    name = "openai"

    def __init__(self, model: str | None = None, base_url: str | None = None,
                 api_key: str | None = None, max_attempts: int = 3, max_retries: int = 4,
                 temperature: float | None = 0.7, timeout: float = 120):
        self.model = model or os.environ.get("OPENAI_MODEL") or DEFAULT_MODEL
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        self._api_key = api_key or os.environ.get("OPENAI_API_KEY") or ""
        if not self._api_key.strip():
            raise MissingAPIKeyError(
                "No API key for the OpenAI agent: set the OPENAI_API_KEY environment variable or "
                "pass api_key=... . For a local server such as Ollama, vLLM or LM Studio any "
                "non-empty string works (e.g. OPENAI_API_KEY=ollama). Or use the offline agent, "
                "which needs no key.")
        self.max_attempts, self.max_retries = max(1, max_attempts), max_retries
        self.temperature = temperature  # None: leave it to the server (some models reject it)
        import openai  # here, not at the top: it takes ~1 s to import and only this agent needs it

        self.client = openai.OpenAI(api_key=self._api_key, base_url=self.base_url,
                                    max_retries=max_retries, timeout=timeout)

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIAgent(model={self.model!r}, base_url={self.base_url!r})"

    def propose(self, state: State) -> Proposal:
        """Ask the model, feeding back each unusable reply, up to max_attempts times."""
        messages = [{"role": "system", "content": system_prompt(state)},
                    {"role": "user", "content": build_prompt(state)}]
        usage: dict = {}
        for attempt in range(1, self.max_attempts + 1):
            reply = self._ask(messages, usage)
            try:
                if state.task != "gpt":
                    description, files = apply_reply(reply, state.files)
                    return Proposal(description, usage=usage, files=files,
                                    originals=dict(state.files))
                description, train_py = apply_reply(reply, state.train_py)
                return Proposal(description, train_py, usage=usage, original=state.train_py)
            except EditError as err:
                problem = str(err)
            log.info("attempt %d/%d: reply not usable: %s", attempt, self.max_attempts, problem)
            # keep the conversation: the model sees its own reply and what was wrong with it
            messages += [{"role": "assistant", "content": reply},
                         {"role": "user", "content": f"Your reply could not be applied: {problem}\n"
                                                     "Send a corrected reply in the same format."}]
        raise ProposalError(f"The model {self.model} gave no usable edit in {self.max_attempts} "
                            f"attempts. The last problem was: {problem}")

    def _ask(self, messages: list[dict], usage: dict) -> str:
        """One chat completion; adds its token counts to `usage`; API errors -> ProposalError."""
        import openai

        extra = {} if self.temperature is None else {"temperature": self.temperature}
        try:
            response = self.client.chat.completions.create(model=self.model, messages=messages, **extra)
        except openai.AuthenticationError:
            # `from None`: the original error may quote the key, so it must not be chained
            raise ProposalError(f"The API key was rejected (401) by {self._server()}. Check "
                                "OPENAI_API_KEY (or api_key=...): it may be mistyped, expired or "
                                "meant for another server.") from None
        except openai.APIError as err:
            raise ProposalError(f"The model server {self._server()} failed, even after "
                                f"{self.max_retries} retries: {self._redact(str(err))}. Check that "
                                f"it is running and serves the model {self.model!r}.") from None
        for key in USAGE_KEYS:  # some local servers send no usage at all
            usage[key] = usage.get(key, 0) + (getattr(response.usage, key, None) or 0)
        choice = response.choices[0] if response.choices else None
        return (choice.message.content or "") if choice else ""

    def _server(self) -> str:
        return self._redact(self.base_url or "api.openai.com")

    def _redact(self, text: str) -> str:
        """Remove the API key from any text that may be shown (server errors can echo it)."""
        return text.replace(self._api_key, "<redacted>") if len(self._api_key) >= 4 else text


def build_prompt(state: State) -> str:
    """The user message: program.md, the current editable file(s), the results, the last crash."""
    parts = [f"# program.md (the human's instructions)\n\n{state.program.strip()}"]
    for name, text in state.files.items():
        language = "python" if name.endswith(".py") else ""
        parts.append(f"# {name} (the current best version)\n\n```{language}\n{text.rstrip()}\n```")
    parts.append(f"# Results so far (results.tsv)\n\n{results_table(state.results, state.metric)}")
    if state.last_crash_log:
        parts.append(f"# The last experiment crashed; the end of its log\n\n```\n"
                     f"{state.last_crash_log[-CRASH_TAIL_CHARS:].rstrip()}\n```")
    if state.pending:
        parts.append("# Already proposed for this wave (they run at the same time as yours, from "
                     "the same files): propose something different\n\n"
                     + "\n".join(f"- {d}" for d in state.pending))
    best = "none yet" if state.best_val_bpb is None else _cell(state.metric, state.best_val_bpb)
    if state.task == "gpt":
        parts.append(f"Propose experiment {state.experiment}. The best val_bpb so far is {best}.")
    else:
        parts.append(f"Propose experiment {state.experiment}. The best {state.metric} so far is "
                     f"{best} ({state.better} is better).")
    return "\n\n".join(parts)


def results_table(results: list[dict], metric: str = "val_bpb") -> str:
    """The most recent results as tab-separated lines, header first (upstream's five columns,
    the second named after the metric)."""
    if not results:
        return "(no experiments yet)"
    columns = (RESULT_COLUMNS[0], metric, *RESULT_COLUMNS[2:])
    lines = ["\t".join(columns)]
    for row in results[-MAX_RESULT_ROWS:]:
        lines.append("\t".join(_cell(column, row.get(column, "")) for column in columns))
    skipped = len(results) - MAX_RESULT_ROWS
    return ("" if skipped <= 0 else f"({skipped} earlier rows not shown)\n") + "\n".join(lines)


def _cell(column: str, value) -> str:
    if isinstance(value, (int, float)) and column in NUMBER_FORMATS:
        return NUMBER_FORMATS[column].format(value)
    if isinstance(value, float):  # a task's metric
        return f"{value:.6g}"
    return str(value).replace("\t", " ").replace("\n", " ")
