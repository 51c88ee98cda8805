"""White-box weight watermark (Uchida et al., ICMR 2017).

A trainer marks one weight tensor ``W`` of its segment, flattened to
``w in R^d``. For stage ``t`` it holds a secret projection ``A in R^{B x d}``
(entries i.i.d. N(0, 1), generated from ``HKDF(w_i, t)``) and target bits
``b in {0, 1}^B``. Training adds the regulariser

    E_R(w) = lambda * sum_j BCE(sigmoid((A w)_j), b_j)

to the task loss (a sum over bits, as in Uchida et al., so lambda = 0.01 works
with B = 256 against an ordinary task loss; a mean would need lambda ~ B times
larger), and extraction reads ``b_hat_j = [(A w)_j > 0]``. The bit
error rate is ``BER = (1/B) * sum_j [b_hat_j != b_j]``. For weights that never
saw ``(A, b)``, each ``b_hat_j`` is a fair coin independent of ``b_j``, so the
number of matching bits is Binomial(B, 1/2) and BER is about 0.5.

Cost: ``A`` holds ``B * d`` float32 numbers, so mark a tensor of moderate size
(a 16k-weight layer and B = 256 give a 16 MB matrix).
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
_TINY = 1e-12


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
    """One stage's watermark: parameter name, projection ``A`` (B x d), bits ``b``, lambda."""

    param_name: str
    matrix: torch.Tensor
    bits: torch.Tensor
    strength: float
    margin: float = DEFAULT_MARGIN

    def __post_init__(self) -> None:
        if self.matrix.dim() != 2 or self.bits.shape != (self.matrix.shape[0],):
            raise ValueError(
                f"matrix must be (B, d) and bits (B,); got {tuple(self.matrix.shape)} "
                f"and {tuple(self.bits.shape)}"
            )

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
        matrix = self.matrix.to(device=flat.device, dtype=flat.dtype)
        return matrix @ flat

    def regulariser(self, module: nn.Module) -> torch.Tensor:
        """``lambda * sum_j BCEWithLogits(c_j, b_j)`` on margin-capped normalised logits.

        ``u = A w / ||w||`` (norm detached) and ``c_j = min(u_j, kappa)`` for ``b_j = 1``,
        ``max(u_j, -kappa)`` for ``b_j = 0``; differentiable in ``w``, zero gradient for
        bits already ``kappa`` deep on their side.
        """
        weight = _weight(module, self.param_name)
        scores = self._logits(weight) / weight.detach().norm().clamp_min(_TINY)
        bits = self.bits.to(device=scores.device, dtype=scores.dtype)
        capped = torch.where(
            bits > 0, scores.clamp(max=self.margin), scores.clamp(min=-self.margin)
        )
        return self.strength * F.binary_cross_entropy_with_logits(capped, bits, reduction="sum")

    def extract(self, state_or_module: StateOrModule) -> torch.Tensor:
        """Bool bits ``(A w) > 0`` read from a module or a state dict."""
        with torch.no_grad():
            weight = _weight(state_or_module, self.param_name).detach().to("cpu", torch.float32)
            return self._logits(weight) > 0

    def ber(self, state_or_module: StateOrModule) -> float:
        """Fraction of extracted bits that differ from ``b``."""
        wrong = self.extract(state_or_module) != self.bits.to(torch.bool)
        return float(wrong.float().mean())
