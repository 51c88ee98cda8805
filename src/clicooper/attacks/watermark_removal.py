"""Watermark-removal attacks on a stolen watermarked chain, scored by ownership claims.

The scene (DESIGN §5, §7): a thief holds a copy of a finished clicooper run's whole
model, the data owner's head (``owner/head.safetensors``) followed by the trainers'
segments (``segments/<tN>.safetensors``), and tries to strip the trainers' watermarks
while keeping the model useful. Each trainer then claims its segment with its
watermark secret (``parties/<tN>/watermark.secret``) and what the ledger records
about its latest stage (:func:`clicooper.watermark.claim_inputs`); a claim holds when
``P[Binomial(B, 1/2) >= matching bits] <= claim_p_value``.

What the thief knows: the stolen weights and the architecture, the run's training
settings (learning rate, batch size, steps, watermark bits and strength) and a set of
fresh unlabelled images it can feed the model (by default half of the test split;
:class:`Lab` takes an explicit set instead, e.g. an evaluation's auxiliary images).
It does not know the trainers' secrets, the ledger links or which tensor carries the
mark beyond "the largest weight of each segment". It cannot decode the owner's
pseudo-classes into true labels, except in the ``true`` fine-tuning variant, which
plays a stronger thief that also holds the label secret and the images' labels.

Attacks (:func:`robustness`): fine-tuning the whole chain, magnitude pruning every
weight tensor of the segments, and overwriting the marks with the thief's own. Model
accuracy after an attack is measured with the owner's label decoding on held-out
test images; that is for scoring only, a thief cannot decode.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clicooper.attacks._common import train
from clicooper.attacks.removal import magnitude_prune
from clicooper.config import RunConfig
from clicooper.data import Dataset, Split
from clicooper.models.assembly import preset_factory
from clicooper.privacy.labels import LabelObfuscator
from clicooper.runtime.rundirs import RunDir
from clicooper.runtime.session import Session
from clicooper.runtime.verification import run_anchor, verify_run
from clicooper.watermark import (
    ClaimInputs,
    ClaimResult,
    InputMoments,
    Ledger,
    StageWatermark,
    VerifyReport,
    claim,
    claim_inputs,
    commitment,
    load_segment,
    new_watermark_secret,
)

State = dict[str, Tensor]
Loss = Callable[[nn.Module, Tensor], Tensor]  # (model, batch ids into the thief's images) -> loss
Row = dict[str, Any]

SECRET_FILE = "watermark.secret"  # = clicooper.parties.watermarking.SECRET_FILE
FINE_TUNE_FRACTIONS = (0.1, 0.2, 0.5)
PRUNE_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
OVERWRITE_FACTORS = (1, 10)
LOSSES = ("pseudo", "true")


@dataclass
class Claimant:
    """A trainer's claim material: its secret, what the ledger says about it, the tensor shape."""

    party: str
    secret: bytes
    inputs: ClaimInputs
    shape: tuple[int, ...]


class Lab:
    """A finished watermarked run as the thief and the owners see it.

    Loads the stolen chain (``stolen``: head then segments, as one ``nn.Sequential``),
    each trainer's claim material (``claimants``) and splits the images: ``fresh`` are
    the thief's images, ``held`` the test images accuracy is measured on.

    ``thief=None`` (default): a seeded half of the test split is the thief's, the other
    half is held out. ``thief`` given (a :class:`Split`, or an image tensor
    ``(N, C, H, W)`` when the thief has no labels): those are the thief's images, and
    accuracy is measured on the whole test split. Pass images disjoint from the
    owner's training data (e.g. the evaluation's auxiliary split).
    """

    def __init__(
        self,
        session: Session,
        run_dir: Path,
        cfg: RunConfig,
        seed: int,
        thief: Split | Tensor | None = None,
    ) -> None:
        self.run_dir, self.seed = Path(run_dir), seed
        self.data: Dataset = session.dataset
        self.cfg = cfg.model_copy(
            update={"batch_size": cfg.effective_batch_size(len(self.data.train))}
        )
        if session.owner is None or session.owner.labels is None:
            raise ValueError("the session has no data owner label mapping: run in clicooper mode")
        self.labels: LabelObfuscator = session.owner.labels
        # release once: the head file holds the frozen head, not the preset's (a copy of
        # the owner's module gives its architecture; its weights still come from the file)
        self.frozen_head = session.owner.head if cfg.privacy.release == "once" else None
        self.fresh_labels: Tensor | None
        if thief is None:
            gen = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(self.data.test), generator=gen)
            half = len(order) // 2
            fresh = self.data.test.subset(order[:half])
            self.fresh, self.fresh_labels = fresh.x, fresh.y
            self.held: Split = self.data.test.subset(order[half:])
        else:
            if isinstance(thief, Split):
                self.fresh, self.fresh_labels = thief.x, thief.y
            else:
                self.fresh, self.fresh_labels = thief, None
            if self.fresh.dim() != 4 or len(self.fresh) == 0:
                raise ValueError(
                    f"thief images must be a non-empty (N, C, H, W) tensor, got "
                    f"{tuple(self.fresh.shape)}"
                )
            self.held = self.data.test
        self.parties = [f"t{i}" for i in range(1, self.cfg.trainers + 1)]
        self.stolen = self.build()
        with Ledger.open(RunDir(self.run_dir).ledger, readonly=True) as ledger:
            anchor = run_anchor(self.run_dir)  # the lab's own run: its anchor file is trusted
            report = verify_run(self.run_dir, self.cfg.watermark, anchor=anchor, ledger=ledger)
            self.claimants = {p: self._claimant(ledger, p, report) for p in self.parties}
        steps_per_epoch = math.ceil(len(self.data.train) / self.batch_size)
        self.train_steps = self.cfg.epochs * steps_per_epoch
        self.stage_steps = self.cfg.watermark.stage_steps or steps_per_epoch

    @property
    def batch_size(self) -> int:
        assert self.cfg.batch_size is not None  # resolved in __init__
        return self.cfg.batch_size

    def _claimant(self, ledger: Ledger, party: str, report: VerifyReport) -> Claimant:
        inputs = claim_inputs(ledger, party, report)
        secret = (RunDir(self.run_dir).party(party) / SECRET_FILE).read_bytes()
        seg = load_segment(RunDir(self.run_dir).segment(party))
        return Claimant(party, secret, inputs, tuple(seg[inputs.param_name].shape))

    def build(self) -> nn.Sequential:
        """The whole stolen chain: the owner's head file and the trainers' segment files."""
        split = preset_factory(self.cfg, self.data)(self.labels.pseudo_classes)
        if self.frozen_head is not None:
            split.head = copy.deepcopy(self.frozen_head)
        split.head.load_state_dict(load_segment(RunDir(self.run_dir).owner / "head.safetensors"))
        for party, seg in zip(self.parties, split.segments, strict=True):
            seg.load_state_dict(load_segment(RunDir(self.run_dir).segment(party)))
        return split.full()

    def segments(self, model: nn.Sequential) -> dict[str, State]:
        """Each trainer's segment state in ``model`` (module 0 is the head)."""
        return {p: copy_state(model[i + 1]) for i, p in enumerate(self.parties)}

    def claim(
        self, party: str, state: State, secret: bytes | None = None, own_commitment: bool = False
    ) -> ClaimResult:
        """``party``'s claim on ``state`` with its ledger inputs.

        ``secret`` replaces the trainer's own (an outsider's claim); ``own_commitment``
        checks it against its own commitment instead of the ledger's, so that the
        binomial test alone decides.
        """
        c = self.claimants[party]
        secret = c.secret if secret is None else secret
        com = commitment(secret) if own_commitment else c.inputs.commitment
        wm = self.cfg.watermark
        return claim(
            state,
            secret,
            com,
            c.inputs.prev_link,
            c.inputs.party_index,
            c.inputs.stage,
            c.inputs.param_name,
            wm.bits,
            wm.claim_p_value,
            c.shape,
        )

    def accuracy(self, model: nn.Module) -> float:
        """True-label accuracy on the held-out images, decoded with the owner's secret mapping."""
        model.eval()
        with torch.no_grad():
            scores = torch.cat(
                [self.labels.decode_logits(model(x)) for x in self.held.x.split(1024)]
            )
        model.train()
        return float((scores.argmax(1) == self.held.y).float().mean())

    def row(
        self, attack: str, steps: int, model: nn.Module, states: dict[str, State], **extra: Any
    ) -> Row:
        """``{"attack", "steps", "accuracy", <party>: {"ber", "p_value", "holds"}, **extra}``."""
        row: Row = {"attack": attack, "steps": steps, "accuracy": self.accuracy(model)}
        for party, state in states.items():
            result = self.claim(party, state)
            row[party] = {"ber": result.ber, "p_value": result.p_value, "holds": result.holds}
        row.update(extra)
        return row


def copy_state(module: nn.Module) -> State:
    """A detached copy of ``module``'s state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _batches(
    n: int, steps: int, batch_size: int, seed: int, at: dict[int, Callable[[], None]] | None
) -> Iterator[Tensor]:
    """``steps`` batches of seeded shuffled ids in ``range(n)``; ``at[k]()`` after step k."""
    gen = torch.Generator().manual_seed(seed)
    batches: list[Tensor] = []
    for step in range(1, steps + 1):
        if not batches:
            batches = list(torch.randperm(n, generator=gen).split(batch_size))
        yield batches.pop()  # the consumer takes its optimiser step before asking again
        if at and step in at:
            at[step]()


def train_chain(
    model: nn.Module,
    loss: Loss,
    n: int,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    at: dict[int, Callable[[], None]] | None = None,
) -> None:
    """``steps`` Adam steps on ``loss(model, ids)`` over seeded shuffled batches of ``range(n)``.

    ``at[k]`` is called after step k.
    """
    train(
        model.parameters(),
        lambda ids: loss(model, ids),
        _batches(n, steps, batch_size, seed, at),
        lr,
    )


def thief_losses(lab: Lab) -> dict[str, Loss]:
    """Fine-tuning targets on the thief's images.

    ``pseudo``: cross-entropy on the stolen model's own arg-max pseudo-classes (what a
    thief can do); ``true``: NLL of the true labels through the owner's decoding (a
    stronger thief that also holds the label secret; only when the images have labels).
    """
    x, y = lab.fresh, lab.fresh_labels
    with torch.no_grad():
        pseudo = lab.stolen.eval()(x).argmax(1)
    lab.stolen.train()
    losses: dict[str, Loss] = {
        "pseudo": lambda m, ids: nn.functional.cross_entropy(m(x[ids]), pseudo[ids]),
    }
    if y is not None:
        losses["true"] = lambda m, ids: nn.functional.nll_loss(
            lab.labels.decode_logits(m(x[ids])), y[ids]
        )
    return losses


def robustness(
    lab: Lab,
    fine_tune_fractions: Sequence[float] = FINE_TUNE_FRACTIONS,
    prune_fractions: Sequence[float] = PRUNE_FRACTIONS,
    overwrite_factors: Sequence[float] = OVERWRITE_FACTORS,
    losses: Sequence[str] = LOSSES,
) -> list[Row]:
    """The trainers' claims on the stolen chain as is and after each attack, one row each.

    - fine-tuning: for each loss in ``losses`` (see :func:`thief_losses`), Adam on the
      whole chain with the run's lr and batch size over the thief's images, read after
      ``fraction * lab.train_steps`` steps for each of ``fine_tune_fractions`` (one
      training per loss, reported at each mark);
    - pruning: zero the smallest ``fraction`` of every weight tensor (rank >= 2) of
      every segment, for each of ``prune_fractions``;
    - overwriting: :func:`overwrite` at ``factor`` times the run's strength, for each
      of ``overwrite_factors``.

    Rows are as :meth:`Lab.row`; the first is ``"none (stolen as is)"``.
    """
    available = thief_losses(lab)
    unknown = [name for name in losses if name not in available]
    if unknown:
        raise ValueError(
            f"losses {unknown} are not available; choose from {sorted(available)} "
            "('true' needs thief images with labels)"
        )
    cfg = lab.cfg
    rows = [lab.row("none (stolen as is)", 0, lab.stolen, lab.segments(lab.stolen))]
    n = len(lab.fresh)
    for name in losses if fine_tune_fractions else ():
        model = copy.deepcopy(lab.stolen)
        marks = {max(1, round(f * lab.train_steps)): f for f in fine_tune_fractions}

        def report(k: int, f: float, name: str = name, model: nn.Module = model) -> None:
            label = f"fine-tune {f:.0%} ({name} labels)"
            rows.append(lab.row(label, k, model, lab.segments(model)))

        hooks = {k: (lambda k=k, f=f: report(k, f)) for k, f in marks.items()}
        train_chain(model, available[name], n, max(marks), cfg.lr, lab.batch_size, lab.seed, hooks)
    for fraction in prune_fractions:
        pruned = copy.deepcopy(lab.stolen)
        for i, state in enumerate(lab.segments(pruned).values()):
            pruned[i + 1].load_state_dict(magnitude_prune(state, fraction))
        rows.append(
            lab.row(f"prune {fraction:.0%} of each weight", 0, pruned, lab.segments(pruned))
        )
    for factor in overwrite_factors:
        rows.append(overwrite(lab, available["pseudo"], cfg.watermark.strength * factor, factor))
    return rows


def overwrite(lab: Lab, loss: Loss, strength: float, factor: float) -> Row:
    """A thief embeds its own fresh stage watermark in every marked tensor, for one stage.

    The thief draws a new secret and link per segment and trains the whole chain for
    ``lab.stage_steps`` steps on ``loss`` plus this library's regulariser at
    ``strength`` (the run's own tensors, bits and embedding), then seals its bits with the
    least correction an honest trainer's stage end applies (with ``seal_metric`` "inputs",
    measured on the marked layers' inputs during the thief's stage). The row adds
    ``thief_ber``: how well the thief's own marks took, per trainer's segment.
    """
    model = copy.deepcopy(lab.stolen)
    wm = lab.cfg.watermark
    thieves, inputs = {}, {}
    for i, party in enumerate(lab.parties):
        c = lab.claimants[party]
        thieves[party] = StageWatermark.derive(
            new_watermark_secret(),
            os.urandom(32),
            i + 1,
            1,
            c.inputs.param_name,
            math.prod(c.shape),
            wm.bits,
            strength,
        )
        if wm.seal_metric == "inputs":
            inputs[party] = InputMoments(model[i + 1], c.inputs.param_name)

    def marked_loss(m: nn.Module, ids: Tensor) -> Tensor:
        marks = sum(mark.regulariser(m[i + 1]) for i, mark in enumerate(thieves.values()))
        return loss(m, ids) + marks

    train_chain(
        model,
        marked_loss,
        len(lab.fresh),
        lab.stage_steps,
        lab.cfg.lr,
        lab.batch_size,
        lab.seed + 1,
    )
    for i, (party, mark) in enumerate(thieves.items()):  # as an honest trainer does, the seal
        mark.seal(model[i + 1], inputs=inputs.get(party), ridge=wm.seal_ridge)
    for moments in inputs.values():
        moments.detach()
    segs = lab.segments(model)
    own = {p: thieves[p].ber(segs[p]) for p in lab.parties}
    label = f"overwrite ({factor:g}x strength, pseudo labels)"
    return lab.row(label, lab.stage_steps, model, segs, thief_ber=own)
