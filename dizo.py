"""Zeroth-order fine-tuning: ZO-SGD with seed replay (MeZO) and DiZO's layer-wise divergence projection.

Torch only: copy it into any project. Read it beside the papers and the released code (the README lists departures):
  MeZO  Malladi et al., arXiv 2305.17333; princeton-nlp/MeZO, large_models/trainer.py.
  DiZO  Tan et al., "Harmony in Divergence", arXiv 2502.03304 (NeurIPS 2025); Skilteee/DiZO (b05e73d), the same file:
        zo_step, zo_update (eq. (1), (2)), dizo_trainer.dizo_zo_iters (a phase), DiZO.zo_forward (a γ-search step).

Equation map (the DiZO paper's sections)                                      where
  z ~ N(0, I), regenerated from its query's seed at every pass (seed replay)   ZOSGD._zs         MeZO
  g = (L(θ + εz) - L(θ - εz)) / (2ε), one per query j = 1..q                    ZOSGD._query      §2.1 eq. (1)
  θ <- θ - η ((1/q) Σ_j g_j z_j + λθ), λθ MeZO's weight decay, not the paper's  ZOSGD._zo_step    §2.1 eq. (2)
  s_l = ||θ_l - θ0_l||_F, the layer-wise divergence                             DiZO.distances    §2.2
  θ_l <- θ0_l + (γ_l / s_l)(θ_l - θ0_l) = θ0_l + r_l Δ_l                         DiZO._set_ratios  §3
  a phase after every κ-th ZO step (released: in zo_update)                     DiZO.step         §3
  M SPSA steps on γ, batches: search_data or the step's; r_l in [1-τ, 1+τ]      DiZO.project      §3
  which matrices: attention K and V (or their LoRA factors)                     projected_params  trainer.py
Tests check the rows against references (pytest -k NAME): test_fused_step_equals_the_four_pass_reference (MeZO),
test_q_queries_follow_the_direct_computation, test_the_projection_phase_follows_the_released_gamma_search (a port).

Usage (ZOSGD: the same without the matrices, search_data and search_loss); the closure: ONE mini-batch's loss:
    opt = DiZO(model.parameters(), projected_params(model), lr=1e-6, search_data=batches, search_loss=loss_fn)
    for batch in loader: loss = opt.step(lambda: loss_fn(batch))   # two forward passes; loss: L(θ + εz), not L(θ)

Check a step by hand. With q = 1, no weight decay, model.eval() (this loop does not replay dropout as step() does),
the optimizer's seed, lr and eps, and params = [p for group in opt.param_groups for p in group["params"] if
p.requires_grad] (the trained tensors), from the same θ the loop gives the FIRST opt.step's g and θ, to rounding:

    step_seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(seed)))
    def perturb(alpha):                                    # θ <- θ + alpha z, one generator per device
        gens = {p.device: torch.Generator(p.device).manual_seed(step_seed) for p in params}
        for p in params:
            p.add_(torch.randn(p.shape, generator=gens[p.device], device=p.device, dtype=p.dtype), alpha=alpha)
    with torch.no_grad():
        perturb(eps); loss_plus = float(closure()); perturb(-2 * eps); loss_minus = float(closure())
        g = (loss_plus - loss_minus) / (2 * eps); perturb(eps); perturb(-lr * g)   # MeZO's four passes
"""

import math
import numbers
import warnings
from collections.abc import Sequence

import torch


def _check(name, value, ok, why):
    if not ok:
        raise ValueError(f"{name} must be {why}, got {value!r}")


def _scalar(value, where):
    """The closure's loss as a float; anything but one finite scalar is an error that says what came back."""
    if not (isinstance(value, torch.Tensor) and value.numel() == 1 or isinstance(value, numbers.Real)):
        what = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else f"{value!r:.40}"
        raise TypeError(f"the closure returned {what} at {where}; it must return one scalar loss (loss.mean()?)")
    if not math.isfinite(float(value)):
        raise FloatingPointError(f"non-finite loss {float(value)} at {where}")
    return float(value)


def _wide(t):  # the dtype in which a difference of two values of t's dtype keeps its low bits: at least fp32
    return torch.promote_types(t.dtype, torch.float32)


class ZOSGD(torch.optim.Optimizer):
    """ZO-SGD with MeZO's seed replay: two forward passes a step (2q with q queries), no gradient, no per-weight state.
    step(closure) calls the closure (one scalar loss, under torch.no_grad()) 2q times, each ± pair from one global RNG
    state (dropout masks agree); returns ℓ+ = L(θ + εz) of the first query, not L(θ); an error says if θ was put back.

    Arguments (defaults: MeZO's and DiZO's released code):
        lr            η of eq. (2), per group (released 1e-6 for OPT; small models take far more: sweep it).
        eps           ε of eq. (1) (released 1e-3), one for all groups: g is one scalar for the whole model.
        weight_decay  λ (DiZO's code has none: default 0), on tensors of 2+ dimensions: our rule (MeZO's: by name).
        seed          seeds the optimizer's own generator (one 62-bit seed per step and query).
        queries       q of eq. (1): directions per step, g_j z_j averaged (released: 1).
        direction     "gaussian" (MeZO, DiZO) or "rademacher" (z_i = ±1 with equal odds, Spall's SPSA)."""

    def __init__(self, params, lr, eps=1e-3, weight_decay=0.0, seed=0, *, queries=1, direction="gaussian"):
        _check("seed", seed, isinstance(seed, int) and seed >= 0, "an int >= 0")
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay, queries=queries, direction=direction))
        self._seeds = torch.Generator().manual_seed(seed)  # one seed per step and query
        self.steps_done, self.projected_grad, self.projected_grads = 0, None, []
        self._offsets, self._cut = {}, None  # where θ stands during a step's queries, for _put_back
        if halves := [p for _, p in self._params() if p.dtype in (torch.bfloat16, torch.float16)]:  # as released
            dtype, lr = halves[0].dtype, self.defaults["lr"]  # fp32 rounds far finer; spacing near |θ|: |θ|·eps/2..eps
            warnings.warn(f"{sum(p.numel() for p in halves):,} {dtype} weights are stepped in place: at lr {lr:g} an "
                          f"update ηgz is lost where |g·z| < |θ|·{torch.finfo(dtype).eps / 4 / max(lr, 1e-300):.3g} (at "
                          f"most half a unit in θ's last place), yet each ±εz pass rounds, moving θ", stacklevel=2)

    def add_param_group(self, group):
        """torch.optim's add_param_group, with the group's settings checked."""
        s = {**self.defaults, **group}
        _check("lr", s["lr"], 0 <= s["lr"] < math.inf, "finite and >= 0")
        _check("eps", s["eps"], 0 < s["eps"] < math.inf, "finite and > 0")
        _check("weight_decay", s["weight_decay"], 0 <= s["weight_decay"] < math.inf, "finite and >= 0")
        _check("queries", s["queries"], isinstance(s["queries"], int) and s["queries"] >= 1, "an int >= 1")
        _check("direction", s["direction"], s["direction"] in ("gaussian", "rademacher"), "gaussian or rademacher")
        for key in ("eps", "queries", "direction"):
            _check(key, s[key], not self.param_groups or s[key] == self.param_groups[0][key],
                   "the same in every parameter group (one ZO step estimates one g for the whole model)")
        super().add_param_group(group)

    def _params(self):
        return [(group, p) for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _forked(self, closure, where):
        """The closure's loss, the global RNG (CPU, CUDA) put back after it: the next pass has the same dropout."""
        with torch.random.fork_rng(devices=list({p.device for _, p in self._params() if p.device.type == "cuda"})):
            return _scalar(closure(), where)

    def _zs(self, seed):
        """(group, p, z) for every trained tensor in order, z regenerated from `seed` (one generator per device)."""
        gens = {d: torch.Generator(d).manual_seed(seed) for d in {p.device for _, p in self._params()}}
        for group, p in self._params():
            gen, like = gens[p.device], dict(size=p.shape, device=p.device, dtype=p.dtype)
            if group["direction"] == "rademacher":
                yield group, p, torch.randint(0, 2, generator=gen, **like).mul_(2).sub_(1)  # z_i = ±1
            else:
                yield group, p, torch.randn(generator=gen, **like)                          # z ~ N(0, I)

    def _perturb(self, seed, alpha):
        """θ <- θ + alpha·z, tensor by tensor; _cut and _offsets (scalars, no z) say how far, for _put_back."""
        for i, (_, p, z) in enumerate(self._zs(seed)):
            self._cut = (seed, alpha, i + 1)  # counted first: a Ctrl-C during add_ is raised as it returns, p moved
            p.add_(z, alpha=alpha)
        self._cut, self._offsets[seed] = None, self._offsets.get(seed, 0.0) + alpha  # θ is now θ_step + Σ offset·z

    def _query(self, closure, seed, eps, back):
        """ℓ± = L(θ ± εz), z of `seed`; returns g (eq. (1)) and ℓ+; leaves θ - εz (back: θ; failing: see _put_back)."""
        self._perturb(seed, eps)                                  # θ + εz
        loss_plus = self._forked(closure, "θ + εz")               # ℓ+ = L(θ + εz)
        self._perturb(seed, -2 * eps)                             # θ - εz
        loss_minus = _scalar(closure(), "θ - εz")                 # ℓ- = L(θ - εz), with ℓ+'s dropout masks
        if back:                                                  # θ - εz back to θ, for the next query
            self._perturb(seed, eps)
        return _scalar((loss_plus - loss_minus) / (2 * eps), "g = (ℓ+ - ℓ-) / 2ε"), loss_plus  # g: eq. (1)

    @torch.no_grad()
    def _zo_step(self, closure=None):
        """One ZO-SGD step, eq. (1) and (2) with q queries, all at the same θ; returns ℓ+ = L(θ + εz_1), not L(θ)."""
        if not callable(closure):
            raise TypeError(f"step(closure) needs a function returning the loss, got {type(closure).__name__}")
        eps, q = self.param_groups[0]["eps"], self.param_groups[0]["queries"]
        seeds = [int(torch.randint(0, 2**62, (1,), generator=self._seeds)) for _ in range(q)]
        self._offsets, self._cut = {}, None
        try:
            grads, losses = zip(*[self._query(closure, seed, eps, back=j < q - 1) for j, seed in enumerate(seeds)])
        except BaseException as error:  # out of memory, Ctrl-C, a non-finite loss or g: θ put back if it can be
            self._put_back(error)
            raise
        try:  # eq. (2), the restore and the last query's update fused into one pass, from θ - εz_q:
            #   θ <- (θ - εz_q + εz_q)(1 - ηλ) - (η/q) g_q z_q          (λ on tensors of 2+ dimensions only)
            for group, p, z in self._zs(seeds[-1]):
                lr, decay = group["lr"], group["weight_decay"] if p.dim() >= 2 else 0.0
                if decay == 0.0:
                    p.add_(z, alpha=eps - lr * grads[-1] / q)
                else:
                    p.add_(z, alpha=eps).mul_(1 - lr * decay).add_(z, alpha=-lr * grads[-1] / q)
            for seed, grad in zip(seeds[:-1], grads[:-1]):        # θ <- θ - (η/q) g_j z_j for j < q
                for group, p, z in self._zs(seed):
                    p.add_(z, alpha=-group["lr"] * grad / q)
        except BaseException as error:  # out of memory drawing z, Ctrl-C: some tensors are updated, some not
            error.add_note(f"ZO step {self.steps_done + 1} stopped in its update: θ is neither old nor new, reload it")
            raise
        self.steps_done += 1
        self.projected_grads, self.projected_grad = list(grads), sum(grads) / q
        return losses[0]  # ℓ+ of the first query

    def step(self, closure=None):  # torch.optim wraps `step` in hooks; DiZO.step calls _zo_step, so hooks run once
        return self._zo_step(closure)

    def state_dict(self):  # torch.optim's (the groups' settings), the step count and the seed generator
        return {**super().state_dict(), "zo": {"steps_done": self.steps_done, "seeds": self._seeds.get_state()}}

    def load_state_dict(self, state_dict):  # the next step draws the z the saved run would have drawn
        if "zo" not in state_dict or ("dizo" in state_dict) != isinstance(self, DiZO):
            saved = "DiZO's" if "dizo" in state_dict else "ZOSGD's" if "zo" in state_dict else "another optimizer's"
            raise ValueError(f"this state_dict is {saved}: it cannot continue a {type(self).__name__}")
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in ("zo", "dizo")})
        self.steps_done = state_dict["zo"]["steps_done"]
        self._seeds.set_state(state_dict["zo"]["seeds"])

    # Recovery: a step that fails part-way (out of memory, Ctrl-C, a non-finite loss) puts θ back, or says it cannot.
    def _put_back(self, error):
        """After a failed query, θ put back where the step began (to rounding) by replaying z: first the tensors a pass
        cut short had moved, then each whole pass still applied; a note says whether it was (θ finite)."""
        try:
            if self._cut:
                seed, alpha, moved = self._cut
                for _, (_, p, z) in zip(range(moved), self._zs(seed)):
                    p.add_(z, alpha=-alpha)
                self._cut = None
            for seed, offset in [(seed, a) for seed, a in self._offsets.items() if a]:
                self._perturb(seed, -offset)
            restored = all(bool(torch.isfinite(p).all()) for _, p in self._params())  # an ε that overflowed: no
        except BaseException:  # out of memory again, Ctrl-C: θ stays where this failure left it, even part-way
            restored = False
        error.add_note(f"ZO step {self.steps_done + 1} stopped; θ " + ("was put back by replaying z" if restored
                                                                      else "could NOT be put back: reload it"))


class DiZO(ZOSGD):
    """ZO-SGD plus DiZO's projection (§3): every κ ZO steps, each projected matrix's distance from its anchor θ0 is
    rescaled by a searched ratio r_l = γ_l / s_l:
        θ_l <- θ0_l + r_l Δ_l,   Δ_l = θ_l - θ0_l,   s_l = ||Δ_l||_F,   r_l in [1 - τ, 1 + τ]
    θ0: the projected matrices as the first step finds them (copied at construction, and again at the first step
    unless a project() ran before it); load_state_dict() puts back a saved θ0 instead.

    Arguments beyond ZOSGD's (defaults: Skilteee/DiZO's large_models/trainer.py and README):
        projected     the matrices, as projected_params(model) gives: trained parameters or views (re-taken at use).
        interval      κ, ZO steps between projection phases (released 50; its README searches 50-400).
        proj_iters    M, γ-search iterations per phase (released 10, hard-coded there).
        proj_eps      ε_γ, proj_lr η_γ, tau τ: the γ search's perturbation, step size and clip (released 0.1,
                      2.0, 0.2; its README searches 0.05-0.1, 1-2 and 0.1-0.3).
        search_data   one batch per search iteration: a function (its state is the caller's to save), a list (cycled,
                      position saved) or an iterable such as a DataLoader (re-iterated; position lost on resume).
                      search_loss(batch) -> scalar loss. Without both: the step's closure (released: fresh batches).
        anchor_device where θ0 and the phase's copy of the matrices live: None, beside each matrix; "cpu"."""

    def __init__(self, params, projected, lr, eps=1e-3, weight_decay=0.0, seed=0, *, queries=1,
                 direction="gaussian", interval=50, proj_iters=10, proj_eps=0.1, proj_lr=2.0, tau=0.2,
                 search_data=None, search_loss=None, anchor_device=None):
        super().__init__(params, lr, eps, weight_decay, seed, queries=queries, direction=direction)
        _check("interval", interval, isinstance(interval, int) and interval >= 1, "an int >= 1")
        _check("proj_iters", proj_iters, isinstance(proj_iters, int) and proj_iters >= 1, "an int >= 1")
        _check("proj_eps", proj_eps, 0 < proj_eps < math.inf, "finite and > 0")
        _check("proj_lr", proj_lr, 0 <= proj_lr < math.inf, "finite and >= 0")
        _check("tau", tau, 0 < tau < 1, "in (0, 1)")
        _check("search_loss", search_loss, (search_data is None) == (search_loss is None) and
               (search_loss is None or callable(search_loss)), "a function of one batch, given with search_data")
        self.interval, self.proj_iters, self.proj_eps, self.proj_lr, self.tau = (interval, proj_iters, proj_eps,
                                                                                 proj_lr, tau)
        _check("projected", type(projected).__name__, isinstance(projected, (list, tuple)) and projected,
               "a non-empty list of tensors or (name, tensor) pairs (else DiZO would be ZO-SGD)")
        pairs = [item if isinstance(item, tuple) else (f"projected[{i}]", item) for i, item in enumerate(projected)]
        trained = {id(p) for _, p in self._params()}
        for name, t in pairs:
            _check(f"projected matrix {name}", type(t).__name__, isinstance(t, torch.Tensor) and id(
                t if t._base is None else t._base) in trained, "a trained parameter of this optimizer or a view of one")
        self.names, self._views = [n for n, _ in pairs], [(t, None) if t._base is None else (t._base, (
            t.shape, t.stride(), t.storage_offset() - t._base.storage_offset())) for _, t in pairs]  # see `matrices`
        self.anchors = [t.detach().to(anchor_device or t.device, copy=True) for t in self.matrices]  # θ0, nothing else
        # for logging: the last phase's r_l and γ_l, and its step, r_l, s_l, loss before and after
        self.ratios, self.gammas, self.last_phase = torch.ones(len(pairs), dtype=torch.float64), None, None
        self._u_gen = torch.Generator().manual_seed(seed + 1)  # its own stream: the ZO seeds stay ZOSGD's
        self._search_data, self._search_loss, self._search_iter, self._drawn = search_data, search_loss, None, 0

    @property
    def matrices(self):  # views re-taken at each use: one taken once keeps the storage that model.double() replaces
        return [p if v is None else p.as_strided(v[0], v[1], p.storage_offset() + v[2]) for p, v in self._views]

    def step(self, closure=None):
        """One ZO step, returning its ℓ+ = L(θ + εz), not L(θ); after every κ-th, a phase (2M + 2 forward passes)."""
        if self.steps_done == 0 and self.last_phase is None:  # θ0 <- θ: in place, or anew after model.double()
            self.anchors = [a.copy_(m.detach()) if a.dtype == m.dtype else m.detach().to(a.device, copy=True)
                            for a, m in zip(self.anchors, self.matrices)]
        loss = self._zo_step(closure)
        if self.steps_done % self.interval == 0:
            self.project(self._search_closure if self._search_loss is not None else lambda: closure)
        return loss

    def _search_closure(self):  # the loss closure of one γ-search iteration: search_loss on search_data's next batch
        data, self._drawn = self._search_data, self._drawn + 1
        if callable(data) or isinstance(data, Sequence) and len(data) > 0:  # a function; a list, cycled
            batch = data() if callable(data) else data[(self._drawn - 1) % len(data)]
        else:  # an iterable: its next batch, or a new pass when exhausted (a shuffling DataLoader reshuffles)
            if self._search_iter is None or (batch := next(self._search_iter, None)) is None:
                self._search_iter = iter(data)
                batch = next(self._search_iter, None)
            _check("search_data", data, batch is not None, "a non-empty list, a DataLoader or a function")
        return lambda: self._search_loss(batch)

    @torch.no_grad()
    def distances(self):
        """s_l = ||θ_l - θ0_l||_F of every projected matrix (float64), the difference taken in at least fp32."""
        return torch.tensor([float(torch.linalg.vector_norm(m.to(_wide(m)) - a.to(m.device, _wide(m))))
                             for m, a in zip(self.matrices, self.anchors)], dtype=torch.float64)

    def _set_ratios(self, ratios, start):
        """θ_l <- θ0_l + r_l (θ_start,l - θ0_l), θ_start the phase's copy; r_l = 1 puts θ_start,l back exactly."""
        for m, a, s, r in zip(self.matrices, self.anchors, start, ratios.tolist()):
            if r == 1.0:
                m.copy_(s)
            else:  # in at least fp32
                a = a.to(m.device, _wide(m))
                m.copy_(s.to(m.device, _wide(m), copy=True).sub_(a).mul_(r).add_(a))

    @torch.no_grad()
    def project(self, next_closure):
        """One projection phase (§3), as the released code runs it: M iterations of SPSA on the distances γ_l, each
        kept in [(1 - τ) s_l, (1 + τ) s_l], then θ_l <- θ0_l + (γ_l / s_l) Δ_l for good; a phase that fails is undone
        exactly. next_closure() gives iteration i's closure, on batch B_i, for ℓ±; B_1 also gives loss_before and
        loss_after (`last_phase`): 2M + 2 forward passes (the released code's 2M). Each trial is set from θ_start, a
        copy of the matrices, where the released code undoes the last one: θ the same to rounding, one more copy."""
        start = [m.detach().to(a.device, copy=True) for m, a in zip(self.matrices, self.anchors)]  # θ_start
        s = self.distances()                      # s_l = ||θ_l - θ0_l||, fixed for the phase (trials start at θ_start)
        gamma = s.clone()                         # re-initialisation: γ_l = s_l, the identity

        def ratio(g):  # r_l = γ_l / s_l; 1 for a matrix that has not moved (s_l = 0: no direction to rescale)
            return torch.where(s > 0, g / s.where(s > 0, 1.0), 1.0)
        try:
            first = next_closure()  # every pass of the phase draws the same dropout masks (the RNG is forked)
            loss_before = self._forked(first, "the loss before the projection phase")
            for it in range(self.proj_iters):
                closure, where = first if it == 0 else next_closure(), f"γ-search iteration {it + 1}"
                # u_l ~ N(0, 1), clipped to ±τ s_l / ε_γ: a trial γ_l ± ε_γ u_l is within τ s_l of γ_l
                bound = self.tau / self.proj_eps * s
                u = torch.randn(len(s), generator=self._u_gen, dtype=torch.float64).clamp(-bound, bound)
                self._set_ratios(ratio(gamma + self.proj_eps * u), start)
                loss_plus = self._forked(closure, where)         # ℓ+ = L(θ0 + ((γ + ε_γ u) / s) Δ)
                self._set_ratios(ratio(gamma - self.proj_eps * u), start)
                loss_minus = self._forked(closure, where)        # ℓ- = L(θ0 + ((γ - ε_γ u) / s) Δ)
                g_hat = (loss_plus - loss_minus) / (2 * self.proj_eps)  # ĝ = (ℓ+ - ℓ-) / (2 ε_γ)
                # γ_l <- clip(γ_l - η_γ s_l ĝ u_l, (1 - τ) s_l, (1 + τ) s_l): the released step (s_l in it)
                gamma = torch.clamp(gamma - self.proj_lr * s * g_hat * u, (1 - self.tau) * s, (1 + self.tau) * s)
            self._set_ratios(ratio(gamma), start)        # θ_l <- θ0_l + (γ_l / s_l) Δ_l, for good
            loss_after = self._forked(first, "the loss after the projection phase")
        except BaseException as error:
            self._set_ratios(torch.ones_like(s), start)
            error.add_note(f"the projection phase after ZO step {self.steps_done} failed; the projected matrices "
                           f"were put back exactly (the step's ZO update stays)")
            raise
        self.ratios, self.gammas = ratio(gamma), gamma
        self.last_phase = {"step": self.steps_done, "ratios": self.ratios.tolist(), "distances": s.tolist(),
                           "loss_before": loss_before, "loss_after": loss_after}

    def state_dict(self):  # ZOSGD's, the anchors (no pretrained model needed), the u generator, r, γ, batches drawn
        return {**super().state_dict(), "dizo": {
            "names": list(self.names), "anchors": [a.clone() for a in self.anchors], "drawn": self._drawn,
            "u_gen": self._u_gen.get_state(), "ratios": self.ratios, "gammas": self.gammas}}

    def load_state_dict(self, state_dict):  # continues from DiZO.state_dict(); refuses one of other matrices
        dizo = state_dict.get("dizo", {"names": self.names})
        _check("the state_dict's projected matrices", dizo["names"][:2], dizo["names"] == self.names,
               f"this optimizer's, {self.names[:2]}...")
        super().load_state_dict(state_dict)
        self.anchors = [saved.to(a.device, copy=True) for a, saved in zip(self.anchors, dizo["anchors"])]
        self._u_gen.set_state(dizo["u_gen"])
        self.ratios, self.gammas, self._drawn = dizo["ratios"], dizo["gammas"], dizo["drawn"]
        if self._drawn and not (callable(self._search_data) or isinstance(self._search_data, Sequence)):
            warnings.warn(f"search_data is a {type(self._search_data).__name__}, whose position is not restored: the "
                          f"γ search draws other batches than the saved run would (a list or a function would not)")


def _linear(module, name):  # module.<name> if it is an nn.Linear, inside a PEFT LoRA wrapper or not; else None
    m = getattr(m := getattr(module, name, None), "base_layer", m)
    return m if isinstance(m, torch.nn.Linear) else None


def _attention(module):
    """(role, weight, columns: the role's output features of a fused weight, or None) of a known attention block."""
    out = "out_proj" if hasattr(module, "out_proj") else "o_proj"  # OPT; Llama, Mistral, Qwen2
    found = {r: _linear(module, n) for r, n in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", out))}
    if not all(found.values()):  # BERT, RoBERTa: attention.self.{query,key,value} and attention.output.dense
        qkv, names = getattr(module, "self", None), (("q", "query"), ("k", "key"), ("v", "value"))
        found = {r: _linear(qkv, n) for r, n in names} | {"o": _linear(getattr(module, "output", None), "dense")}
    if all(found.values()):
        return [(role, m.weight, None) for role, m in found.items()]
    # GPT-2: one Conv1D c_attn, weight [d, 3d] whose output features are laid out q | k | v; each block projected alone
    w = getattr(getattr(module, "c_attn", None), "weight", None)
    if w is not None and hasattr(module, "c_proj") and w.dim() == 2 and w.shape[1] == 3 * (d := w.shape[0]):
        return [(r, w, slice(i * d, i * d + d)) for i, r in enumerate("qkv")] + [("o", module.c_proj.weight, None)]
    return None


def projected_params(model, roles=("k", "v")):
    """The trained attention matrices DiZO projects, as (name, tensor) pairs in module order. Default K and V, as the
    released code (OPT's k_proj and v_proj); any of "q", "k", "v", "o", found by the structure of each family's
    attention block (none found: an error). A view is named after its parameter + [role]. Under PEFT LoRA a matrix
    gives its active adapters' trained A and B (roles=("q", "v") is the released); GPT-2's fused c_attn, the rows of B
    of each role (B anchored at 0, r_l rescales that role's update B_l A alone; A, shared by q, k and v, is not
    projected). A frozen matrix without adapters is left out, with a warning naming it."""
    _check("roles", roles, roles and set(roles) <= {"q", "k", "v", "o"}, "a non-empty subset of q, k, v, o")
    names = {id(p): n.replace("_orig_mod.", "") for n, p in model.named_parameters()}
    lora = {id(getattr(m.base_layer, "weight", None)): m for m in model.modules()  # PEFT LoRA wrappers
            if hasattr(m, "base_layer") and isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)}
    blocks = [hits for hits in map(_attention, model.modules()) if hits]
    _check("model", type(model).__name__, blocks, "OPT, Llama/Mistral/Qwen2, BERT/RoBERTa, GPT-2 (or pass the matrices)")
    found, frozen = [], []
    for role, w, cols in (hit for hits in blocks for hit in hits if hit[0] in roles):
        layer, name = lora.get(id(w)), names[id(w)] + ("" if cols is None else f"[{role}]")
        if layer is None:  # the weight itself, or its block
            hits = [(name, w if cols is None else w[:, cols])] if w.requires_grad else []
        else:  # the frozen weight's trained LoRA factors instead: A and B, or B's rows of a fused block
            ab = [(layer.lora_A[a].weight, layer.lora_B[a].weight) for a in layer.active_adapters if a in layer.lora_A]
            hits = [(names[id(f)], f) for pair in ab for f in pair if f.requires_grad] if cols is None else [
                (f"{names[id(b)]}[{role}]", b[cols]) for _, b in ab if b.requires_grad]
        found, frozen = found + hits, frozen + ([] if hits else [name])
    _check(f"attention matrices {', '.join(roles)}", "frozen", found, "trained, or carry LoRA adapters")
    if frozen:
        warnings.warn(f"not projected: {len(frozen)} attention matrices asked for are frozen, with no LoRA adapter, "
                      f"e.g. {', '.join(frozen[:2])} (LoRA on q and v: pass roles=('q', 'v'))", stacklevel=2)
    return found


@torch.no_grad()
def divergence(model, anchor, roles=("k", "v")):
    """§2.2's ||W - W0||_F of each attention matrix by role in layer order, W0 = anchor[projected_params name]."""
    return {role: [float(torch.linalg.vector_norm(t.to(_wide(t)) - anchor[n].to(t.device, _wide(t))))
                   for n, t in projected_params(model, roles=(role,))] for role in roles}
