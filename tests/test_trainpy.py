"""The baseline train.py itself: its loss, attention paths, optimizer levers and presets, on a CPU.

Each test loads train.py as a module (rendered with the quick preset, or edited as an agent
would edit it) and checks one behaviour on a tiny model."""

import importlib.util
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from autoresearch_lib.baseline import TRAIN_PY, render_train_py, set_constant
from autoresearch_lib.config import PRESETS

TANH_SOFTCAP = "return LOGIT_SOFTCAP * torch.tanh(logits.float() / LOGIT_SOFTCAP)"


def load_train_py(tmp_path, source=None, name="train_under_test"):
    path = tmp_path / f"{name}.py"
    path.write_text(source or render_train_py("quick"))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def tiny_gpt(train_py, seed=0, head_std=None, **overrides):
    config = dict(sequence_len=32, vocab_size=64, n_layer=2, n_head=4, n_kv_head=4, n_embd=64,
                  window_pattern="SL")
    config = train_py.GPTConfig(**{**config, **overrides})
    torch.manual_seed(seed)
    model = train_py.GPT(config)
    model.init_weights()
    with torch.no_grad():  # away from the init's zeros, so every weight gets a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        if head_std:
            model.lm_head.weight.normal_(std=head_std)
    return model


def gradients(model, x, y):
    model.zero_grad()
    loss = model(x, y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.slow
def test_compiled_training_follows_an_edited_softcap(tmp_path):
    """The compiled training step (a GPU's path) and the eager one (a CPU's) both differentiate
    whatever softcap() computes: an agent who swaps tanh for another squashing function gets the
    same, correct gradients on every device."""
    assert TANH_SOFTCAP in TRAIN_PY.read_text()
    edited = render_train_py("quick").replace(
        TANH_SOFTCAP, "return LOGIT_SOFTCAP * torch.sin(logits.float() / LOGIT_SOFTCAP)")
    train_py = load_train_py(tmp_path, edited, "train_sin_softcap")
    model = tiny_gpt(train_py, head_std=2.0)  # logits of ±10-40: deep in the soft cap's curve
    x, y = torch.randint(0, 64, (4, 32)), torch.randint(0, 64, (4, 32))
    eager_loss, eager = gradients(model, x, y)
    # the loss is the cross-entropy of what the model returns for scoring: the edited soft cap
    assert eager_loss.item() == pytest.approx(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    compiled_loss, compiled = gradients(torch.compile(model, dynamic=False), x, y)
    assert compiled_loss.item() == pytest.approx(eager_loss.item(), rel=1e-5)
    for e, c in zip(eager, compiled):
        assert torch.allclose(e, c, rtol=1e-4, atol=1e-5 * e.abs().max().item())
    # and the edit matters: tanh's gradients are not sin's (a hard-coded derivative would show)
    _, tanh = gradients(tiny_gpt(load_train_py(tmp_path, name="train_tanh"), head_std=2.0), x, y)
    assert not torch.allclose(tanh[-1], eager[-1], rtol=1e-3)


@pytest.mark.parametrize("body", [TANH_SOFTCAP,
                                  "return LOGIT_SOFTCAP * torch.sin(logits.float() / LOGIT_SOFTCAP)",
                                  "return logits.float() - logits.float().mean(dim=-1, keepdim=True)"])
def test_the_memory_light_loss_equals_cross_entropy_of_softcap(tmp_path, body):
    """SoftcappedCrossEntropy (the compiled path) gives F.cross_entropy(softcap(logits)) in value
    and gradient for any softcap() body, even one that mixes the vocabulary (the last one)."""
    train_py = load_train_py(tmp_path, render_train_py("quick").replace(TANH_SOFTCAP, body), "train_loss_check")
    torch.manual_seed(0)
    logits = (torch.randn(300, 50, dtype=torch.float64) * 30).requires_grad_()
    targets = torch.randint(0, 50, (300,))
    ours = train_py.SoftcappedCrossEntropy.apply(logits, targets)
    (ours_grad,) = torch.autograd.grad(ours, logits)
    reference = F.cross_entropy(train_py.softcap(logits), targets)
    (reference_grad,) = torch.autograd.grad(reference, logits)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)
    assert torch.allclose(ours_grad, reference_grad.to(ours_grad.dtype), atol=1e-8)
    assert ours_grad.dtype == logits.dtype  # the gradient comes back in the logits' precision


def test_grouped_query_attention_shares_each_key_value_head(tmp_path):
    """With n_kv_head < n_head, query heads 2i and 2i+1 read key/value head i: the same as plain
    attention with every key/value head repeated."""
    train_py = load_train_py(tmp_path)
    model = tiny_gpt(train_py, n_kv_head=2, window_pattern="L")
    attn = model.blocks[1].attn  # a layer with a value embedding: its gate has one output per kv head
    assert attn.c_k.weight.shape == (2 * 16, 64) and attn.ve_gate.weight.shape == (2, 32)
    assert model.value_embeds["1"].weight.shape == (64, 2 * 16)
    x = torch.randn(3, 32, 64)
    ve = torch.randn(3, 32, 2 * 16)
    T, cos, sin = 32, model.cos[:, :32], model.sin[:, :32]
    out = attn(x, ve, cos, sin, None)
    # the reference: expand k, v (and the value embedding) to every query head, plain SDPA
    B, H, D = 3, 4, 16
    q = attn.c_q(x).view(B, T, H, D)
    k = attn.c_k(x).view(B, T, 2, D)
    v = attn.c_v(x).view(B, T, 2, D)
    gate = 2 * torch.sigmoid(attn.ve_gate(x[..., :32]))
    v = v + gate.unsqueeze(-1) * ve.view(B, T, 2, D)
    q, k = train_py.norm(train_py.apply_rotary(q, cos, sin)), train_py.norm(train_py.apply_rotary(k, cos, sin))
    k, v = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
    reference = attn.c_proj(y.transpose(1, 2).reshape(B, T, 64))
    assert torch.allclose(out, reference, atol=1e-5)


def test_the_model_rebuilds_from_its_config_and_state_dict(tmp_path):
    """What a model server does with a checkpoint: GPT(GPTConfig(**config)), load_state_dict, forward."""
    train_py = load_train_py(tmp_path)
    model = tiny_gpt(train_py, n_kv_head=2, ve_gate_channels=16)
    rebuilt = train_py.GPT(train_py.GPTConfig(**asdict(model.config)))
    rebuilt.load_state_dict(model.state_dict())
    idx = torch.randint(0, 64, (2, 32))
    logits = rebuilt(idx)
    assert logits.shape == (2, 32, 64) and torch.equal(logits, model(idx))
    assert logits.abs().max() < train_py.LOGIT_SOFTCAP  # soft-capped


def test_a_sliding_window_layer_sees_exactly_its_window(tmp_path):
    """The mask path (CPUs, and GPUs older than Ampere): in an S layer of window w, query t sees
    tokens t-w+1 .. t. Perturbing token 0 changes outputs 0 .. w-1 and nothing after."""
    train_py = load_train_py(tmp_path)
    model = tiny_gpt(train_py, window_pattern="SL")  # layer 0 has a window of 16, the last is full
    assert model.windows == [16, 32]
    attn, T = model.blocks[0].attn, 32
    masks = model.masks(T, torch.device("cpu"))
    assert masks[1] is None and masks[0].dtype == torch.bool and masks[0].shape == (T, T)
    assert model.masks(T, torch.device("cpu"))[0] is masks[0]  # built once, then reused
    x = torch.randn(1, T, 64)
    nudged = x.clone()
    nudged[0, 0] += 1.0
    args = (None, model.cos[:, :T], model.sin[:, :T], masks[0])
    changed = (attn(x, *args) - attn(nudged, *args)).abs().amax(dim=-1)[0]
    assert (changed[:16] > 1e-6).all() and (changed[16:] == 0).all()


@pytest.mark.parametrize("kernel, capability, chosen", [
    ("auto", (9, 0), "flex"), ("auto", (8, 0), "flex"), ("auto", (7, 5), "mask"),  # T4: the mask path
    ("mask", (9, 0), "mask"), ("flex", (7, 5), "flex")])
def test_the_attention_kernel_is_chosen_by_card_or_by_constant(tmp_path, monkeypatch, kernel, capability, chosen):
    train_py = load_train_py(tmp_path, set_constant(render_train_py("quick"), "ATTENTION_KERNEL", kernel))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert train_py.attention_kernel(torch.device("cuda")) == chosen
    assert train_py.attention_kernel(torch.device("cpu")) == (kernel if kernel != "auto" else "mask")


@pytest.mark.parametrize("installed, capability, chosen", [
    (True, (9, 0), "fa4"), (True, (10, 0), "fa4"), (False, (9, 0), "flex"), (True, (8, 0), "flex"),
    (True, (12, 0), "flex")])  # sm120 (consumer Blackwell): fa4 runs there, unmeasured
def test_auto_picks_flash_attention_4_where_it_is_installed_and_runs(tmp_path, monkeypatch, installed, capability, chosen):
    train_py = load_train_py(tmp_path)
    monkeypatch.setattr(train_py, "fa4_installed", lambda: installed)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert train_py.attention_kernel(torch.device("cuda")) == chosen
    if chosen == "fa4":  # heads FlashAttention 4 has no kernel for: FlexAttention
        assert [train_py.attention_kernel(torch.device("cuda"), d) for d in (64, 100, 256, 512)] == [
            "fa4", "flex", "fa4", "flex"]


def fake_flash_attn_4(monkeypatch):
    """flash-attn-4's two entry points train.py calls, as the package documents them, computed
    by SDPA with a dense mask: (B, T, H, D) layout, window_size_left = how many keys back."""
    import types

    def scores_and_mask(q, k, window_size_left):  # q (B, T, H, D), k (B, T, H_kv, D)
        T, group = q.size(1), q.size(2) // k.size(2)
        i = torch.arange(T)
        allowed = i[None, :] <= i[:, None]
        if window_size_left is not None:
            allowed &= i[:, None] - i[None, :] <= window_size_left
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.repeat_interleave(group, 2).float()) / q.size(-1) ** 0.5
        return scores.masked_fill(~allowed, float("-inf")), group

    def _flash_attn_fwd(q, k, v, causal=False, window_size_left=None, return_lse=False, **unused):
        assert causal and return_lse and not unused
        calls.append(window_size_left)
        scores, group = scores_and_mask(q, k, window_size_left)
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.repeat_interleave(group, 2).float())
        return out.to(q.dtype).contiguous(), scores.logsumexp(-1), None, None, None

    def _flash_attn_bwd(q, k, v, out, dout, lse, causal=False, window_size_left=None, **unused):
        """FlashAttention's backward: the probabilities again from the saved log-sum-exp."""
        assert causal and not unused
        scores, group = scores_and_mask(q, k, window_size_left)
        P = torch.exp(scores - lse[..., None])  # (B, H, T, T)
        dout, ve, ke = dout.float(), v.repeat_interleave(group, 2).float(), k.repeat_interleave(group, 2).float()
        dP = torch.einsum("bqhd,bkhd->bhqk", dout, ve)
        dS = P * (dP - (dout * out.float()).sum(-1).transpose(1, 2)[..., None]) / q.size(-1) ** 0.5
        dq = torch.einsum("bhqk,bkhd->bqhd", dS, ke)
        dk = torch.einsum("bhqk,bqhd->bkhd", dS, q.float())
        dv = torch.einsum("bhqk,bqhd->bkhd", P, dout)
        unshare = lambda t: t.unflatten(2, (k.size(2), group)).sum(3)  # GQA: sum over each group
        return dq.to(q.dtype), unshare(dk).to(k.dtype), unshare(dv).to(v.dtype)

    calls = []
    interface = types.ModuleType("flash_attn.cute.interface")
    interface._flash_attn_fwd, interface._flash_attn_bwd = _flash_attn_fwd, _flash_attn_bwd
    for name, module in [("flash_attn", types.ModuleType("flash_attn")),
                         ("flash_attn.cute", types.ModuleType("flash_attn.cute")),
                         ("flash_attn.cute.interface", interface)]:
        monkeypatch.setitem(sys.modules, name, module)
    return calls


@pytest.mark.slow
def test_the_fa4_kernel_trains_the_same_model_as_the_mask_kernel_compiled_as_one_graph(tmp_path, monkeypatch):
    """ATTENTION_KERNEL = "fa4" reaches flash-attn-4 through a custom op (its own autograd.Function
    would break torch.compile's graph). With the package's kernels replaced by a reference, the
    fa4 model's loss and every gradient equal the mask kernel's, eager and compiled: the window
    sizes, the layout and the backward's wiring are right. GQA included."""
    calls = fake_flash_attn_4(monkeypatch)
    kernels = {k: load_train_py(tmp_path, set_constant(render_train_py("quick"), "ATTENTION_KERNEL", k), f"train_{k}")
               for k in ("fa4", "mask")}
    x, y = torch.randint(0, 64, (2, 32)), torch.randint(0, 64, (2, 32))
    mask_model = tiny_gpt(kernels["mask"], n_layer=3, window_pattern="SSL", n_kv_head=2)
    want_loss, want = gradients(mask_model, x, y)
    fa4_model = tiny_gpt(kernels["fa4"], n_layer=3, window_pattern="SSL", n_kv_head=2)
    assert fa4_model.masks(32, "cpu") == [16, 16, 32]  # each layer's window, as FA4 takes it
    for model in (fa4_model, torch.compile(fa4_model, dynamic=False)):
        calls.clear()
        loss, got = gradients(model, x, y)
        assert calls == [15, 15, None]  # keys at most 15 back in the window layers; plain causal last
        assert loss.item() == pytest.approx(want_loss.item(), rel=1e-4)  # FA4 computes in bf16
        for w, g in zip(want, got):
            assert torch.allclose(w, g, rtol=1e-2, atol=1e-2 * w.abs().max().item())
    explained = torch._dynamo.explain(fa4_model)(x, y)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("kernel", ["flex", "mask"])
def test_the_compiled_model_is_one_graph_once_main_has_built_the_masks(tmp_path, kernel):
    """A graph break costs a second trace at every start-up (~1 s warm, ~3 s cold on an H200):
    main() builds the masks before compiling, so the compiled forward only looks them up."""
    source = set_constant(set_constant(render_train_py("quick"), "ATTENTION_KERNEL", kernel), "WINDOW_PATTERN", "SSL")
    train_py = load_train_py(tmp_path, source)
    model = train_py.GPT(train_py.model_config(64, 256))
    model.init_weights()
    x = torch.randint(0, 256, (2, 64))
    with torch.no_grad():  # FlexAttention has no backward on a CPU; the forward is what is traced
        assert torch._dynamo.explain(train_py.GPT(model.config))(x).graph_break_count == 1  # masks not built
        model.masks(64, "cpu")
        explained = torch._dynamo.explain(model)(x, x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    assert "model.masks(run.seq_len, run.device)" in source.split("run.compile(model)")[0]


def test_the_masks_main_builds_are_the_ones_the_compiled_forward_finds(tmp_path, monkeypatch):
    """main() builds them for run.device ("cuda"); the forward asks for its input's device
    ("cuda:0"). torch.device("cuda") != torch.device("cuda:0"): unless the two are one key, the
    compiled forward would build them again inside the graph, and break it in two."""
    train_py = load_train_py(tmp_path)
    model = train_py.GPT(train_py.model_config(64, 256))
    built = []
    monkeypatch.setattr(model, "build_masks", lambda T, device: built.append(device) or [None])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    first = model.masks(64, torch.device("cuda"))  # as main() calls it
    assert model.masks(64, torch.device("cuda", 0)) is first and built == [torch.device("cuda", 0)]
    model.masks(64, "cpu")
    assert built == [torch.device("cuda", 0), torch.device("cpu")]


def ill_conditioned(shape, seed=0):
    """A stack of matrices with singular values from 1 down to 1e-3, like real gradients."""
    torch.manual_seed(seed)
    U, _, V = torch.linalg.svd(torch.randn(3, *shape), full_matrices=False)
    return U @ torch.diag_embed(torch.logspace(0, -3, min(shape))) @ V


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (64, 64)])
def test_polar_express_orthogonalizes_better_than_classic_newton_schulz(tmp_path, shape):
    train_py = load_train_py(tmp_path)
    G = ill_conditioned(shape)
    errors = {}
    for polar in (True, False):
        train_py.POLAR_EXPRESS = polar
        s = torch.linalg.svdvals(train_py.orthogonalize(G))
        assert s.max() < 1.25 and s.min() > 0.1  # every direction moves, none by much more than 1
        errors[polar] = (s - 1).abs().mean().item()
    assert errors[True] < 0.7 * errors[False]


def test_normuon_evens_out_neurons_and_keeps_the_norm(tmp_path):
    train_py = load_train_py(tmp_path)
    U = torch.randn(2, 8, 4) * torch.tensor([1, 2, 4, 8, 1, 2, 4, 8.0])[:, None]  # tall: one scale per row
    second_moment = torch.zeros(2, 8, 1)
    out = train_py.normuon(U, second_moment, beta2=0.9)
    assert torch.allclose(out.norm(dim=(-2, -1)), U.norm(dim=(-2, -1)))
    row_rms = out.square().mean(dim=-1).sqrt()
    assert torch.allclose(row_rms, row_rms[:, :1].expand_as(row_rms), rtol=1e-4)  # all rows alike
    assert torch.allclose(second_moment, 0.1 * U.square().mean(dim=-1, keepdim=True))
    wide = torch.randn(1, 4, 8)  # a wide matrix: one statistic per column
    moment = torch.zeros(1, 1, 8)
    train_py.normuon(wide, moment, beta2=0.5)
    assert torch.allclose(moment, 0.5 * wide.square().mean(dim=-2, keepdim=True))


@pytest.mark.parametrize("cautious", [True, False])
def test_muon_step_decays_only_where_the_update_agrees_when_cautious(tmp_path, cautious):
    train_py = load_train_py(tmp_path)
    train_py.CAUTIOUS_WEIGHT_DECAY = cautious
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(48, 16)) for _ in range(2)]  # tall: lr scaled by sqrt(3)
    for p in params:
        p.grad = torch.randn_like(p)
    before = torch.stack([p.detach().clone() for p in params])
    grads = torch.stack([p.grad for p in params])
    opt = train_py.Muon(params, lr=0.1, momentum=0.9, weight_decay=0.5)
    opt.step()
    # the expected step, from its parts: Nesterov momentum from zero, orthogonalize, NorMuon
    U = train_py.orthogonalize(grads.lerp((1 - 0.9) * grads, 0.9))
    U = train_py.normuon(U, torch.zeros(2, 48, 1), train_py.NORMUON_BETA2)
    agree = (U * before >= 0) if cautious else torch.ones_like(U, dtype=torch.bool)
    expected = before - 0.1 * 3**0.5 * (U + 0.5 * before * agree)
    assert torch.allclose(torch.stack([p.detach() for p in params]), expected, atol=1e-5)
    assert 0.2 < agree.float().mean() < 0.8 or not cautious  # the mask does pick some, not all


def test_momentum_warms_up_and_weight_decay_anneals(tmp_path):
    train_py = load_train_py(tmp_path)
    assert train_py.muon_momentum(0) == pytest.approx(0.85)
    assert train_py.muon_momentum(150) == pytest.approx(0.90)
    assert train_py.muon_momentum(300) == train_py.muon_momentum(10_000) == pytest.approx(0.95)
    train_py.MUON_MOMENTUM_WARMUP_STEPS = 0
    assert train_py.muon_momentum(0) == pytest.approx(0.95)
    assert train_py.weight_decay(0.0) == pytest.approx(train_py.WEIGHT_DECAY)
    assert train_py.weight_decay(0.5) == pytest.approx(train_py.WEIGHT_DECAY / 2)
    assert train_py.weight_decay(1.0) == pytest.approx(0.0)
    train_py.WEIGHT_DECAY_FINAL_FRAC = 1.0
    assert train_py.weight_decay(1.0) == pytest.approx(train_py.WEIGHT_DECAY)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_renders_a_train_py_that_builds_its_model(tmp_path, preset):
    train_py = load_train_py(tmp_path, render_train_py(preset), f"train_{preset.replace('-', '_')}")
    for name, value in PRESETS[preset].hparams.items():
        assert getattr(train_py, name) == value
    with torch.device("meta"):  # no memory: only that the shapes fit together
        model = train_py.GPT(train_py.model_config(seq_len=128, vocab_size=512))
    assert model.config.n_embd % model.config.n_head == 0


def test_the_offline_agent_keeps_momenta_and_betas_below_one():
    """The offline agent scales floats like learning rates; a momentum of 0.95 x 1.4 would diverge.
    Muon's momenta and NorMuon's beta move by +-0.1 within [0, 1) instead."""
    from autoresearch_lib.agents.offline import candidate_changes, read_constants

    moves = [change for change in candidate_changes(read_constants(render_train_py("h100")))
             if {"MUON_MOMENTUM", "MUON_MOMENTUM_START", "NORMUON_BETA2"} & set(change)]
    assert moves and all(0 <= value < 1 for change in moves for value in change.values())
