"""Zeroth-order fine-tuning: ZO-SGD with seed replay (MeZO) and DiZO's layer-wise divergence projection.

This module depends on torch alone. Read it beside the papers:
  MeZO  -- Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", arXiv 2305.17333.
  DiZO  -- Tan et al., "Harmony in Divergence: Towards Fast, Accurate, and Memory-efficient Zeroth-order
           LLM Fine-tuning", arXiv 2502.03304 (NeurIPS 2025).

Where each equation is computed (PAPER.md sections in brackets)
  z ~ N(0, I), regenerated from a per-step seed       ZOSGD._z, ZOSGD._perturb_   [§1, MeZO's seed replay]
  g = (L(θ + εz) - L(θ - εz)) / (2ε)                   ZOSGD.step                  [§1, DiZO eq. 1, q = 1]
  θ <- θ - η (g z + λ θ), restore and update fused     ZOSGD.step                  [§1, DiZO eq. 2]
  Δ_l = θ_l - θ0_l,  s_l = ||Δ_l||_F                   DiZO.distances              [§3, θ0 = pretrained]
  θ_l <- θ0_l + (γ_l / s_l) Δ_l = θ0_l + r_l Δ_l       DiZO._set_ratios_           [§3, projection]
  γ search: clipped SPSA on per-matrix scalars         DiZO.project                [§3, as the released code]
  which matrices are projected                         projected_params            [§4.1: K and V]

Usage (any model, any loss):

    opt = DiZO(model.parameters(), projected_params(model), lr=1e-6)
    for batch in batches:
        def closure():                      # loss of ONE fixed mini-batch, no autograd
            return loss_fn(model, batch)
        opt.step(closure, fresh_closure=lambda: make_closure(next(other_batches)))

ZOSGD is the same without `projected` and `fresh_closure`. The model must be in eval mode (dropout off):
the two forward passes of a step must see the same function, or g measures the dropout noise.
"""

import math

import torch

__all__ = ["ZOSGD", "DiZO", "projected_params", "projection_report"]


def _check(name, value, ok, why):
    if not ok:
        raise ValueError(f"{name} must be {why}, got {value!r}")


class ZOSGD(torch.optim.Optimizer):
    """ZO-SGD with MeZO's seed replay: two forward passes per step, no gradient, no optimizer state.

    step(closure) evaluates the closure exactly twice, at θ + εz and θ - εz, and returns the first loss
    (as MeZO does). z is never stored: one seed is drawn per step from the optimizer's own generator, and
    every pass over the parameters regenerates z tensor by tensor, in the fixed order of the parameter
    groups, from that seed. One scratch buffer per (device, dtype), the size of the largest tensor, holds
    the current tensor's z; the global torch RNG is never touched.

    MeZO regenerates z four times per step (+ε, -2ε, +ε to restore, then -ηg to update). Here the restore
    and the update are fused into one pass, θ <- θ + (ε - ηg) z, so z is generated three times.

    weight_decay (MeZO's, default 0 as in DiZO's code) applies to matrices only, i.e. tensors with two or
    more dimensions: biases and LayerNorm weights are vectors. The decision is by shape, not by name.
    """

    def __init__(self, params, lr, eps=1e-3, weight_decay=0.0, seed=0):
        _check("lr", lr, lr >= 0, ">= 0")
        _check("eps", eps, eps > 0, "> 0")
        _check("weight_decay", weight_decay, weight_decay >= 0, ">= 0")
        _check("seed", seed, isinstance(seed, int) and seed >= 0, "an int >= 0")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.eps = eps  # one ε for all groups: g is one scalar for the whole model
        self.steps_done = 0
        self.projected_grad = None  # g of the last step, for logging
        self._seeds = torch.Generator().manual_seed(seed)  # draws one seed per step
        self._z_gens = {}  # device -> torch.Generator, re-seeded at every pass
        self._buffers = {}  # (device, dtype) -> flat scratch tensor for z

    def _params(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    yield group, p

    def _z(self, p):
        """The next z for tensor p, from p's device generator, in a reused scratch buffer."""
        key = (p.device, p.dtype)
        buf = self._buffers.get(key)
        if buf is None:
            largest = max(q.numel() for _, q in self._params() if (q.device, q.dtype) == key)
            buf = self._buffers[key] = torch.empty(largest, device=p.device, dtype=p.dtype)
        return buf[: p.numel()].view_as(p).normal_(generator=self._z_gens[p.device])

    @torch.no_grad()
    def _perturb_(self, seed, alpha, decay=None):
        """θ <- θ + alpha(group) · z for every parameter, with z regenerated from `seed`.

        decay(group), if given, is the factor (1 - ηλ) applied to matrices between restoring θ + εz and
        subtracting ηgz, so that the decay acts on the restored θ as in the unfused update.
        """
        devices = dict.fromkeys(p.device for _, p in self._params())  # in order of first appearance
        for i, d in enumerate(devices):
            gen = self._z_gens.get(d)
            if gen is None:
                gen = self._z_gens[d] = torch.Generator(device=d)
            gen.manual_seed(seed + i)  # a model split over devices: independent z on each
        for group, p in self._params():
            z = self._z(p)
            factor = decay(group) if decay is not None and p.dim() >= 2 else 1.0
            if factor != 1.0:
                p.add_(z, alpha=self.eps).mul_(factor).add_(z, alpha=alpha(group) - self.eps)
            else:
                p.add_(z, alpha=alpha(group))

    def _next_seed(self):
        return int(torch.randint(0, 2**62, (1,), generator=self._seeds))

    @torch.no_grad()
    def step(self, closure):
        """One ZO-SGD step (DiZO eq. 1 and 2); returns L(θ + εz), the closure's value."""
        seed = self._next_seed()
        eps = self.eps
        self._perturb_(seed, lambda group: eps)
        loss_plus = closure()
        self._perturb_(seed, lambda group: -2 * eps)
        loss_minus = closure()
        # g = (ℓ+ - ℓ-) / 2ε: the directional derivative of L along z, estimated from two losses.
        grad = (float(loss_plus) - float(loss_minus)) / (2 * eps)
        if not math.isfinite(grad):
            self._perturb_(seed, lambda group: eps)  # put θ back before anyone sees it
            raise FloatingPointError(
                f"non-finite loss at ZO step {self.steps_done + 1}: "
                f"L(θ+εz)={float(loss_plus)}, L(θ-εz)={float(loss_minus)}; parameters left unchanged"
            )
        # Fused restore + update: θ - εz + (ε - ηg) z = θ - ηgz, with decay on the restored θ.
        self._perturb_(
            seed,
            lambda group: eps - group["lr"] * grad,
            decay=lambda group: 1.0 - group["lr"] * group["weight_decay"],
        )
        self.steps_done += 1
        self.projected_grad = grad
        return loss_plus

    def state_dict(self):
        """Everything needed to continue bit-for-bit: the step count and the seed generator's state."""
        state = super().state_dict()
        state["zo"] = {"steps_done": self.steps_done, "seeds": self._seeds.get_state(), "eps": self.eps}
        return state

    def load_state_dict(self, state_dict):
        """Restore a state from state_dict(), including the seed generator: the next z is the one the
        saved run would have drawn."""
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo")
        super().load_state_dict(state_dict)
        self.steps_done = zo["steps_done"]
        self._seeds.set_state(zo["seeds"])
        self.eps = zo["eps"]


class DiZO(ZOSGD):
    """ZO-SGD plus DiZO's divergence-driven projection of selected weight matrices (DiZO §3).

    Every `interval` (κ) ZO steps, a projection phase rescales each projected matrix's distance from its
    pretrained value θ0 (the anchor, copied at construction; nothing else is copied):

        θ_l <- θ0_l + r_l Δ_l,   Δ_l = θ_l - θ0_l,   r_l = γ_l / ||Δ_l||   (a target distance γ_l per matrix)

    The ratios are searched by SPSA on the scalars, with `proj_iters` (M) iterations, each on a fresh
    mini-batch, starting from the identity r = 1 (γ = ||Δ||, DiZO's re-initialisation). Per iteration:
        u_l ~ N(0, 1), clipped to ±(τ/ε_γ)·s_l    (so that a trial never moves γ_l by more than τ·s_l)
        ℓ± = L(θ0 + (r ± ε_γ u / s) Δ)              (two forward passes on the iteration's batch)
        ĝ = (ℓ+ - ℓ-) / (2 ε_γ)
        r_l <- clip(r_l - η_γ ĝ u_l, 1 - τ, 1 + τ)   (γ <- γ - η_γ s ĝ u in the released code, divided by s)
    and the final r is applied. Trial projections are undone exactly by copying back the weights saved at
    the start of the phase (the released code divides, which drifts in fp16). That copy lives in the idle z
    scratch buffer as far as it fits (the buffer is the size of the largest tensor, e.g. the embedding), and
    in new memory beyond that; so DiZO's extra memory is the anchor plus whatever part of the copy overflows.

    Arguments beyond ZOSGD's (defaults are the released code's, PAPER.md §3):
        projected   tensors to project, or (name, tensor) pairs as returned by projected_params().
        interval    κ, ZO steps between projection phases (released: 50; searched 50/100/200/400).
        proj_iters  M, SPSA iterations per phase (released: 10, hard-coded there).
        proj_eps    ε_γ, perturbation scale of γ (released: 0.1; searched 0.1/0.05).
        proj_lr     η_γ, step size of the ratio search (released: 2.0; searched 2.0/1.0).
        tau         τ, the ratio is clipped to [1 - τ, 1 + τ] (released: 0.2; searched 0.1/0.2/0.3).
    """

    def __init__(self, params, projected, lr, eps=1e-3, weight_decay=0.0, seed=0,
                 interval=50, proj_iters=10, proj_eps=0.1, proj_lr=2.0, tau=0.2):
        super().__init__(params, lr=lr, eps=eps, weight_decay=weight_decay, seed=seed)
        _check("interval", interval, isinstance(interval, int) and interval >= 1, "an int >= 1")
        _check("proj_iters", proj_iters, isinstance(proj_iters, int) and proj_iters >= 1, "an int >= 1")
        _check("proj_eps", proj_eps, proj_eps > 0, "> 0")
        _check("proj_lr", proj_lr, proj_lr >= 0, ">= 0")
        _check("tau", tau, 0 < tau < 1, "in (0, 1)")
        pairs = [t if isinstance(t, tuple) else (f"projected[{i}]", t) for i, t in enumerate(projected)]
        if not pairs:
            raise ValueError("projected is empty: DiZO would silently be ZO-SGD")
        self.names = [n for n, _ in pairs]
        self.matrices = [t for _, t in pairs]
        self.anchors = [t.detach().clone() for t in self.matrices]
        self.interval, self.proj_iters, self.proj_eps, self.proj_lr, self.tau = (
            interval, proj_iters, proj_eps, proj_lr, tau)
        self.ratios = torch.ones(len(pairs), dtype=torch.float64)  # last phase's r, for logging
        self.gammas = torch.zeros(len(pairs), dtype=torch.float64)  # last phase's γ = r·s
        self._u_gen = torch.Generator().manual_seed(seed + 1)  # own stream: ZO seeds match ZOSGD's

    @property
    def projection_due(self):
        """True right after every κ-th ZO step."""
        return self.steps_done > 0 and self.steps_done % self.interval == 0

    def step(self, closure, fresh_closure=None):
        """One ZO step; after every κ-th, a projection phase (2 + 2M closure calls on such steps).

        fresh_closure: called once per inner iteration, returns a loss closure on a FRESH mini-batch, as
        the released code draws one; if None, `closure` itself is reused for every iteration.
        """
        loss = super().step(closure)
        if self.projection_due:
            self.project(fresh_closure if fresh_closure is not None else lambda: closure)
        return loss

    def distances(self):
        """s_l = ||θ_l - θ0_l||_F for every projected matrix (float64, on the CPU)."""
        with torch.no_grad():
            # half precision is summed in fp32: a norm over millions of squares overflows fp16
            norms = [torch.linalg.vector_norm(m - a, dtype=torch.promote_types(m.dtype, torch.float32))
                     for m, a in zip(self.matrices, self.anchors)]
        return torch.tensor([float(n) for n in norms], dtype=torch.float64)

    @torch.no_grad()
    def _set_ratios_(self, ratios, start):
        """θ_l <- θ0_l + r_l (θ_start,l - θ0_l), written in place; r_l = 1 gives θ_start,l exactly."""
        for m, a, s, r in zip(self.matrices, self.anchors, start, ratios.tolist()):
            m.copy_(a).lerp_(s, r)  # lerp(a, s, r) = a + r (s - a); works on views (GPT-2, NeoX)

    def _saved_copies(self, tensors):
        """Copies of `tensors`, placed in the z scratch buffers while they are idle (no new memory) as far as
        they fit, in new tensors beyond that. The next ZO step overwrites the buffers with fresh z."""
        used, copies = {}, []
        for t in tensors:
            key = (t.device, t.dtype)
            buf, start = self._buffers.get(key), used.get(key, 0)
            if buf is not None and start + t.numel() <= buf.numel():
                copies.append(buf[start:start + t.numel()].view(t.shape).copy_(t))
                used[key] = start + t.numel()
            else:
                copies.append(t.detach().clone())
        return copies

    @torch.no_grad()
    def project(self, make_closure):
        """One projection phase: SPSA search of the ratios r_l (DiZO §3), then θ_l <- θ0_l + r_l Δ_l."""
        start = self._saved_copies(self.matrices)  # for the exact undo of trial projections
        dist = self.distances()
        tau, eps_g = self.tau, self.proj_eps
        ratios = torch.ones_like(dist)  # re-initialisation: γ = ||Δ||, the identity
        moving = dist > 0  # a matrix that has not moved has no direction to rescale
        for it in range(self.proj_iters):
            closure = make_closure()
            # u_l ~ N(0, 1), clipped to ±(τ/ε_γ) s_l; the trial γ_l ± ε_γ u_l is the ratio r_l ± ε_γ u_l / s_l
            bound = (tau / eps_g) * dist
            u = torch.randn(len(dist), generator=self._u_gen, dtype=torch.float64).clamp(-bound, bound)
            trial = torch.where(moving, eps_g * u / dist.where(moving, 1.0), 0.0)
            self._set_ratios_(ratios + trial, start)
            loss_plus = float(closure())
            self._set_ratios_(ratios - trial, start)
            loss_minus = float(closure())
            grad = (loss_plus - loss_minus) / (2 * eps_g)  # ĝ = (ℓ+ - ℓ-) / (2 ε_γ)
            if not math.isfinite(grad):
                self._set_ratios_(torch.ones_like(dist), start)
                raise FloatingPointError(
                    f"non-finite loss in the projection phase after ZO step {self.steps_done} "
                    f"(inner iteration {it + 1}); projected matrices restored")
            # r_l <- clip(r_l - η_γ ĝ u_l, 1 - τ, 1 + τ)
            ratios = (ratios - self.proj_lr * grad * u).clamp(1 - tau, 1 + tau)
        self._set_ratios_(ratios, start)  # θ_l <- θ0_l + r_l Δ_l, for good
        self.ratios, self.gammas = ratios, ratios * dist

    def state_dict(self):
        """ZOSGD's state plus the anchors (so a resumed run needs no pretrained model), their names,
        the u generator and the last phase's ratios and γ."""
        state = super().state_dict()
        state["dizo"] = {"names": list(self.names), "anchors": [a.clone() for a in self.anchors],
                         "u_gen": self._u_gen.get_state(), "ratios": self.ratios.clone(),
                         "gammas": self.gammas.clone()}
        return state

    def load_state_dict(self, state_dict):
        """Restore ZOSGD's state, the anchors (from the checkpoint, not from the current weights), the u
        generator and the last ratios; refuses a state that projects other matrices."""
        state_dict = dict(state_dict)
        dizo = state_dict.pop("dizo")
        if dizo["names"] != self.names:
            raise ValueError("checkpoint projects other matrices than this optimizer: "
                             f"{dizo['names'][:2]}... vs {self.names[:2]}...")
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for a, saved in zip(self.anchors, dizo["anchors"]):
                a.copy_(saved)
        self._u_gen.set_state(dizo["u_gen"])
        self.ratios, self.gammas = dizo["ratios"].clone(), dizo["gammas"].clone()


# Which matrices to project, found by module structure. Each rule recognises one family's attention block
# and yields (role, suffix, tensor); roles are q, k, v, o.

def _separate_projections(module):
    """OPT, Llama, Mistral, Qwen2, ...: q_proj, k_proj, v_proj and out_proj (OPT) or o_proj (Llama)."""
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj"}
    out = "out_proj" if hasattr(module, "out_proj") else "o_proj"
    if not all(isinstance(getattr(module, n, None), torch.nn.Linear) for n in (*names.values(), out)):
        return None
    names["o"] = out
    return [(role, f"{n}.weight", getattr(module, n).weight) for role, n in names.items()]


def _bert_attention(module):
    """BERT, RoBERTa: attention.self.{query,key,value} and attention.output.dense."""
    sa, out = getattr(module, "self", None), getattr(module, "output", None)
    if not all(isinstance(getattr(sa, n, None), torch.nn.Linear) for n in ("query", "key", "value")):
        return None
    if not isinstance(getattr(out, "dense", None), torch.nn.Linear):
        return None
    return [("q", "self.query.weight", sa.query.weight), ("k", "self.key.weight", sa.key.weight),
            ("v", "self.value.weight", sa.value.weight), ("o", "output.dense.weight", out.dense.weight)]


def _gpt2_attention(module):
    """GPT-2: one fused c_attn (a Conv1D, weight [d, 3d] laid out q | k | v along columns) and c_proj.

    The fused weight is one parameter, but K and V are distinct matrices of the model, so DiZO projects
    each column block, a view of the parameter, on its own, like OPT's separate k_proj and v_proj.
    """
    c_attn, c_proj = getattr(module, "c_attn", None), getattr(module, "c_proj", None)
    if c_attn is None or c_proj is None or getattr(c_attn, "weight", None) is None:
        return None
    w = c_attn.weight
    if w.dim() != 2 or w.shape[1] != 3 * w.shape[0]:
        return None  # cross-attention or another layout: not ours to guess
    d = w.shape[0]
    return [("q", "c_attn.weight[q]", w[:, :d]), ("k", "c_attn.weight[k]", w[:, d:2 * d]),
            ("v", "c_attn.weight[v]", w[:, 2 * d:]), ("o", "c_proj.weight", c_proj.weight)]


def _neox_attention(module):
    """GPT-NeoX (Pythia): query_key_value, a Linear [3d, d] whose rows are per head [q | k | v].

    K and V are strided views of shape [heads, head_dim, d], one per role, as for GPT-2.
    """
    qkv, dense = getattr(module, "query_key_value", None), getattr(module, "dense", None)
    head_size = getattr(module, "head_size", None)
    if not isinstance(qkv, torch.nn.Linear) or not isinstance(dense, torch.nn.Linear) or not head_size:
        return None
    w = qkv.weight.view(-1, 3, head_size, qkv.weight.shape[1])
    return [("q", "query_key_value.weight[q]", w[:, 0]), ("k", "query_key_value.weight[k]", w[:, 1]),
            ("v", "query_key_value.weight[v]", w[:, 2]), ("o", "dense.weight", dense.weight)]


_RULES = (_separate_projections, _bert_attention, _gpt2_attention, _neox_attention)
SUPPORTED_FAMILIES = "OPT, Llama/Mistral/Qwen2, BERT/RoBERTa, GPT-2, GPT-NeoX"


def projected_params(model, roles=("k", "v")):
    """The attention matrices DiZO projects, as (name, tensor) pairs, in module order.

    Default roles K and V, as the released code (OPT's k_proj and v_proj); any of "q", "k", "v", "o".
    Matrices are found by the structure of each family's attention block, never by a single name check,
    and an unknown architecture raises instead of silently projecting nothing.
    """
    bad = set(roles) - {"q", "k", "v", "o"}
    if not roles or bad:
        raise ValueError(f"roles must be a non-empty subset of q, k, v, o, got {roles!r}")
    found = []
    for prefix, module in model.named_modules():
        for rule in _RULES:
            hits = rule(module)
            if hits:
                found += [(f"{prefix}.{suffix}", t) for role, suffix, t in hits if role in roles]
                break
    if not found:
        raise ValueError(f"no attention block recognised in {type(model).__name__}; "
                         f"projected_params supports {SUPPORTED_FAMILIES}")
    return found


def projection_report(pairs):
    """Count, parameters and anchor bytes of the projected matrices, for the user to check the choice."""
    tensors = [t for _, t in pairs]
    return {"matrices": len(tensors), "params": sum(t.numel() for t in tensors),
            "anchor_bytes": sum(t.numel() * t.element_size() for t in tensors)}
