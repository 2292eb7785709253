"""Two training scripts that collude, for the tests of runs alone (test_parallel, test_attacks).

A helper trains as usual and hands its trained weights over through byte-range locks on files
that every sandbox can read (a channel that no namespace separates). A receiver waits for them
while it starts (within the start-up allowance, off the training clock), starts from them, and
trains its own budget on top: the work of two budgets in one number, which spot checks can't
see (the model is honestly causal). Each prints what it did ("PAIR sent N bytes", "PAIR heard
N bytes" or "PAIR heard nothing") to its log.
"""

import re

PAIRS = '''
import fcntl as fcntl_, glob as glob_, os as os_, struct as struct_, sys as sys_, time as time_
# Byte-range locks on files that every sandbox can read (Python's own): a channel that no
# namespace separates. One lock carries 10 bytes: 5 in where it starts, 5 in its length.
HERE = os_.path.dirname(os_.__file__)
SIGNAL = os_.path.join(HERE, "this.py")  # "sent n bytes": a lock at 1 + n; "got them": at ACK
FILES = [f for f in sorted(glob_.glob(os_.path.join(HERE, "*.py"))) if f != SIGNAL][:64]
SLOT, ACK, FLOCK = 1 << 44, 1 << 60, "hhqqixxxx"
def ranges(f, start=0, end=1 << 62):  # (start, length) of the locks other processes hold
    found = []
    while start < end:
        got = fcntl_.fcntl(f, fcntl_.F_GETLK, struct_.pack(FLOCK, fcntl_.F_WRLCK, 0, start, end - start, 0))
        kind, _, first, length, _ = struct_.unpack(FLOCK, got)
        if kind == fcntl_.F_UNLCK:
            break
        found.append((first, length))
        start = first + length
    return found
def state_bytes(model):
    state = model.state_dict()
    return torch.cat([state[k].detach().float().flatten().cpu() for k in sorted(state)]).half().numpy().tobytes()
def send(model):  # the helper: its trained weights, to whoever listens, until they say so
    blob, signal, files = state_bytes(model), open(SIGNAL, "rb"), [open(f, "rb") for f in FILES]
    padded = blob + bytes(-len(blob) % 10)
    for j in range(len(padded) // 10):
        a, b = (int.from_bytes(padded[10 * j + s:10 * j + s + 5], "big") for s in (0, 5))
        fcntl_.lockf(files[j % len(files)], fcntl_.LOCK_SH | fcntl_.LOCK_NB, b + 1, (j // len(files)) * SLOT + a)
    fcntl_.lockf(signal, fcntl_.LOCK_SH | fcntl_.LOCK_NB, 1, 1 + len(blob))
    t_end = time_.time() + 8
    while time_.time() < t_end and not ranges(signal, ACK, ACK + 1):
        time_.sleep(0.05)
    print(f"PAIR sent {len(blob)} bytes", file=sys_.stderr, flush=True)
def receive(model, patience=8):  # the receiver: a helper's weights, shaped like its own model's, or None
    signal, t_end = open(SIGNAL, "rb"), time_.time() + patience
    while not (sent := ranges(signal, 1, ACK)) and time_.time() < t_end:
        time_.sleep(0.05)
    if not sent:
        print("PAIR heard nothing", file=sys_.stderr, flush=True)
        return None
    chunks = {}
    for k, path in enumerate(FILES):
        with open(path, "rb") as f:
            for first, length in ranges(f):
                chunks[(first // SLOT) * len(FILES) + k] = (first % SLOT).to_bytes(5, "big") + (length - 1).to_bytes(5, "big")
    blob = b"".join(chunks[j] for j in range(len(chunks)))[:sent[0][0] - 1]
    fcntl_.lockf(signal, fcntl_.LOCK_SH | fcntl_.LOCK_NB, 1, ACK)
    print(f"PAIR heard {len(blob)} bytes", file=sys_.stderr, flush=True)
    flat, other, at = torch.frombuffer(bytearray(blob), dtype=torch.float16).float(), {}, 0
    for key, tensor in sorted(model.state_dict().items()):
        other[key] = flat[at:at + tensor.numel()].view_as(tensor).to(tensor.dtype)
        at += tensor.numel()
    return other
'''


def helper_and_receiver(baseline: str) -> tuple[str, str]:
    """The baseline train.py, edited into the helper and the receiver."""
    imports = "from torch.nn.attention.flex_attention import create_block_mask, flex_attention\n"
    shared = baseline.replace(imports, imports + PAIRS, 1)
    helper = shared.replace("    run.finish(model, config)\n", "    send(model)\n    run.finish(model, config)\n", 1)
    receiver = shared.replace(
        "    model.init_weights()\n",
        "    model.init_weights()\n"
        "    other = receive(model)  # before the clock starts: the helper's budget, then its own\n"
        "    if other is not None:\n"
        "        model.load_state_dict(other)\n", 1)
    assert "send(model)" in helper and "model.load_state_dict(other)" in receiver
    return helper, receiver


def judged_alone(log: str) -> list[float]:
    """A receiver's row log, checked: beside the helper it heard the weights, and trained on top
    of them to a clearly better score; trained again alone, it heard nothing. Returns the
    val_bpb of both runs."""
    together, _, alone = log.partition("=== the same code, trained again, alone on its machine ===")
    assert "PAIR heard" in together and "PAIR heard nothing" not in together, together[-3000:]  # the attack ran
    assert "PAIR heard nothing" in alone, log[-3000:]  # ... and alone, nobody helped
    scores = [float(v) for v in re.findall(r"^val_bpb:\s+([\d.]+)", log, re.M)]
    assert len(scores) == 2, log[-3000:]
    assert scores[0] < scores[1] - 0.02, scores  # two budgets beat one: the attack paid
    return scores
