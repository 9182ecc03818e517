"""Tests of dizo.py as a project gets it when it copies the file alone: views of fused weights after a dtype change,
the anchor of a DiZO built before its checkpoint is loaded, PEFT LoRA on GPT-2, the docstring's hand check run as
written, and each number and claim in dizo.py's docstrings measured. Standalone: torch, pytest and dizo.py (transformers
and peft where a test needs them)."""

import re
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import dizo
from dizo import DiZO, ZOSGD, projected_params

torch.set_num_threads(1)


def tiny(family, seed=0, **settings):
    """A 2-layer, width-32 transformer, "opt" or "gpt2", in eval mode, no dropout unless OPT `settings` give it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32,
                                     **{"dropout": 0.0, **settings})
        model = transformers.OPTForCausalLM(cfg)
    return model.eval()


def lm_closure(model, seed=0, batch=4, length=12):
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    return lambda: model(input_ids=ids, labels=ids).loss


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def step_seeds(seed, n):
    """The per-step seeds ZOSGD documents: one 62-bit draw per step (and query) from Generator(seed)."""
    gen = torch.Generator().manual_seed(seed)
    return [int(torch.randint(0, 2**62, (1,), generator=gen)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------
# GPT-2's projected K and V are views of the fused c_attn weight: they follow the parameter's storage

def test_a_dtype_change_after_dizo_is_built_keeps_the_gpt2_projection():
    """model.double() after DiZO is built gives each parameter new storage: the phase still sees and moves K and V
    (distances > 0, ratios != 1), and the run is bit for bit the run of a DiZO built after model.double()."""
    runs = []
    for double_first in (False, True):
        model = tiny("gpt2")
        if double_first:
            model.double()
        opt = DiZO(model.parameters(), projected_params(model), lr=1e-2, seed=1, interval=3, proj_iters=3)
        if not double_first:
            model.double()
        closure = lm_closure(model)
        for _ in range(6):
            opt.step(closure)
        assert all(d > 0 for d in opt.last_phase["distances"]) and any(r != 1.0 for r in opt.ratios.tolist())
        runs.append(weights(model))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_a_dtype_change_in_the_middle_of_a_run_projects_the_new_storage():
    """model.double() after a phase: the next phase measures and rescales the weights the model now holds,
    θ_l <- θ0_l + r_l (θ_l - θ0_l), on fresh views of c_attn."""
    model = tiny("gpt2")
    opt = DiZO(model.parameters(), projected_params(model), lr=1e-2, seed=2, interval=3, proj_iters=3)
    closure = lm_closure(model)
    for _ in range(3):
        opt.step(closure)
    model.double()
    for _ in range(2):
        opt.step(closure)
    opt._zo_step(closure)  # the sixth step without its phase, to see θ_start
    start = [t.detach().clone() for _, t in projected_params(model)]
    s = [float((t - a.double()).norm()) for t, a in zip(start, opt.anchors)]
    opt.project(lambda: closure)
    assert opt.last_phase["distances"] == pytest.approx(s, rel=1e-12) and all(d > 0 for d in s)
    for (_, t), t0, a, r in zip(projected_params(model), start, opt.anchors, opt.ratios.tolist()):
        a = a.double()
        torch.testing.assert_close(t.detach(), a + r * (t0 - a), rtol=0, atol=1e-15)
    assert any(abs(r - 1) > 1e-3 for r in opt.ratios.tolist())


# ---------------------------------------------------------------------------------------------------------
# θ0: the weights the first step starts from

def test_a_dizo_built_before_its_checkpoint_is_loaded_anchors_on_the_checkpoint():
    """Model and optimizer built, then the pretrained weights loaded (a common order): θ0 is the checkpoint's,
    and the run is bit for bit the run of a DiZO built after loading. Before the first step θ0 is the copy taken
    when DiZO was built (what project() alone would use)."""
    pretrained = tiny("opt", seed=7).state_dict()
    runs = []
    for load_first in (True, False):
        model = tiny("opt", seed=123)
        if load_first:
            model.load_state_dict(pretrained)
        opt = DiZO(model.parameters(), projected_params(model), lr=1e-2, seed=3, interval=3, proj_iters=2)
        built = [a.clone() for a in opt.anchors]
        if not load_first:
            model.load_state_dict(pretrained)
        closure = lm_closure(model)
        opt.step(closure)
        assert all(torch.equal(a, pretrained[n]) for n, a in zip(opt.names, opt.anchors))
        if not load_first:
            assert not any(torch.equal(a, b) for a, b in zip(built, opt.anchors))
        for _ in range(5):
            opt.step(closure)
        runs.append(weights(model))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_a_resume_into_a_dizo_built_before_the_checkpoint_keeps_the_saved_anchors():
    """Resume in the order a training script takes: model and DiZO built at random weights, then the model's and
    the optimizer's checkpoints loaded; the run goes on bit for bit as the uninterrupted one (θ0 is the saved one,
    not re-taken at the first step after the resume)."""
    pretrained = tiny("opt", seed=7).state_dict()

    def build(model):
        return DiZO(model.parameters(), projected_params(model), lr=1e-2, seed=4, interval=3, proj_iters=2)

    full = tiny("opt", seed=123)
    opt = build(full)
    full.load_state_dict(pretrained)
    for _ in range(8):
        opt.step(lm_closure(full))
    half = tiny("opt", seed=123)
    opt = build(half)
    half.load_state_dict(pretrained)
    for _ in range(4):
        opt.step(lm_closure(half))
    saved_model, saved_opt = half.state_dict(), opt.state_dict()
    resumed = tiny("opt", seed=99)
    opt = build(resumed)
    resumed.load_state_dict(saved_model)
    opt.load_state_dict(saved_opt)
    assert all(torch.equal(a, pretrained[n]) for n, a in zip(opt.names, opt.anchors))
    for _ in range(4):
        opt.step(lm_closure(resumed))
    assert all(torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters()))


# ---------------------------------------------------------------------------------------------------------
# PEFT LoRA: GPT-2's fused c_attn, and roles that find adapters on only some matrices

def gpt2_lora(**config):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(tiny("gpt2"), peft.LoraConfig(r=4, fan_in_fan_out=True, **config))


def test_lora_on_gpt2_fused_c_attn_projects_the_rows_of_b_of_each_role():
    """LoRA on c_attn (PEFT's default for GPT-2): K and V are B's rows d..2d and 2d..3d (c_attn's output features
    q | k | v); a change to the K rows moves the keys only; a phase rescales those rows, B anchored at 0 (so ||B_k||
    is the distance), leaving A and every frozen weight alone."""
    model = gpt2_lora(target_modules=["c_attn"])
    pairs = projected_params(model)
    b0 = model.base_model.model.transformer.h[0].attn.c_attn.lora_B["default"].weight
    assert [n for n, _ in pairs] == [f"base_model.model.transformer.h.{i}.attn.c_attn.lora_B.default.weight[{r}]"
                                     for i in range(2) for r in "kv"]
    assert all(t.shape == (32, 4) and t._base is not None for _, t in pairs)
    assert pairs[0][1].data_ptr() == b0[32:64].data_ptr() and pairs[1][1].data_ptr() == b0[64:].data_ptr()
    attn, x = model.base_model.model.transformer.h[0].attn, torch.randn(1, 5, 32)
    with torch.no_grad():
        b0.normal_()  # B starts at 0: give every role an update, then move K's rows only
        q0, k0, v0 = attn.c_attn(x).split(32, dim=2)
        pairs[0][1].add_(1.0)
        q1, k1, v1 = attn.c_attn(x).split(32, dim=2)
        b0.zero_()
    assert torch.equal(q0, q1) and torch.equal(v0, v1) and not torch.equal(k0, k1)

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = DiZO(model.parameters(), pairs, lr=1e-2, interval=1000, proj_iters=3)
    closure = lm_closure(model)
    for _ in range(3):
        opt.step(closure)
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    assert opt.distances().tolist() == pytest.approx([float(t.detach().norm()) for _, t in pairs], rel=1e-6)
    opt.project(lambda: closure)
    assert all(abs(r - 1) > 1e-6 for r in opt.ratios.tolist())
    assert all(torch.equal(p, a_before[n]) for n, p in model.named_parameters() if "lora_A" in n)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_roles_that_find_adapters_on_only_some_matrices_warn_which():
    """LoRA on Q and V with the default roles K and V projects V's factors alone: a warning names the frozen K
    matrices and says what to pass; roles=("q", "v") warns of nothing. GPT-2 LoRA on c_attn with roles k, v, o:
    the warning names c_proj."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny("opt"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.warns(UserWarning, match=r"not projected: 2 attention matrices asked for are frozen, with no LoRA "
                                         r"adapter, e\.g\. \S*layers\.0\.self_attn\.k_proj\.weight, "
                                         r"\S*layers\.1\.self_attn\.k_proj\.weight .*roles=\('q', 'v'\)"):
        names = [n for n, _ in projected_params(model)]
    assert len(names) == 4 and all(".v_proj.lora_" in n for n in names)
    gpt2 = gpt2_lora(target_modules=["c_attn"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(projected_params(model, roles=("q", "v"))) == 8
        assert len(projected_params(gpt2)) == 4
    with pytest.warns(UserWarning, match=r"2 attention matrices .*h\.0\.attn\.c_proj\.weight"):
        assert len(projected_params(gpt2, roles=("k", "v", "o"))) == 4


# ---------------------------------------------------------------------------------------------------------
# The docstring's hand check, executed as written

def hand_check():
    """dizo.py's "Check a step by hand": the expression it gives for params and its loop, as text."""
    section = dizo.__doc__.split("Check a step by hand", 1)[1]
    prose, loop = section.split("\n\n", 2)[:2]
    text = " ".join(prose.split())
    start = end = text.index("params = [") + len("params = ")
    depth = 0
    for end, c in enumerate(text[start:], start):  # to the bracket that closes the list
        depth += (c == "[") - (c == "]")
        if depth == 0:
            break
    return prose, text[start:end + 1], textwrap.dedent(loop)


@pytest.mark.parametrize("kind", ["ZOSGD", "DiZO"])
def test_the_docstring_hand_check_runs_as_written_and_gives_the_first_step(kind):
    """A float64 network with a frozen embedding and two parameter groups in another order than
    model.parameters(): the docstring's params expression and loop, executed on a twin before the optimizer's
    first step, give its g and θ. Over every parameter (the frozen one too) the same loop gives another g, and
    with dropout on (train mode, which the docstring rules out) the two passes of the loop disagree."""
    prose, params_expr, loop = hand_check()
    assert "model.eval()" in prose and "FIRST" in prose

    def build(dropout=0.0):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Flatten(), torch.nn.Linear(32, 16),
                                  torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(16, 1)).double()
        net[0].weight.requires_grad_(False)
        groups = [{"params": list(net[5].parameters())}, {"params": list(net[:3].parameters())}]
        make = (lambda: ZOSGD(groups, lr=0.05, eps=1e-3, seed=5)) if kind == "ZOSGD" else \
            (lambda: DiZO(groups, [net[2].weight], lr=0.05, eps=1e-3, seed=5, interval=1000))
        return net.eval(), make()

    ids, y = torch.randint(0, 16, (6, 4), generator=torch.Generator().manual_seed(1)), torch.randn(6, 1)

    def run_loop(net, params):
        namespace = {"torch": torch, "params": params, "seed": 5, "lr": 0.05, "eps": 1e-3,
                     "closure": lambda: torch.nn.functional.mse_loss(net(ids), y)}
        exec(loop, namespace)
        return namespace["g"]

    net, opt = build()
    twin, twin_opt = build()
    params = eval(params_expr, {"opt": twin_opt})
    assert [p.shape for p in params] == [p.shape for g in opt.param_groups for p in g["params"] if p.requires_grad]
    g = run_loop(twin, params)
    opt.step(lambda: torch.nn.functional.mse_loss(net(ids), y))
    assert opt.projected_grad == pytest.approx(g, rel=1e-9)
    start = build()[0]
    for p, q, s in zip(net.parameters(), twin.parameters(), start.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-12)
    assert max(float((p - s).detach().abs().max()) for p, s in zip(net.parameters(), start.parameters())) > 1e-4

    every, _ = build()  # z drawn for the frozen embedding too: every later tensor gets another z
    assert run_loop(every, list(every.parameters())) != pytest.approx(g, rel=1e-3)
    gs = []
    for by_hand in (False, True):  # dropout on: the optimizer's two passes share masks, the loop's do not
        dropped, dropped_opt = build(dropout=0.5)
        dropped.train()
        torch.manual_seed(3)
        if by_hand:
            gs.append(run_loop(dropped, eval(params_expr, {"opt": dropped_opt})))
        else:
            dropped_opt.step(lambda: torch.nn.functional.mse_loss(dropped(ids), y))
            gs.append(dropped_opt.projected_grad)
    assert gs[1] != pytest.approx(gs[0], rel=1e-3)


# ---------------------------------------------------------------------------------------------------------
# The claims in dizo.py's docstrings, measured

def linear_256(dtype):
    torch.manual_seed(0)
    return torch.nn.Linear(256, 256, bias=False).to(dtype)


def test_fp32_weights_round_far_finer_than_bf16_yet_not_exactly():
    """ZOSGD's comment: 20 steps at lr 0 move 87% of a 256 x 256 fp32 weight (forward under bf16 autocast or not:
    the rounding is the ±εz passes'), by at most 5e-8; bf16 weights stepped in place move by far more."""
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    moved = {}
    for dtype, autocast in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False)):
        lin = linear_256(dtype)
        start = lin.weight.detach().clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bf16: the warning is tested below
            opt = ZOSGD(lin.parameters(), lr=0.0, eps=1e-3, seed=0)

        def closure():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return lin(x.to(dtype)).float().pow(2).mean()

        for _ in range(20):
            opt.step(closure)
        delta = (lin.weight.detach().double() - start.double()).abs()
        moved[dtype, autocast] = (float((delta > 0).double().mean()), float(delta.max()))
    for autocast in (False, True):
        fraction, largest = moved[torch.float32, autocast]
        assert 0.85 < fraction < 0.89 and 0 < largest <= 5e-8, moved
    assert moved[torch.bfloat16, False][1] > 1000 * moved[torch.float32, False][1], moved


def test_bf16_weights_below_the_warned_threshold_still_move():
    """The bf16 warning's threshold: where |g·z| is below it the update -ηgz is lost, yet the ±εz passes round,
    so about half of those weights move at every step (lr 1e-6, released): the threshold is not a condition for θ
    to stay."""
    lin = linear_256(torch.bfloat16)
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with pytest.warns(UserWarning, match=r"at lr 1e-06 an update ηgz is lost where \|g·z\| < \|θ\|·1\.95e\+03 \(at most "
                                         r"half a unit in θ's last place\), yet each ±εz pass rounds, moving θ"):
        opt = ZOSGD(lin.parameters(), lr=1e-6, eps=1e-3, seed=0)
    for seed in step_seeds(0, 3):
        before = lin.weight.detach().clone()
        opt.step(lambda: lin(x).float().pow(2).mean())
        z = torch.randn(before.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.bfloat16).float()
        below = (opt.projected_grad * z).abs() < before.float().abs() * torch.finfo(torch.bfloat16).eps / 4 / 1e-6
        moved = lin.weight.detach() != before
        assert below.double().mean() > 0.99 and 0.4 < (moved & below).sum() / below.sum() < 0.6


def test_a_step_calls_the_closure_2q_times_each_pair_from_one_rng_state():
    """queries=3 in train mode with dropout: six calls; the two calls of each ± pair start from one global RNG
    state, the next pair from where the previous pair's second call left it."""
    model = tiny("opt", dropout=0.1).train()
    closure, states = lm_closure(model), []
    opt = ZOSGD(model.parameters(), lr=1e-3, queries=3)
    opt.step(lambda: states.append(torch.get_rng_state()) or closure())
    assert len(states) == 6
    assert all(torch.equal(states[2 * j], states[2 * j + 1]) for j in range(3))
    assert not any(torch.equal(states[2 * j + 1], states[2 * j + 2]) for j in range(2))


def test_trial_ratios_reach_1_plus_2tau_while_the_accepted_ratio_stays_within_1_plus_tau():
    """project()'s algebra: |δ_l| = ε_γ |u_l| / s_l <= τ, so from an accepted r_l at 1 + τ a trial reaches
    1 + 2τ. A matrix that moved s = 0.01 (u's clip binds: |δ| = τ) and a loss that wants r = 3."""
    anchor = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    direction = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    direction *= 0.01 / direction.norm()
    w = torch.nn.Parameter(anchor.clone())
    opt = DiZO([w], [w], lr=0.0, interval=1, proj_iters=20, proj_eps=0.1, proj_lr=50.0, tau=0.2)
    with torch.no_grad():
        w.add_(direction)  # r = 1, s = 0.01
    trials = []

    def loss():
        r = float(((w - anchor) * direction).sum() / direction.norm() ** 2)
        trials.append(r)
        return (r - 3.0) ** 2

    opt.project(lambda: loss)
    trials = trials[1:-1]  # the passes before and after the search are at r = 1 and the accepted r
    assert max(trials) == pytest.approx(1.4, abs=1e-9) and min(trials) >= 0.6 - 1e-9  # 1 ± 2τ
    assert opt.ratios.tolist() == pytest.approx([1.2], abs=1e-12)


@pytest.mark.parametrize("make", ["zosgd", "dizo"])
def test_step_returns_the_loss_at_theta_plus_eps_z_not_at_theta(make):
    """ZOSGD.step and DiZO.step return ℓ+ = L(θ + εz) of the first query (as MeZO logs), not L(θ)."""
    model = tiny("opt")
    closure = lm_closure(model)
    params = list(model.parameters())
    with torch.no_grad():
        at_theta = float(closure())
        gen = torch.Generator().manual_seed(step_seeds(6, 1)[0])
        zs = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        for p, z in zip(params, zs):
            p.add_(z, alpha=1e-2)
        at_plus = float(closure())
        for p, z in zip(params, zs):
            p.sub_(z, alpha=1e-2)
    opt = ZOSGD(params, lr=1e-3, eps=1e-2, seed=6, queries=2) if make == "zosgd" else \
        DiZO(params, projected_params(model), lr=1e-3, eps=1e-2, seed=6, queries=2)
    returned = opt.step(closure)
    assert returned == pytest.approx(at_plus, rel=1e-6) and abs(returned - at_theta) > 1e-4


def test_the_tests_the_equation_map_names_exist():
    """The module docstring points a reader at tests by name: each is defined in a test file beside dizo.py."""
    named = re.findall(r"\btest_\w+", dizo.__doc__)
    assert len(named) == 4
    source = "".join(p.read_text() for p in Path(dizo.__file__).parent.glob("test_*.py"))
    assert all(f"def {name}(" in source for name in named), named
