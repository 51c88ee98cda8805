"""White-box weight watermark (Uchida et al., ICMR 2017) with a margin cap.

A trainer marks one weight tensor ``W`` of its segment, flattened to
``w in R^d``. For stage ``t`` it holds a secret projection ``A in R^{B x d}``
(entries i.i.d. N(0, 1), generated from ``HKDF(w_i, t)``) and target bits
``b in {0, 1}^B``; write ``s_j = 2 b_j - 1``. Training adds the regulariser

    E_R(w) = lambda * sum_j BCE(sigmoid(c_j), b_j),
    c_j = s_j * min(s_j u_j, kappa),   u = A w / ||w||   (||w|| held constant)

to the task loss, and extraction reads ``b_hat_j = [(A w)_j > 0] = [u_j > 0]``.
The bit error rate is ``BER = (1/B) * sum_j [b_hat_j != b_j]``. For weights that
never saw ``(A, b)``, ``u_j = A_j . w / ||w||`` is N(0, 1) and each ``b_hat_j`` is a
fair coin independent of ``b_j``, so the number of matching bits is Binomial(B, 1/2)
and BER is about 0.5.

Why normalise and cap (Uchida's loss is the case ``u = A w``, ``kappa = inf``):

- ``u_j`` has unit standard deviation under the null for every layer size and
  weight scale, so the margin ``kappa`` means the same everywhere: a bit that is
  ``kappa`` deep flips under a later change ``dw`` only if ``s_j A_j . dw < -kappa ||w||``;
  for a random ``dw`` that is ``P[N(0, 1) > kappa ||w|| / ||dw||]``.
- The target bits change every stage (DESIGN §5), so every stage must move ``w``
  until about half of its bits flip. The plain BCE never stops pushing (its
  gradient on a satisfied bit shrinks, but Adam rescales it per coordinate), which
  grows ``A w`` all stage long and costs accuracy (0.972 -> 0.906 test accuracy on
  digits at lambda = 0.01). With the cap, a bit ``kappa`` deep adds the constant
  ``softplus(-kappa)`` and no gradient, so a stage moves ``w`` about as little as
  the bits need: the least change that puts every bit ``kappa`` deep has norm about
  ``sqrt(B E[(kappa - Z)_+^2] / d) ||w||`` with Z ~ N(0, 1) (0.23 ||w|| for B = 256,
  d = 5120, kappa = 0.5).

Lazy schedule (cost): ``A`` holds ``B * d`` float32 numbers (16 MB for a 16k-weight
layer and B = 256), and reading it twice a step (``A w``, then ``A^T g``) costs about
1.5 ms of CPU for d = 8192. Between stage starts the bits only need guarding, so a
mark that has every bit ``kappa`` deep rests: it returns its last value with a zero
gradient and re-reads ``A w`` only every ``recheck`` calls (default 8); when some bit
has slipped below ``kappa / 2`` it pushes again until every bit is ``kappa`` deep.
Bits therefore stay at least about ``kappa / 2`` deep once placed.

Defaults ``lambda = 0.01``, ``kappa = 0.5``, measured in paired runs (same seed,
noise stream and label secret, with and without the mark):

- Fashion-MNIST, CNN preset, 5 epochs of 469 steps, one stage per epoch: test
  accuracy 0.8964 and 0.8950 with the mark against 0.8961 and 0.8967 without
  (seeds 0, 1), BER 0 at every stage. lambda = 0.003 costs no more (0.8956,
  0.8970) and places each stage's bits within 120 steps.
- Digits, MLP, 10 stages of 45 steps: lambda = 0.003 leaves BER 0.19 to 0.27 in
  the late stages; 0.01 verifies every stage (0.947 and 0.964 against 0.972 and
  0.972; the plain BCE at 0.01 gave 0.906).

Schedules (``watermark.schedule``). ``"seal"`` (the default) leaves the regulariser
off during training and relies on :meth:`StageWatermark.seal` at each stage's end:
the least-norm change that puts every bit ``kappa`` deep. Adam moves every
coordinate of ``w`` by about its learning rate a step whatever the gradient's size,
so the regulariser walks ``w`` along the dense sign pattern of ``A^T s`` (norm about
``lr sqrt(d)`` a step) where the seal moves it only within the row space of the
shallow bits' ``A_j``. Measured with benchmarks/equal_budget.py (digits, MLP, 3
trainers, 5 epochs, validation split, 3 runs with fresh secrets, vanilla 0.892):
regulariser all stage long (``"always"``) median 0.453, worst 0.449; ``"seal"``
0.840 and 0.815; no watermark 0.829 and 0.784. Every stage verified (BER 0) with
both. ``"always"`` keeps the older behaviour for comparison.

Seal metric (``watermark.seal_metric``). The least change of the *weights* is not the
least change of what the layer computes: a linear layer ``y = W h + c`` sees inputs
``h`` that fill only part of their space (ReLU features of a smaller cut), and
``E ||dW (h - mu)||^2 = tr(dW Sigma dW^T)`` is small for a change along the directions
of low input variance. ``"inputs"`` (the default) has the trainer keep the moments of
its marked layer's training inputs over the stage (:class:`InputMoments`, a forward
pre-hook) and seal with the metric ``Sigma + ridge tr(Sigma)/n_in I`` (ridge 0.01), the
bias taking ``-dW mu``; ``"weights"`` is the plain least norm (and the fallback for a
tensor that is not a linear layer's weight). Measured on a trained Fashion-MNIST chain
(CNN, 2 trainers, K 2, 2 epochs; one seal of fresh bits in both trainers' tensors,
four draws, validation accuracy lost in points): ``"weights"`` B 256: 0.38, -0.06,
0.42, -0.38, B 128: -0.17, 0.20, 0.07, 0.00; ``"inputs"`` ridge 0.01 B 256: 0.01,
0.02, 0.02, 0.00, B 128: -0.01, 0.02, 0.01, -0.01 (ridge 0.1: up to 0.05; ridge 1:
0.08 to 0.15). Fine-tuning moves ``W`` by ``g h^T``, within the span of the inputs; on
that chain every claim held after the evaluation's fine-tuning, pruning and overwriting
at B 128 (worst BER 0.117; benchmarks/defaults_calibration.md).

Adam moves each weight by at most about its learning rate per step, so a stage
needs enough steps whatever lambda is: on digits (lr 1e-3) 25 steps a stage
always reached BER <= 0.05 and 20 or fewer often did not, at lambda from 0.003 to
0.1. Later stages need more steps than early ones (the weights grow), so many
short stages want a larger lambda: 20 stages of 31 steps verify at 0.03.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from torch import nn
from torch.nn import functional as F

from clicooper.watermark.chain import target_bits

PROJECTION_INFO = b"clicooper-v1/watermark/projection/"

StateOrModule = nn.Module | dict[str, torch.Tensor]
DEFAULT_STRENGTH = 0.01
DEFAULT_MARGIN = 0.5
DEFAULT_RECHECK = 8
MIN_WEIGHTS_PER_BIT = 16
DEFAULT_RIDGE = 0.01
_TINY = 1e-12


MIN_STAGE_STEPS = 25


class WatermarkWarning(UserWarning):
    """A watermark setting that costs accuracy: a tensor small for B, stages too short."""


def stage_note(steps: int) -> str | None:
    """A one-line warning when stages are shorter than ``MIN_STAGE_STEPS`` steps, else None.

    Adam moves each weight by about its learning rate a step, so the regulariser needs
    about 25 steps to place a stage's bits (measured on digits, lambda 0.003 to 0.1);
    in shorter stages the stage-end seal places the rest with one jump of the weights.
    Digits, MLP, 10 epochs of 45 steps: one stage an epoch 0.981 test accuracy; stages
    of 10 steps 0.933 (45 stages); of 5 steps 0.836 (90 stages, 25,662 bits sealed).
    """
    if steps >= MIN_STAGE_STEPS:
        return None
    return (
        f"watermark stages of {steps} steps are shorter than the {MIN_STAGE_STEPS} the "
        f"regulariser needs to place the bits; the stage-end seal jumps the weights instead "
        f"and costs accuracy: set watermark.stage_steps to {MIN_STAGE_STEPS} or more"
    )


def capacity_note(party: str, dim: int, n_bits: int, margin: float = DEFAULT_MARGIN) -> str | None:
    """A one-line warning when ``dim < MIN_WEIGHTS_PER_BIT * n_bits``, else None.

    Each stage moves ``w`` by about ``sqrt(B E[(kappa - Z)_+^2] / d) ||w||`` (module
    docstring); below 16 weights a bit that is over 25% of ``||w||`` at kappa = 0.5.
    Measured on examples/custom_model.py (digits, 12 stages, tensors of 1,536 and
    1,280 weights): 256 bits gave test accuracy 0.46 to 0.61, 64 bits 0.89, no mark 0.88.
    """
    if dim >= MIN_WEIGHTS_PER_BIT * n_bits:
        return None
    z = torch.distributions.Normal(0.0, 1.0)
    k = torch.tensor(float(margin))
    shortfall = (k**2 + 1) * z.cdf(k) + k * z.log_prob(k).exp()  # E[(kappa - Z)_+^2]
    move = float((n_bits * shortfall / dim).sqrt())
    fitting = max(16, dim // MIN_WEIGHTS_PER_BIT)
    return (
        f"{party} marks a tensor of {dim} weights with {n_bits} bits: each stage moves it by "
        f"about {move:.0%} of its norm and costs accuracy; set watermark.bits to {fitting} "
        f"or less, or give the segment a larger layer"
    )


def select_weight(module: nn.Module, name: str | None = None) -> str:
    """Name of the parameter to mark: ``name`` if given, else the largest by numel.

    Ties go to the first in ``named_parameters`` order. ValueError when ``name``
    is not a parameter of ``module`` or the module has none.
    """
    params = dict(module.named_parameters())
    if not params:
        raise ValueError("the segment has no parameters to watermark")
    if name is None:
        return max(params, key=lambda key: params[key].numel())  # max keeps the first of ties
    if name not in params:
        raise ValueError(f"no parameter {name!r} in the segment; valid names: {', '.join(params)}")
    return name


def projection(secret: bytes, stage: int, n_bits: int, dim: int) -> torch.Tensor:
    """``A``: an ``(n_bits, dim)`` float32 matrix of N(0, 1) entries.

    Drawn by a CPU ``torch.Generator`` seeded with the 8 bytes (big-endian, top bit
    cleared) of ``HKDF-SHA256(secret, salt=None, info=PROJECTION_INFO | ascii(stage))``.
    """
    if not secret:
        raise ValueError("watermark secret must be non-empty bytes")
    if stage < 1 or n_bits < 1 or dim < 1:
        raise ValueError(f"need stage, n_bits, dim >= 1 (got {stage}, {n_bits}, {dim})")
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=8,
        salt=None,
        info=PROJECTION_INFO + str(stage).encode("ascii"),
    )
    seed = int.from_bytes(hkdf.derive(bytes(secret)), "big") >> 1
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn((n_bits, dim), generator=generator, dtype=torch.float32)


def _weight(state_or_module: StateOrModule, name: str) -> torch.Tensor:
    if isinstance(state_or_module, nn.Module):
        tensors = dict(state_or_module.named_parameters())
        tensors = tensors if name in tensors else state_or_module.state_dict()
    else:
        tensors = state_or_module
    if name not in tensors:
        raise ValueError(
            f"no tensor {name!r} to read the watermark from; have: {', '.join(tensors)}"
        )
    return tensors[name]


@dataclass(eq=False)
class StageWatermark:
    """One stage's watermark: parameter name, projection ``A`` (B x d), bits ``b``, lambda.

    ``margin`` is kappa and ``recheck`` the resting period of the lazy schedule; the
    object keeps the schedule's state, so use one per trainer and stage.
    """

    param_name: str
    matrix: torch.Tensor
    bits: torch.Tensor
    strength: float
    margin: float = DEFAULT_MARGIN
    recheck: int = DEFAULT_RECHECK

    def __post_init__(self) -> None:
        if self.matrix.dim() != 2 or self.bits.shape != (self.matrix.shape[0],):
            raise ValueError(
                f"matrix must be (B, d) and bits (B,); got {tuple(self.matrix.shape)} "
                f"and {tuple(self.bits.shape)}"
            )
        if self.margin < 0 or self.recheck < 1:
            raise ValueError(
                f"need margin >= 0 and recheck >= 1 (got {self.margin}, {self.recheck})"
            )
        self._signs = self.bits.to(torch.float32) * 2 - 1  # s_j = 2 b_j - 1
        self._pushing, self._rest, self._value = True, 0, 0.0

    @classmethod
    def derive(
        cls,
        secret: bytes,
        prev_link: bytes,
        party_index: int,
        stage: int,
        param_name: str,
        dim: int,
        n_bits: int = 256,
        strength: float = DEFAULT_STRENGTH,
        margin: float = DEFAULT_MARGIN,
        recheck: int = DEFAULT_RECHECK,
    ) -> StageWatermark:
        """The watermark of trainer ``party_index`` for ``stage`` after link ``prev_link``.

        ``A = projection(secret, stage, n_bits, dim)`` and
        ``b = target_bits(secret, prev_link, party_index, stage, n_bits)``.
        """
        return cls(
            param_name=param_name,
            matrix=projection(secret, stage, n_bits, dim),
            bits=target_bits(secret, prev_link, party_index, stage, n_bits),
            strength=float(strength),
            margin=float(margin),
            recheck=int(recheck),
        )

    @property
    def n_bits(self) -> int:
        return int(self.bits.shape[0])

    def _logits(self, weight: torch.Tensor) -> torch.Tensor:
        flat = weight.reshape(-1)
        if flat.numel() != self.matrix.shape[1]:
            raise ValueError(
                f"tensor {self.param_name!r} has {flat.numel()} entries but the projection "
                f"expects {self.matrix.shape[1]}: the segment's shape changed"
            )
        return self.matrix.to(flat) @ flat

    def regulariser(self, module: nn.Module) -> torch.Tensor:
        """``lambda * sum_j BCEWithLogits(c_j, b_j)``, differentiable in ``w``; see the module.

        ``u = A w / ||w||`` (norm detached), ``s_j = 2 b_j - 1`` and the capped logit
        ``c_j = s_j * min(s_j u_j, kappa)``: a bit already ``kappa`` deep on its side adds
        the constant ``softplus(-kappa)`` and no gradient. Lazy schedule: once every bit
        is ``kappa`` deep the mark rests (value only, zero gradient) and re-reads ``A w``
        every ``recheck`` calls; it pushes again, until every bit is ``kappa`` deep, when
        some bit is less than ``kappa / 2`` deep.
        """
        weight = _weight(module, self.param_name)
        if not self._pushing and self._rest > 0:
            self._rest -= 1
            return weight.sum() * 0 + self._value
        scale = 1.0 / max(float(weight.detach().norm()), _TINY)
        signed = self._logits(weight) * self._signs.to(weight) * scale  # s_j u_j
        depth = float(signed.detach().min())
        self._pushing = depth < (self.margin if self._pushing else self.margin / 2)
        capped = signed.clamp(max=self.margin)  # s_j c_j; BCE(c_j, b_j) = softplus(-s_j c_j)
        value = self.strength * F.softplus(-capped).sum()
        if self._pushing:
            return value
        self._rest, self._value = self.recheck - 1, float(value.detach())
        return weight.sum() * 0 + self._value

    def seal(
        self,
        module: nn.Module,
        max_rounds: int = 8,
        inputs: InputMoments | None = None,
        ridge: float = DEFAULT_RIDGE,
    ) -> int:
        """Put every bit at least ``kappa / 2`` deep with the least change to ``w``.

        For the shallow bits ``V`` this solves ``min dw^T M dw  s.t.
        s_j A_j . (w + dw) = kappa ||w||  (j in V)`` and repeats (``||w||`` moves a
        little) up to ``max_rounds`` times. ``inputs`` None (or without samples):
        ``M = I``, the least change of the weights (``torch.linalg.lstsq``, driver
        gelsd, minimum norm). ``inputs`` given, for a linear layer ``y = W h + c``:
        ``M = I_out (x) (Sigma + ridge tr(Sigma)/n_in I)`` with ``Sigma`` the covariance
        of the layer's training inputs ``h`` (:meth:`InputMoments.whitener`), so
        ``dw^T M dw`` is ``E ||dW (h - mu)||^2`` plus the ridge: the least change of the
        layer's outputs on the data it trains on, and the bias takes ``dc = -dW mu``
        (the mean shift). With ``P = (Sigma + ridge ...)^(-1/2)`` and ``dW = V P`` this
        is the minimum-norm problem in ``V`` with rows ``A_j P``. Returns how many bits
        were shallow before the first round; 0 leaves the segment untouched.
        """
        weight = _weight(module, self.param_name)
        whitener = inputs.whitener(ridge) if inputs is not None else None
        with torch.no_grad():
            flat = weight.detach().reshape(-1).to("cpu", torch.float64)  # gelsd: CPU only
            start = flat.clone()
            matrix = self.matrix.to(torch.float64)
            signs = self._signs.to(torch.float64)
            shallow_at_start = 0
            for round_ in range(max_rounds):
                norm = max(float(flat.norm()), _TINY)
                depth = signs * (matrix @ flat) / norm
                shallow = depth < self.margin / 2
                if round_ == 0:
                    shallow_at_start = int(shallow.sum())
                if not shallow.any():
                    break
                wanted = signs[shallow] * (self.margin - depth[shallow]) * norm
                flat = flat + _least_change(matrix[shallow], wanted, whitener)
            if shallow_at_start:
                weight.copy_(flat.reshape(weight.shape).to(weight.dtype))
                if whitener is not None and inputs is not None:
                    inputs.shift_bias((flat - start).reshape(weight.shape), whitener[1])
        self._pushing, self._rest = False, 0
        return shallow_at_start

    def extract(self, state_or_module: StateOrModule) -> torch.Tensor:
        """Bool bits ``(A w) > 0`` read from a module or a state dict."""
        with torch.no_grad():
            weight = _weight(state_or_module, self.param_name).detach().to("cpu", torch.float32)
            return self._logits(weight) > 0

    def ber(self, state_or_module: StateOrModule) -> float:
        """Fraction of extracted bits that differ from ``b``."""
        wrong = self.extract(state_or_module) != self.bits.to(torch.bool)
        return float(wrong.float().mean())


def _least_change(
    rows: torch.Tensor, wanted: torch.Tensor, whitener: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """The ``dw`` of least ``dw^T M dw`` with ``rows @ dw = wanted`` (see ``seal``)."""
    if whitener is None:
        return torch.linalg.lstsq(rows, wanted.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    root = whitener[0]  # P, (n_in, n_in), symmetric
    n_in = root.shape[0]
    shaped = rows.reshape(len(rows), -1, n_in) @ root  # rows of (A_j as W's shape) P
    v = torch.linalg.lstsq(shaped.reshape(len(rows), -1), wanted.unsqueeze(1), driver="gelsd")
    return (v.solution.reshape(-1, n_in) @ root).reshape(-1)


class InputMoments:
    """Running moments of the inputs of the linear layer that owns a marked weight.

    A forward pre-hook on that ``nn.Linear`` adds, for every training forward (grad
    enabled, module in train mode), the count ``n``, the sum ``sum h`` and
    ``sum h h^T`` of its inputs (float64, on the CPU). ``layer`` is None when the marked
    tensor is not a linear layer's weight: the seal then falls back to the least change
    of the weights. Inference passes and evaluation do not count.
    """

    def __init__(self, module: nn.Module, param_name: str) -> None:
        path, _, attr = param_name.rpartition(".")
        owner = module.get_submodule(path) if path else module
        self.layer: nn.Linear | None = (
            owner if isinstance(owner, nn.Linear) and attr == "weight" else None
        )
        self.reset()
        if self.layer is not None:
            self._handle = self.layer.register_forward_pre_hook(self._observe)

    def reset(self) -> None:
        """Forget every sample (a new stage)."""
        n_in = self.layer.in_features if self.layer is not None else 0
        self.count = 0
        self.total = torch.zeros(n_in, dtype=torch.float64)
        self.outer = torch.zeros(n_in, n_in, dtype=torch.float64)

    def detach(self) -> None:
        """Remove the hook."""
        if self.layer is not None:
            self._handle.remove()

    def _observe(self, layer: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if not (torch.is_grad_enabled() and layer.training):
            return
        h = args[0].detach().reshape(-1, self.total.shape[0]).to("cpu", torch.float64)
        self.count += h.shape[0]
        self.total += h.sum(0)
        self.outer += h.T @ h

    def whitener(self, ridge: float = DEFAULT_RIDGE) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(P, mu)``: ``P = (Sigma + ridge tr(Sigma)/n_in I)^(-1/2)`` and the mean ``mu``.

        ``Sigma`` is the covariance (the second moment when the layer has no bias: nothing
        can absorb a mean shift, and ``mu`` is then 0). None without a layer or samples.
        """
        if self.layer is None or self.count < 2:
            return None
        mean = self.total / self.count
        if self.layer.bias is None:
            cov, mean = self.outer / self.count, torch.zeros_like(mean)
        else:
            cov = self.outer / self.count - torch.outer(mean, mean)
        floor = max(ridge * float(cov.diagonal().sum()) / len(mean), _TINY)
        values, vectors = torch.linalg.eigh(cov + floor * torch.eye(len(mean), dtype=cov.dtype))
        root = vectors @ torch.diag(values.clamp(min=floor).rsqrt()) @ vectors.T
        return root, mean

    def shift_bias(self, delta: torch.Tensor, mean: torch.Tensor) -> None:
        """Add ``-delta @ mean`` to the layer's bias: the outputs keep their mean on the data."""
        if self.layer is not None and self.layer.bias is not None:
            bias = self.layer.bias
            with torch.no_grad():
                bias.sub_((delta @ mean).to(bias.device, bias.dtype))

    def state(self) -> dict[str, object]:
        """The moments as JSON (float64 lists round-trip exactly): for a checkpoint."""
        return {"count": self.count, "total": self.total.tolist(), "outer": self.outer.tolist()}

    def load_state(self, state: dict[str, object]) -> None:
        """Inverse of :meth:`state`; an empty state resets."""
        self.reset()
        if state and self.layer is not None:
            self.count = int(state["count"])  # type: ignore[call-overload]
            self.total = torch.tensor(state["total"], dtype=torch.float64)
            self.outer = torch.tensor(state["outer"], dtype=torch.float64)
