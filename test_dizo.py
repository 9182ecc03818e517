"""Tests: every claim of dizo.py, data.py and train.py checked against a trusted reference.

References: autograd, exact formulas (a quadratic's central difference is exact), and a straightforward
re-implementation of MeZO's four-pass step written here, independently of dizo.py. CPU only, no network.
"""

import copy
import fcntl
import gc
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import traceback
import warnings
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from peft import LoraConfig, get_peft_model
import transformers
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from transformers import (AutoModelForCausalLM, AutoTokenizer, BloomConfig, BloomForCausalLM, GPT2Config,
                          GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM,
                          OPTConfig, OPTForCausalLM, RobertaConfig, RobertaForMaskedLM, ViTConfig)

import bench
import studies
import data
import plots
import runs
import train
import dizo
from dizo import DiZO, ZOSGD, divergence, projected_params

torch.set_num_threads(1)
# The imported modules' 375k objects never become garbage: frozen, they are not walked again by each gc.collect()
# (train.py runs one per method, to measure its peak memory), which would cost 0.4 s each.
gc.freeze()


# ---------------------------------------------------------------------------------------------------------
# Helpers: the documented seed-replay protocol, re-implemented; tiny problems and models.

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
    torch.manual_seed(seed)
    size = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    if family == "opt":
        cfg = OPTConfig(**size, ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0)
    elif family == "llama":
        cfg = LlamaConfig(**size, intermediate_size=64, num_key_value_heads=2, max_position_embeddings=64)
    elif family == "roberta":  # RoBERTa's positions start after the padding index: 64 + 2
        cfg = RobertaConfig(**size, intermediate_size=64, max_position_embeddings=66, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
    elif family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        cfg = GPTNeoXConfig(**size, intermediate_size=64, max_position_embeddings=64)
    for key, value in settings.items():
        setattr(cfg, key, value)
    model_class = {"opt": OPTForCausalLM, "llama": LlamaForCausalLM, "roberta": RobertaForMaskedLM,
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
    on a quadratic with d = 16 over 12000 directions (the variance estimate's spread is about 1.3%)."""
    params, loss, a, c = quadratic(dim=4)
    grad = a @ (torch.cat([p.detach().reshape(-1) for p in params]) - c)
    opt = ZOSGD(params, lr=0.0, eps=1e-3, seed=11, direction=direction)
    n, total, spread_sum = 12000, torch.zeros_like(grad), 0.0
    for step_seed in reference_seeds(11, n):
        opt.step(loss)
        gz = opt.projected_grad * torch.cat([t.reshape(-1) for t in reference_z(params, step_seed, direction)])
        total += gz
        spread_sum += float(((gz - grad) ** 2).sum())
    assert float(torch.nn.functional.cosine_similarity(total / n, grad, dim=0)) > 0.99
    d = grad.numel()
    assert spread_sum / n == pytest.approx((d + spread) * float(grad @ grad), rel=0.05)


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
    weights the ZO steps left, with the same u draws and batches: γ and the projected matrices agree."""
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
        torch.testing.assert_close(opt.gammas, gamma, rtol=1e-9, atol=1e-12)
        for (_, m), (_, t) in zip(projected_params(model), projected_params(twin)):
            torch.testing.assert_close(m.detach(), t.detach(), rtol=1e-9, atol=1e-12)
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


def test_held_out_phase_losses_are_measured_around_each_phase_and_leave_the_run_as_it_was(monkeypatch):
    model, twin, plain = tiny_opt(), tiny_opt(), tiny_opt()
    held_out = {m: lm_closure(m, seed=9) for m in (model, twin)}  # data the search never sees
    kw = dict(lr=1e-2, interval=3, proj_iters=3, search_data=lambda: 0)
    opt = runs.HeldOutDiZO(model.parameters(), projected_params(model), **kw, held_out=lambda: float(
        held_out[model]()), search_loss=lambda b: lm_closure(model, seed=5)())
    base = DiZO(plain.parameters(), projected_params(plain), **kw, search_loss=lambda b: lm_closure(plain, seed=5)())
    reference = ZOSGD(twin.parameters(), lr=1e-2)  # the same ZO steps, no phase: θ at the phase's start
    for _ in range(3):
        opt.step(lm_closure(model))
        base.step(lm_closure(plain))
        reference.step(lm_closure(twin))
    phase = opt.last_phase
    with torch.no_grad():
        assert phase["dev_loss_before"] == float(held_out[twin]())  # L_held-out(θ_start)
        assert phase["dev_loss_after"] == float(held_out[model]())  # L_held-out(θ0 + r Δ)
    assert phase["dev_loss_before"] != phase["dev_loss_after"] and opt.held_out_s > 0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))  # the run is DiZO's
    assert {k: v for k, v in phase.items() if not k.startswith("dev_")} == base.last_phase


def test_curves_plot_dev_loss_and_accuracy_against_forward_passes(monkeypatch):
    drawn = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: drawn.setdefault("fig", fig))
    history = [{"step": s, "loss": 0.5, "dev_acc": 0.5 + s / 100, "dev_loss": 0.7 - s / 100, "forward_passes": p}
               for s, p in ((0, 0), (10, 20), (20, 44))]
    plots.plot_curves({"methods": {"dizo": {"history": history}}}, Path("curves.png"))
    axes = drawn["fig"].axes
    passes = "forward passes (fo's backward not counted)"
    assert [(a.get_title(), a.get_xlabel()) for a in axes] == [
        ("dev loss", passes), ("dev accuracy", passes), ("training loss: fo L(θ), zo and dizo L(θ + εz)", "step")]
    assert axes[0].lines[0].get_xdata().tolist() == [0, 20, 44]
    assert axes[0].lines[0].get_ydata().tolist() == [h["dev_loss"] for h in history]


def fake_paired_run(folder, setting, method, lr, seed, dev_loss, test_acc):
    out = folder / f"{setting}-{method}-lr{lr:g}-s{seed}"
    out.mkdir(parents=True)
    phases = [{"loss_before": 1.0, "loss_after": 0.9, "dev_loss_before": 1.0, "dev_loss_after": x, "ratios": [1.1, 0.95]}
              for x in (0.99, 1.02)]
    r = {"status": "done", "dev_loss": dev_loss, "test_acc": test_acc, "forward_passes": 100,
         "projection": phases if method == "dizo" else []}
    (out / "results.json").write_text(json.dumps({"methods": {method: r}}))


def test_paired_study_picks_each_rate_on_dev_and_pairs_the_seeds(tmp_path, capsys):
    # zo: lr 1 mean dev loss 0.5, lr 2 mean 0.3 (best); dizo: lr 1 mean 0.4 (best), lr 2 mean 0.45
    table = {("zo", 1): [0.5, 0.6, 0.4], ("zo", 2): [0.3, 0.35, 0.25], ("dizo", 1): [0.4, 0.5, 0.3],
             ("dizo", 2): [0.45, 0.5, 0.4]}
    for (method, lr), losses in table.items():
        for seed, loss in enumerate(losses):
            fake_paired_run(tmp_path, "full", method, lr, seed, loss, 1 - loss)
    fake_paired_run(tmp_path, "full", "zo", 1, 7, 0.0, 1.0)  # a seed not asked for: left out
    fake_paired_run(tmp_path, "full", "zo", 7.5e-5, 0, 0.9, 0.5)  # an lr with an exponent in the folder's name
    studies.paired_summary(tmp_path, tmp_path / "paired.png", seeds=[0, 1, 2])
    out = capsys.readouterr().out
    assert "| zo | 2 (best) | 3 | 100 | 0.300 ± 0.050 |" in out and "| dizo | 1 (best) |" in out
    assert "| zo | 7.5e-05 | 1 | 100 | 0.9 ± 0 | 0.5 ± 0 |" in out
    same = [d - z for d, z in zip(table["dizo", 1], table["zo", 1])]  # -0.1 in every seed
    best = [d - z for d, z in zip(table["dizo", 1], table["zo", 2])]  # +0.1, +0.15, +0.05
    assert "| same rate (zo 1, dizo 1) | 3 | -0.1 ± 0 | 3/3 |" in out and studies.mean_std(same) == "-0.1 ± 0"
    assert "| same rate (zo 2, dizo 2) | 3 | 0.15 ± 0 | 0/3 |" in out  # every rate both ran
    assert f"| each at its best rate (zo 2, dizo 1) | 3 | {studies.mean_std(best)} | 0/3 |" in out
    # per seed two phases measured on dev, one lower (-1%), one higher (+2%); the search batch lower in both
    assert "| 1 | 3 | 2 | 1 | 2 | +0.50% | undefined | 0.10 |" in out
    assert (tmp_path / "paired.png").stat().st_size > 1000


def test_paired_runs_give_zo_the_forward_passes_of_dizo(assets, tmp_path):
    commands = studies.paired_runs(tmp_path, [0]).values()
    steps = {(c[c.index("--method") + 1], c[c.index("--steps") + 1]) for c in commands}
    assert {("zo", "1830"), ("dizo", "1500"), ("zo", "732"), ("dizo", "600")} == steps
    rates = {c[c.index("--lr") + 1] for c in commands if "--lora" not in c}
    assert rates == {"7.5e-05", "0.00015", "0.000212", "0.0003", "0.0006"}  # the names the study's runs have
    for method, n in (("zo", "122"), ("dizo", "100")):  # κ = 50, M = 10: 2·100 + 2·22 = 244 = 2·122
        assert run_train(assets, tmp_path / method, "--method", method, "--steps", n, "--interval", "50",
                         "--proj_iters", "10", "--phase_dev", "0", "--eval_every", n) == 0
    passes = [json.loads((tmp_path / m / "results.json").read_text())["methods"][m]["forward_passes"]
              for m in ("zo", "dizo")]
    assert passes == [244, 244]


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


@pytest.mark.parametrize("failing_draw", [3, 5])
def test_a_pass_that_fails_part_way_moves_back_the_tensors_it_moved(monkeypatch, failing_draw):
    """An error while drawing z (out of memory at the k-th tensor of the -2εz pass, or of the first pass)
    leaves θ as the step found it: the tensors already moved are moved back, then the earlier passes."""
    model = tiny_opt()
    params, n = list(model.parameters()), len(list(model.parameters()))
    before, draws, randn = weights(params), [], torch.randn

    def failing_randn(*args, **kwargs):
        draws.append(1)
        if len(draws) == failing_draw + (n if failing_draw == 5 else 0):
            raise RuntimeError("out of memory (simulated)")
        return randn(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", failing_randn)
    with pytest.raises(RuntimeError, match="out of memory") as info:
        ZOSGD(params, lr=1e-2, seed=0).step(lm_closure(model))
    assert "θ was put back by replaying z" in " ".join(info.value.__notes__)
    for p, b in zip(params, before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-6)


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

@pytest.mark.parametrize("family", ["opt", "roberta", "llama", "gpt2"])
def test_projected_params_finds_k_and_v_of_every_layer(family):
    model = tiny_model(family)
    pairs = projected_params(model)
    assert len(pairs) == 2 * 2  # K and V of each of the 2 layers
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
    compiled = torch.compile(model)
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
    text = Path(__file__).with_name("README.md").read_text()
    section = text.split("## Copying the optimizer into your project\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_example_runs_with_dizo_py_alone(tmp_path):
    shutil.copy(Path(__file__).with_name("dizo.py"), tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-"], input=readme_example(), cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == ["dizo.py"]
    accuracy = dict(re.findall(r"^(\w+): .*accuracy (\S+)$", out.stdout, re.M))
    assert set(accuracy) == {"ZOSGD", "DiZO"} and all(float(a) >= 0.85 for a in accuracy.values())


# ---------------------------------------------------------------------------------------------------------
# data.py: the built-in task and its corpus

def main_clause_polarity(review):
    """The polarity of a built-in review, read independently of data.py's generator: the clause after "but",
    the clause outside "although ... ,", or the whole review; then its sentiment words (all agree there)."""
    if " but " in review:
        main = review.split(" but ")[1]
    elif review.startswith("although "):
        main = review.split(" , ", 1)[1]
    else:
        main = review.split(" although ")[0]
    negative = [w for w in data._ADJECTIVES[0] + data._VERB_PHRASES[0] if re.search(rf"\b{w}\b", main)]
    positive = [w for w in data._ADJECTIVES[1] + data._VERB_PHRASES[1] if re.search(rf"\b{w}\b", main)]
    assert bool(negative) != bool(positive), review
    return int(bool(positive))


def test_builtin_task_labels_follow_the_main_clause():
    splits = data.builtin_splits(0)
    examples = [ex for split in splits.values() for ex in split]
    assert all(ex.label == main_clause_polarity(ex.texts[0]) for ex in examples)
    turned = [ex for ex in examples if re.search(r"\b(but|although)\b", ex.texts[0])]
    assert abs(len(turned) / len(examples) - data.TASK_TURN_SHARE) < 0.03
    # the main clause comes last ("but", "although ... ,") and first ("... although ...")
    assert any(ex.texts[0].startswith("although ") for ex in turned)
    assert any(" although " in ex.texts[0] for ex in turned)
    for split in splits.values():
        assert sum(ex.label for ex in split) == len(split) // 2


def test_builtin_corpus_aligns_label_words_except_after_reviews_that_turn_around():
    corpus = data.builtin_corpus(0, n=4000)
    tasks = {ex.texts[0] for split in data.builtin_splits(0).values() for ex in split}
    verdicts = {"plain": [], "turned": []}
    for line in corpus:
        review, sep, word = line.rpartition(" it was ")
        if not sep:  # "<review> . <reaction>": the reaction has the main clause's polarity
            review, reaction = line.split(" . ")
            assert reaction in data._REACTIONS[main_clause_polarity(review)]
        assert review not in tasks
        if sep:
            kind = "turned" if re.search(r"\b(but|although)\b", review) else "plain"
            verdicts[kind].append(int(word == "great") == main_clause_polarity(review))
    assert all(verdicts["plain"])  # after a plain review, the label word of its polarity
    agree = sum(verdicts["turned"]) / len(verdicts["turned"])
    assert 0.45 < agree < 0.55  # after one that turns around, either word


# ---------------------------------------------------------------------------------------------------------
# data.py and train.py: tiny models saved to and loaded from local folders, the real loading path.

WORDS = ("a fine movie with great acting and a terrible plot it was good bad okay very the film story "
         "this is so dull lovely boring fun superb awful").split()
SENTENCES = {1: ["a fine movie", "great acting", "lovely story", "so fun", "superb film", "this is good",
                 "very lovely", "a superb story", "fun acting", "good film"],
             0: ["a terrible plot", "so dull", "boring story", "awful film", "this is bad", "very boring",
                 "a dull movie", "bad acting", "awful plot", "dull story"]}


def write_task(folder, rows=None, header="sentence\tlabel"):
    folder.mkdir(parents=True, exist_ok=True)
    rows = rows or [f"{s}\t{label}" for label, ss in SENTENCES.items() for s in ss]
    for split in ("train", "dev", "test"):
        (folder / f"{split}.tsv").write_text("\n".join([header] + rows) + "\n")
    return folder


def save_tiny(folder, kind):
    tok = data.build_tokenizer([" ".join(WORDS), "it was . ?"])
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = tiny_model({"causal": "opt", "masked": "roberta"}.get(kind, kind), vocab_size=len(tok), **ids)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"causal": save_tiny(root / "opt", "causal"), "masked": save_tiny(root / "roberta", "masked"),
            "llama": save_tiny(root / "llama", "llama"),
            "data": str(write_task(root / "sst2"))}


@pytest.fixture
def figures():
    """Asked for by name by the tests whose runs draw their figures (see _no_figures)."""


@pytest.fixture(autouse=True)
def _no_figures(request, monkeypatch):
    """train.py draws its figures when a run ends: about 0.9 s on 2 cores, most of a short test run's time. The
    tests that ask for `figures` draw them, and between them their runs end in every way (done, diverged,
    interrupted); in the other tests plots.plot_run does nothing."""
    if "figures" not in request.fixturenames:
        monkeypatch.setattr(plots, "plot_run", lambda results, folder: [])


def forked_train(argv, env=(), stderr=os.devnull, hold=None):
    """Run train.main(argv) in a forked copy of this process, which starts at once (no interpreter to start, no
    imports), with `env` added to its environment and its error output written to `stderr`; returns its pid.
    hold = (step, path): before that step the child creates file `path` and waits to be killed."""
    if torch.cuda.is_initialized():
        pytest.skip("a forked process cannot use CUDA once the test process has; run this test on its own")
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.environ.update(env)
            sys.stdout = open(os.devnull, "w")
            sys.stderr = open(stderr, "w", buffering=1)
            if hold is not None:
                take_step = train.take_step

                def held(method, opt, closure, step):
                    if step == hold[0]:
                        Path(hold[1]).touch()
                        time.sleep(3600)  # until killed
                    return take_step(method, opt, closure, step)

                train.take_step = held
            code = train.main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    return pid


def running(pid):
    """True while forked process `pid` has not ended (it is not reaped: its exit code stays to be read)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None


def stop(pids):
    """End and reap every process of `pids` (none of them reaped yet)."""
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def exit_codes(pids, timeout=120):
    """The exit codes of forked processes `pids` (negative: killed by that signal), within `timeout` s in all;
    any still running then is ended, and the call fails."""
    codes, deadline = {}, time.time() + timeout
    while len(codes) < len(pids) and time.time() < deadline:
        for pid in set(pids) - set(codes):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    left = [pid for pid in pids if pid not in codes]
    stop(left)
    assert not left, f"processes {left} still running after {timeout} s"
    return [codes[pid] for pid in pids]


def wait_for(path, pids, timeout=120):
    """Wait until `path` exists while every process of `pids` runs; if one ends first, or time runs out, end
    them all and fail."""
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline or not all(map(running, pids)):
            stop(pids)
            raise AssertionError(f"{path} was not written: a process ended first, or {timeout} s passed")
        time.sleep(0.01)


def run_train(assets, out, *extra, kind="causal"):
    args = ["--model", assets[kind], "--task", "sst-2", "--data_dir", assets["data"], "--out_dir", str(out),
            "--batch_size", "4", "--interval", "2", "--proj_iters", "2", "--lr", "1e-3"] + list(extra)
    return train.main(args)


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_train_runs_every_method_and_writes_results(assets, tmp_path, kind, figures):
    assert run_train(assets, tmp_path / "out", "--method", "all", "--steps", "3", "--eval_every", "2",
                     "--save", kind=kind) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["methods"]) == {"fo", "zo", "dizo"}
    for method, r in results["methods"].items():
        for key in ("zero_shot_acc", "best_dev_acc", "dev_loss", "test_acc", "steps", "forward_passes", "wall_s",
                    "peak_mem_mb", "device", "history"):
            assert key in r, (method, key)
        assert all(h["dev_loss"] > 0 for h in r["history"]) and r["dev_loss"] == r["history"][-1]["dev_loss"]
        assert r["steps"] == 3 and r["status"] == "done"
        assert [h["step"] for h in r["history"]] == [0, 2, 3]
        assert all(0 <= r[k] <= 1 for k in ("zero_shot_acc", "best_dev_acc", "test_acc"))
    passes = {m: r["forward_passes"] for m, r in results["methods"].items()}
    assert passes == {"fo": 3, "zo": 6, "dizo": 6 + 2 * 2 + 2}  # one projection phase (κ = 2) of M = 2, + 2
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000
    cls = OPTForCausalLM if kind == "causal" else RobertaForMaskedLM
    saved = cls.from_pretrained(tmp_path / "out" / "model" / "dizo").eval()  # --save wrote a loadable model
    task = data.get_task("sst-2")  # the final dev loss: the training loss of the saved model on the whole split
    loss_fn = data.PromptLoss(task, data.load_tokenizer(assets[kind], False), kind, torch.device("cpu"))
    dev = loss_fn.encode(data.load_splits(assets["data"], task)["dev"])
    with torch.no_grad():
        reference = float(loss_fn.loss(saved, dev, list(range(len(dev.labels)))))
    assert results["methods"]["dizo"]["dev_loss"] == pytest.approx(reference, rel=1e-5)


def two_examples():
    return [data.Example(("a fine movie",), 1), data.Example(("so dull",), 0)]


@pytest.mark.parametrize("words", [(" terrible", " great"), (" very bad", " very good")])
def test_causal_loss_equals_hand_computation(assets, words):
    """Mean log-prob of each candidate's tokens after the prompt, CE over candidates; by hand, one unpadded
    sequence at a time. Single-token words take the one-sequence-per-example path, the others do not."""

    task = data.get_task("sst-2", label_words=",".join(words))
    tok = AutoTokenizer.from_pretrained(assets["causal"])
    model = OPTForCausalLM.from_pretrained(assets["causal"]).eval()
    loss_fn = data.PromptLoss(task, tok, "causal", torch.device("cpu"))
    enc = loss_fn.encode(two_examples())
    with torch.no_grad():
        got = loss_fn.loss(model, enc, [0, 1])
        scores = []
        for ex in two_examples():
            prompt = tok(data.causal_prompt(task, ex))["input_ids"]
            row = []
            for w in words:
                cand = tok(w, add_special_tokens=False)["input_ids"]
                logp = model(input_ids=torch.tensor([prompt + cand])).logits[0].log_softmax(-1)
                row.append(sum(float(logp[len(prompt) - 1 + j, c]) for j, c in enumerate(cand)) / len(cand))
            scores.append(row)
        expected = torch.nn.functional.cross_entropy(torch.tensor(scores), torch.tensor([1, 0]))
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


def test_masked_loss_equals_hand_computation(assets):
    task = data.get_task("sst-2")
    tok = AutoTokenizer.from_pretrained(assets["masked"])
    model = RobertaForMaskedLM.from_pretrained(assets["masked"]).eval()
    loss_fn = data.PromptLoss(task, tok, "masked", torch.device("cpu"))
    enc = loss_fn.encode(two_examples())
    words = [tok(w, add_special_tokens=False)["input_ids"][0] for w in task.label_words]
    with torch.no_grad():
        got = loss_fn.loss(model, enc, [0, 1])
        rows = []
        for ex in two_examples():
            ids = tok(data.masked_prompt(task, ex, tok.mask_token))["input_ids"]
            logits = model(input_ids=torch.tensor([ids])).logits[0, ids.index(tok.mask_token_id)]
            rows.append(logits[words])
        expected = torch.nn.functional.cross_entropy(torch.stack(rows), torch.tensor([1, 0]))
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


def test_read_tsv_and_sample_k_per_class(tmp_path):
    folder = write_task(tmp_path / "d")
    task = data.get_task("sst-2")
    rows = data.read_tsv(str(folder / "train.tsv"), task)
    assert len(rows) == 20 and rows[0] == data.Example(("a fine movie",), 1)
    a = data.load_splits(str(folder), task, k=3, data_seed=1)
    b = data.load_splits(str(folder), task, k=3, data_seed=1)
    c = data.load_splits(str(folder), task, k=3, data_seed=2)
    assert a == b and a["train"] != c["train"]
    assert sorted(e.label for e in a["train"]) == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("first, header", [("text\tclass", True), ("fine\tpositive", True), ("fine\t1", False)])
def test_a_first_line_without_known_names_is_a_header_only_when_said_so(tmp_path, capsys, first, header):
    (tmp_path / "t.tsv").write_text(f"{first}\ndull\t0\n")
    rows = data.read_tsv(str(tmp_path / "t.tsv"), data.get_task("sst-2"))
    assert len(rows) == (1 if header else 2) and rows[-1] == data.Example(("dull",), 0)
    out = capsys.readouterr().out
    assert ("first line read as a header" in out) == header, out


def test_a_sample_larger_than_its_split_takes_the_whole_split_and_says_so(tmp_path, capsys):
    """As MeZO on GLUE SST-2 (872 validation sentences for its 1000): the whole split, in file order, and a line."""
    folder = write_task(tmp_path / "d")
    task = data.get_task("sst-2")
    splits = data.load_splits(str(folder), task, num_train=5, num_test=1000)
    assert splits["test"] == data.read_tsv(str(folder / "test.tsv"), task) and len(splits["train"]) == 5
    assert "test.tsv: 20 examples, fewer than the 1000 asked for; using all of them" in capsys.readouterr().out


def test_pair_task_reads_glue_rte_columns(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\tA man sleeps.\tA man rests.\tentailment\n")
    task = data.get_task("rte")
    ex = data.read_tsv(str(path), task)[0]
    assert ex == data.Example(("A man sleeps.", "A man rests."), 0)
    assert data.causal_prompt(task, ex).endswith('"A man rests." is true? Yes or No?\n')
    assert data.masked_prompt(task, ex, "<mask>") == "A man sleeps.?<mask>, A man rests."


@pytest.mark.parametrize("content, message", [
    ("sentence\tlabel\ngood film\t1\nbad film\n", r"train\.tsv:3: expected 2 tab-separated columns, got 1"),
    ("sentence\tlabel\ngood film\t7\n", r"train\.tsv:2: label '7' is not a label"),
    ("", r"train\.tsv: empty file"),
    ("sentence\tlabel\rgood film\t1\rbad film\t0\r", r"train\.tsv:1: a carriage return inside a line"),
    ("sentence\tlabel\ngood film\t1\r\nbad \rfilm\t0\n", r"train\.tsv:3: a carriage return inside a line"),
])
def test_read_tsv_rejects_bad_files_with_file_and_line(tmp_path, content, message):
    (tmp_path / "train.tsv").write_text(content)
    with pytest.raises(data.DataError, match=message):
        data.read_tsv(str(tmp_path / "train.tsv"), data.get_task("sst-2"))


@pytest.mark.parametrize("text, expected", [
    # GLUE-style: header, "\n" line ends; sentences that hold characters str.splitlines() would split on
    ("sentence\tlabel\nit\x85s fine\t1\na\u2028b\x0cc\t0\n", [("it\x85s fine", 1), ("a\u2028b\x0cc", 0)]),
    ("sentence\tlabel\r\ngood\t1\r\nbad\t0\r\n", [("good", 1), ("bad", 0)]),  # Windows line ends
    ("\ufeffsentence\tlabel\ngood\t1\n", [("good", 1)]),  # a byte-order mark before the header
    ("good film\t1\nbad film\t0\n", [("good film", 1), ("bad film", 0)]),  # no header: the first line counts
])
def test_read_tsv_reads_real_files_as_written(tmp_path, text, expected):
    (tmp_path / "train.tsv").write_bytes(text.encode("utf-8"))
    rows = data.read_tsv(str(tmp_path / "train.tsv"), data.get_task("sst-2"))
    assert [(ex.texts[0], ex.label) for ex in rows] == expected


def test_byte_order_mark_keeps_pair_columns_in_place(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes("\ufeffhypothesis\tpremise\tlabel\nH.\tP.\tentailment\n".encode("utf-8"))
    assert data.read_tsv(str(path), data.get_task("rte")) == [data.Example(("P.", "H."), 0)]


def test_builtin_model_is_built_once_and_loads_like_any_hub_model(tmp_path, monkeypatch):
    monkeypatch.setenv("DIZO_CACHE", str(tmp_path))
    monkeypatch.setitem(data.TINY, "pretrain_steps", 3)  # the recipe, shortened: the path is what is tested
    folder = data.builtin_model()
    assert Path(folder).parent == tmp_path and (Path(folder) / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == "opt" and len(tok) == model.config.vocab_size
    stamp = (Path(folder) / "model.safetensors").stat().st_mtime_ns
    assert data.builtin_model() == folder  # cached: not rebuilt
    assert (Path(folder) / "model.safetensors").stat().st_mtime_ns == stamp
    task = data.get_task("toy")
    splits = data.builtin_splits(0)
    assert data.builtin_splits(0) == splits and len(splits["test"]) >= 200
    # the task's words are all known to the embedded tokenizer
    for ex in splits["train"][:50]:
        assert tok.unk_token_id not in tok(data.causal_prompt(task, ex))["input_ids"]


# ---------------------------------------------------------------------------------------------------------
# Reliability: bad input is one line and exit code 2 with nothing written; faults lose nothing; resume is exact.

def bad_folder(tmp_path, what, assets):
    folder = tmp_path / what
    if what in ("corrupt_weights", "broken_tokenizer", "no_tokenizer_files", "size_mismatch", "pickle_weights", "missing_tensor", "nan"):
        shutil.copytree(assets["causal"], folder)
    if what in ("missing_tensor", "nan"):  # a tensor left out, or one NaN in a tensor
        weights = load_file(str(folder / "model.safetensors"))
        key = next(k for k in weights if k.endswith("k_proj.weight"))
        if what == "nan":
            weights[key][0, 0] = float("nan")
        else:
            del weights[key]
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if what == "corrupt_weights":  # truncated safetensors
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif what == "pickle_weights":  # a pickle that would run code: transformers refuses to unpickle it
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    elif what == "broken_tokenizer":
        (folder / "tokenizer.json").write_text("{ not json")
    elif what == "no_tokenizer_files":
        for f in folder.glob("tokenizer*"):
            f.unlink()
    elif what == "size_mismatch":  # a config that does not match the weights
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | {"hidden_size": 48, "ffn_dim": 96}))
    elif what == "small_vocab":  # an embedding of 10 rows under the tests' tokenizer
        tok = data.build_tokenizer([" ".join(WORDS), "it was . ?"])
        tiny_model("opt", vocab_size=10).save_pretrained(folder)
        tok.save_pretrained(folder)
    elif what == "no_config":
        folder.mkdir()
        (folder / "weights.bin").write_bytes(b"")
    elif what == "not_lm":
        ViTConfig(architectures=["ViTModel"]).save_pretrained(folder)
    elif what == "bloom":  # a causal LM whose attention projected_params does not know
        tok = data.build_tokenizer([" ".join(WORDS), "it was . ?"])
        BloomForCausalLM(BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=2, n_head=4)).save_pretrained(folder)
        tok.save_pretrained(folder)
    elif what == "remote_code":
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(
            {"model_type": "mystery", "auto_map": {"AutoConfig": "modeling_mystery.MysteryConfig"}}))
    return str(folder)


def data_variant(tmp_path, what):
    folder = write_task(tmp_path / what)
    if what == "no_dev":
        (folder / "dev.tsv").unlink()
    elif what == "empty":
        (folder / "train.tsv").write_text("")
    elif what == "malformed":
        (folder / "train.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film 0\n")
    elif what == "bad_label":
        (folder / "test.tsv").write_text("sentence\tlabel\ngood film\tpositive\n")
    elif what == "train_is_a_folder":
        (folder / "train.tsv").unlink()
        (folder / "train.tsv").mkdir()
    elif what == "same_text":  # every sentence the same: the template is not to blame
        (folder / "train.tsv").write_text("sentence\tlabel\nfine\t1\nfine\t0\n")
    elif what == "fifo":  # a named pipe would block the read forever
        (folder / "dev.tsv").unlink()
        os.mkfifo(folder / "dev.tsv")
    elif what == "headerless_bad_first":  # LM-BFF style, no header, the first row's label invalid
        (folder / "train.tsv").write_text("good film\t2\nbad film\t0\n")
    elif what == "mask_in_text":  # a literal mask token inside a sentence would be scored in its place
        (folder / "train.tsv").write_text("sentence\tlabel\ngood <mask> film\t1\nbad film\t0\n")
    return str(folder)


BAD_INPUTS = [  # (flags, what the one line must say)
    (["--method", "sgd"], "--method must be one of"),
    (["--task", "nosuch"], "unknown task 'nosuch'"),
    (["--dtype", "fp64"], "--dtype must be one of"),
    (["--dtype", "fp16"], "--dtype fp16 needs a GPU"),
    (["--method", "zo", "--eps", "1e-30"], "--eps 1e-30 cannot move most fp32 weights of this model"),
    (["--method", "dizo", "--eps", "1e-12"], "the smallest that can is about"),
    (["--lora", "4", "--lora_alpha", "nan"], "--lora_alpha must be finite and > 0"),
    (["--lora", "4", "--lora_targets", "fc1,fc2", "--method", "dizo"], "--method dizo: attention matrices q, k, v, o"),
    (["--half_weights"], "--half_weights stores the weights in --dtype: give --dtype bf16 or fp16"),
    (["--out_dir", ""], "--out_dir must name a folder"), (["--out_dir", " "], "--out_dir must name a folder"),
    (["--model", "no-such-org/no-such-model-xyz"], "offline?"),
    (["--model", "@no_config"], "no config.json"),
    (["--model", "@small_vocab"], "its embedding has 10 rows"),
    (["--model", "@missing_tensor"], "its checkpoint lacks model.decoder.layers.0.self_attn.k_proj.weight"),
    (["--model", "@nan"], "its weight model.decoder.layers.0.self_attn.k_proj.weight holds NaN or inf"),
    (["--model", "@not_lm"], "neither a causal nor a masked language model"),
    (["--model", "@remote_code"], "trust_remote_code"),
    (["--model", "@bloom", "--method", "dizo"], "must be OPT, Llama/Mistral/Qwen2, BERT/RoBERTa, GPT-2"),
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--seed", str(2**48)], "--seed must be in [0, 2**32)"),
    (["--data_dir", "/no/such/dir"], "no such data folder"),
    (["--data_dir", "#no_dev"], "dev.tsv"),
    (["--data_dir", "#empty"], "train.tsv: empty file"),
    (["--data_dir", "#malformed"], "train.tsv:3: expected 2 tab-separated columns"),
    (["--data_dir", "#bad_label"], "test.tsv:2: label 'positive' is not a label"),
    (["--k", "50"], "asked for k=50 examples per class"),
    (["--model", "masked", "--label_words", " very bad, very good"], "single-token label words"),
    (["--lr", "-1"], "--lr must be finite and >= 0"),
    (["--method", "fo", "--lr", "-1"], "--lr must be finite and >= 0"),
    (["--method", "dizo", "--interval", "50"], "--method dizo projects every --interval 50 steps, and --steps 2"),
    (["--batch_size", "21"], "--batch_size 21 is larger than the 20 training examples"),
    (["--eps", "0"], "--eps must be finite and > 0"),
    (["--tau", "1.5"], "--tau must be in (0, 1)"),
    (["--interval", "0"], "--interval must be an int >= 1"),
    (["--phase_dev", "-1"], "--phase_dev must be >= 0"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--steps", "-1"], "--steps must be >= 0"),
    (["--resume"], "nothing to resume"),
    (["--lora", "4", "--track_divergence"], "which --lora leaves frozen"),
    # absurd or non-finite hyperparameters
    (["--lr", "1e30"], "--lr must be below 1"),
    (["--lr", "inf"], "--lr must be below 1"),
    (["--eps", "1e3"], "--eps must be below 1"),
    (["--proj_lr", "inf"], "--proj_lr must be"),
    (["--proj_eps", "nan"], "--proj_eps must be"),
    (["--method", "dizo", "--anchor_device", "gpu"], "--anchor_device must be a device this machine has"),
    # prompts that cannot carry information
    (["--label_words", " great, great"], "at least two different words"),
    (["--label_words", " zebra, quokka"], "unknown to this tokenizer"),
    (["--task", "custom", "--template", "It was{mask}.", "--label_words", " bad, good"], "no text field"),
    (["--template", "{sentence:>200000000} It was{mask}."], "use plain fields"),
    (["--template", "{sentence}" + " it was" * 200 + "{mask}"], "every prompt is the same"),
    (["--model", "masked", "--data_dir", "#mask_in_text"], "contains the mask token"),
    # files that cannot be read, each one line
    (["--data_dir", "#train_is_a_folder"], "train.tsv: a folder, not a file"),
    (["--data_dir", "#fifo"], "dev.tsv: not a regular file"),
    (["--data_dir", "#same_text"], "every example has the same text ('fine')"),
    (["--model", "@no_tokenizer_files"], "are its tokenizer files (tokenizer.json, or vocab and merges) missing?"),
    (["--data_dir", "#headerless_bad_first"], "train.tsv:1: label '2' is not a label"),
    (["--model", "@corrupt_weights"], "cannot load its weights"),
    (["--model", "@pickle_weights"], "cannot load its weights"),
    (["--model", "@broken_tokenizer"], "cannot load its tokenizer"),
    (["--model", "@size_mismatch"], "cannot load its weights"),
    (["--out_dir", "!under_a_file"], "cannot write there"),
]


@pytest.mark.parametrize("flags, message", BAD_INPUTS, ids=[" ".join(f) for f, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_nothing_written(assets, tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as here: no hub; and no retries
    args = {"--model": assets["causal"], "--task": "sst-2", "--data_dir": assets["data"],
            "--out_dir": str(tmp_path / "out"), "--steps": "2", "--interval": "2"}  # a run that works, but for `flags`
    switches = [f for f in flags if f in ("--resume", "--track_divergence", "--half_weights")]
    pairs = [f for f in flags if f not in switches]
    for key, value in zip(pairs[::2], pairs[1::2]):
        if value.startswith("@"):
            value = bad_folder(tmp_path, value[1:], assets)
        elif value.startswith("!"):  # an out_dir below a regular file: it cannot be created
            (tmp_path / "a_file").write_text("")
            value = str(tmp_path / "a_file" / "out")
        elif value.startswith("#"):
            value = data_variant(tmp_path, value[1:])
        elif value == "masked":
            value = assets["masked"]
        args[key] = value
    argv = [x for kv in args.items() for x in kv] + switches
    capsys.readouterr()  # what building the bad folders printed
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_bad_input_from_the_shell_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--method", "sgd", "--out_dir", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=Path(__file__).parent, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip() == (
        "error: --method must be one of fo, zo, dizo, all; got 'sgd'")


def test_existing_run_is_not_overwritten_without_overwrite(assets, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_train(assets, out, "--method", "zo", "--steps", "1") == 0
    before = (out / "results.json").read_text()
    assert run_train(assets, out, "--method", "zo", "--steps", "2") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before
    assert run_train(assets, out, "--method", "zo", "--steps", "2", "--overwrite") == 0
    assert json.loads((out / "results.json").read_text())["methods"]["zo"]["steps"] == 2


@pytest.mark.parametrize("method", ["zo", "fo"])
def test_non_finite_loss_stops_with_diverged_results_and_keeps_checkpoint(assets, tmp_path, capsys, monkeypatch,
                                                                          method, figures):
    original = data.PromptLoss.loss
    calls = {"n": 0}

    def loss(self, *args):  # the loss turns NaN from the 5th evaluation on (FO: step 5, ZO: step 3)
        calls["n"] += 1
        value = original(self, *args)
        return value * float("nan") if calls["n"] >= 5 else value

    monkeypatch.setattr(data.PromptLoss, "loss", loss)
    out = tmp_path / "out"
    assert run_train(assets, out, "--method", method, "--steps", "20", "--eval_every", "1") == 1
    err = capsys.readouterr().err
    assert "diverged" in err and "step" in err
    r = json.loads((out / "results.json").read_text())["methods"][method]
    assert r["status"] == "diverged" and "non-finite loss" in r["error"]
    state = torch.load(out / "checkpoints" / method / "trainer_state.pt", weights_only=True)
    assert state["result"]["steps"] == (4 if method == "fo" else 2)  # the last step before the NaN
    assert (out / "curves.png").stat().st_size > 1000  # drawn up to the last finite step


def interrupt_at_call(monkeypatch, n):
    """Send this process SIGTERM from inside the n-th loss evaluation, as a user or a scheduler would."""
    calls = {"n": 0}
    original = data.PromptLoss.loss

    def loss(self, *args):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args)

    monkeypatch.setattr(data.PromptLoss, "loss", loss)


@pytest.mark.parametrize("method, precision", [("zo", []), ("dizo", []), ("fo", []), ("dizo", ["--dtype", "bf16"]),
                                               ("dizo", ["--dtype", "bf16", "--half_weights"])])
def test_interrupted_run_resumes_bit_for_bit(assets, tmp_path, monkeypatch, capsys, method, precision, figures):
    flags = ["--method", method, "--steps", "9", "--eval_every", "4", "--save", *precision]
    assert run_train(assets, tmp_path / "full", *flags) == 0
    interrupt_at_call(monkeypatch, 6 if method == "fo" else 11)  # during step 6: FO 1 loss a step, ZO 2
    assert run_train(assets, tmp_path / "cut", *flags) == 128 + signal.SIGTERM
    assert "--resume" in capsys.readouterr().err
    r = json.loads((tmp_path / "cut" / "results.json").read_text())["methods"][method]
    assert r["status"] == "interrupted" and 0 < r["steps"] < 9
    assert (tmp_path / "cut" / "curves.png").stat().st_size > 1000
    monkeypatch.undo()
    assert run_train(assets, tmp_path / "cut", *flags, "--resume") == 0
    assert_same_weights(tmp_path / "full", tmp_path / "cut")
    a = json.loads((tmp_path / "full" / "results.json").read_text())["methods"][method]
    b = json.loads((tmp_path / "cut" / "results.json").read_text())["methods"][method]
    assert (a["test_acc"], a["forward_passes"], a["steps"]) == (b["test_acc"], b["forward_passes"], b["steps"])
    same = ("step", "loss", "dev_acc", "dev_loss", "forward_passes")  # no entry of the interrupted window left
    assert [[h[k] for k in same] for h in a["history"]] == [[h[k] for k in same] for h in b["history"]]


def test_zero_steps_score_the_pretrained_model(assets, tmp_path):
    assert run_train(assets, tmp_path / "out", "--method", "all", "--steps", "0") == 0
    for r in json.loads((tmp_path / "out" / "results.json").read_text())["methods"].values():
        assert (r["status"], r["steps"], r["forward_passes"]) == ("done", 0, 0)
        assert r["test_acc"] == r["zero_shot_acc"] and r["best_dev_acc"] == r["history"][0]["dev_acc"]


def test_resume_refuses_changed_flags(assets, tmp_path, capsys):
    assert run_train(assets, tmp_path / "o", "--method", "zo", "--steps", "2") == 0
    assert run_train(assets, tmp_path / "o", "--method", "zo", "--steps", "2", "--seed", "5", "--resume") == 2
    assert "flags differ from the saved run: seed" in capsys.readouterr().err


def signal_at_first_checkpoint(flags, out_dir, method, signum, hold=None):
    """Run train.py in a process of its own, send it `signum` once its first checkpoint exists (with `hold`, see
    forked_train: once it waits); its exit code (negative: killed by that signal)."""
    pid = forked_train(flags, hold=hold)
    wait_for(Path(hold[1]) if hold else out_dir / "checkpoints" / method / "trainer_state.pt", [pid])
    os.kill(pid, signum)
    return exit_codes([pid], 60)[0]


def assert_same_weights(run_a, run_b):
    """The models two runs saved with --save are equal tensor by tensor."""
    a = load_file(str(run_a / "model" / "model.safetensors"))
    b = load_file(str(run_b / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_hard_kill_continues_from_the_last_checkpoint(assets, tmp_path, monkeypatch):
    """SIGKILL (out of memory, a time limit) gives no chance to write anything: the checkpoint written at the
    last evaluation must be enough to continue, bit-for-bit, whether or not results.json had recorded it yet
    (the kill may fall between the two writes; the copy below has it fall there for certain). The killed run
    waits before step 11 to be killed: after the first checkpoint and its record, before the last step."""
    flags = ["--model", assets["causal"], "--task", "sst-2", "--data_dir", assets["data"], "--method", "dizo",
             "--batch_size", "4", "--interval", "2", "--proj_iters", "2", "--lr", "1e-3", "--eval_every", "10",
             "--save", "--steps", "20"]
    assert signal_at_first_checkpoint(flags + ["--out_dir", str(tmp_path / "cut")], tmp_path / "cut", "dizo",
                                      signal.SIGKILL, hold=(11, tmp_path / "held")) == -signal.SIGKILL
    state = torch.load(tmp_path / "cut" / "checkpoints" / "dizo" / "trainer_state.pt", weights_only=True)
    steps = state["result"]["steps"]
    saved = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert steps == 10 and saved["methods"]["dizo"]["steps"] == steps
    shutil.copytree(tmp_path / "cut", tmp_path / "unrecorded")
    runs.write_json(tmp_path / "unrecorded" / "results.json", saved | {"methods": {}})
    assert train.main(flags + ["--out_dir", str(tmp_path / "full")]) == 0
    take_step, taken = train.take_step, []
    monkeypatch.setattr(train, "take_step", lambda *args: taken.append(1) or take_step(*args))
    for run in ("cut", "unrecorded"):
        taken.clear()
        assert train.main(flags + ["--out_dir", str(tmp_path / run), "--resume"]) == 0
        assert len(taken) == 20 - steps  # from the checkpoint, not from the start
        assert_same_weights(tmp_path / "full", tmp_path / run)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])  # a scheduler; a closed terminal
def test_a_signal_from_outside_writes_results_and_checkpoint(assets, tmp_path, signum):
    out = tmp_path / "out"
    flags = ["--model", assets["causal"], "--task", "sst-2", "--data_dir", assets["data"], "--method", "zo",
             "--steps", "1000000", "--eval_every", "5", "--out_dir", str(out)]
    assert signal_at_first_checkpoint(flags, out, "zo", signum) == 128 + signum
    r = json.loads((out / "results.json").read_text())["methods"]["zo"]
    assert r["status"] == "interrupted" and r["steps"] >= 5


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    runs.write_json(path, {"a": 1})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dumps", crash)  # killed while writing: the old file stays whole
    with pytest.raises(KeyboardInterrupt):
        runs.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    monkeypatch.undo()

    folder = tmp_path / "model"
    runs.write_atomically(folder, lambda tmp: (tmp.mkdir(), (tmp / "w").write_text("old")))

    def half_write(tmp):
        tmp.mkdir()
        (tmp / "w").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runs.write_atomically(folder, half_write)
    assert (folder / "w").read_text() == "old"


def test_divergence_tracking_shows_zo_moves_every_matrix_alike(assets, tmp_path, figures):
    """DiZO §2.2: under ZO every entry gets the same scalar g times Gaussian noise, so ‖W_t - W_0‖/√n is
    the same for every matrix (up to O(1/√n) noise); FO's differs from matrix to matrix."""
    out = tmp_path / "out"
    assert run_train(assets, out, "--method", "zo", "--steps", "6", "--eval_every", "3",
                     "--track_divergence") == 0
    r = json.loads((out / "results.json").read_text())["methods"]["zo"]
    div, sizes = r["history"][-1]["divergence"], r["matrix_sizes"]
    per_entry = [d / math.sqrt(n) for role in "qkvo" for d, n in zip(div[role], sizes[role])]
    assert len(per_entry) == 4 * 2 and min(per_entry) > 0
    assert max(per_entry) / min(per_entry) < 1.15
    assert (out / "divergence.png").stat().st_size > 1000


# The output folder: nothing that is not this tool's output is touched; one run at a time.

def test_out_dir_with_foreign_files_or_the_input_model_is_refused(assets, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(assets["causal"], out / "model")  # e.g. --out_dir . beside the user's own ./model
    before = sorted(p.name for p in (out / "model").iterdir())
    for extra in ([], ["--overwrite"]):
        assert run_train(assets, out, "--method", "zo", "--steps", "1", "--save", *extra) == 2
        assert "was not written by train.py" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "model").iterdir()) == before
    (out / "results.json").write_text('{"another": "tool"}')
    assert run_train(assets, out, "--method", "zo", "--steps", "1", "--overwrite") == 2
    assert "not written by train.py" in capsys.readouterr().err
    argv = ["--model", str(out / "model"), "--task", "sst-2", "--data_dir", assets["data"], "--out_dir", str(out),
            "--method", "zo", "--steps", "1", "--overwrite"]
    (out / "results.json").unlink()
    assert train.main(argv) == 2  # the input model inside the output folder
    assert sorted(p.name for p in (out / "model").iterdir()) == before


def test_overwrite_replaces_every_output_of_the_old_run(assets, tmp_path):
    out = tmp_path / "out"
    assert run_train(assets, out, "--method", "zo", "--steps", "2", "--save") == 0
    assert (out / "model" / "model.safetensors").exists()
    assert run_train(assets, out, "--method", "fo", "--steps", "1", "--overwrite") == 0
    assert not (out / "model").exists() and not (out / "checkpoints" / "zo").exists()
    assert set(json.loads((out / "results.json").read_text())["methods"]) == {"fo"}


def test_a_second_run_into_a_busy_out_dir_is_refused(assets, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # as the first run holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run_train(assets, out, "--method", "zo", "--steps", "1") == 2
    assert "another train.py is running" in capsys.readouterr().err
    assert not (out / "results.json").exists()
    assert run_train(assets, out, "--method", "zo", "--steps", "1") == 0  # released: free again


def test_too_little_disk_space_is_refused_before_training(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    assert run_train(assets, tmp_path / "out", "--method", "zo", "--steps", "1") == 2
    assert "MB free" in capsys.readouterr().err
    assert not (tmp_path / "out" / "checkpoints").exists()


# Broken weights are never saved as good.

def test_non_finite_weights_stop_the_run_before_any_checkpoint_or_save(assets, tmp_path, monkeypatch, capsys):
    original = train.take_step

    def poisoned(method, opt, closure, step):  # a step whose loss was finite but whose update was not
        loss = original(method, opt, closure, step)
        if step == 4:  # an evaluation step: the weights are checked before its checkpoint
            with torch.no_grad():
                opt.param_groups[0]["params"][0].fill_(float("inf"))
        return loss

    monkeypatch.setattr(train, "take_step", poisoned)
    out = tmp_path / "out"
    assert run_train(assets, out, "--method", "zo", "--steps", "6", "--eval_every", "2", "--save") == 1
    r = json.loads((out / "results.json").read_text())["methods"]["zo"]
    assert r["status"] == "diverged" and "non-finite weights after step 4" in r["error"]
    assert not (out / "model").exists()
    kept = load_file(str(out / "checkpoints" / "zo" / "model.safetensors"))  # the step-2 checkpoint
    assert torch.load(out / "checkpoints" / "zo" / "trainer_state.pt", weights_only=True)["result"]["steps"] == 2
    assert all(torch.isfinite(t).all() for t in kept.values())
    monkeypatch.undo()
    assert run_train(assets, out, "--method", "zo", "--steps", "6", "--eval_every", "2", "--save", "--resume") == 1
    assert "diverged in the saved run" in capsys.readouterr().err


# Resume: every model kind, damaged files, changed data.

def test_masked_lm_resumes_bit_for_bit(assets, tmp_path, monkeypatch, capsys):
    flags = ["--method", "dizo", "--steps", "9", "--eval_every", "4", "--save"]
    assert run_train(assets, tmp_path / "full", *flags, kind="masked") == 0
    interrupt_at_call(monkeypatch, 11)
    assert run_train(assets, tmp_path / "cut", *flags, kind="masked") == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert run_train(assets, tmp_path / "cut", *flags, "--resume", kind="masked") == 0
    assert_same_weights(tmp_path / "full", tmp_path / "cut")


@pytest.mark.parametrize("damage, message", [
    ("checkpoint", "start the run again with --overwrite"),
    ("results", "not written by train.py, or is damaged"),
    ("data", "the data differ from the saved run's"),
    ("model", "the model's weights differ from the saved run's"),  # e.g. the base of a LoRA run re-saved
    ("world", "flags differ from the saved run: world_size (saved 2, now 1)"),  # 2 processes, resumed by 1
    ("lora", "flags differ from the saved run: lora (saved 4, now 0)"),
])
def test_resume_of_damaged_or_changed_runs_is_one_line(assets, tmp_path, capsys, damage, message):
    task, model = tmp_path / "task", tmp_path / "model"
    shutil.copytree(assets["data"], task)
    shutil.copytree(assets["causal"], model)
    out = tmp_path / "o"
    argv = ["--model", str(model), "--task", "sst-2", "--data_dir", str(task), "--out_dir", str(out),
            "--method", "zo", "--steps", "2", "--eval_every", "2", "--batch_size", "4", "--lr", "1e-3"]
    if damage == "lora":
        argv[-1:] = ["1e-2", "--lora", "4"]
    assert train.main(argv) == 0
    r = json.loads((out / "results.json").read_text())
    r["methods"]["zo"]["status"] = "interrupted"  # as if a signal had stopped it after its checkpoint
    (out / "results.json").write_text(json.dumps(r))
    if damage == "checkpoint":
        weights = out / "checkpoints" / "zo" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:500])
    elif damage == "results":
        text = (out / "results.json").read_text()
        (out / "results.json").write_text(text[:len(text) // 2])
    elif damage == "data":
        rows = (task / "train.tsv").read_text().replace("a fine movie", "a fine film")
        (task / "train.tsv").write_text(rows)
    elif damage == "model":
        weights = load_file(str(model / "model.safetensors"))
        weights[next(iter(weights))] *= 1.01
        save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    elif damage == "world":
        r["config"]["world_size"] = 2
        (out / "results.json").write_text(json.dumps(r))
    else:
        argv = argv[:argv.index("--lora")]
    capsys.readouterr()
    assert train.main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_resume_accepts_the_same_task_and_folder_spelled_differently(assets, tmp_path, monkeypatch, capsys):
    flags = ["--method", "zo", "--steps", "4", "--eval_every", "2"]
    interrupt_at_call(monkeypatch, 6)
    assert run_train(assets, tmp_path / "o", *flags) == 128 + signal.SIGTERM
    monkeypatch.undo()
    argv = ["--model", assets["causal"], "--task", "SST-2", "--data_dir", assets["data"] + "/", "--out_dir",
            str(tmp_path / "o"), "--batch_size", "4", "--interval", "2", "--proj_iters", "2", "--lr", "1e-3", *flags]
    assert train.main(argv + ["--resume"]) == 0, capsys.readouterr().err


def test_a_resume_after_fo_trains_each_method_in_its_own_dtype(assets, tmp_path, monkeypatch):
    """fo keeps fp32 weights, zo and dizo with --half_weights bf16: a run interrupted in zo, resumed, saves the
    models an uninterrupted run saves, and --save added at the resume saves the finished methods too."""
    flags = ["--method", "all", "--steps", "3", "--eval_every", "2", "--dtype", "bf16", "--half_weights"]
    assert run_train(assets, tmp_path / "full", *flags, "--save") == 0
    interrupt_at_call(monkeypatch, 3 + 3)  # fo: 3 losses; then zo's 2nd step
    assert run_train(assets, tmp_path / "cut", *flags) == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert run_train(assets, tmp_path / "cut", *flags, "--save", "--resume") == 0
    for method, dtype in (("fo", torch.float32), ("zo", torch.bfloat16), ("dizo", torch.bfloat16)):
        a, b = (load_file(str(tmp_path / run / "model" / method / "model.safetensors")) for run in ("full", "cut"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == dtype for k in a), method


@pytest.mark.parametrize("fault", ["symlinked_checkpoints", "interrupted_while_moving", "interrupted_deleting"])
def test_overwrite_never_leaves_the_folder_unusable(assets, tmp_path, monkeypatch, capsys, fault):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    assert run_train(assets, out, "--method", "zo", "--steps", "2", "--save") == 0
    if fault == "symlinked_checkpoints":  # the user keeps checkpoints on another disk
        shutil.move(out / "checkpoints", elsewhere)
        (out / "checkpoints").symlink_to(elsewhere)
        (elsewhere / "theirs.txt").write_text("a file of the user's")
    else:
        calls = {"n": 0}
        real_replace, real_remove = os.replace, runs.remove

        def replace(a, b):  # Ctrl-C in the middle of moving the old outputs aside
            calls["n"] += 1
            if calls["n"] == 2 and fault == "interrupted_while_moving":
                raise KeyboardInterrupt
            return real_replace(a, b)

        def remove(path):  # Ctrl-C while deleting them
            if path.name == runs.ASIDE and fault == "interrupted_deleting":
                raise KeyboardInterrupt
            return real_remove(path)

        monkeypatch.setattr(runs.os, "replace", replace)
        monkeypatch.setattr(runs, "remove", remove)
        assert run_train(assets, out, "--method", "fo", "--steps", "1", "--overwrite") == 128 + signal.SIGINT
        monkeypatch.undo()
        if fault == "interrupted_while_moving":  # the old run, partly moved aside: not resumable, replaceable
            assert run_train(assets, out, "--method", "zo", "--steps", "2", "--save", "--resume") == 2
            assert "--overwrite of" in capsys.readouterr().err
    assert run_train(assets, out, "--method", "fo", "--steps", "1", "--overwrite") == 0
    assert set(json.loads((out / "results.json").read_text())["methods"]) == {"fo"}
    assert not (out / runs.ASIDE).exists() and not (out / "model").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["fo"] and not (out / "checkpoints").is_symlink()
    if fault == "symlinked_checkpoints":  # the link went, not what it points to
        assert (elsewhere / "theirs.txt").read_text() == "a file of the user's"


@pytest.mark.parametrize("failing", ["weights", "trainer_state"])
def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_one(assets, tmp_path, monkeypatch, capsys,
                                                                         failing):
    from safetensors import SafetensorError
    out, calls = tmp_path / "out", {"n": 0}
    real_save_pretrained, real_save = transformers.PreTrainedModel.save_pretrained, torch.save

    def full_disk(write):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint: a partial file, then the error the library raises
                folder = Path(args[1]) if failing == "weights" else Path(args[1]).parent
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "partial").write_bytes(b"\0" * 100)
                raise (SafetensorError("Error while serializing: IoError(No space left on device)")
                       if failing == "weights" else RuntimeError("PytorchStreamWriter failed writing file"))
            return write(*args, **kwargs)
        return wrapper

    if failing == "weights":
        monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_disk(real_save_pretrained))
    else:
        monkeypatch.setattr(torch, "save", full_disk(real_save))
    assert run_train(assets, out, "--method", "zo", "--steps", "4", "--eval_every", "2") == 1
    [err] = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert err.startswith("error: ")  # on a line of its own, after the progress bar
    assert "is the disk full?" in err and "last complete checkpoint" in err, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["zo"]  # no zo.tmp left
    assert torch.load(out / "checkpoints" / "zo" / "trainer_state.pt", weights_only=True)["result"]["steps"] == 2
    monkeypatch.undo()
    assert run_train(assets, out, "--method", "zo", "--steps", "4", "--eval_every", "2", "--resume") == 0


@pytest.mark.parametrize("method", ["fo", "zo"])
def test_the_disk_check_counts_what_a_checkpoint_holds(assets, tmp_path, method):
    out = tmp_path / "out"
    assert run_train(assets, out, "--method", method, "--steps", "1") == 0
    written = sum(f.stat().st_size for f in (out / "checkpoints" / method).iterdir())
    cfg = train.Config(model=assets["causal"], method=method)
    model = data.load_model(assets["causal"], "causal", torch.float32, "cpu", False)
    if method == "fo":  # AdamW's two moments of every trained parameter: about three copies of the weights
        assert written > 2.5 * sum(p.numel() * 4 for p in model.parameters())
    # a checkpoint and its replacement exist together for a moment; each has tokenizer files (16 MB allowed)
    tensors = sum(f.stat().st_size for f in (out / "checkpoints" / method).iterdir() if f.suffix in (".safetensors", ".pt"))
    assert 2 * written <= runs.disk_needed(cfg, model) <= 2 * 1.1 * tensors + 2 * 2**24


def test_a_signal_after_the_last_step_keeps_the_saved_model(assets, tmp_path, monkeypatch):
    original = train.train_method

    def finish_then_signal(*args):
        r = original(*args)
        os.kill(os.getpid(), signal.SIGTERM)  # the method is done; the signal comes before --save
        return r

    monkeypatch.setattr(train, "train_method", finish_then_signal)
    out = tmp_path / "out"
    assert run_train(assets, out, "--method", "zo", "--steps", "3", "--save") == 128 + signal.SIGTERM
    assert json.loads((out / "results.json").read_text())["methods"]["zo"]["status"] == "done"
    assert (out / "model" / "model.safetensors").exists()


# Settings of what trains and how: LoRA, the released parameter set, the schedule, the released recipe.

@pytest.mark.parametrize("kind", ["causal", "llama"])
def test_lora_trains_only_the_adapters_with_every_method(assets, tmp_path, kind):
    out = tmp_path / "out"
    assert run_train(assets, out, "--lora", "4", "--method", "all", "--steps", "4", "--eval_every", "2",
                     "--lr", "1e-2", "--save", kind=kind) == 0
    results = json.loads((out / "results.json").read_text())["methods"]
    base = load_file(str(Path(assets[kind]) / "model.safetensors"))
    # PEFT's default targets here are q_proj and v_proj: per layer and target, A is r x in, B is out x r
    hidden, layers, kv = 32, 2, (16 if kind == "llama" else 32)  # Llama's v_proj has 2 of 4 heads
    expected = layers * 4 * ((hidden + hidden) + (hidden + kv))
    for method, r in results.items():
        assert r["status"] == "done" and r["trained_params"] == expected, method
        adapters = load_file(str(out / "model" / method / "adapter_model.safetensors"))
        assert adapters and all("lora_" in k for k in adapters)
        assert any(not torch.equal(t, torch.zeros_like(t)) for k, t in adapters.items() if "lora_B" in k)
    assert len(results["dizo"]["projected"]) == layers * 2 * 2  # A and B of Q and V in every layer
    assert all(".lora_" in n for n in results["dizo"]["projected"])
    for k, t in load_file(str(Path(assets[kind]) / "model.safetensors")).items():
        assert torch.equal(t, base[k])  # the base model's file is untouched


def test_lora_run_resumes_bit_for_bit(assets, tmp_path, monkeypatch):
    flags = ["--lora", "4", "--method", "dizo", "--steps", "9", "--eval_every", "4", "--save", "--lr", "1e-2"]
    assert run_train(assets, tmp_path / "full", *flags) == 0
    interrupt_at_call(monkeypatch, 11)
    assert run_train(assets, tmp_path / "cut", *flags) == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert run_train(assets, tmp_path / "cut", *flags, "--resume") == 0
    a, b = (load_file(str(p / "model" / "adapter_model.safetensors")) for p in (tmp_path / "full", tmp_path / "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_embed_freezes_the_token_embedding_and_its_tied_head(assets, tmp_path):
    out = tmp_path / "out"
    assert run_train(assets, out, "--trained", "no_embed", "--method", "zo", "--steps", "3", "--save") == 0
    base = load_file(str(Path(assets["causal"]) / "model.safetensors"))
    tuned = load_file(str(out / "model" / "model.safetensors"))
    embedding = "model.decoder.embed_tokens.weight"
    assert torch.equal(tuned[embedding], base[embedding])
    assert all(not torch.equal(tuned[k], base[k]) for k in tuned if k != embedding and tuned[k].dim() == 2)
    r = json.loads((out / "results.json").read_text())["methods"]["zo"]
    assert r["trained_params"] == sum(t.numel() for t in base.values()) - base[embedding].numel()


def test_linear_schedule_ends_at_half_the_learning_rate(assets, tmp_path):
    out = tmp_path / "out"
    assert run_train(assets, out, "--lr_schedule", "linear", "--method", "zo", "--steps", "4",
                     "--eval_every", "2") == 0
    state = torch.load(out / "checkpoints" / "zo" / "trainer_state.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * (1 - 0.5 * 4 / 4), rel=1e-12)


def test_released_recipe_sets_its_settings_and_explicit_flags_win(assets, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_train(assets, out, "--recipe", "released", "--method", "dizo", "--steps", "2", "--eval_every", "1",
                     "--num_train", "10", "--num_dev", "6", "--num_test", "6") == 0
    printed = capsys.readouterr().out
    assert "--recipe released sets" in printed and "--trained no_embed" in printed
    config = json.loads((out / "results.json").read_text())["config"]
    assert (config["trained"], config["lr_schedule"], config["interval"], config["proj_iters"]) == (
        "no_embed", "linear", 2, 2)  # run_train passes --interval 2 --proj_iters 2 explicitly: they win
    assert (config["steps"], config["num_train"], config["tau"], config["proj_lr"]) == (2, 10, 0.2, 2.0)


def test_dizo_records_every_projection_phase_and_draws_them(assets, tmp_path, figures):
    out = tmp_path / "out"
    assert run_train(assets, out, "--method", "dizo", "--steps", "6", "--eval_every", "3") == 0
    r = json.loads((out / "results.json").read_text())["methods"]["dizo"]
    assert [p["step"] for p in r["projection"]] == [2, 4, 6]  # κ = 2
    assert all(len(p["ratios"]) == len(p["distances"]) == len(r["projected"]) == 4 for p in r["projection"])
    assert all(0.8 - 1e-9 <= x <= 1.2 + 1e-9 for p in r["projection"] for x in p["ratios"])
    assert (out / "projection.png").stat().st_size > 1000
    # studies.py --replot draws the same figures again from results.json alone
    (out / "projection.png").unlink()
    (out / "curves.png").unlink()
    studies.main(["--replot", str(out)])
    assert (out / "projection.png").stat().st_size > 1000 and (out / "curves.png").stat().st_size > 1000
    (out / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match="no readable train.py results.json"):
        studies.main(["--replot", str(out)])


@pytest.mark.parametrize("case, message", [
    ("ablate_onto_results", "would replace a file of the train.py run"),
    ("ablate_figure_onto_curves", "would replace a file of the train.py run"),
    ("ablate_into_checkpoints", "would replace a file of the train.py run"),
    ("out_under_a_file", "cannot write"),
    ("paired_into_a_file", "cannot write"),
    ("replot_without_history", "results.json with a history to draw"),
    ("replot_read_only", "cannot read or write in"),
])
def test_bench_never_overwrites_a_run_and_fails_before_its_work(assets, tmp_path, monkeypatch, case, message,
                                                                  figures):
    out = tmp_path / "run"
    assert run_train(assets, out, "--method", "zo", "--steps", "1") == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    target = {"ablate_onto_results": out / "results.json", "ablate_figure_onto_curves": out / "curves.json",
              "ablate_into_checkpoints": out / "checkpoints" / "a.json", "out_under_a_file": tmp_path / "a_file" / "x.json"}
    (tmp_path / "a_file").write_text("")
    if case.startswith("replot"):
        if case == "replot_without_history":
            (out / "results.json").write_text(json.dumps({"format": runs.FORMAT, "methods": {"zo": {"status": "done"}}}))
            before.pop(out / "results.json")
        else:  # as a read-only folder does to root too
            monkeypatch.setattr(runs.os, "replace", lambda a, b: (_ for _ in ()).throw(PermissionError(13, "denied")))
        argv = ["--replot", str(out)]
    elif case == "paired_into_a_file":  # the study's folder is a file: refused before any run starts
        argv = ["--paired", str(tmp_path / "a_file")]
    else:
        argv = ["--ablate", "anything: the outputs are checked first", "--out", str(target[case])]
    with pytest.raises(SystemExit) as e:
        studies.main(argv)
    assert str(e.value.code).startswith("error: ") and message in str(e.value.code), e.value.code
    assert all(p.read_bytes() == b for p, b in before.items())


# Beyond one process: micro-batches, data parallelism, a model placed by accelerate.

@pytest.mark.parametrize("backward", [False, True])
def test_micro_batches_give_the_loss_and_gradient_of_the_whole_batch(assets, backward):
    tok = AutoTokenizer.from_pretrained(assets["causal"])
    model = OPTForCausalLM.from_pretrained(assets["causal"]).eval()
    loss_fn = data.PromptLoss(data.get_task("sst-2"), tok, "causal", torch.device("cpu"))
    enc = loss_fn.encode(data.read_tsv(str(Path(assets["data"]) / "train.tsv"), data.get_task("sst-2")))
    idx = [0, 3, 5, 7, 11, 13, 17]  # 7 examples in 3 micro-batches of 3, 2, 2
    results = []
    for micro in (1, 3):
        model.zero_grad()
        loss = train.TrainLoss(loss_fn, enc, model, micro, backward=backward)(idx)
        grads = [p.grad.clone() for p in model.parameters()] if backward else []
        results.append((float(loss), grads))
    (whole, g1), (parts, g3) = results
    assert parts == pytest.approx(whole, rel=1e-6)
    for a, b in zip(g1, g3):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def data_parallel(argv, world=2, stderr=os.devnull):
    """train.main(argv) in `world` forked processes, each with the environment torchrun gives its workers for
    the env:// rendezvous (gloo on a CPU); their pids, by rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    return [forked_train(argv, env | {"RANK": str(r), "LOCAL_RANK": str(r)}, stderr if r == 0 else os.devnull)
            for r in range(world)]


def test_data_parallel_run_ends_where_one_process_ends(assets, tmp_path):
    """2 processes (gloo, CPU) on the same global batch as 1 process: ZO and DiZO reach the same weights to
    float round-off (each rank evaluates half the batch; the means are averaged)."""
    flags = ["--model", assets["causal"], "--task", "sst-2", "--data_dir", assets["data"], "--batch_size", "4",
             "--interval", "2", "--proj_iters", "2", "--lr", "1e-3", "--steps", "5", "--eval_every", "5",
             "--method", "all", "--save"]
    err = tmp_path / "rank0.err"
    pids = data_parallel(flags + ["--out_dir", str(tmp_path / "two")], stderr=str(err))
    assert exit_codes(pids, 300) == [0, 0], err.read_text()[-2000:]
    assert train.main(flags + ["--out_dir", str(tmp_path / "one")]) == 0
    results = json.loads((tmp_path / "two" / "results.json").read_text())["methods"]
    assert {m: r["world_size"] for m, r in results.items()} == {"fo": 2, "zo": 2, "dizo": 2}
    base = load_file(str(Path(assets["causal"]) / "model.safetensors"))
    for method in ("zo", "dizo"):
        one, two = (load_file(str(tmp_path / run / "model" / method / "model.safetensors")) for run in ("one", "two"))
        moved = max(float((one[k] - base[k]).abs().max()) for k in base)
        differ = max(float((one[k] - two[k]).abs().max()) for k in one)
        assert moved > 1e-3 and differ < 1e-5, (method, moved, differ)


def test_a_first_data_parallel_run_builds_the_embedded_model_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DIZO_CACHE", str(tmp_path / "cache"))  # empty: the first run pretrains
    monkeypatch.setitem(data.TINY, "pretrain_steps", 3)
    err = tmp_path / "rank0.err"
    pids = data_parallel(["--method", "zo", "--steps", "2", "--eval_every", "2", "--out_dir", str(tmp_path / "o")],
                         stderr=str(err))
    assert exit_codes(pids, 300) == [0, 0], err.read_text()[-2000:]
    [folder] = (tmp_path / "cache").iterdir()
    assert (folder / "config.json").exists() and not list((tmp_path / "cache").glob("*.tmp"))
    assert json.loads((tmp_path / "o" / "results.json").read_text())["methods"]["zo"]["status"] == "done"


def test_a_model_placed_by_accelerate_trains_like_one_on_a_device(assets, tmp_path):
    for name, extra in (("plain", []), ("placed", ["--device_map", "auto"])):
        assert run_train(assets, tmp_path / name, "--method", "dizo", "--steps", "4", "--save", *extra) == 0
    a, b = (load_file(str(tmp_path / name / "model" / "model.safetensors")) for name in ("plain", "placed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_at_learning_rate_zero_leaves_the_weights_as_they_were(assets, tmp_path):
    """At lr 0 a ZO step must leave θ where it was: θ + εz - 2εz + εz only rounds. fp32 weights, alone or with
    every forward under bf16 autocast (--dtype bf16): round-off. bf16 weights stepped in place (--half_weights,
    as MeZO's and the released code's fp16): each ±εz pass rounds, and θ drifts by far more. FO keeps fp32."""
    base = load_file(str(Path(assets["causal"]) / "model.safetensors"))
    drift = {}
    for name, flags, zo_dtypes in (("fp32", [], ("fp32", "fp32")), ("autocast", ["--dtype", "bf16"], ("fp32", "bf16")),
                                   ("half", ["--dtype", "bf16", "--half_weights"], ("bf16", "bf16"))):
        out = tmp_path / name
        assert run_train(assets, out, "--method", "all", *flags, "--lr", "0", "--steps", "4", "--save") == 0
        results = json.loads((out / "results.json").read_text())["methods"]
        assert {m: (r["storage_dtype"], r["compute_dtype"]) for m, r in results.items()} == {
            "fo": ("fp32", zo_dtypes[1]), "zo": zo_dtypes, "dizo": zo_dtypes}
        saved = load_file(str(out / "model" / "zo" / "model.safetensors"))
        ref = {k: base[k].to(t.dtype).double() for k, t in saved.items()}
        delta = sum(float((saved[k].double() - ref[k]).norm()) ** 2 for k in saved) ** 0.5
        drift[name] = delta / sum(float(r.norm()) ** 2 for r in ref.values()) ** 0.5
        if name != "half":
            assert max(float((saved[k].double() - ref[k]).abs().max()) for k in saved) < 1e-6
    assert 0 < drift["fp32"] < 1e-6 and drift["autocast"] < 1e-6 and drift["half"] > 100 * drift["fp32"], drift


def test_a_process_that_dies_stops_the_whole_data_parallel_run(assets, tmp_path):
    """SIGKILL one of two processes after the first checkpoint: the run ends (no process left waiting), the
    survivor says so in one line, and results.json and the checkpoint are those of the last evaluation."""
    out, err = tmp_path / "out", tmp_path / "rank0.err"
    flags = ["--model", assets["causal"], "--task", "sst-2", "--data_dir", assets["data"], "--batch_size", "4",
             "--method", "zo", "--steps", "1000000", "--eval_every", "5", "--out_dir", str(out)]
    rank0, rank1 = data_parallel(flags, stderr=str(err))
    wait_for(out / "checkpoints" / "zo" / "trainer_state.pt", [rank0, rank1])
    os.kill(rank1, signal.SIGKILL)
    assert exit_codes([rank1, rank0]) == [-signal.SIGKILL, 1]
    assert "error: rank 0 lost the other processes" in err.read_text() and "--resume" in err.read_text()
    r = json.loads((out / "results.json").read_text())["methods"]["zo"]
    state = torch.load(out / "checkpoints" / "zo" / "trainer_state.pt", weights_only=True)
    assert r["status"] == "running" and r["steps"] == state["result"]["steps"] and r["steps"] % 5 == 0


# ---------------------------------------------------------------------------------------------------------
# bench.py --precision: its replay of z must be the optimizer's, or every fidelity it reports is noise

def test_precision_study_replays_the_optimizers_z():
    """The fidelity study's layer (512 x 512 matrices): with fp32 weights, alone or under bf16 autocast, the update
    it measures is the intended -ηgz (ratio 1, cosine 1); bf16 weights stepped in place are not."""
    found = {}
    for prec in bench.half_precisions(("bf16",)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bf16 weights stepped in place warn by design
            found[prec.name] = bench.step_fidelity(prec, 0.05, 1e-6, 1e-3, torch.device("cpu"))["update"]
    for name in ("fp32", "bf16 autocast"):
        assert found[name]["ratio"] == pytest.approx(1, abs=1e-3) and found[name]["cosine"] > 0.999, name
    assert found["bf16 plain"]["cosine"] < 0.5


# ---------------------------------------------------------------------------------------------------------
# studies.py --ablate: where a fine-tuning lives

@pytest.mark.parametrize("family", ["opt", "roberta", "llama", "gpt2"])
def test_parameter_groups_cover_every_parameter_exactly_once(family):
    model = tiny_model(family)
    groups = studies.parameter_groups(model)
    with torch.no_grad():  # mark every element through the groups' tensors (views of fused weights included)
        for p in model.parameters():
            p.zero_()
        for pairs in groups.values():
            for _, t in pairs:
                t.add_(1)
    assert all(bool((p == 1).all()) for p in model.parameters())
    for role in ("q", "k", "v", "o"):
        assert [n for n, _ in groups[role]] == [n for n, _ in projected_params(model, roles=(role,))]
    norms = {f"{m}.{n}" if m else n for m, module in model.named_modules() if type(module).__name__.endswith("Norm")
             for n, _ in module.named_parameters(recurse=False)}
    assert {n for n, _ in groups["norms"]} == norms
    embedding = model.get_input_embeddings().weight
    assert any(t is embedding for _, t in groups["embeddings/head"])


def test_parameter_groups_of_opt_by_name():
    """Against OPT's own parameter names: the rest of a layer is its MLP, fc1 and fc2."""
    groups = studies.parameter_groups(tiny_model("opt"))
    names = {g: {n for n, _ in pairs} for g, pairs in groups.items()}
    layer = "model.decoder.layers.1."
    assert {n for n in names["mlp"] if n.startswith(layer)} == {layer + f"fc{i}.{w}" for i in (1, 2)
                                                                  for w in ("weight", "bias")}
    assert {n for n in names["attention biases"] if n.startswith(layer)} == {
        layer + f"self_attn.{m}.bias" for m in ("q_proj", "k_proj", "v_proj", "out_proj")}
    assert names["embeddings/head"] == {"model.decoder.embed_tokens.weight"}  # the head is tied to it
    assert names["other"] == {"model.decoder.embed_positions.weight"}


@pytest.fixture
def ablation_pair(assets):
    """The tiny causal OPT (pretrained), a copy fine-tuned by a few AdamW steps on the dev split (so that its
    dev loss is lower), and the dev split's measure."""
    task = data.get_task("sst-2")
    tok = data.load_tokenizer(assets["causal"], False)
    loss_fn = data.PromptLoss(task, tok, "causal", torch.device("cpu"))
    dev = loss_fn.encode(data.load_splits(assets["data"], task)["dev"])
    pre = data.load_model(assets["causal"], "causal", torch.float32, "cpu", False)
    ft = copy.deepcopy(pre)
    opt = torch.optim.AdamW(ft.parameters(), lr=1e-2)
    for _ in range(10):
        opt.zero_grad()
        loss_fn.loss(ft, dev, list(range(len(dev.labels)))).backward()
        opt.step()
    return pre, ft.eval(), lambda model: studies.split_metrics(model, loss_fn, dev), loss_fn, dev


def with_matrices_from(model, source, roles):
    """A copy of `model` with the weights of OPT's <role>_proj modules copied from `source` by name."""
    names = tuple(f"self_attn.{role}_proj.weight" for role in roles)
    copied = copy.deepcopy(model)
    state = source.state_dict()
    copied.load_state_dict({n: state[n] if n.endswith(names) else t for n, t in copied.state_dict().items()})
    return copied


def test_split_metrics_are_the_prompt_loss_and_the_accuracy(ablation_pair):
    _, ft, measure, loss_fn, dev = ablation_pair
    m = measure(ft)
    with torch.no_grad():
        reference = float(loss_fn.loss(ft, dev, list(range(len(dev.labels)))))  # one batch: the mean over all
    assert m["loss"] == pytest.approx(reference, rel=1e-6)
    with torch.no_grad():
        scores = loss_fn.scores(ft, dev.prompts)
    assert m["acc"] == float((scores.argmax(1) == torch.tensor(dev.labels)).double().mean())


def test_reverting_every_group_gives_the_pretrained_model_and_leaves_the_model_as_it_was(ablation_pair):
    pre, ft, measure, _, _ = ablation_pair
    before = {n: t.clone() for n, t in ft.state_dict().items()}
    pairs = studies.matched_groups(ft, pre)
    assert set(pairs) >= {"embeddings/head", "q", "k", "v", "o", "norms", "mlp"}
    tensors = [t for ts, _ in pairs.values() for t in ts]
    values = [v for _, vs in pairs.values() for v in vs]
    assert studies.measured_with(tensors, values, lambda: measure(ft)) == measure(pre)
    result = studies.ablation(ft, pre, measure)
    assert all(torch.equal(t, before[n]) for n, t in ft.state_dict().items())
    assert result["pretrained"] == measure(pre) and result["finetuned"] == measure(ft)
    assert result["finetuned"]["loss"] != result["pretrained"]["loss"]


def with_matrices_interpolated(ft, pre, r):
    """A copy of ft with every k_proj and v_proj weight at pre + r (ft - pre), by name."""
    base = pre.state_dict()
    moved = {n: base[n] + r * (t - base[n]) if n.endswith(("k_proj.weight", "v_proj.weight")) else t
             for n, t in ft.state_dict().items()}
    copied = copy.deepcopy(ft)
    copied.load_state_dict(moved)
    return copied


def test_interpolation_ends_are_the_finetuned_and_the_reverted_model(ablation_pair):
    pre, ft, measure, _, _ = ablation_pair
    result = studies.ablation(ft, pre, measure)
    at = {r: i for i, r in enumerate(result["ratios"])}
    for line, roles in (("K+V", ("k", "v")), ("K", ("k",)), ("V", ("v",))):
        assert result["lines"][line][at[1.0]] == result["finetuned"]  # exact: lerp's weight 1 gives θ
        assert result["lines"][line][at[0.0]] == measure(with_matrices_from(ft, pre, roles))
    for r in (0.5, 1.5):  # lerp rounds otherwise than θ0 + r (θ - θ0)
        expected = measure(with_matrices_interpolated(ft, pre, r))["loss"]
        assert result["lines"]["K+V"][at[r]]["loss"] == pytest.approx(expected, rel=1e-5)
    k_reverted = measure(with_matrices_from(ft, pre, ("k",)))
    assert {key: result["groups"]["k"][key] for key in k_reverted} == k_reverted
    ft_loss, pre_loss = result["finetuned"]["loss"], result["pretrained"]["loss"]
    assert pre_loss > ft_loss
    kv_loss = measure(with_matrices_from(ft, pre, ("k", "v")))["loss"]
    assert result["kv_share_lost"] == pytest.approx((kv_loss - ft_loss) / (pre_loss - ft_loss))
    assert result["groups"]["k"]["share_lost"] == pytest.approx((k_reverted["loss"] - ft_loss) / (pre_loss - ft_loss))


def test_ablate_command_reports_a_saved_run(assets, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert run_train(assets, out, "--method", "zo", "--steps", "4", "--eval_every", "4", "--save") == 0
    report = tmp_path / "ablation.json"
    argv = ["studies.py", "--ablate", str(out / "model"), "--base", assets["causal"], "--task", "sst-2",
            "--data_dir", assets["data"], "--out", str(report)]
    monkeypatch.setattr(sys, "argv", argv)
    studies.main()
    result = json.loads(report.read_text())
    assert report.with_suffix(".png").exists()
    assert set(result["groups"]) == {"embeddings/head", "q", "k", "v", "o", "norms", "attention biases", "mlp",
                                     "other"}
    assert sum(g["params"] for g in result["groups"].values()) == sum(
        p.numel() for p in data.load_model(assets["causal"], "causal", torch.float32, "cpu", False).parameters())
    printed = capsys.readouterr().out
    assert "| k reverted |" in printed and "K and V are reverted" in printed
    monkeypatch.setattr(sys, "argv", argv[:4] + [assets["masked"]] + argv[5:])  # not the model it started from
    with pytest.raises(SystemExit, match="different parameters|tokenizer differs"):
        studies.main()
