"""Tests of dizo.py, each claim against a trusted reference: autograd, exact formulas (a quadratic's central
difference is exact), and a straightforward re-implementation of MeZO's four-pass step written here,
independently of dizo.py. CPU only, no network.

Stands alone: copy dizo.py and this file into any folder and run pytest there. Its imports are the standard
library, torch, pytest and dizo; the tests that build Hugging Face models (transformers) or LoRA adapters (peft)
import them when they run, and are skipped where they cannot be imported. test_train.py and test_bench.py take
their tiny models from here.
"""

import ast
import copy
import importlib
import math
import re
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import dizo
from dizo import DiZO, ZOSGD, divergence, projected_params

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------
# Helpers: the documented seed-replay protocol, re-implemented; tiny problems and models.

def optional(name):
    """Module `name` (transformers, peft), or the calling test is skipped where it cannot be imported: missing
    or broken, any ImportError (pytest.importorskip skips only a missing module unless told otherwise)."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        pytest.skip(f"needs {name}, which cannot be imported here: {error}")


def reference_seeds(seed, n):
    """The per-step seeds ZOSGD documents: one 62-bit draw per step from Generator(seed)."""
    gen = torch.Generator().manual_seed(seed)
    return [int(torch.randint(0, 2**62, (1,), generator=gen)) for _ in range(n)]


def reference_z(params, step_seed, direction="gaussian"):
    """z for every tensor, in order, as dizo.py documents it: one generator per device seeded with the step's
    seed draws each tensor in turn, in the tensor's dtype (Rademacher: 0/1 integers mapped to ±1)."""
    gens, out = {}, []
    for p in params:
        gen = gens.setdefault(p.device, torch.Generator(p.device).manual_seed(step_seed))
        if direction == "rademacher":
            out.append(torch.randint(0, 2, p.shape, generator=gen, dtype=p.dtype) * 2 - 1)
        else:
            out.append(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return out


def zo_reference_step(params, loss_fn, directions, lr, eps, weight_decay=0.0):
    """MeZO's step as released, written plainly with q = len(directions) queries, each a list of z per tensor:
    four passes per query (+ε, -2ε, +ε), every g_j = (L(θ + εz_j) - L(θ - εz_j)) / (2ε) at the same θ, then
    θ <- θ - η (λθ [matrices] + (1/q) Σ_j g_j z_j), η one lr or one per tensor. Returns the g_j."""
    lrs = lr if isinstance(lr, list) else [lr] * len(params)
    gs = []
    with torch.no_grad():
        for zs in directions:
            for p, z in zip(params, zs):
                p.add_(eps * z)
            lp = float(loss_fn())
            for p, z in zip(params, zs):
                p.sub_(2 * eps * z)
            lm = float(loss_fn())
            for p, z in zip(params, zs):
                p.add_(eps * z)
            gs.append((lp - lm) / (2 * eps))
        for i, (p, lr_p) in enumerate(zip(params, lrs)):
            step = sum(g * zs[i] for g, zs in zip(gs, directions)) / len(directions)
            p.sub_(lr_p * (step + (weight_decay * p if p.dim() >= 2 else 0.0)))
    return gs


def mezo_reference_step(params, loss_fn, step_seed, lr, eps, weight_decay=0.0):
    return zo_reference_step(params, loss_fn, [reference_z(params, step_seed)], lr, eps, weight_decay)[0]


def quadratic(dim=12, seed=0, dtype=torch.float64):
    """L(θ) = ½ (θ-c)ᵀ A (θ-c) over a matrix and a vector parameter; A symmetric positive definite."""
    gen = torch.Generator().manual_seed(seed)
    n = dim * 3 + dim
    m = torch.randn(n, n, generator=gen, dtype=dtype)
    a = m @ m.T / n + torch.eye(n, dtype=dtype)
    c = torch.randn(n, generator=gen, dtype=dtype)
    w = torch.nn.Parameter(torch.randn(dim, 3, generator=gen, dtype=dtype))
    b = torch.nn.Parameter(torch.randn(dim, generator=gen, dtype=dtype))

    def loss():
        x = torch.cat([w.reshape(-1), b]) - c
        return 0.5 * x @ a @ x

    return [w, b], loss, a, c


def tiny_model(family, vocab_size=64, seed=0, **settings):
    """The tests' one tiny transformer: 2 layers, width 32, 4 heads, MLP 64, 64 positions, no dropout, in any
    family train.py and projected_params know; `settings` override or add config fields (e.g. pad_token_id)."""
    optional("transformers")  # the test is skipped where transformers cannot be imported
    from transformers import (BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig,
                              GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM, RobertaConfig,
                              RobertaForMaskedLM)
    torch.manual_seed(seed)
    size = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    if family == "opt":
        cfg = OPTConfig(**size, ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0)
    elif family in ("llama", "mistral", "qwen2"):
        config = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
        cfg = config(**size, intermediate_size=64, num_key_value_heads=2, max_position_embeddings=64)
    elif family in ("roberta", "bert"):  # RoBERTa's positions start after the padding index: 64 + 2
        cfg = (RobertaConfig if family == "roberta" else BertConfig)(
            **size, intermediate_size=64, max_position_embeddings=66, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)
    elif family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        cfg = GPTNeoXConfig(**size, intermediate_size=64, max_position_embeddings=64)
    for key, value in settings.items():
        setattr(cfg, key, value)
    model_class = {"opt": OPTForCausalLM, "llama": LlamaForCausalLM, "mistral": MistralForCausalLM,
                   "qwen2": Qwen2ForCausalLM, "roberta": RobertaForMaskedLM, "bert": BertForMaskedLM,
                   "gpt2": GPT2LMHeadModel, "gpt_neox": GPTNeoXForCausalLM}[family]
    return model_class(cfg).eval()


def tiny_opt(seed=0, **settings):
    return tiny_model("opt", seed=seed, **settings)


def lm_closure(model, seed=0, batch=4, length=12):
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    return lambda: model(input_ids=ids, labels=ids).loss


def weights(params):
    return [p.detach().clone() for p in params]


# ---------------------------------------------------------------------------------------------------------
# dizo.py: ZOSGD against MeZO's four-pass step, autograd and exact formulas

def docstring_loop():
    """The few-line MeZO loop in dizo.py's docstring, as a function of (params, closure, seed, lr, eps)."""
    doc = dizo.__doc__.split("Check a step by hand", 1)[1].split("\n\n", 1)[1].split("\n\n", 1)[0]
    body = textwrap.indent(textwrap.dedent(doc), "    ")
    namespace = {"torch": torch}
    exec(f"def loop(params, closure, seed, lr, eps):\n{body}\n    return g\n", namespace)
    return namespace["loop"]


def test_the_docstring_loop_reproduces_a_step_on_a_model_with_a_million_entry_tensor():
    """dizo.py's docstring promises that its few lines of MeZO reproduce a ZOSGD step on any model: here a
    network with a 1024 x 1024 weight (2^20 entries), to float rounding; the step after it, as the four-pass
    reference on the optimizer's second seed."""
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 1)).double()

    x, y = torch.randn(16, 1024, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    net, ref = build(), build()
    loss, ref_loss = (lambda m=m: torch.nn.functional.mse_loss(m(x), y) for m in (net, ref))
    opt = ZOSGD(net.parameters(), lr=0.05, eps=1e-3, seed=7)
    start = weights(net.parameters())
    opt.step(loss)
    g = docstring_loop()(list(ref.parameters()), ref_loss, 7, 0.05, 1e-3)
    assert opt.projected_grad == pytest.approx(g, rel=1e-9)
    for p, r, s in zip(net.parameters(), ref.parameters(), start):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-9, atol=1e-9)  # the GEMM's rounding may vary
        assert float((p.detach() - s).abs().max()) > 1e-3  # the step moved far more than the tolerance
    opt.step(loss)
    g = mezo_reference_step(list(ref.parameters()), ref_loss, reference_seeds(7, 2)[1], 0.05, 1e-3)
    assert opt.projected_grad == pytest.approx(g, rel=1e-9)
    for p, r in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-9, atol=1e-9)  # the GEMM's rounding may vary


def test_projected_grad_equals_directional_derivative_on_quadratic():
    params, loss, a, c = quadratic()
    opt = ZOSGD(params, lr=0.0, eps=1e-3, seed=3)
    x = torch.cat([p.detach().reshape(-1) for p in params]) - c
    opt.step(loss)
    z = torch.cat([t.reshape(-1) for t in reference_z(params, reference_seeds(3, 1)[0])])
    # The central difference of a quadratic is exact: g = zᵀ∇L up to rounding.
    assert opt.projected_grad == pytest.approx(float(z @ (a @ x)), rel=1e-9, abs=1e-9)


def test_projected_grad_matches_autograd_on_tiny_transformer():
    """g against zᵀ∇L from autograd, over 24 directions: correlation above 0.98 and a least-squares slope
    within 10% of 1 (ε = 1e-3 moves 20k parameters by 0.14, so each g is off by a few percent)."""
    model = tiny_opt()
    closure = lm_closure(model)
    params = list(model.parameters())
    grads = torch.autograd.grad(closure(), params)
    opt = ZOSGD(params, lr=0.0, eps=1e-3, seed=5)
    g, d = [], []
    for step_seed in reference_seeds(5, 24):
        opt.step(closure)
        g.append(opt.projected_grad)
        d.append(sum(float((z * gr).sum()) for z, gr in zip(reference_z(params, step_seed), grads)))
    g, d = torch.tensor(g), torch.tensor(d)
    assert float(torch.corrcoef(torch.stack([g, d]))[0, 1]) > 0.98
    assert float(g @ d / (d @ d)) == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("direction", ["gaussian", "rademacher"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_step_equals_the_four_pass_reference(weight_decay, direction):
    params, loss, _, _ = quadratic()
    ref_params, ref_loss, _, _ = quadratic()  # same seed: same A, c and start, its own parameters
    opt = ZOSGD(params, lr=0.01, eps=1e-3, weight_decay=weight_decay, seed=7, direction=direction)
    for i, step_seed in enumerate(reference_seeds(7, 20)):
        before = weights(params)
        zs = reference_z(ref_params, step_seed, direction)
        g_ref = zo_reference_step(ref_params, ref_loss, [zs], 0.01, 1e-3, weight_decay)[0]
        opt.step(loss)
        assert opt.projected_grad == pytest.approx(g_ref, rel=1e-6)
        for p, r in zip(params, ref_params):
            torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-10, atol=1e-12)
        if i == 0 and weight_decay == 0.0:  # one step is exactly θ - lr g z
            for p, b, z in zip(params, before, zs):
                torch.testing.assert_close(p.detach(), b - 0.01 * opt.projected_grad * z, rtol=1e-12, atol=1e-12)
    if direction == "rademacher":
        assert all(set(z.unique().tolist()) == {-1.0, 1.0} for z in zs)


def test_each_step_moves_toward_the_minimum_along_z():
    params, loss, a, c = quadratic(dim=5)
    opt = ZOSGD(params, lr=1e-3, eps=1e-3, seed=2)
    for step_seed in reference_seeds(2, 10):
        before = torch.cat([p.detach().reshape(-1) for p in params])
        l0 = float(loss().detach())
        opt.step(loss)
        after = torch.cat([p.detach().reshape(-1) for p in params])
        z = torch.cat([t.reshape(-1) for t in reference_z(params, step_seed)])
        t_star = -float(z @ (a @ (before - c))) / float(z @ a @ z)  # exact line minimum θ + t* z
        move = after - before
        # every coordinate moves in the direction of t* z_i, and less than the line minimum's distance
        assert torch.all(torch.sign(move) == math.copysign(1, t_star) * torch.sign(z))
        assert torch.all(move.abs() <= abs(t_star) * z.abs() + 1e-12)
        assert float(loss().detach()) < l0


@pytest.mark.parametrize("direction, spread", [("gaussian", 1), ("rademacher", -1)])
def test_g_z_is_unbiased_with_the_stated_variance(direction, spread):
    """E[g z] = ∇L, and the total variance E||g z - ∇L||² is (d ± 1)||∇L||² (+1 Gaussian, -1 Rademacher),
    on a quadratic with d = 16 over the first 24000 directions of the optimizer's seed stream. The first 2000
    are ZOSGD's own steps, each g equal to the central difference along the replayed z computed plainly; the
    others are that replay, which is what a step computes (as those 2000 show, to rounding).

    Samples, bound, false failures: ||g z - ∇L||² has a standard deviation of 1.70 (Gaussian) and 1.16
    (Rademacher) times its mean, so the mean of 24000 has a spread of 1.10% and 0.75%: the 4% bound is 3.6σ
    and 5.3σ, a false failure for 0.025% of seeds with Gaussian z (simulated: 60000 runs) and under 1e-6 with
    Rademacher z. The mean of g z is off ∇L by 2.7% of its norm (rms); the cosine bound 0.99 allows 14%.
    Time: a step on these 16 numbers costs about 0.3 ms of Python and dispatch (three passes that each seed a
    generator and draw z, the forked RNG, the step hooks), ten times the replay of its z."""
    params, loss, a, c = quadratic(dim=4)
    x = torch.cat([p.detach().reshape(-1) for p in params]) - c
    grad = a @ x
    n, stepped, eps = 24000, 2000, 1e-3
    opt = ZOSGD(params, lr=0.0, eps=eps, seed=11, direction=direction)
    stepped_g = []
    for _ in range(stepped):
        opt.step(loss)
        stepped_g.append(opt.projected_grad)
    replayed = [reference_z(params, step_seed, direction) for step_seed in reference_seeds(11, n)]
    z = torch.cat([torch.stack(zs).reshape(n, -1) for zs in zip(*replayed)], dim=1)  # row i: z of step i
    plus, minus = x + eps * z, x - eps * z  # θ ± εz - c, every direction in a row
    g = (0.5 * ((plus @ a) * plus).sum(1) - 0.5 * ((minus @ a) * minus).sum(1)) / (2 * eps)
    assert stepped_g == pytest.approx(g[:stepped].tolist(), rel=1e-9, abs=1e-9)
    g[:stepped] = torch.tensor(stepped_g, dtype=torch.float64)
    gz = g[:, None] * z
    total, spread_sum = gz.sum(0), float(((gz - grad) ** 2).sum())
    assert float(torch.nn.functional.cosine_similarity(total / n, grad, dim=0)) > 0.99
    d = grad.numel()
    assert spread_sum / n == pytest.approx((d + spread) * float(grad @ grad), rel=0.04)


@pytest.mark.parametrize("direction", ["gaussian", "rademacher"])
def test_q_queries_follow_the_direct_computation(direction):
    """queries=3 with weight decay and two groups of different lr: every g_j, and θ after 8 steps, as the
    plainly written eq. (1)-(2) with q = 3 on the same seeds (three per step); 2q closure calls per step."""
    params, loss, _, _ = quadratic()
    ref_params, ref_loss, _, _ = quadratic()
    groups = [{"params": params[:1]}, {"params": params[1:], "lr": 0.02}]
    opt = ZOSGD(groups, lr=0.01, eps=1e-3, weight_decay=0.1, seed=8, direction=direction, queries=3)
    seeds, calls = reference_seeds(8, 3 * 8), []
    for step in range(8):
        directions = [reference_z(ref_params, s, direction) for s in seeds[3 * step:3 * step + 3]]
        g_ref = zo_reference_step(ref_params, ref_loss, directions, [0.01, 0.02], 1e-3, 0.1)
        opt.step(lambda: calls.append(1) or loss())
        assert opt.projected_grads == pytest.approx(g_ref, rel=1e-6)
        assert opt.projected_grad == pytest.approx(sum(g_ref) / 3, rel=1e-6)
    assert len(calls) == 2 * 3 * 8
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-10, atol=1e-12)


def test_seed_determinism_and_closure_calls():
    def run(seed):
        model = tiny_opt()
        opt = ZOSGD(model.parameters(), lr=1e-3, seed=seed)
        closure, calls = lm_closure(model), []
        for _ in range(3):
            opt.step(lambda: calls.append(1) or closure())
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), len(calls)

    a, calls = run(0)
    b, _ = run(0)
    c, _ = run(1)
    assert calls == 6  # exactly two forward passes per step
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_lr_scheduler_sets_the_learning_rate_of_every_step():
    params, loss, _, _ = quadratic()
    ref_params, ref_loss, _, _ = quadratic()
    opt = ZOSGD(params, lr=0.02, seed=4)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    for step, seed in enumerate(reference_seeds(4, 6)):
        opt.step(loss)
        schedule.step()
        mezo_reference_step(ref_params, ref_loss, seed, lr=0.02 / (1 + step), eps=1e-3)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-10, atol=1e-12)


def two_tensor_quadratic():
    """L = Σ_i w_i (θ_i - c_i)² over a small and a larger tensor (weights w > 0), float64."""
    gen = torch.Generator().manual_seed(0)
    small, large = (torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=torch.float64)) for s in [(3,), (6, 5)])
    targets = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (small, large)]
    scales = [torch.rand(t.shape, generator=gen, dtype=torch.float64) + 0.5 for t in (small, large)]
    return small, large, lambda: sum((w * (t - c) ** 2).sum() for t, c, w in zip((small, large), targets, scales))


@pytest.mark.parametrize("how", ["add_param_group", "unfreeze"])
def test_a_tensor_joining_after_the_first_step_is_trained(how):
    """z stays in parameter-group order as a tensor joins: compare with the four-pass reference."""
    small, large, loss = two_tensor_quadratic()
    ref_small, ref_large, ref_loss = two_tensor_quadratic()
    if how == "unfreeze":
        large.requires_grad_(False)
        opt = ZOSGD([small, large], lr=0.05, seed=3)
    else:
        opt = ZOSGD([small], lr=0.05, seed=3)
    seeds = reference_seeds(3, 3)
    opt.step(loss)
    mezo_reference_step([ref_small], ref_loss, seeds[0], lr=0.05, eps=1e-3)
    if how == "unfreeze":
        large.requires_grad_(True)
    else:
        opt.add_param_group({"params": [large]})
    for seed in seeds[1:]:
        opt.step(loss)
        mezo_reference_step([ref_small, ref_large], ref_loss, seed, lr=0.05, eps=1e-3)
    for p, r in ((small, ref_small), (large, ref_large)):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-12, atol=1e-12)
    assert not torch.equal(large.detach(), two_tensor_quadratic()[1].detach())


def test_weights_changed_between_steps_are_where_the_next_step_starts():
    """A step starts from the weights as they are: a head zeroed or a state_dict loaded between steps is
    what the next step moves (no copy of the weights is kept): one step from each equals the reference's."""
    model, ref = tiny_opt(), tiny_opt(seed=3)
    opt = ZOSGD(model.parameters(), lr=1e-2, seed=1)
    seeds = reference_seeds(1, 3)
    opt.step(lm_closure(model))
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied to the embedding: zeroes both
    ref.load_state_dict(model.state_dict())
    opt.step(lm_closure(model))
    mezo_reference_step(list(ref.parameters()), lm_closure(ref), seeds[1], lr=1e-2, eps=1e-3)
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-6)
    model.load_state_dict(tiny_opt(seed=5).state_dict())
    ref.load_state_dict(tiny_opt(seed=5).state_dict())
    opt.step(lm_closure(model))
    mezo_reference_step(list(ref.parameters()), lm_closure(ref), seeds[2], lr=1e-2, eps=1e-3)
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", ["zosgd", "dizo"])
def test_steps_inside_and_after_inference_mode(make):
    """A step taken inside torch.inference_mode() is the same step, and the steps after it work (nothing the
    optimizer keeps becomes an inference tensor)."""
    runs = []
    for inference in (False, True):
        model = tiny_opt()
        opt = ZOSGD(model.parameters(), lr=1e-2, seed=2) if make == "zosgd" else \
            DiZO(model.parameters(), projected_params(model), lr=1e-2, seed=2, interval=2, proj_iters=2)
        closure = lm_closure(model)
        for step in range(5):
            with torch.inference_mode(inference and step in (1, 2)):
                opt.step(closure)
        copy.deepcopy(opt.state_dict())
        runs.append(weights(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_half_precision_weights_are_stepped_in_place_with_a_warning_that_gives_the_numbers():
    """bf16 weights: the constructor warns once, with the relative size of the smallest update that survives
    (|θ|·2^-7/4/lr); a step is the fused step written plainly on the bf16 weights, z drawn in bf16."""
    model, ref = tiny_opt().to(torch.bfloat16), tiny_opt().to(torch.bfloat16)
    with pytest.warns(UserWarning, match=r"bfloat16 weights are stepped in place: at lr 0.01 .*\|θ\|·0\.195"):
        opt = ZOSGD(model.parameters(), lr=1e-2, seed=0)
    opt.step(lm_closure(model))
    params, closure = list(ref.parameters()), lm_closure(ref)
    zs, losses = reference_z(params, reference_seeds(0, 1)[0]), []
    with torch.no_grad():
        for alpha in (1e-3, -2e-3):
            for p, z in zip(params, zs):
                p.add_(z, alpha=alpha)
            losses.append(float(closure()))
        g = opt.projected_grad  # the same up to the forward's rounding (checked below): its update, bit for bit
        for p, z in zip(params, zs):
            p.add_(z, alpha=1e-3 - 1e-2 * g)  # restore and update in one add
    assert g == pytest.approx((losses[0] - losses[1]) / 2e-3, rel=1e-4) and all(z.dtype == torch.bfloat16 for z in zs)
    assert all(torch.equal(p, r) for p, r in zip(model.parameters(), ref.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ZOSGD(tiny_opt().parameters(), lr=1e-2)  # fp32: no warning


@pytest.mark.parametrize("eps", [1e-3, 0.1])
def test_zosgd_on_a_non_differentiable_error_rate_needs_a_larger_eps(eps):
    """The closure may return any scalar: here the 0/1 error of a linear classifier on 256 fixed points,
    piecewise constant in θ, from a start orthogonal to the separating line. At the default ε = 1e-3 no
    prediction flips between θ ± εz, so g = 0 at every step and nothing trains; at ε = 0.1 it learns."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=gen, dtype=torch.float64)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = torch.nn.Linear(2, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
        model.bias.zero_()

    def accuracy():
        return float((model(x).argmax(1) == y).double().mean())

    start = accuracy()
    opt = ZOSGD(model.parameters(), lr=0.5, eps=eps, seed=0)
    moved = 0
    for _ in range(100):
        opt.step(lambda: 1.0 - accuracy())
        moved += opt.projected_grad != 0
    assert 0.4 < start < 0.6
    assert (moved, accuracy()) == (0, start) if eps == 1e-3 else (moved > 50 and accuracy() >= 0.9)


def test_accelerate_returns_none_from_step_and_skips_zo_steps_when_it_accumulates():
    """What the README warns of: accelerate's wrapped optimizer returns None from step(closure) (the loss is
    the inner optimizer's), and with gradient_accumulation_steps = 4 it takes one ZO step in four calls."""
    accelerate = pytest.importorskip("accelerate")
    net = torch.nn.Linear(4, 1)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    runner = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=4)
    net, opt = runner.prepare(net, ZOSGD(net.parameters(), lr=0.1, seed=0))
    returned = []
    for _ in range(8):
        with runner.accumulate(net):
            returned.append(opt.step(lambda: torch.nn.functional.mse_loss(net(x), y)))
    assert returned == [None] * 8 and opt.optimizer.steps_done == 2
    assert isinstance(opt.optimizer.step(lambda: torch.nn.functional.mse_loss(net(x), y)), float)


# ---------------------------------------------------------------------------------------------------------
# dizo.py: DiZO's projection (§3)

def test_dizo_without_projection_is_bit_identical_to_zosgd():
    m1, m2 = tiny_opt(), tiny_opt()
    o1 = ZOSGD(m1.parameters(), lr=1e-3, seed=4)
    o2 = DiZO(m2.parameters(), projected_params(m2), lr=1e-3, seed=4, interval=1000)
    c1, c2 = lm_closure(m1), lm_closure(m2)
    for _ in range(5):
        o1.step(c1)
        o2.step(c2)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)


def released_gamma_search(matrices, anchors, closures, us, proj_eps, proj_lr, tau):
    """The released code's γ search (Skilteee/DiZO, large_models/trainer.py) written plainly in γ space, in
    float64: γ = s at the start; per iteration γ ± ε_γ u applied as θ0 + (γ/s)Δ, ĝ from the two losses, then
    γ <- clip(γ - η_γ s ĝ u, (1-τ)s, (1+τ)s); the final γ applied. Returns γ."""
    start = [m.detach().clone() for m in matrices]
    s = torch.tensor([float((m - a).norm()) for m, a in zip(start, anchors)], dtype=torch.float64)
    gamma = s.clone()

    def apply(g):
        with torch.no_grad():
            for m, a, t, gl, sl in zip(matrices, anchors, start, g.tolist(), s.tolist()):
                m.copy_(a + gl / sl * (t - a))

    for closure, u in zip(closures, us):
        u = u.clamp(-(tau / proj_eps) * s, (tau / proj_eps) * s)
        apply(gamma + proj_eps * u)
        loss_plus = float(closure())
        apply(gamma - proj_eps * u)
        loss_minus = float(closure())
        grad = (loss_plus - loss_minus) / (2 * proj_eps)
        gamma = torch.minimum(torch.maximum(gamma - proj_lr * s * grad * u, (1 - tau) * s), (1 + tau) * s)
    apply(gamma)
    return gamma


def test_the_projection_phase_follows_the_released_gamma_search():
    """Three phases on a float64 transformer, each against the released γ search run on a twin holding the
    weights the ZO steps left, with the same u draws and batches: γ and the projected matrices agree bit for bit
    (the same float64 operations in the same order)."""
    model, twin = tiny_opt().double(), tiny_opt().double()
    opt = DiZO(model.parameters(), projected_params(model), lr=2e-2, seed=3, interval=10**6, proj_iters=5)
    u_gen, anchors = torch.Generator().manual_seed(3 + 1), [a.clone() for a in opt.anchors]
    for phase in range(3):
        for _ in range(4):
            opt.step(lm_closure(model))
        with torch.no_grad():  # the twin takes the weights the ZO steps left before the phase
            for p, q in zip(twin.parameters(), model.parameters()):
                p.copy_(q)
        seeds = range(10 * phase + 1, 10 * phase + 6)  # a fresh batch per iteration
        batches = iter([lm_closure(model, seed=s) for s in seeds])
        opt.project(lambda: next(batches))
        us = [torch.randn(len(anchors), generator=u_gen, dtype=torch.float64) for _ in seeds]
        gamma = released_gamma_search([m for _, m in projected_params(twin)], anchors,
                                      [lm_closure(twin, seed=s) for s in seeds], us, 0.1, 2.0, 0.2)
        torch.testing.assert_close(opt.gammas, gamma, rtol=0, atol=0)
        for (_, m), (_, t) in zip(projected_params(model), projected_params(twin)):
            torch.testing.assert_close(m.detach(), t.detach(), rtol=0, atol=0)
        assert any(abs(r - 1) > 1e-3 for r in opt.last_phase["ratios"])


def test_projection_step_calls_closure_2_plus_2m_times_with_fresh_batches():
    model = tiny_opt()
    calls, fresh = [], []
    closure = lm_closure(model)

    def search_loss(batch):
        calls.append(batch)
        return closure()

    opt = DiZO(model.parameters(), projected_params(model), lr=1e-3, interval=3, proj_iters=4,
               search_data=lambda: fresh.append(len(fresh)) or fresh[-1], search_loss=search_loss)
    for step in range(1, 7):
        n = len(calls)
        opt.step(lambda: calls.append("step") or closure())
        assert len(calls) - n == (2 + 2 * 4 + 2 if step % 3 == 0 else 2)
    assert fresh == list(range(2 * 4))  # one fresh batch per inner iteration, two phases
    # each batch twice (ℓ+, ℓ-); a phase's first batch also before the search and after the final r
    phase = [[b, b, b] if i == 0 else [b, b] for i, b in enumerate(range(4))]
    expected = [b for batches in phase for b in batches] + [0]
    assert [c for c in calls if c != "step"] == expected + [b + 4 for b in expected]


def scale_problem(targets, seed=0):
    """Matrices whose loss depends only on the ratio r_l = component of (θ_l - θ0_l) along Δ_l: the best
    ratio of matrix l is targets[l], so the γ search has a known answer."""
    gen = torch.Generator().manual_seed(seed)
    anchors = [torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in targets]
    deltas = [torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in targets]
    deltas = [d / d.norm() for d in deltas]  # ‖Δ‖ = 1, so u's clip ±(τ/ε_γ)·s does not bind at s
    mats = [torch.nn.Parameter(a.clone()) for a in anchors]
    other = torch.nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64))

    def loss():
        r = [((m - a) * d).sum() for m, a, d in zip(mats, anchors, deltas)]
        return sum((ri - t) ** 2 for ri, t in zip(r, targets)) + (other ** 2).sum()

    def move_away():  # after DiZO has taken θ0 as its anchor: θ = θ0 + Δ, i.e. r = 1
        with torch.no_grad():
            for m, d in zip(mats, deltas):
                m.add_(d)

    return mats, other, move_away, loss


def test_projection_with_zero_step_is_the_identity():
    mats, other, move_away, loss = scale_problem([1.1, 0.9])
    opt = DiZO(mats + [other], mats, lr=0.0, proj_lr=0.0, interval=1, proj_iters=3)
    move_away()
    before = weights(mats)
    opt.project(lambda: loss)
    for m, b in zip(mats, before):
        assert torch.equal(m.detach(), b)  # r = 1 exactly, and trials are undone exactly


def test_trial_projections_are_undone_exactly():
    """fp32 matrices after ZO steps, a phase with η_γ = 0: every trial θ0 + (1 ± δ)Δ is undone from the
    phase's copy, so each projected matrix ends bit-identical (undoing by division would not)."""
    model = tiny_opt()
    pairs = projected_params(model)
    opt = DiZO(model.parameters(), pairs, lr=1e-2, proj_lr=0.0, interval=1000, proj_iters=3)
    closure = lm_closure(model)
    for _ in range(3):
        opt.step(closure)
    before = [t.detach().clone() for _, t in pairs]
    opt.project(lambda: closure)
    assert all(torch.equal(t, b) for (_, t), b in zip(pairs, before))


@pytest.mark.parametrize("targets, expected", [
    ([1.1, 0.93], [1.1, 0.93]),  # best scales inside [1 - τ, 1 + τ]: the search converges to them
    ([1.6, 0.3], [1.2, 0.8]),    # outside: the search stops at the clip bound
])
def test_projection_finds_the_best_scale_within_the_clip(targets, expected):
    mats, other, move_away, loss = scale_problem(targets)
    other_before = other.detach().clone()
    opt = DiZO(mats + [other], mats, lr=0.0, interval=1, proj_iters=200, proj_lr=0.05, tau=0.2)
    move_away()
    start_dist = opt.distances()
    opt.project(lambda: loss)
    torch.testing.assert_close(opt.ratios, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=0.01)
    # afterwards ‖θ_l - θ0_l‖ = γ_l = r_l s_l, and the parameter outside the projection is untouched
    dist = opt.distances()
    torch.testing.assert_close(dist, opt.gammas, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dist, opt.ratios * start_dist, rtol=1e-9, atol=1e-12)
    assert torch.equal(other.detach(), other_before)


def test_projection_touches_only_projected_matrices_and_keeps_the_clip():
    model = tiny_opt()
    pairs = projected_params(model)
    projected_names = {n for n, _ in pairs}
    opt = DiZO(model.parameters(), pairs, lr=1e-2, interval=1000, tau=0.1, proj_iters=3)
    closure = lm_closure(model)
    for _ in range(3):
        opt.step(closure)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.project(lambda: closure)
    for n, p in model.named_parameters():
        if n not in projected_names:
            assert torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in projected_names)
    assert torch.all((opt.ratios >= 0.9 - 1e-12) & (opt.ratios <= 1.1 + 1e-12)) and not torch.all(opt.ratios == 1)


def test_phase_telemetry_records_ratios_distances_and_the_losses_around_the_phase():
    model, twin = tiny_opt(), tiny_opt()
    batch = {m: lm_closure(m, seed=5) for m in (model, twin)}  # the first search batch, on either model
    opt = DiZO(model.parameters(), projected_params(model), lr=1e-2, interval=3, proj_iters=3,
               search_data=lambda: 0, search_loss=lambda b: batch[model]())
    reference = ZOSGD(twin.parameters(), lr=1e-2)  # the same ZO steps, no phase: θ at the phase's start
    for _ in range(3):
        opt.step(lm_closure(model))
        reference.step(lm_closure(twin))
    phase = opt.last_phase
    assert phase["step"] == 3 and phase["ratios"] == opt.ratios.tolist()
    with torch.no_grad():
        assert phase["loss_before"] == float(batch[twin]())  # L(θ_start; B_1), bit for bit
        assert phase["loss_after"] == float(batch[model]())  # L(θ0 + r Δ; B_1) at the final weights
        s = [float((t - a).norm()) for (_, t), a in zip(projected_params(twin), opt.anchors)]
    assert phase["distances"] == pytest.approx(s, rel=1e-6)
    assert phase["loss_before"] != phase["loss_after"] and any(r != 1.0 for r in phase["ratios"])



@pytest.mark.parametrize("anchor_device", [None, "cpu"])
def test_anchors_where_asked_give_the_same_run(anchor_device):
    """anchor_device="cpu" keeps θ0 (and the phase's copy) in host memory, copied to each matrix's device;
    on a CPU-only machine the run is the default's, bit for bit (a GPU run: bench.py --gpu-check)."""
    runs = []
    for device in (None, anchor_device):
        model = tiny_opt()
        opt = DiZO(model.parameters(), projected_params(model), lr=1e-2, interval=3, proj_iters=2, seed=1,
                   anchor_device=device)
        for _ in range(6):
            opt.step(lm_closure(model))
        assert all(a.device == torch.device("cpu") for a in opt.anchors)
        runs.append(weights(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ---------------------------------------------------------------------------------------------------------
# dizo.py: resume, failures and the torch.optim conventions

@pytest.mark.parametrize("make", ["zosgd", "dizo", "dizo-list"])
def test_state_dict_round_trip_continues_bit_for_bit(make):
    """20 steps at once against 10 + 10 through state_dict into a fresh model and optimizer (other weights,
    other seed: everything comes from the checkpoint, the anchors too). With a list as search_data the γ
    search resumes at the same batch."""
    def build(model, seed):
        if make == "zosgd":
            return ZOSGD(model.parameters(), lr=1e-3, weight_decay=0.01, seed=seed)
        search = dict(search_data=list(range(7)), search_loss=lambda b: lm_closure(model, seed=b)()) \
            if make == "dizo-list" else {}
        return DiZO(model.parameters(), projected_params(model), lr=1e-3, seed=seed, interval=4, proj_iters=2,
                    **search)

    full = tiny_opt()
    opt = build(full, 9)
    for _ in range(20):
        opt.step(lm_closure(full))
    half = tiny_opt()
    opt = build(half, 9)
    for _ in range(10):
        opt.step(lm_closure(half))
    saved_model, saved_opt = copy.deepcopy(half.state_dict()), copy.deepcopy(opt.state_dict())
    resumed = tiny_opt(seed=123)
    resumed.load_state_dict(saved_model)
    opt = build(resumed, 0)
    opt.load_state_dict(saved_opt)
    for _ in range(10):
        opt.step(lm_closure(resumed))
    assert all(torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters()))


def test_a_resume_with_a_dataloader_as_search_data_warns_that_it_draws_other_batches():
    model = tiny_opt()
    closure = lm_closure(model)
    loader = DataLoader(torch.arange(3), batch_size=None, shuffle=True)

    def build():
        return DiZO(model.parameters(), projected_params(model), lr=1e-3, interval=2, proj_iters=2,
                    search_data=loader, search_loss=lambda b: closure())

    opt = build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build().load_state_dict(opt.state_dict())  # nothing drawn yet: nothing lost, no warning
    for _ in range(2):
        opt.step(closure)
    with pytest.warns(UserWarning, match="search_data is a DataLoader, whose position is not restored"):
        build().load_state_dict(opt.state_dict())


@pytest.mark.parametrize("source, target", [("zosgd", "dizo"), ("dizo", "zosgd"), ("sgd", "zosgd"),
                                            ("sgd", "dizo")])
def test_a_state_dict_from_another_optimizer_is_refused(source, target):
    model = tiny_opt()
    make = {"zosgd": lambda: ZOSGD(model.parameters(), lr=1e-3),
            "dizo": lambda: DiZO(model.parameters(), projected_params(model), lr=1e-3),
            "sgd": lambda: torch.optim.SGD(model.parameters(), lr=1e-3)}
    says = {"zosgd": "ZOSGD's", "dizo": "DiZO's", "sgd": "another optimizer's"}[source]
    with pytest.raises(ValueError, match=says):
        make[target]().load_state_dict(make[source]().state_dict())
    other = DiZO(model.parameters(), projected_params(model, roles=("q",)), lr=1e-3)
    with pytest.raises(ValueError, match="projected matrices must be this optimizer's"):
        other.load_state_dict(make["dizo"]().state_dict())


def failing_closure(kind, loss, fail_at):
    """A closure that behaves like `loss` except at its `fail_at`-th call, where it does `kind`."""
    calls = []

    def closure():
        calls.append(1)
        if len(calls) != fail_at:
            return loss()
        if kind == "raises":
            raise ValueError("the data loader broke")
        if kind == "interrupt":
            raise KeyboardInterrupt
        if kind == "backward":
            value = loss()
            value.backward()
            return value
        return {"none": None, "vector": loss() * torch.ones(4), "string": "0.5", "nan": torch.tensor(math.nan)}[kind]

    return closure


CLOSURE_FAILURES = {  # kind: (exception, what its message must say)
    "raises": (ValueError, "data loader broke"), "interrupt": (KeyboardInterrupt, ""),
    "none": (TypeError, "returned None at θ [+-] εz"), "vector": (TypeError, r"shape \(4,\).*one scalar"),
    "string": (TypeError, "returned '0.5'"), "backward": (RuntimeError, "does not require grad"),
    "nan": (FloatingPointError, "non-finite loss nan at θ [+-] εz"),
}


@pytest.mark.parametrize("fail_at", [1, 2])
@pytest.mark.parametrize("kind", list(CLOSURE_FAILURES))
def test_a_failing_closure_leaves_theta_put_back_by_replaying_z(kind, fail_at):
    """θ afterwards is what replaying z gives, bit for bit (the moves of the step, then one move back), within
    float rounding of θ before the step; the error says so and which pass failed."""
    model = tiny_opt()
    params = list(model.parameters())
    before = weights(params)
    opt = ZOSGD(params, lr=1e-2, eps=1e-3, seed=6)
    exception, says = CLOSURE_FAILURES[kind]
    with pytest.raises(exception) as info:
        opt.step(failing_closure(kind, lm_closure(model), fail_at))
    text = " ".join([str(info.value)] + info.value.__notes__)
    assert re.search(says, text) and "ZO step 1 stopped; θ was put back by replaying z" in text
    moves = [1e-3] if fail_at == 1 else [1e-3, -2e-3]
    expected = [b.clone() for b in before]
    for alpha in moves + [-sum(moves)]:
        for e, z in zip(expected, reference_z(before, reference_seeds(6, 1)[0])):
            e.add_(z, alpha=alpha)
    assert all(torch.equal(p, e) for p, e in zip(model.parameters(), expected))
    assert max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before)) < 1e-6
    assert opt.steps_done == 0 and opt.projected_grad is None


def test_a_failing_query_is_undone_and_dizo_takes_2q_passes_per_step():
    """A closure that fails in the second query leaves θ where replaying z puts it back (the first query was
    undone before it); DiZO with q queries runs its phase every κ steps."""
    model = tiny_opt()
    params = list(model.parameters())
    before = weights(params)
    opt = ZOSGD(params, lr=1e-2, eps=1e-3, seed=6, queries=2)
    with pytest.raises(ValueError, match="data loader broke"):
        opt.step(failing_closure("raises", lm_closure(model), fail_at=3))  # ℓ+ of the second query
    expected = [b.clone() for b in before]
    for step_seed, alphas in zip(reference_seeds(6, 2), [(1e-3, -2e-3, 1e-3), (1e-3, -1e-3)]):
        for alpha in alphas:
            for e, z in zip(expected, reference_z(before, step_seed)):
                e.add_(z, alpha=alpha)
    assert all(torch.equal(p, e) for p, e in zip(params, expected)) and opt.steps_done == 0
    calls, closure = [], lm_closure(model)
    opt = DiZO(params, projected_params(model), lr=1e-3, queries=2, interval=2, proj_iters=3)
    for step in range(1, 5):
        n = len(calls)
        opt.step(lambda: calls.append(1) or closure())
        assert len(calls) - n == 2 * 2 + (2 * 3 + 2 if step % 2 == 0 else 0)


@pytest.mark.parametrize("failing_draw, queries", [(3, 1), (5, 1), (7, 2)])
def test_a_pass_that_fails_part_way_moves_back_the_tensors_it_moved(monkeypatch, failing_draw, queries):
    """An error while drawing z (out of memory at the k-th tensor of the first pass, of the -2εz pass, or of the
    pass that puts θ back between two queries) leaves θ as the step found it: the tensors already moved are moved
    back, then the earlier passes."""
    model = tiny_opt()
    params, n = list(model.parameters()), len(list(model.parameters()))
    before, draws, randn = weights(params), [], torch.randn

    def failing_randn(*args, **kwargs):
        draws.append(1)
        if len(draws) == failing_draw + {3: 0, 5: n, 7: 2 * n}[failing_draw]:
            raise RuntimeError("out of memory (simulated)")
        return randn(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", failing_randn)
    with pytest.raises(RuntimeError, match="out of memory") as info:
        ZOSGD(params, lr=1e-2, seed=0, queries=queries).step(lm_closure(model))
    assert "θ was put back by replaying z" in " ".join(info.value.__notes__)
    for p, b in zip(params, before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("passes_before, tensor", [(0, 2), (1, 3)])  # the 2nd tensor of +εz; the 3rd of -2εz
def test_a_ctrl_c_as_a_tensor_moves_still_puts_theta_back(monkeypatch, passes_before, tensor):
    """Python runs a signal handler between bytecodes, so a Ctrl-C that comes while add_ moves a tensor raises as
    add_ returns: that tensor has moved. The pass counts it as moved before it moves, and θ is put back."""
    model = tiny_opt()
    params = list(model.parameters())
    before, adds, add_ = weights(params), [], torch.Tensor.add_

    def add_then_interrupt(self, *args, **kwargs):
        out = add_(self, *args, **kwargs)
        if any(self is p for p in params):
            adds.append(1)
            if len(adds) == passes_before * len(params) + tensor:
                raise KeyboardInterrupt
        return out

    monkeypatch.setattr(torch.Tensor, "add_", add_then_interrupt)
    with pytest.raises(KeyboardInterrupt) as info:
        ZOSGD(params, lr=1e-2, seed=0).step(lm_closure(model))
    assert "θ was put back by replaying z" in " ".join(info.value.__notes__)
    for p, b in zip(params, before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-6)


def test_a_g_that_overflows_after_theta_is_back_says_so_truthfully():
    """With q = 2 the first query puts θ back before it computes g; a g that overflows (ℓ± = ±1e308, finite) then
    fails with θ already back: the note says it was put back, and it was, bit for bit."""
    model = tiny_opt()
    params = list(model.parameters())
    before, calls = weights(params), []

    def closure():
        calls.append(1)
        return torch.tensor(1e308 if len(calls) == 1 else -1e308, dtype=torch.float64)

    with pytest.raises(FloatingPointError, match="g = ") as info:
        ZOSGD(params, lr=1e-2, seed=0, queries=2).step(closure)
    assert "ZO step 1 stopped; θ was put back by replaying z" in info.value.__notes__ and len(calls) == 2
    expected = [b.clone() for b in before]
    for alpha in (1e-3, -2e-3, 1e-3):
        for e, z in zip(expected, reference_z(before, reference_seeds(0, 2)[0])):
            e.add_(z, alpha=alpha)
    assert all(torch.equal(p, e) for p, e in zip(params, expected))


@pytest.mark.parametrize("second", ["undo", "restore"])
def test_a_restore_that_fails_too_says_so_and_keeps_the_first_error(monkeypatch, second):
    """Out of memory at the 2nd tensor of the -2εz pass, and again when that pass undoes its 1st tensor, or when θ is
    then put back from θ + εz: the first error is the one raised, and its note says θ could not be put back (it
    is not), rather than the second error with no note, or a note saying θ was put back."""
    model = tiny_opt()
    params, n = list(model.parameters()), len(list(model.parameters()))
    before, draws, randn = weights(params), [], torch.randn
    fails = (n + 2, n + 3 if second == "undo" else n + 4)  # +εz: 1..n; -2εz: n+1, n+2; its undo: n+3; restore n+4..

    def failing_randn(*args, **kwargs):
        draws.append(1)
        if len(draws) in fails:
            raise RuntimeError("out of memory (simulated, " + ("first" if len(draws) == fails[0] else "second") + ")")
        return randn(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", failing_randn)
    with pytest.raises(RuntimeError, match="first") as info:
        ZOSGD(params, lr=1e-2, seed=0).step(lm_closure(model))
    assert "ZO step 1 stopped; θ could NOT be put back: reload it" in info.value.__notes__
    assert max(float((p.detach() - b).abs().max()) for p, b in zip(params, before)) > 1e-4  # θ really moved


@pytest.mark.parametrize("queries", [1, 2])
def test_a_failure_in_the_update_says_theta_is_neither_old_nor_new(monkeypatch, queries):
    """Out of memory (or Ctrl-C) while the update draws z: the error says the weights must be reloaded, and the step
    is not counted. Without the note a caller could save a model with some tensors updated and others at θ - εz."""
    model = tiny_opt()
    params, n = list(model.parameters()), len(list(model.parameters()))
    draws, randn = [], torch.randn

    def failing_randn(*args, **kwargs):
        draws.append(1)
        if len(draws) == (3 * queries - 1) * n + 2:  # the 2nd tensor of the update's first pass
            raise RuntimeError("out of memory (simulated)")
        return randn(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", failing_randn)
    opt = ZOSGD(params, lr=1e-2, seed=0, queries=queries)
    with pytest.raises(RuntimeError, match="out of memory") as info:
        opt.step(lm_closure(model))
    assert "ZO step 1 stopped in its update: θ is neither old nor new, reload it" in info.value.__notes__
    assert opt.steps_done == 0 and opt.projected_grad is None


@pytest.mark.parametrize("eps, says", [(1e38, "could NOT be put back"), (1e-3, "was put back")])
def test_an_eps_that_overflows_is_not_reported_as_put_back(eps, says):
    model = tiny_opt()
    opt = ZOSGD(model.parameters(), lr=1e-3, eps=eps)
    with pytest.raises(FloatingPointError) as info:
        opt.step(failing_closure("nan", lm_closure(model), 2) if eps < 1 else lm_closure(model))
    assert says in " ".join(info.value.__notes__)


@pytest.mark.parametrize("closure", [None, torch.tensor(0.5), 0.5])
def test_a_closure_that_is_not_callable_is_refused_before_theta_moves(closure):
    model = tiny_opt()
    before = weights(model.parameters())
    opt = DiZO(model.parameters(), projected_params(model), lr=1e-2, seed=2)
    with pytest.raises(TypeError, match="needs a function returning the loss"):
        opt.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("kind", ["raises", "none", "interrupt"])
def test_a_failure_in_the_gamma_search_puts_the_projected_matrices_back_exactly(kind):
    """The step's ZO update stays; the projected matrices are exactly as that update left them, i.e. as in
    a twin run without projection."""
    model, twin = tiny_opt(), tiny_opt()
    closure, twin_closure = lm_closure(model), lm_closure(twin)
    search_loss = failing_closure(kind, closure, fail_at=3)  # the second inner iteration's ℓ+
    opt = DiZO(model.parameters(), projected_params(model), lr=1e-2, interval=3, proj_iters=4,
               search_data=lambda: None, search_loss=lambda batch: search_loss())
    ref = DiZO(twin.parameters(), projected_params(twin), lr=1e-2, interval=1000)
    for _ in range(2):
        opt.step(closure)
        ref.step(twin_closure)
    ref.step(twin_closure)
    with pytest.raises(CLOSURE_FAILURES[kind][0]) as info:
        opt.step(closure)
    assert "matrices were put back exactly" in " ".join(info.value.__notes__)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert opt.steps_done == 3 and torch.equal(opt.ratios, torch.ones(4, dtype=torch.float64))


def test_dropout_both_passes_see_the_same_masks():
    """Train mode, dropout 0.1, float64: g equals the directional derivative zᵀ∇L of the loss with the mask
    drawn from the RNG state at the start of the step (autograd under that state). Without the fork (the
    four-pass reference) the two passes see different masks and g is off by orders of magnitude. After the
    step the global RNG is where one closure call leaves it."""
    model = tiny_opt(dropout=0.1).double().train()
    ids = torch.randint(2, 64, (4, 12), generator=torch.Generator().manual_seed(0))  # no padding token:
    # its embedding row gets no gradient from autograd, yet moves the loss when perturbed

    def closure():  # the loss in float64 (Hugging Face's loss is computed in fp32)
        logits = model(input_ids=ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1))

    params = list(model.parameters())
    start = torch.get_rng_state()
    grads = torch.autograd.grad(closure(), params)
    step_seed = reference_seeds(5, 1)[0]
    derivative = sum(float((z * g).sum()) for z, g in zip(reference_z(params, step_seed), grads))
    torch.set_rng_state(start)
    opt = ZOSGD(params, lr=0.0, eps=1e-7, seed=5)  # small enough to cross no ReLU kink
    opt.step(closure)
    assert opt.projected_grad == pytest.approx(derivative, rel=1e-4)
    after_step = torch.get_rng_state()
    torch.set_rng_state(start)
    with torch.no_grad():
        closure()
    assert torch.equal(after_step, torch.get_rng_state())
    torch.set_rng_state(start)
    unreplayed = mezo_reference_step(params, closure, step_seed, lr=0.0, eps=1e-7)
    assert abs(unreplayed - derivative) > 100 * abs(derivative)


def test_every_pass_of_a_pair_starts_from_the_same_rng_state():
    """ZO steps: ℓ+ and ℓ- start from the same global RNG state, the next step from where ℓ- left it. A
    projection phase: every pass starts from the state the phase began with, and leaves it there."""
    model = tiny_opt(dropout=0.1).train()
    closure, states = lm_closure(model), []

    def recorded(kind):
        states.append((kind, torch.get_rng_state()))
        return closure()

    opt = DiZO(model.parameters(), projected_params(model), lr=1e-3, interval=2, proj_iters=3,
               search_data=[0], search_loss=lambda batch: recorded("search"))
    for _ in range(2):
        opt.step(lambda: recorded("step"))
    after = torch.get_rng_state()
    kinds, rng = [k for k, _ in states], [s for _, s in states]
    # two steps' ℓ±; then the phase: its first batch before the search, 3 pairs ℓ±, that batch after it
    assert kinds == ["step"] * 4 + ["search"] * (1 + 2 * 3 + 1)
    assert torch.equal(rng[0], rng[1]) and torch.equal(rng[2], rng[3]) and not torch.equal(rng[1], rng[2])
    assert all(torch.equal(rng[4], s) for s in rng[4:]) and torch.equal(after, rng[4])


def test_step_hooks_fire_once_per_step_and_both_optimizers_take_step_closure():
    counts = []
    for make in (lambda m: ZOSGD(m.parameters(), lr=1e-3),
                 lambda m: DiZO(m.parameters(), projected_params(m), lr=1e-3, interval=2, proj_iters=1)):
        model = tiny_opt()
        opt = make(model)
        hits = []
        opt.register_step_pre_hook(lambda *_: hits.append("pre"))
        opt.register_step_post_hook(lambda *_: hits.append("post"))
        closure = lm_closure(model)
        for _ in range(4):
            opt.step(closure)
        counts.append(hits)
    assert counts == [["pre", "post"] * 4] * 2


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1.0), "lr"), (dict(lr=math.nan), "lr"), (dict(eps=0.0), "eps"), (dict(weight_decay=-1.0),
                                                                               "weight_decay"),
    (dict(queries=0), "queries"), (dict(direction="uniform"), "direction"), (dict(seed=-1), "seed"),
    (dict(tau=0.0), "tau"), (dict(tau=1.0), "tau"), (dict(interval=0), "interval"),
    (dict(proj_iters=0), "proj_iters"), (dict(proj_eps=-0.1), "proj_eps"), (dict(proj_lr=-1.0), "proj_lr"),
    (dict(search_data=[1]), "search_loss"), (dict(search_loss=lambda b: 0.0), "search_loss"),
    (dict(search_data=[1], search_loss="loss"), "search_loss"),
])
def test_bad_hyperparameters_raise_naming_the_argument(kwargs, name):
    model = tiny_opt()
    args = dict(lr=1e-3) | kwargs
    with pytest.raises(ValueError, match=f"^{name} must be"):
        DiZO(model.parameters(), projected_params(model), **args)
    if name in ("lr", "eps", "weight_decay", "queries", "direction", "seed"):
        with pytest.raises(ValueError, match=f"^{name} must be"):
            ZOSGD(model.parameters(), **args)


def test_groups_may_differ_in_lr_and_weight_decay_only():
    model = tiny_opt()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="eps must be the same in every parameter group"):
        ZOSGD([{"params": params[:3], "eps": 1e-2}, {"params": params[3:]}], lr=1e-3)
    opt = ZOSGD(params[:3], lr=1e-3)
    with pytest.raises(ValueError, match="queries must be the same in every parameter group"):
        opt.add_param_group({"params": params[3:], "queries": 2})
    with pytest.raises(ValueError, match="^lr must be"):
        opt.add_param_group({"params": params[3:], "lr": -1.0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": params[3:], "lr": 1e-4, "weight_decay": 0.1})
    assert "eps: 0.001" in repr(opt)


@pytest.mark.parametrize("bad, says", [
    ("tensor", "projected must be a non-empty list"), ("module", "projected must be a non-empty list"),
    ("empty", "projected must be a non-empty list"),
    ("frozen", "must be a trained parameter"), ("outside", "must be a trained parameter"),
    ("not a tensor", "must be a trained parameter"),
])
def test_projected_must_be_trained_parameters_of_the_optimizer(bad, says):
    model = tiny_opt()
    k = model.model.decoder.layers[0].self_attn.k_proj
    projected = {"tensor": k.weight, "module": k, "frozen": [k.weight.detach()], "empty": [],
                 "outside": [torch.nn.Parameter(torch.zeros(3, 3))], "not a tensor": [("k", 3)]}[bad]
    with pytest.raises(ValueError, match=says):
        DiZO(model.parameters(), projected, lr=1e-3)
    DiZO(model.parameters(), [k.weight, ("k rows", k.weight[:4])], lr=1e-3)  # a parameter and a view: fine


def test_search_data_is_drawn_once_per_iteration_and_reiterated_when_exhausted():
    model = tiny_opt()
    closure, seen = lm_closure(model), []

    def search_loss(batch):
        seen.append(int(batch))
        return closure()

    expected = [0] + [b for b in [0, 1, 2, 0] for _ in "+-"] + [0, 1] + [b for b in [1, 2, 0, 1] for _ in "+-"] + [1]
    for source in (DataLoader(torch.arange(3), batch_size=None), [0, 1, 2]):  # three batches: 0, 1, 2
        seen.clear()
        opt = DiZO(model.parameters(), projected_params(model), lr=1e-3, interval=2, proj_iters=4,
                   search_data=source, search_loss=search_loss)
        for _ in range(4):
            opt.step(closure)
        # two phases of 4 batches, each twice; the first batch of a phase also before and after it
        assert seen == expected

    # without search_data and search_loss the γ search evaluates the step's own closure
    calls = []
    opt = DiZO(model.parameters(), projected_params(model), lr=1e-3, interval=2, proj_iters=4)
    for _ in range(2):
        opt.step(lambda: calls.append(1) or closure())
    assert len(calls) == 2 + 2 + 2 * 4 + 2

    # a generator cannot be iterated again: a clear error at the first draw past its end
    opt = DiZO(model.parameters(), projected_params(model), lr=1e-3, interval=1, proj_iters=3,
               search_data=(b for b in range(2)), search_loss=search_loss)
    with pytest.raises(ValueError, match="search_data must be a non-empty list, a DataLoader or a function"):
        opt.step(closure)


# ---------------------------------------------------------------------------------------------------------
# dizo.py: which matrices, per architecture family; LoRA; the divergence of §2.2

@pytest.mark.parametrize("family", ["opt", "roberta", "bert", "llama", "mistral", "qwen2", "gpt2"])
def test_projected_params_finds_k_and_v_of_every_layer(family):
    model = tiny_model(family)
    pairs = projected_params(model)
    assert len(pairs) == 2 * 2  # K and V of each of the 2 layers
    names = {"gpt2": ("[k]", "[v]"), "roberta": ("key", "value"), "bert": ("key", "value")}  # else k_proj, v_proj
    k, v = names.get(family, ("k_proj", "v_proj"))
    assert [(k in name, v in name) for name, _ in pairs] == [(True, False), (False, True)] * 2, [n for n, _ in pairs]
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for _, t in pairs:  # each is the parameter itself or a view of it, so in-place edits reach the model
        assert t.untyped_storage().data_ptr() in storages
    assert len(projected_params(model, roles=("q", "k", "v", "o"))) == 4 * 2


def test_projected_views_are_the_key_weights():
    """A change to GPT-2's projected K view (a column block of the fused c_attn) changes the keys only."""
    model = tiny_model("gpt2").eval()
    name, k = projected_params(model, roles=("k",))[0]
    attn = model.transformer.h[0].attn
    x = torch.randn(1, 5, 32)
    q0, k0, v0 = attn.c_attn(x).split(32, dim=2)
    with torch.no_grad():
        k.add_(1.0)
    q1, k1, v1 = attn.c_attn(x).split(32, dim=2)
    assert torch.equal(q0, q1) and torch.equal(v0, v1) and not torch.equal(k0, k1)
    assert name == "transformer.h.0.attn.c_attn.weight[k]"


def test_unsupported_model_or_roles_raise_naming_what_is_supported():
    for model in (torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), tiny_model("gpt_neox")):
        with pytest.raises(ValueError, match="model must be OPT, Llama/Mistral/Qwen2, BERT/RoBERTa, GPT-2 .or pass the matrices"):
            projected_params(model)
    with pytest.raises(ValueError, match="roles must be a non-empty subset"):
        projected_params(tiny_opt(), roles=("x",))


def LoraConfig(**settings):
    """peft.LoraConfig; without peft the test is skipped."""
    return optional("peft").LoraConfig(**settings)


def get_peft_model(model, config):
    """peft.get_peft_model; without peft the test is skipped."""
    return optional("peft").get_peft_model(model, config)


def trained_names(model, part=""):
    return [n for n, p in model.named_parameters() if p.requires_grad and part in n]


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_lora_projects_the_adapter_factors_of_k_and_v(family):
    model = get_peft_model(tiny_model(family), LoraConfig(r=4, target_modules=["k_proj", "v_proj"]))
    pairs = projected_params(model)
    params = dict(model.named_parameters())
    assert [n for n, _ in pairs] == trained_names(model)  # A and B of K and V in every layer, nothing else
    assert len(pairs) == 2 * 2 * 2 and all(t is params[n] for n, t in pairs)
    # PEFT's default targets, Q and V: by default V's factors; roles q, v: all, as the released code
    model = get_peft_model(tiny_model(family), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert [n for n, _ in projected_params(model)] == trained_names(model, ".v_proj.")
    assert sorted(n for n, _ in projected_params(model, roles=("q", "v"))) == sorted(trained_names(model))
    # LoRA on the MLP only: no trained K or V anywhere, refused (the frozen weights are never returned)
    mlp = {"opt": ["fc1", "fc2"], "llama": ["gate_proj", "up_proj", "down_proj"]}[family]
    model = get_peft_model(tiny_model(family), LoraConfig(r=4, target_modules=mlp))
    with pytest.raises(ValueError, match="attention matrices k, v must be trained, or carry LoRA adapters"):
        projected_params(model)


def test_lora_projects_the_active_adapter():
    model = get_peft_model(tiny_model("opt"), LoraConfig(r=4, target_modules=["k_proj", "v_proj"]))
    model.add_adapter("second", LoraConfig(r=2, target_modules=["k_proj", "v_proj"]))
    model.set_adapter("second")
    names = [n for n, _ in projected_params(model)]
    assert names == trained_names(model) and len(names) == 8 and all(".second." in n for n in names)


def test_dizo_on_lora_anchors_b_at_zero_and_rescales_the_adapters_only():
    model = get_peft_model(tiny_model("opt"), LoraConfig(r=4, target_modules=["k_proj", "v_proj"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    pairs = projected_params(model)
    opt = DiZO(model.parameters(), pairs, lr=1e-2, interval=3, proj_iters=3)
    assert all(torch.all(a == 0) for n, a in zip(opt.names, opt.anchors) if ".lora_B." in n)
    closure = lm_closure(model)
    for _ in range(3):
        opt.step(closure)
    assert not torch.all(opt.ratios == 1.0)
    for (n, t), d in zip(pairs, opt.distances()):
        if ".lora_B." in n:  # Δ_B = B: the distance from the anchor is the norm of B itself
            assert d == pytest.approx(float(t.detach().norm()), rel=1e-6) and d > 0
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_compiled_model_projects_the_same_names_and_loads_an_eager_checkpoint():
    model = tiny_opt()
    compiled = torch.compile(model, backend="eager")  # the same wrapper and names with any backend
    assert any(n.startswith("_orig_mod.") for n, _ in compiled.named_parameters())
    names = [n for n, _ in projected_params(compiled)]
    assert names == [n for n, _ in projected_params(model)]
    eager = DiZO(model.parameters(), projected_params(model), lr=1e-3)
    DiZO(compiled.parameters(), projected_params(compiled), lr=1e-3).load_state_dict(eager.state_dict())


def test_divergence_is_each_matrix_distance_from_its_anchor_in_layer_order():
    model = tiny_model("gpt2")  # Q, K and V are column blocks of one fused Conv1D weight (in, 3 * width)
    roles = ("q", "k", "v", "o")
    anchor = {n: t.detach().clone() for n, t in projected_params(model, roles=roles)}
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.weight[:, 32:64].add_(0.5)  # layer 1's K: 32 x 32 entries
        model.transformer.h[0].attn.c_proj.weight[0, 0].sub_(3.0)  # one entry of layer 0's O
    assert divergence(model, anchor, roles) == {"q": [0.0, 0.0], "k": [0.0, 16.0], "v": [0.0, 0.0],
                                                "o": [3.0, 0.0]}
    assert divergence(model, anchor) == {"k": [0.0, 16.0], "v": [0.0, 0.0]}  # K and V by default
    half = tiny_model("opt").to(torch.bfloat16)  # bf16 weights: the distance is computed in fp32
    start = {n: t.detach().clone() for n, t in projected_params(half)}
    with torch.no_grad():
        for _, t in projected_params(half):
            t.add_(torch.randn_like(t, dtype=torch.float32).mul_(1e-3).to(torch.bfloat16))
    exact = [float(torch.linalg.vector_norm(t.double() - start[n].double())) for n, t in projected_params(half)]
    got = divergence(half, start)
    assert got["k"] + got["v"] == pytest.approx([exact[i] for i in (0, 2, 1, 3)], rel=1e-6)


def readme_example():
    """The first python block of the README section on copying the optimizer."""
    readme = Path(__file__).with_name("README.md")
    if not readme.exists():  # dizo.py and this file copied into another project
        pytest.skip("no README.md beside this file")
    text = readme.read_text()
    section = text.split("## Copying the optimizer into your project\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def top_level_imports(source):
    """The top-level package of every absolute import in `source`."""
    nodes = list(ast.walk(ast.parse(source)))
    return {a.name.split(".")[0] for n in nodes if isinstance(n, ast.Import) for a in n.names} | {
        n.module.split(".")[0] for n in nodes if isinstance(n, ast.ImportFrom) and n.level == 0}


def test_readme_example_runs_with_dizo_py_alone(tmp_path, monkeypatch, capsys):
    """The README's example runs as written, in an empty folder that it leaves empty. Its imports are torch and dizo,
    and dizo.py's the standard library and torch, so dizo.py is all it needs beside torch. (Run in this process: a
    fresh interpreter would spend 3.5 s importing torch and torch._dynamo, which torch.optim loads.)"""
    example, allowed = readme_example(), set(sys.stdlib_module_names) | {"torch"}
    assert top_level_imports(example) == {"torch", "dizo"}
    assert top_level_imports(Path(dizo.__file__).read_text()) <= allowed
    monkeypatch.chdir(tmp_path)
    with torch.random.fork_rng():
        exec(compile(example, "README.md", "exec"), {"__name__": "__main__"})
    assert list(tmp_path.iterdir()) == []
    accuracy = dict(re.findall(r"^(\w+): .*accuracy (\S+)$", capsys.readouterr().out, re.M))
    assert set(accuracy) == {"ZOSGD", "DiZO"} and all(float(a) >= 0.85 for a in accuracy.values())


# ---------------------------------------------------------------------------------------------------------
# GPT-2's projected K and V are views of the fused c_attn weight: they follow the parameter's storage

def test_a_dtype_change_after_dizo_is_built_keeps_the_gpt2_projection():
    """model.double() after DiZO is built gives each parameter new storage: the phase still sees and moves K and V
    (distances > 0, ratios != 1), and the run is bit for bit the run of a DiZO built after model.double()."""
    runs = []
    for double_first in (False, True):
        model = tiny_model("gpt2")
        if double_first:
            model.double()
        opt = DiZO(model.parameters(), projected_params(model), lr=1e-2, seed=1, interval=3, proj_iters=3)
        if not double_first:
            model.double()
        closure = lm_closure(model)
        for _ in range(6):
            opt.step(closure)
        assert all(d > 0 for d in opt.last_phase["distances"]) and any(r != 1.0 for r in opt.ratios.tolist())
        runs.append(weights(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_a_dtype_change_in_the_middle_of_a_run_projects_the_new_storage():
    """model.double() after a phase: the next phase measures and rescales the weights the model now holds,
    θ_l <- θ0_l + r_l (θ_l - θ0_l), on fresh views of c_attn."""
    model = tiny_model("gpt2")
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
    pretrained = tiny_model("opt", seed=7).state_dict()
    runs = []
    for load_first in (True, False):
        model = tiny_model("opt", seed=123)
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
        runs.append(weights(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_a_resume_into_a_dizo_built_before_the_checkpoint_keeps_the_saved_anchors():
    """Resume in the order a training script takes: model and DiZO built at random weights, then the model's and
    the optimizer's checkpoints loaded; the run goes on bit for bit as the uninterrupted one (θ0 is the saved one,
    not re-taken at the first step after the resume)."""
    pretrained = tiny_model("opt", seed=7).state_dict()

    def build(model):
        return DiZO(model.parameters(), projected_params(model), lr=1e-2, seed=4, interval=3, proj_iters=2)

    full = tiny_model("opt", seed=123)
    opt = build(full)
    full.load_state_dict(pretrained)
    for _ in range(8):
        opt.step(lm_closure(full))
    half = tiny_model("opt", seed=123)
    opt = build(half)
    half.load_state_dict(pretrained)
    for _ in range(4):
        opt.step(lm_closure(half))
    saved_model, saved_opt = half.state_dict(), opt.state_dict()
    resumed = tiny_model("opt", seed=99)
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
    peft = optional("peft")
    return peft.get_peft_model(tiny_model("gpt2"), peft.LoraConfig(r=4, fan_in_fan_out=True, **config))


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
    peft = optional("peft")
    model = peft.get_peft_model(tiny_model("opt"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
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
    for seed in reference_seeds(0, 3):
        before = lin.weight.detach().clone()
        opt.step(lambda: lin(x).float().pow(2).mean())
        z = torch.randn(before.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.bfloat16).float()
        below = (opt.projected_grad * z).abs() < before.float().abs() * torch.finfo(torch.bfloat16).eps / 4 / 1e-6
        moved = lin.weight.detach() != before
        assert below.double().mean() > 0.99 and 0.4 < (moved & below).sum() / below.sum() < 0.6


def test_a_step_calls_the_closure_2q_times_each_pair_from_one_rng_state():
    """queries=3 in train mode with dropout: six calls; the two calls of each ± pair start from one global RNG
    state, the next pair from where the previous pair's second call left it."""
    model = tiny_model("opt", dropout=0.1).train()
    closure, states = lm_closure(model), []
    opt = ZOSGD(model.parameters(), lr=1e-3, queries=3)
    opt.step(lambda: states.append(torch.get_rng_state()) or closure())
    assert len(states) == 6
    assert all(torch.equal(states[2 * j], states[2 * j + 1]) for j in range(3))
    assert not any(torch.equal(states[2 * j + 1], states[2 * j + 2]) for j in range(2))


def test_trial_ratios_reach_1_plus_2tau_while_the_accepted_ratio_stays_within_1_plus_tau():
    """project()'s algebra: |ε_γ u_l| <= τ s_l, so a trial γ_l ± ε_γ u_l is within τ of the ratio r_l = γ_l / s_l,
    and from an accepted r_l at 1 + τ it reaches 1 + 2τ. A matrix that moved s = 0.01 (u's clip binds) and a loss
    that wants r = 3."""
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
    model = tiny_model("opt")
    closure = lm_closure(model)
    params = list(model.parameters())
    with torch.no_grad():
        at_theta = float(closure())
        gen = torch.Generator().manual_seed(reference_seeds(6, 1)[0])
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
    assert len(named) == 3
    source = "".join(p.read_text() for p in Path(dizo.__file__).parent.glob("test_*.py"))
    assert all(f"def {name}(" in source for name in named), named
