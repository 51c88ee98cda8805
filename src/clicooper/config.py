"""Run configuration: one validated pydantic model, loadable from TOML and flags.

Every field has a safe default; ``RunConfig.load`` merges a TOML file with
explicit overrides and turns validation failures into one-line errors.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

Mode = Literal["centralized", "vanilla", "clicooper"]


class ConfigError(ValueError):
    """A bad setting; the message names it and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


#: (training samples, small noise, large noise): an unset noise_multiplier is 0.1 below
#: 30,000 training samples, else 0.2. Chosen on validation splits (benchmarks/
#: defaults_calibration.md): 0.2 cost 20 points on digits (CNN, 3 trainers, 5 epochs) and
#: 11 in one 1-epoch run on 12,000 Fashion-MNIST images; on 48,000 every run stayed within
#: 2 points of vanilla, and on full Fashion-MNIST it kept the evaluation's query decoder
#: under the class-mean floor (SSIM 0.371 < 0.402; 0.449 at 0.1).
NOISE_BY_SIZE: tuple[int, float, float] = (30_000, 0.1, 0.2)


#: The epsilon (at ``delta``) release once aims at when no noise setting is given. Chosen
#: on validation (full Fashion-MNIST, cnn-light, the last 5,000 training images held out):
#: 0.8848 at epsilon 2 against 0.8806 at issue 10's 8, so the smaller of the two that
#: keeps the accuracy; there the white-box data-free inversion scores its no-information
#: floor (SSIM 0.047 against unpaired reconstructions 0.046; README "Release once").
ONCE_TARGET_EPSILON = 2.0


#: (training records, below, from): an unset ``privacy.release`` is "every-epoch" below
#: 30,000 training records and "once" from there (issue 10, point 8). Full Fashion-MNIST
#: (cnn-light, epsilon 8; README "Release once"): test 0.876-0.878, owner share 0.14%,
#: query-decoder SSIM 0.109 under its class-mean floor 0.404, extraction at chance, where
#: every-epoch (cnn, noise 0.2) scored 0.893 at epsilon 354.9 and owner share 98.4%. On
#: digits' 1,437 training images release once scored 0.344 (quick evaluation) against
#: every-epoch's 0.89: its public split is too small to pretrain a head on.
RELEASE_BY_SIZE: tuple[int, str, str] = (30_000, "every-epoch", "once")

#: The preset a run releasing once takes when it sets no ``model``: the owner-light
#: counterpart of the default preset. With ``cnn`` release once left the owner 13.8% of
#: the training FLOPs (issue 10's target: at most 10%), with ``cnn-light`` 0.14%.
ONCE_MODEL: dict[str, str] = {"cnn": "cnn-light"}


def default_release(n_train: int) -> str:
    """The ``privacy.release`` of a run on ``n_train`` training records that sets none:
    one release per record needs a public split large enough to pretrain the head on."""
    large, small_release, large_release = RELEASE_BY_SIZE
    return small_release if n_train < large else large_release


def default_noise_multiplier(n_train: int) -> float:
    """The activation noise of a run on ``n_train`` training samples that sets none: the
    noise on each sample's activation averages out over more steps on a larger set."""
    large, small_noise, large_noise = NOISE_BY_SIZE
    return small_noise if n_train < large else large_noise


class PrivacyConfig(_Strict):
    """Activation protection (DESIGN §3, §6)."""

    mechanism: Literal["gaussian", "laplace"] = "gaussian"
    clip_norm: float = Field(1.0, gt=0)
    # None: by the training set's size (default_noise_multiplier), resolved when the run is
    # assembled (runtime.session.run), so config.toml records the value used.
    noise_multiplier: float | None = Field(None, ge=0)
    target_epsilon: float | None = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    noise_at_inference: bool = False
    # The last trainer clips each sample's loss gradient to gradient_clip_norm and adds
    # Gaussian noise of std gradient_noise_multiplier * gradient_clip_norm before sending
    # it back (clicooper.privacy.gradient); 0 is off, the default: see the README.
    gradient_noise_multiplier: float = Field(0.0, ge=0)
    gradient_clip_norm: float = Field(1.0, gt=0)
    # "every-epoch": the owner's head trains and every record's noisy activation is released
    # again each epoch (epsilon composes over epochs). "once": the head is frozen (its source:
    # [head] source, clicooper.heads), each training record's noisy activation is
    # released to t1 once, before training, and t1 trains every epoch on its cached copy.
    # None: by the training set's size (default_release; RunConfig.for_data), resolved when
    # the run is assembled, so config.toml records the value used.
    release: Literal["every-epoch", "once"] | None = None

    def for_data(self, n_train: int) -> PrivacyConfig:
        """This config, an unset ``noise_multiplier`` resolved for ``n_train`` samples.

        Release once with neither the noise nor ``target_epsilon`` set aims at
        :data:`ONCE_TARGET_EPSILON`: its one release then bounds something, where the
        every-epoch noise default would give it an epsilon in the hundreds."""
        if self.noise_multiplier is not None:
            return self
        update: dict[str, float] = {"noise_multiplier": default_noise_multiplier(n_train)}
        if self.release == "once" and self.target_epsilon is None:
            update["target_epsilon"] = ONCE_TARGET_EPSILON
        return self.model_copy(update=update)


class LabelConfig(_Strict):
    """Secret label obfuscation (DESIGN §4)."""

    # K = 2 pseudo-classes per class, chosen on a validation split with the other defaults
    # (README "Defaults at vanilla's budget"): keyed sub-classes are random within a
    # class, which the classifier must spread its mass over; K = 4 cost digits up to 19
    # points at 5 epochs, K = 1 shows the class count to the last trainer.
    expansion: int = Field(2, ge=1, le=64)
    decoys: int = Field(0, ge=0, le=1024)
    mode: Literal["keyed", "feature"] = "keyed"


class WatermarkConfig(_Strict):
    """Dynamic chained watermarking (DESIGN §5)."""

    enabled: bool = True
    # 128: the CNN and MLP presets' smallest marked tensor (the last trainer's 128 x 20
    # classifier at K 2) holds 2,560 weights, 20 a bit (capacity_note asks 16); issue 11
    bits: int = Field(128, ge=16, le=4096)
    strength: float = Field(0.01, ge=0)  # = clicooper.watermark.embed.DEFAULT_STRENGTH
    stage_steps: int | None = Field(None, ge=1)
    # "seal": the regulariser stays off and each stage's end places the bits with the
    # least-norm change of the marked tensor (see clicooper.watermark.embed,
    # "Schedules"); "always": the regulariser pushes all stage long, the seal deepens the rest.
    schedule: Literal["seal", "always"] = "seal"
    seal: bool = True  # "always" only: at a stage's end, deepen any bit left short
    # the seal's least change: "inputs", of the marked linear layer's outputs on the stage's
    # training inputs (ridge: of tr(Sigma)/n); "weights", of the marked tensor's weights
    seal_metric: Literal["inputs", "weights"] = "inputs"
    seal_ridge: float = Field(0.01, gt=0, le=1e6)  # = clicooper.watermark.embed.DEFAULT_RIDGE
    ber_threshold: float = Field(0.05, ge=0, le=0.5)
    claim_p_value: float = Field(1e-6, gt=0, lt=1)
    keep_audit_stages: int | None = Field(None, ge=1)


class ImageConfig(_Strict):
    """How user arrays become images (the axis and scale rules of clicooper.data.layout)."""

    layout: Literal["auto", "channels-first", "channels-last"] = "auto"
    minmax_scale: bool = False  # map non-uint8 images by the training min and max


class HeadConfig(_Strict):
    """Where a frozen owner head comes from (clicooper.heads; release-once mode).

    ``public``: pretrained on public data, the first ``public_split`` training images
    (None: one sixth of the training split, 10,000 of Fashion-MNIST's 60,000) or the
    dataset at ``public_path``; ``scattering``: a wavelet scattering transform, no data;
    ``dpsgd``: trained on the private data with DP-SGD to ``dp_epsilon`` at ``dp_delta``
    (its cost composes with the release's: clicooper.heads.compose); ``random``: a seeded
    random head, no data. ``pretrain_by``: who pretrains on public data (counted there).
    """

    source: str = Field("public", min_length=1, max_length=200)
    public_split: int | None = Field(None, ge=1)
    public_path: Path | None = None
    pretrain_epochs: int = Field(10, ge=1, le=1000)
    pretrain_lr: float = Field(1e-3, gt=0)
    pretrain_by: Literal["trainers", "owner"] = "trainers"
    scattering_j: int = Field(2, ge=1, le=4)
    dp_epsilon: float = Field(2.0, gt=0)
    dp_clip_norm: float = Field(1.0, gt=0)
    dp_epochs: int = Field(5, ge=1, le=1000)
    dp_delta: float | None = Field(None, gt=0, lt=1, description="None: privacy.delta / 10")

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        from clicooper.heads import get_source

        get_source(value)  # one line naming the registered sources
        return value


class ChainConfig(_Strict):
    """How the trainers' chain learns from a release-once session (issue 10, point 4).

    ``warm_epochs``: epochs on the public split's clean activations (the head source's
    public data, the ``public`` source only) before the epochs on the releases; public
    data costs no privacy and its pass is the trainers' work. ``denoise = "post-mean"``:
    t1 trains on each release's class-posterior mean under a Gaussian within-class model
    whose covariance is the releases' minus the known noise covariance (post-processing:
    it needs the releases' pseudo-labels at t1, which the owner then sends with them).
    ``release_lr_factor``: the learning rate of every trainer is multiplied by this once
    the warm start is over (fine-tuning on the noisy releases). ``replay``: the public
    set's clean activations in every epoch on the releases too. Defaults (replay on,
    factor 0.1, no denoising, no fresh optimizer): chosen on the last 5,000 of
    Fashion-MNIST's training images, cnn-light, epsilon 8
    (``benchmarks/release_chain_designs.py``, then ``benchmarks/frontier.py --full
    --validation 5000``; benchmarks/release_once_calibration.md "The chain's epochs on the
    releases"): without replay every epoch on the releases lowered the chain below its
    warm start (factor 0.01: 0.885 to 0.849 after 5); with replay at 0.1 it stays at the
    warm start's level however many epochs (0.885 to 0.885).
    """

    warm_epochs: int = Field(20, ge=0, le=1000)
    # every epoch on the releases also passes over the public set once, its batches spread
    # among the releases' (replay; the public split, warm start or not, is at t1 then)
    replay: bool = True
    # every trainer's optimizer state (Adam's moments) starts afresh when the warm start
    # ends (clicooper.runtime.optim.phase_reset_step says why)
    fresh_optimizer: bool = False
    denoise: Literal["post-mean", "none"] = "none"
    release_lr_factor: float = Field(0.1, gt=0, le=1)


KIB = 1 << 10
MIB = 1 << 20


class KindCaps(_Strict):
    """Caps on the messages of one group of kinds, checked before any tensor is decoded.

    ``max_header_bytes`` bounds the safetensors JSON header (the 8-byte length is read
    first), ``max_tensors`` the entries it declares, ``max_bytes`` the whole payload
    (header and tensor data; the transport's ``max_message_bytes`` applies as well) and
    ``max_meta_bytes`` the message's JSON meta.
    """

    max_tensors: int = Field(ge=0)
    max_header_bytes: int = Field(ge=8)
    max_bytes: int = Field(ge=16)  # the smallest safetensors blob, no tensor, is 16 bytes
    max_meta_bytes: int = Field(ge=2)  # "{}"


#: Which caps apply to which :class:`~clicooper.common.messages.Kind` value. Work messages
#: carry one batch tensor (activations, gradients, labels, logits); control messages carry
#: only meta; an audit carries a whole segment's state dict.
KIND_GROUPS: dict[str, str] = {
    **dict.fromkeys(
        ("forward", "backward", "labels", "infer", "logits", "loss", "release"), "work"
    ),
    **dict.fromkeys(("control", "reply", "register", "record", "error"), "control"),
    "audit": "audit",
}


class TransportLimits(_Strict):
    """What one served party spends on its peers (gRPC transport), each limit named in the
    error it produces.

    Memory: an accepted message holds its payload size until the party takes it
    (``recv``); a message being read or decoded holds twice its payload (the bytes and
    their decoded copy). ``max_inbox_bytes`` bounds the sum, ``max_inbox_messages`` the
    messages waiting. Time: a stream that sends no chunk for ``stream_idle_timeout_s``,
    or is still sending after ``delivery_deadline_s``, is cut; a TLS handshake must finish
    within ``handshake_timeout_s``. Threads: at most ``max_concurrent_streams`` streams are
    read at once, at most ``max_streams_per_peer`` from one peer (an honest peer sends one
    message at a time per link), and every admitted stream has a worker thread of its own,
    so stalled streams of one peer cannot starve the others.
    """

    max_message_bytes: int = Field(256 * MIB, ge=1)
    max_inbox_messages: int = Field(1024, ge=1)
    max_inbox_bytes: int = Field(1024 * MIB, ge=1)
    max_concurrent_streams: int = Field(64, ge=1, le=4096)
    max_streams_per_peer: int = Field(4, ge=1)
    stream_idle_timeout_s: float = Field(15.0, gt=0)
    delivery_deadline_s: float = Field(120.0, gt=0)
    handshake_timeout_s: float = Field(10.0, gt=0)
    max_connections: int = Field(64, ge=1)
    connection_idle_s: float = Field(600.0, gt=0)
    work: KindCaps = KindCaps(
        max_tensors=4, max_header_bytes=4 * KIB, max_bytes=256 * MIB, max_meta_bytes=64 * KIB
    )
    control: KindCaps = KindCaps(
        max_tensors=0, max_header_bytes=256, max_bytes=1 * KIB, max_meta_bytes=256 * KIB
    )
    audit: KindCaps = KindCaps(
        max_tensors=1024, max_header_bytes=1 * MIB, max_bytes=256 * MIB, max_meta_bytes=256 * KIB
    )

    @model_validator(mode="before")
    @classmethod
    def _partial_caps(cls, data: Any) -> Any:
        """``work = {max_tensors = 8}`` changes one cap and keeps the group's other defaults."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for group in ("work", "control", "audit"):
            if isinstance(data.get(group), dict):
                default = cls.model_fields[group].default.model_dump()
                data[group] = {**default, **data[group]}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> TransportLimits:
        if self.max_inbox_bytes < 2 * self.max_message_bytes:
            raise ValueError(
                f"limits.max_inbox_bytes {self.max_inbox_bytes} must be at least twice "
                f"limits.max_message_bytes {self.max_message_bytes} (a message being decoded "
                "holds its bytes and their copy)"
            )
        if self.max_streams_per_peer > self.max_concurrent_streams:
            raise ValueError(
                f"limits.max_streams_per_peer {self.max_streams_per_peer} exceeds "
                f"limits.max_concurrent_streams {self.max_concurrent_streams}"
            )
        return self

    def caps(self, kind: str) -> tuple[str, KindCaps]:
        """``(group name, caps)`` for a message kind value (``KeyError`` if unknown)."""
        group = KIND_GROUPS[kind]
        return group, getattr(self, group)


# 8x8 digits (1,437 training images): the same epochs for every mode. Measured with the
# earlier defaults (lr 1e-3, noise 0.2, K=4, watermark): CNN 5 epochs vanilla 0.864 vs
# clicooper 0.578; MLP 5 epochs 0.936 vs 0.906. MLP 10 epochs: vanilla 0.956, clicooper
# spread 0.864-0.953 over seven runs (fresh owner secrets); 20 epochs: vanilla 0.967,
# clicooper 0.978, 0.981, 0.989.
SMALL_DATA_DEFAULTS: dict[str, dict[str, Any]] = {"digits": {"model": "mlp", "epochs": 20}}

#: The learning rate a run takes when it sets none, by ``privacy.release``. "every-epoch":
#: 3e-3, every mode alike, chosen on a validation split (README "Defaults at vanilla's
#: budget"); at 1e-3 a 5-epoch run is undertrained, vanilla too (digits CNN validation
#: 0.840 -> 0.909, Fashion-MNIST 1 epoch 0.700 -> 0.731). "once": 1e-3, chosen on the last
#: 5,000 Fashion-MNIST training images (cnn-light, epsilon 8, 1 epoch: validation 0.8696
#: at 1e-3 against 0.8568 at 3e-3; README "How the chain learns from the releases").
DEFAULT_LR: dict[str, float] = {"every-epoch": 3e-3, "once": 1e-3}


def default_lr(release: str) -> float:
    """The learning rate of a run with ``privacy.release = release`` that sets none."""
    return DEFAULT_LR.get(release, DEFAULT_LR["every-epoch"])


class RunConfig(_Strict):
    """Everything a run needs; the same config drives every transport."""

    dataset: str = "auto"
    mode: Mode = "clicooper"
    # Left unset: cnn, or with release once its owner-light counterpart (ONCE_MODEL)
    model: Literal["mlp", "cnn", "cnn-light", "resnet"] = "cnn"
    cut: str | None = None
    trainers: int = Field(2, ge=1, le=8)
    epochs: int = Field(5, ge=1, le=1000)
    batch_size: int | None = Field(
        None, ge=1, le=65536, description="None: 32 below 10,000 training samples, else 128"
    )
    # Left unset, the default of the run's release mode (DEFAULT_LR, resolved by
    # _release_defaults once the release is known, so config.toml records the value used):
    # 3e-3 for every mode releasing every epoch, 1e-3 for release once. An explicit lr wins.
    lr: float = Field(DEFAULT_LR["every-epoch"], gt=0)
    # Optimizer and schedule of every party (clicooper.runtime.optim); lr_per_party
    # overrides lr for the parties it names: {do = 1e-3, t1 = 3e-3}.
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr_per_party: dict[str, float] = Field(
        default_factory=dict, description="base lr of named parties (do, t1 ..); others: lr"
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    weight_decay: float | None = Field(
        None, ge=0, description="None: the optimizer's default (adamw 0.01, else 0)"
    )
    schedule: Literal["constant", "cosine", "step"] = "constant"
    warmup_steps: int = Field(0, ge=0, description="linear lr warm-up steps")
    decay_steps: int | None = Field(
        None, ge=1, description="step schedule: steps between decays (None: a third of the run)"
    )
    decay_gamma: float = Field(0.1, gt=0, le=1, description="step schedule: lr factor per decay")
    device: str = Field("auto", description="auto (cuda, else mps, else cpu), cpu, cuda[:N], mps")
    devices: dict[str, str] = Field(
        default_factory=dict, description='per-party device overrides: {t1 = "cuda"}'
    )
    seed: int = Field(0, ge=0)
    train_subset: int | None = Field(None, ge=1)
    test_subset: int | None = Field(None, ge=1)
    micro_batches: int = Field(1, ge=1, le=64)
    record: int = Field(0, ge=0, description="samples per epoch each party records (0: off)")
    transport: Literal["inprocess", "grpc"] = "inprocess"
    checkpoint_steps: int = Field(
        0,
        ge=0,
        description="also checkpoint every N steps (0: only at step 0 and before stage and "
        "epoch ends; checkpoints are always on, so a run that dies can be resumed)",
    )
    threads: int = Field(1, ge=1, le=256, description="torch intra-op threads per process")
    owner_secret: Path | None = Field(
        None,
        description="reuse this owner secret (an earlier run's owner/owner.secret): the same "
        "label permutation and activation noise, so a clicooper run repeats; None: a fresh one",
    )
    privacy: PrivacyConfig = PrivacyConfig()
    labels: LabelConfig = LabelConfig()
    watermark: WatermarkConfig = WatermarkConfig()
    images: ImageConfig = ImageConfig()
    head: HeadConfig = HeadConfig()  # the frozen head of release once (clicooper.heads)
    chain: ChainConfig = ChainConfig()  # how the chain learns from the releases (release once)
    # What a served party lets its peers cost (gRPC); every process of a deployment
    # reads it from the same config.
    limits: TransportLimits = TransportLimits()

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """Defaults that depend on other settings, for the settings the user left unset:
        the dataset's first (``auto``, small-data defaults), then the release's."""
        if not isinstance(data, dict):
            return data
        return _release_defaults(_dataset_defaults(dict(data)))

    @model_validator(mode="after")
    def _micro_fits(self) -> RunConfig:
        if self.batch_size is not None and self.micro_batches > self.batch_size:
            raise ValueError("micro_batches cannot exceed batch_size")
        return self

    @model_validator(mode="after")
    def _release_fits(self) -> RunConfig:
        """``release = "once"`` freezes the head: refuse settings that need it to train.

        ``mode = "vanilla"`` with release once is the baseline of release once: the same
        frozen head and chain warm start, its clean activations sent to t1 once (no clip,
        no noise, true labels, no watermark), so the two compare on the same head."""
        if self.privacy.release == "once" and (problem := self.head_must_train()):
            raise ValueError(problem)
        return self

    def head_must_train(self) -> str | None:
        """Why this run cannot release once (None: it can). An unset release resolves to
        every-epoch then (:meth:`for_data`)."""
        if self.mode == "centralized":
            return (
                "privacy.release once needs a split mode: mode centralized trains one model "
                "and releases nothing (use --mode clicooper, or --mode vanilla for its baseline)"
            )
        if self.mode == "vanilla" and self.chain.denoise != "none":
            return (
                f"chain.denoise {self.chain.denoise} removes activation noise, and mode vanilla "
                "adds none (set chain.denoise none, or use --mode clicooper)"
            )
        if self.trainers == 1 and self.privacy.gradient_noise_multiplier > 0:
            return (
                "privacy.gradient_noise_multiplier protects gradients sent back towards the "
                "owner's head; with release once and one trainer no gradient leaves the trainer "
                "(set it to 0, or use two or more trainers)"
            )
        return None

    def release_choice(self, n_train: int) -> tuple[str, str]:
        """(release, why) of a run on ``n_train`` training records: the configured one
        (why: ""), else the size default (:func:`default_release`), except that a run whose
        settings need the head to train (:meth:`head_must_train`) releases every epoch."""
        if self.privacy.release is not None:
            return self.privacy.release, ""
        large = RELEASE_BY_SIZE[0]
        release = default_release(n_train)
        side = "below" if n_train < large else "at least"
        why = f"the default for {n_train:,} training records, {side} {large:,}"
        if release == "once" and self.mode != "clicooper":
            return "every-epoch", f"mode {self.mode} trains the owner's head"
        if release == "once" and self.head_must_train():
            return "every-epoch", (
                "not the size default once: gradient noise with one trainer needs the owner's "
                "head to train (--release once refuses it)"
            )
        return release, why

    def with_release(self, release: str) -> RunConfig:
        """This config releasing ``release`` if it set no release, the settings that follow
        the release (``lr``, ``model``: :func:`_release_defaults`) taking its defaults where
        they were left unset; unchanged if it set one."""
        if self.privacy.release is not None:
            return self
        raw = self.model_dump(exclude={"model", "lr"} - self.model_fields_set)
        raw["privacy"]["release"] = release
        return type(self).model_validate(raw)

    def for_data(self, n_train: int) -> RunConfig:
        """This config with its size-dependent defaults resolved for ``n_train`` training
        records, in order: the release (:meth:`release_choice`), then what follows it for
        the settings left unset (the model, :data:`ONCE_MODEL`; the lr,
        :data:`DEFAULT_LR`), the batch size, then the noise or target epsilon
        (:meth:`PrivacyConfig.for_data`). Every value is then set, so config.toml records
        it and a resume (or another process reading that file) resolves nothing again."""
        cfg = self.with_release(self.release_choice(n_train)[0])
        return cfg.model_copy(
            update={
                "batch_size": cfg.effective_batch_size(n_train),
                "privacy": cfg.privacy.for_data(n_train),
            }
        )

    @model_validator(mode="after")
    def _party_settings(self) -> RunConfig:
        """Per-party entries name parties of this run, with positive learning rates."""
        names = ["do", *(f"t{i}" for i in range(1, self.trainers + 1))]
        for setting, entries in (("lr_per_party", self.lr_per_party), ("devices", self.devices)):
            for party in entries:
                if party not in names:
                    raise ValueError(
                        f"{setting}: unknown party {party!r} (choose from {', '.join(names)})"
                    )
        for value in self.lr_per_party.values():
            if not value > 0:
                raise ValueError(f"lr_per_party: a learning rate must be positive (got {value})")
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        from clicooper.runtime.device import valid_device

        return valid_device(value)

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: dict[str, str]) -> dict[str, str]:
        from clicooper.runtime.device import valid_device

        return {party: valid_device(name) for party, name in value.items()}

    def effective_batch_size(self, n_train: int) -> int:
        """The configured batch size, or 32 for small datasets (< 10,000) and 128 otherwise."""
        if self.batch_size is not None:
            return self.batch_size
        return 32 if n_train < 10_000 else 128

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> RunConfig:
        """Config from an optional TOML file, then ``overrides`` (dotted keys allowed)."""
        data: dict[str, Any] = {}
        if path is not None:
            try:
                data = tomllib.loads(Path(path).read_text())
            except FileNotFoundError:
                raise ConfigError(f"config file {path} does not exist") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for key, value in overrides.items():
            if value is None:
                continue
            node = data
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(one_line(exc)) from None


def _dataset_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """Resolve ``auto`` and apply small-data defaults for settings the user left unset."""
    if data.get("dataset", "auto") == "auto":
        from clicooper.data import default_dataset

        data["dataset"] = default_dataset()
    for key, value in SMALL_DATA_DEFAULTS.get(data["dataset"], {}).items():
        data.setdefault(key, value)
    return data


def _release_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """Once ``privacy.release`` is set, an unset ``lr`` takes its default
    (:data:`DEFAULT_LR`) and, releasing once, an unset ``model`` the owner-light preset
    (:data:`ONCE_MODEL`). The values are then fields like any other, so config.toml records
    them and a resume reuses them. With the release unset both wait for
    :meth:`RunConfig.for_data` (``lr`` and ``model`` keep their every-epoch defaults till
    then, and are not in ``model_fields_set``)."""
    privacy = data.get("privacy")
    release = (
        privacy.get("release") if isinstance(privacy, dict) else getattr(privacy, "release", None)
    )
    if release is None:  # None given for either is unset too
        return {k: v for k, v in data.items() if k not in ("lr", "model") or v is not None}
    if data.get("lr") is None:
        data["lr"] = default_lr(release)
    if release == "once" and data.get("model") is None:
        default = RunConfig.model_fields["model"].default
        data["model"] = ONCE_MODEL.get(default, default)
    return data


def one_line(exc: ValidationError) -> str:
    """The first validation error as ``setting: problem (got value)``."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "config"
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    message = err["msg"].removeprefix("Value error, ")
    return f"invalid setting {where}: {message}{shown}"
