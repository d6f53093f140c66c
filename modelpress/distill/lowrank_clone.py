"""Low-Rank Clone distillation (LRC: Hao et al., "A Token is Worth over 1,000 Tokens: Efficient
Knowledge Distillation through Low-Rank Clone", arXiv 2505.12781), with the rank guideline
r* = O(sqrt(n)) (n = training sample size) of "Demystifying Low-Rank Knowledge Distillation in Large
Language Models", arXiv 2603.22355.

The student has the teacher's depth, heads, head size and MLP width but a smaller hidden size D_S.
Its weights are *generated* from the frozen teacher's by trainable projections P (D_T, D_S), one per
weight matrix (torch layout W (out, in)):
    reads the hidden stream  (q, k, v, gate, up):  W_S = (W_T diag(g_T)) P          (out, D_S)
    writes the hidden stream (o, down):            W_S = P^T W_T                    (D_S, in)
    embedding:                                     E_S = E_T P_emb                  (V, D_S)
    head:                                          H_S = (H_T diag(g_T,final)) P_head (V, D_S)
g_T are the teacher's RMSNorm gains, folded into the weights that read the normalised stream; the
student's RMSNorm gains are trainable vectors (D_S,). Only P and the student gains train.

Loss = w_ce CE(next token) + w_kl T^2 KL(p_T^(T) || p_S^(T)) + w_clone * sum_terms w_term * mean_layers
MSE_rel(term), the activation clone over q, k, v (outputs of q/k/v_proj), attention output (o_proj
output, student side mapped back to D_T by P_o^T), MLP activations (input of down_proj) and MLP output
(down_proj output, mapped back by P_down^T). MSE_rel = ||S - T||^2 / ||T||^2 (an MSE weighted by the
teacher activation's inverse mean square, so layers with large activations do not dominate).

After training the projections merge: `merge()` returns an ordinary dense model of the teacher's class
(e.g. LlamaForCausalLM with hidden_size D_S, untied head) that save_pretrained/from_pretrained handle.

modelpress choices (documented, not from the papers): P starts from the top-D_S principal directions
U of the teacher's residual stream on the training tokens (each layer's second moment normalised to
unit trace), shared by all projections, with student gains sqrt(D_T / D_S) - so when the stream lies
in span(U) the student starts as the teacher seen through U ("pca" init; "random" = a random
orthonormal U, "identity" needs D_S = D_T). Several students can train in lockstep on the same
batches, sharing one teacher forward per batch (used by the rank sweep and `--hidden auto`).
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import UserError
from ..model import decoder_layers

READS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")      # read the (normalised) hidden stream
WRITES = ("o_proj", "down_proj")                                     # write into the hidden stream
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
NORM_OF = {"q_proj": "input_layernorm", "k_proj": "input_layernorm", "v_proj": "input_layernorm",
           "gate_proj": "post_attention_layernorm", "up_proj": "post_attention_layernorm"}
TERMS = ("q", "k", "v", "attn_out", "mlp_act", "mlp_out")
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
PCA_WINDOWS = 16                       # token windows used for the PCA init (a basis, not a fit: few suffice)


@dataclass(frozen=True)
class LossWeights:
    ce: float = 1.0
    kl: float = 1.0
    temperature: float = 2.0
    clone: float = 1.0
    terms: dict = field(default_factory=lambda: {t: 1.0 for t in TERMS})


# ---------------------------------------------------------------- pure pieces

def generate_reader(W: Tensor, g: Tensor, P: Tensor) -> Tensor:
    """W_S = (W_T diag(g)) P: W (out, D_T), g (D_T,), P (D_T, D_S) -> (out, D_S)."""
    return (W * g[None, :]) @ P


def generate_writer(W: Tensor, P: Tensor) -> Tensor:
    """W_S = P^T W_T: W (D_T, in), P (D_T, D_S) -> (D_S, in)."""
    return P.t() @ W


def read_through(x: Tensor, W: Tensor, g: Tensor, P: Tensor, b: Tensor | None = None) -> Tensor:
    """x W_S^T + b with W_S = (W diag(g)) P: x (.., D_S), W (out, D_T), g (D_T,), P (D_T, D_S) -> (.., out).
    Whichever association costs fewer multiply-adds for this many tokens: forming W_S (out D_T D_S, then
    tok D_S out) or ((x P^T) * g) W^T (tok D_T (D_S + out)); the two differ by rounding only."""
    out, D_T = W.shape
    D_S, tok = P.shape[1], x.numel() // P.shape[1]
    if tok * D_T * (D_S + out) < out * D_T * D_S + tok * D_S * out:
        return F.linear(F.linear(x, P) * g, W, b)
    return F.linear(x, generate_reader(W, g, P), b)


def write_through(x: Tensor, W: Tensor, P: Tensor, b: Tensor | None = None) -> Tensor:
    """x W_S^T + P^T b with W_S = P^T W: x (.., in), W (D_T, in), P (D_T, D_S) -> (.., D_S); the cheaper
    association as in read_through: forming W_S (D_S D_T in, then tok in D_S) or (x W^T + b) P
    (tok D_T (in + D_S))."""
    D_T, n_in = W.shape
    D_S, tok = P.shape[1], x.numel() // n_in
    if tok * D_T * (n_in + D_S) < D_S * D_T * n_in + tok * n_in * D_S:
        return F.linear(F.linear(x, W, b), P.t())
    return F.linear(x, generate_writer(W, P), None if b is None else P.t() @ b)


def kl_distill(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """T^2 * mean over positions of KL(softmax(t / T) || softmax(s / T)); logits (..., V)."""
    lt = F.log_softmax(teacher_logits.float() / T, -1)
    ls = F.log_softmax(student_logits.float() / T, -1)
    return (T * T) * (lt.exp() * (lt - ls)).sum(-1).mean()


def relative_mse(s: Tensor, t: Tensor) -> Tensor:
    """||s - t||^2 / ||t||^2 (0 when equal; t detached)."""
    t = t.float().detach()
    return ((s.float() - t) ** 2).sum() / (t ** 2).sum().clamp(min=1e-12)


def pca_basis(second_moment: Tensor, d: int) -> Tensor:
    """Top-d eigenvectors (D, d) of a symmetric (D, D) matrix, largest first."""
    evals, evecs = torch.linalg.eigh(second_moment.double())
    return evecs[:, torch.argsort(evals, descending=True)[:d]].float()


def rank_guideline(r_pilot: int, n_pilot: int, n: int) -> float:
    """r* = c sqrt(n) with c = r_pilot / sqrt(n_pilot) fitted on a pilot sweep (arXiv 2603.22355)."""
    return r_pilot * math.sqrt(n / n_pilot)


@torch.no_grad()
def residual_basis(teacher: nn.Module, ids: Tensor, batch_size: int = 4) -> Tensor:
    """Eigenbasis (D_T, D_T), largest eigenvalue first, of sum_l C_l / tr(C_l) with C_l = X_l^T X_l the
    second moment of the teacher's residual stream entering layer l (and after the last) on `ids`."""
    D_T = teacher.config.hidden_size
    C = torch.zeros(D_T, D_T, dtype=torch.float64)
    dev = next(teacher.parameters()).device
    for b in range(0, ids.shape[0], batch_size):
        out = teacher(input_ids=ids[b:b + batch_size].to(dev), output_hidden_states=True, use_cache=False)
        for h in out.hidden_states:
            x = h.reshape(-1, D_T).double().cpu()                         # (tokens, D_T)
            M = x.t() @ x
            C += M / M.trace().clamp(min=1e-12)
    return pca_basis(C, D_T)


# ---------------------------------------------------------------- the clone

def _check_teacher(teacher: nn.Module) -> tuple[str, nn.ModuleList]:
    mt = getattr(teacher.config, "model_type", None)
    if mt not in SUPPORTED:
        raise UserError(f"low-rank clone supports Llama-style decoders ({', '.join(SUPPORTED)}), got model_type "
                        f"{mt!r}: pick a teacher of one of these families")
    prefix, layers = decoder_layers(teacher)
    for name in ATTN:
        if not isinstance(getattr(layers[0].self_attn, name, None), nn.Linear):
            raise UserError(f"teacher layer has no self_attn.{name}: low-rank clone needs q/k/v/o_proj and gate/up/down_proj")
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not isinstance(getattr(layers[0].mlp, name, None), nn.Linear):
            raise UserError(f"teacher layer has no mlp.{name}: low-rank clone needs q/k/v/o_proj and gate/up/down_proj")
    return prefix, layers


class _Through(nn.Module):
    """A student linear that reads the teacher's weight and its projection P live (no weights of its own):
    the shell's q/k/v/o and gate/up/down, so a forward never forms W_S when applying W_T and P is cheaper."""

    def __init__(self, teacher_linear: nn.Linear, P: nn.Parameter, gain: Tensor | None):
        super().__init__()
        self._ref = {"W": teacher_linear.weight, "b": teacher_linear.bias, "P": P, "g": gain}

    def forward(self, x: Tensor) -> Tensor:
        r = self._ref
        W, b = r["W"].detach(), None if r["b"] is None else r["b"].detach()
        if r["g"] is None:
            return write_through(x, W, r["P"], b)
        return read_through(x, W, r["g"].detach(), r["P"], b)


def _module_name(model: nn.Module, mod: nn.Module) -> str:
    for n, m in model.named_modules():
        if m is mod:
            return n
    raise UserError(f"module {type(mod).__name__} not found in the model")


class LowRankClone(nn.Module):
    """Trainable projections (and student RMSNorm gains) that generate a student from a frozen teacher."""

    def __init__(self, teacher: nn.Module, hidden: int, init: str = "pca", calib_ids: Tensor | None = None,
                 seed: int = 0, basis: Tensor | None = None):
        super().__init__()
        prefix, layers = _check_teacher(teacher)
        cfg = teacher.config
        D_T = cfg.hidden_size
        if isinstance(hidden, bool) or not isinstance(hidden, int) or not 1 <= hidden <= D_T:
            raise UserError(f"--hidden must be an integer in [1, {D_T}] (the teacher's hidden size), got {hidden!r}")
        if init not in ("pca", "random", "identity"):
            raise UserError(f"init must be pca, random or identity, got {init!r}")
        if init == "identity" and hidden != D_T:
            raise UserError(f"init identity needs --hidden {D_T} (the teacher's hidden size), got {hidden}")
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.hidden, self.d_teacher, self.prefix, self.n_layers = hidden, D_T, prefix, len(layers)
        # teacher and student shell are kept outside the module tree: they never train
        self._t = {"teacher": teacher.eval(), "student": self._student_shell(teacher, hidden)}
        self.emb_name = _module_name(teacher, teacher.get_input_embeddings())
        self.head_name = _module_name(teacher, teacher.get_output_embeddings())
        base = getattr(teacher, teacher.base_model_prefix, None)
        if base is None or not hasattr(base, "norm"):
            raise UserError("teacher has no final norm (model.norm): low-rank clone needs a Llama-style decoder")
        self.final_norm_name = _module_name(teacher, base.norm)

        if basis is not None and init == "pca":                           # precomputed residual_basis
            if basis.shape[0] != D_T or basis.shape[1] < hidden:
                raise UserError(f"basis has shape {tuple(basis.shape)}, needs ({D_T}, >= {hidden}): pass residual_basis(teacher, ids)")
            U = basis[:, :hidden].float().clone()
        else:
            U = self._init_basis(init, calib_ids, seed)                   # (D_T, D_S)
        g0 = math.sqrt(D_T / hidden)
        self.P = nn.ParameterDict()
        self.gain = nn.ParameterDict()
        for i in range(self.n_layers):
            for name in READS + WRITES:
                self.P[f"{i}_{name}"] = nn.Parameter(U.clone())
            for norm in ("input_layernorm", "post_attention_layernorm"):
                self.gain[f"{i}_{norm}"] = nn.Parameter(torch.full((hidden,), g0))
        self.P["embed"] = nn.Parameter(U.clone())
        self.P["head"] = nn.Parameter(U.clone())
        self.gain["final"] = nn.Parameter(torch.full((hidden,), g0))
        self._frozen_extra = self._check_coverage()
        s_layers = self.student.get_submodule(prefix)
        for layer, s_layer, i in zip(layers, s_layers, range(self.n_layers)):   # the shell's linears apply W_T and P
            for n in READS + WRITES:
                where = "self_attn" if n in ATTN else "mlp"
                gain = getattr(layer, NORM_OF[n]).weight if n in READS else None
                setattr(getattr(s_layer, where), n, _Through(getattr(getattr(layer, where), n), self.P[f"{i}_{n}"], gain))
        # the body's own parameters are then the norm gains and copied extras: the same tensors every step
        base_name = self.final_norm_name.rsplit(".", 1)[0]                 # the decoder body, e.g. "model"
        cut = len(base_name) + 1
        own = {n for n, _ in self.student.get_submodule(base_name).named_parameters()} - {f"{self.emb_name[cut:]}.weight"}
        state = {k[cut:]: v for k, v in (self._frozen_extra | self._gain_state()).items() if k[cut:] in own}
        if len(state) != len(own):
            raise UserError(f"low-rank clone: student parameters {sorted(own - set(state))[:3]} are not generated: "
                            "unsupported architecture detail")
        self._body = (base_name, state)

    # -- construction helpers
    @staticmethod
    def _student_shell(teacher: nn.Module, hidden: int) -> nn.Module:
        """The student's architecture with its parameters on the meta device (no memory): forward swaps
        in the generated state, which covers every parameter; buffers (rotary frequencies) are real."""
        from accelerate import init_empty_weights
        cfg = copy.deepcopy(teacher.config)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        cfg.hidden_size, cfg.head_dim, cfg.tie_word_embeddings = hidden, head_dim, False
        with init_empty_weights(include_buffers=False):
            return type(teacher)(cfg).eval()

    @property
    def teacher(self) -> nn.Module:
        return self._t["teacher"]

    @property
    def student(self) -> nn.Module:
        return self._t["student"]

    @torch.no_grad()
    def _init_basis(self, init: str, calib_ids: Tensor | None, seed: int) -> Tensor:
        D_T, D_S = self.d_teacher, self.hidden
        if init == "identity":
            return torch.eye(D_T)
        if init == "random":
            g = torch.Generator().manual_seed(seed)
            q, _ = torch.linalg.qr(torch.randn(D_T, D_S, generator=g))
            return q
        if calib_ids is None:
            raise UserError("init pca needs calibration token windows (calib_ids): pass them or use init random")
        return residual_basis(self.teacher, calib_ids)[:, :D_S]

    def _check_coverage(self) -> dict[str, Tensor]:
        """Student parameters not generated from projections must not involve D_T (they are copied)."""
        gen = set(self._generated_names())
        extra = {}
        for n, p in self.student.named_parameters():
            if n in gen:
                continue
            tp = dict(self.teacher.named_parameters()).get(n)
            if tp is None or tp.shape != p.shape:
                raise UserError(f"low-rank clone cannot map the teacher parameter {n}: unsupported architecture detail")
            extra[n] = tp.detach()
        return extra

    def _generated_names(self) -> list[str]:
        names = [f"{self.emb_name}.weight", f"{self.head_name}.weight", f"{self.final_norm_name}.weight"]
        for i in range(self.n_layers):
            p = f"{self.prefix}.{i}"
            names += [f"{p}.self_attn.{n}.weight" for n in ATTN] + [f"{p}.mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")]
            names += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
            layer = decoder_layers(self.teacher)[1][i]
            for n in WRITES:
                sub = layer.self_attn if n == "o_proj" else layer.mlp
                if getattr(sub, n).bias is not None:
                    names.append(f"{p}.{'self_attn' if n == 'o_proj' else 'mlp'}.{n}.bias")
        return names

    # -- the generated student
    def student_state(self) -> dict[str, Tensor]:
        """Every student parameter, generated from the teacher's weights and the projections."""
        t = self.teacher
        _, layers = decoder_layers(t)
        S: dict[str, Tensor] = dict(self._frozen_extra) | self._gain_state()
        E = t.get_input_embeddings().weight.detach()                       # (V, D_T)
        S[f"{self.emb_name}.weight"] = E @ self.P["embed"]                  # (V, D_S)
        H = t.get_output_embeddings().weight.detach()                      # (V, D_T)
        gf = t.get_submodule(self.final_norm_name).weight.detach()
        S[f"{self.head_name}.weight"] = generate_reader(H, gf, self.P["head"])
        for i, layer in enumerate(layers):
            p = f"{self.prefix}.{i}"
            for n in READS:
                sub, where = (layer.self_attn, "self_attn") if n in ATTN else (layer.mlp, "mlp")
                g = getattr(layer, NORM_OF[n]).weight.detach()
                S[f"{p}.{where}.{n}.weight"] = generate_reader(getattr(sub, n).weight.detach(), g, self.P[f"{i}_{n}"])
            for n in WRITES:
                sub, where = (layer.self_attn, "self_attn") if n == "o_proj" else (layer.mlp, "mlp")
                lin = getattr(sub, n)
                S[f"{p}.{where}.{n}.weight"] = generate_writer(lin.weight.detach(), self.P[f"{i}_{n}"])
                if lin.bias is not None:
                    S[f"{p}.{where}.{n}.bias"] = self.P[f"{i}_{n}"].t() @ lin.bias.detach()
        return S

    def _gain_state(self) -> dict[str, Tensor]:
        """The student's RMSNorm gains (trainable vectors, D_S) under their parameter names."""
        S = {f"{self.final_norm_name}.weight": self.gain["final"]}
        for i in range(self.n_layers):
            for norm in ("input_layernorm", "post_attention_layernorm"):
                S[f"{self.prefix}.{i}.{norm}.weight"] = self.gain[f"{i}_{norm}"]
        return S

    def forward(self, input_ids: Tensor) -> Tensor:
        """Student logits (batch, seq, V) through the projected weights (differentiable in P, gains).

        Equal to the merged student's logits, computed without forming E_S (V, D_S) or H_S (V, D_S): the
        embedding is E_T[ids] P_emb (only the batch's rows) and the head is ((x P_head^T) * g_T,final) H_T^T.
        With a large vocabulary these two (V, D_T) x (D_T, D_S) products and their gradients were a third
        of a training step (Qwen2.5, V = 151936). The layers' linears (_Through) apply W_T and P in the
        cheaper order for the batch's token count (read_through / write_through): for a few hundred tokens
        and a wide student, forming W_S every step cost about three times the token products. The result
        differs from the merged model's only by floating-point rounding."""
        t = self.teacher
        E = t.get_input_embeddings().weight.detach()                       # (V, D_T)
        x = E[input_ids] @ self.P["embed"]                                  # (batch, seq, D_S)
        base_name, state = self._body
        base = self.student.get_submodule(base_name)
        h = functional_call(base, state, (), {"inputs_embeds": x, "use_cache": False}).last_hidden_state
        H = t.get_output_embeddings().weight.detach()                      # (V, D_T)
        gf = t.get_submodule(self.final_norm_name).weight.detach()          # (D_T,)
        return ((h @ self.P["head"].t()) * gf) @ H.t()                     # (batch, seq, V)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """An ordinary dense model (the teacher's class, hidden_size D_S) with the generated weights."""
        st = {k: v.detach().clone() for k, v in self.student_state().items()}
        merged = type(self.teacher)(copy.deepcopy(self.student.config))
        missing, unexpected = merged.load_state_dict(st, strict=False)
        missing = [m for m in missing if not m.endswith("inv_freq")]
        if missing or unexpected:
            raise UserError(f"merge failed: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return merged.eval()

    # -- activations
    def hook_names(self) -> dict[str, tuple[int, str]]:
        out = {}
        for i in range(self.n_layers):
            p = f"{self.prefix}.{i}"
            for n in ATTN:
                out[f"{p}.self_attn.{n}"] = (i, n)
            out[f"{p}.mlp.down_proj"] = (i, "down_proj")
        return out

    def project_back(self, i: int, which: str, x: Tensor) -> Tensor:
        """Map a student hidden-space activation (.., D_S) to the teacher's space: x P^T (.., D_T)."""
        return x @ self.P[f"{i}_{which}"].t()


class _Capture:
    """Forward hooks recording q/k/v/o outputs and down_proj input/output per layer."""

    def __init__(self, model: nn.Module, names: dict[str, tuple[int, str]]):
        self.acts: dict[tuple[int, str], Tensor] = {}
        self.handles = []
        for name, (i, kind) in names.items():
            self.handles.append(model.get_submodule(name).register_forward_hook(self._make(i, kind)))

    def _make(self, i: int, kind: str):
        def hook(_m, args, out):
            if kind == "down_proj":
                self.acts[(i, "mlp_act")] = args[0]
                self.acts[(i, "mlp_out")] = out
            else:
                self.acts[(i, {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "attn_out"}[kind])] = out
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def teacher_targets(clone: LowRankClone, ids: Tensor) -> dict:
    """Teacher logits and activations for one batch (shared by every student trained on it)."""
    with _Capture(clone.teacher, clone.hook_names()) as cap:
        logits = clone.teacher(input_ids=ids, use_cache=False).logits
    return {"logits": logits, "acts": dict(cap.acts)}


def clone_losses(clone: LowRankClone, ids: Tensor, targets: dict, w: LossWeights) -> dict[str, Tensor]:
    """All loss terms for one batch; "total" is the weighted sum that trains."""
    with _Capture(clone.student, clone.hook_names()) as cap:
        logits = clone(ids)
    V = logits.shape[-1]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1))
    kl = kl_distill(logits, targets["logits"], w.temperature)
    terms: dict[str, Tensor] = {}
    for t in TERMS:
        vals = []
        for i in range(clone.n_layers):
            s = cap.acts[(i, t)]
            if t == "attn_out":
                s = clone.project_back(i, "o_proj", s)
            elif t == "mlp_out":
                s = clone.project_back(i, "down_proj", s)
            vals.append(relative_mse(s, targets["acts"][(i, t)]))
        terms[t] = torch.stack(vals).mean()
    clone_term = sum(w.terms.get(t, 0.0) * v for t, v in terms.items())
    total = w.ce * ce + w.kl * kl + w.clone * clone_term
    return {"total": total, "ce": ce.detach(), "kl": kl.detach(), "clone": clone_term.detach(),
            **{f"clone_{t}": v.detach() for t, v in terms.items()}}


@torch.no_grad()
def lm_ce(model: Callable[[Tensor], Tensor], windows: Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross entropy of logits = model(ids) over token windows (n, seq)."""
    tot, n = 0.0, 0
    for b in range(0, windows.shape[0], batch_size):
        ids = windows[b:b + batch_size]
        logits = model(ids)
        V = logits.shape[-1]
        tot += float(F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1), reduction="sum"))
        n += ids[:, 1:].numel()
    return tot / n


def batches(train: Tensor, steps: int, batch_size: int, seed: int):
    """`steps` batches (batch_size, seq) from epochs of a seeded shuffle of the rows of `train` (n, seq)."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(train.shape[0], generator=g).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        yield train[idx]


def train_lockstep(clones: list[LowRankClone], train: Tensor, steps: int, lr: float = 1e-4, batch_size: int = 4,
                   weights: LossWeights = LossWeights(), seed: int = 0, log: Callable[[str], None] | None = None) -> list[dict]:
    """Train several clones of one teacher on the same batch sequence (epochs of a seeded shuffle of
    `train` (n, seq)), one teacher forward per batch. Returns per clone {"loss": [...], "ce": [...],
    "seconds": ...}."""
    if not clones:
        return []
    opts = [torch.optim.Adam(c.parameters(), lr=lr) for c in clones]
    hist = [{"loss": [], "ce": [], "kl": [], "clone": [], "seconds": 0.0} for _ in clones]
    for step, ids in enumerate(batches(train, steps, batch_size, seed)):
        targets = teacher_targets(clones[0], ids)
        for c, opt, h in zip(clones, opts, hist):
            t0 = time.perf_counter()
            L = clone_losses(c, ids, targets, weights)
            opt.zero_grad(set_to_none=True)
            L["total"].backward()
            opt.step()
            h["seconds"] += time.perf_counter() - t0
            for k in ("ce", "kl", "clone"):
                h[k].append(float(L[k]))
            h["loss"].append(float(L["total"].detach()))
            if not math.isfinite(h["loss"][-1]):
                raise UserError(f"low-rank clone (hidden {c.hidden}): loss became non-finite at step {step + 1}: lower --lr")
        if log is not None and (step % 10 == 0 or step == steps - 1):
            log(f"step {step + 1}/{steps}: " + ", ".join(f"D_S={c.hidden} loss {h['loss'][-1]:.3f} ce {h['ce'][-1]:.3f}"
                                                        for c, h in zip(clones, hist)))
    return hist


def round_hidden(r: float, d_teacher: int, multiple: int = 32) -> int:
    return int(min(d_teacher, max(multiple, multiple * round(r / multiple))))


def pick_rank(rows: list[dict], n: int, d_teacher: int, multiple: int = 32) -> int | None:
    """r* = c sqrt(n) with c = r0 / sqrt(n0) from pilot rows {hidden, n, val_ce}, where r0 is the pilot's best
    rank; None when r0 is not strictly inside the swept ranks (an optimum at an end is not bracketed: the
    true one may lie beyond it, and a constant fitted there says nothing)."""
    hs = sorted(r["hidden"] for r in rows)
    best = min(rows, key=lambda r: r["val_ce"])
    if not hs[0] < best["hidden"] < hs[-1]:
        return None
    return round_hidden(rank_guideline(best["hidden"], best["n"], n), d_teacher, multiple)


def auto_hidden(teacher: nn.Module, train: Tensor, val: Tensor, candidates: tuple[int, ...], pilot_fraction: float = 0.25,
                pilot_steps: int = 20, lr: float = 1e-4, batch_size: int = 4, weights: LossWeights = LossWeights(),
                init: str = "pca", seed: int = 0, multiple: int = 32,
                log: Callable[[str], None] | None = None) -> tuple[int | None, list[dict]]:
    """`--hidden auto`: a pilot sweep over `candidates` on n0 = pilot_fraction * n training windows picks
    the best rank r0 by validation CE; the guideline r* = c sqrt(n), c = r0 / sqrt(n0) (arXiv 2603.22355),
    extrapolates to the full n. Returns (r* or None when the pilot's optimum is not bracketed, see pick_rank;
    sweep rows with train/val CE and gap).

    Measured (benchmarks/lrc_rank.py, SmolLM2, 4-64 windows): the held-out CE of LRC students falls with D_S
    all the way to D_T at every budget (a full-width clone *is* the teacher), so on real models the pilot's
    best is usually its largest candidate and no r* is returned: choose D_S for the size you need."""
    n = train.shape[0]
    n0 = max(batch_size, int(round(pilot_fraction * n)))
    if n0 > n:
        raise UserError(f"--hidden auto needs at least {batch_size} training windows, got {n}")
    pilot = train[:n0]
    basis = residual_basis(teacher, pilot[:PCA_WINDOWS]) if init == "pca" else None
    clones = [LowRankClone(teacher, h, init, pilot, seed, basis) for h in candidates]
    train_lockstep(clones, pilot, pilot_steps, lr, batch_size, weights, seed, log)
    rows = []
    for c in clones:
        tr, va = lm_ce(c, pilot, batch_size), lm_ce(c, val, batch_size)
        rows.append({"hidden": c.hidden, "n": n0, "train_ce": tr, "val_ce": va, "gap": va - tr})
    return pick_rank(rows, n, clones[0].d_teacher, multiple), rows
