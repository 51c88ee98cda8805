"""Budgets of the evaluation: how long each party trains and how hard each attacker tries."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from clicooper.config import ONCE_TARGET_EPSILON

#: The columns an evaluation may have, in report order: vanilla split learning, CliCooper
#: releasing every epoch, and CliCooper releasing once (privacy.release = "once").
COLUMNS = ("vanilla", "clicooper", "once")


@dataclass(frozen=True)
class EvalSettings:
    """Every knob of one evaluation (quick and full presets below)."""

    seed: int = 0
    epochs: int = 10
    batch_size: int = 128
    train_subset: int | None = None
    test_subset: int | None = None
    aux_fraction: float = 0.1  # of the training split, held out for the attackers
    record: int = 1024  # samples per epoch each trainer records
    n_invert: int = 256
    cluster_trials: int = 20
    cluster_subset: int = 500
    permutations: int = 200
    unsplit_rounds: int = 20
    unsplit_steps: int = 20
    aux_epochs: int = 40
    decoder_epochs: int = 40
    finetune_epochs: int = 50
    scratch_epochs: int = 100
    adaptive_m: tuple[int, ...] = (1, 5, 10, 50)
    sweep_noise: tuple[float, ...] = (0.1, 0.25, 1.0, 2.0)
    # Points over the gradient protection at the default activation noise: the only setting
    # that moves T1's gradient clustering (clicooper.privacy.gradient).
    sweep_gradient_noise: tuple[float, ...] = ()
    sweep_epochs: int | None = None  # None: the main runs' epochs
    sweep_train_subset: int | None = None
    shallow_epochs: int = 1  # runs at the preset's shallowest cut (data-free inversion there)
    # Watermark removal on the stolen clicooper chain: fine-tune for these shares of the
    # training steps, prune these shares of each weight, overwrite at these strengths.
    removal_fine_tune: tuple[float, ...] = (0.1, 0.2, 0.5)
    removal_prune: tuple[float, ...] = (0.2, 0.4, 0.6)
    removal_overwrite: tuple[float, ...] = (1.0, 10.0)
    # The report's columns: vanilla, clicooper (every-epoch release) and once (clicooper with
    # release once: a frozen head, one noisy release per record, at once_target_epsilon).
    columns: tuple[str, ...] = COLUMNS
    once_head_source: str | None = None  # None: the config's [head] source
    # The once column's preset. None: the one `clicooper run` gives release once on the
    # owner's training set when that is its default (config.RELEASE_BY_SIZE): the config's
    # model's owner-light counterpart (config.ONCE_MODEL, cnn -> cnn-light); else the
    # config's model, as every other column (evaluation.columns.with_run_defaults).
    once_model: str | None = None
    once_target_epsilon: float = ONCE_TARGET_EPSILON  # release once's default in `run`
    # Frontier: more release-once runs at these epsilons (same epochs and data as the main
    # runs; trained, scored and inverted data-free from their release caches, no other
    # attack), beside the noise sweep's every-epoch points.
    once_sweep_epsilon: tuple[float, ...] = ()
    extra: dict[str, float] = field(default_factory=dict)

    def with_seed(self, seed: int) -> EvalSettings:
        return replace(self, seed=seed)


QUICK = EvalSettings(
    epochs=15,
    batch_size=64,
    aux_fraction=0.25,
    record=512,
    cluster_subset=256,
    unsplit_rounds=10,
    aux_epochs=30,
    decoder_epochs=40,
    finetune_epochs=30,
    scratch_epochs=60,
    adaptive_m=(1, 5, 10),
    sweep_noise=(0.1, 2.0),
    sweep_gradient_noise=(1.0,),
    removal_fine_tune=(0.2,),
    removal_prune=(0.5,),
    removal_overwrite=(1.0,),
    # digits' once column at issue 10's epsilon 8, its frontier point at 2
    once_target_epsilon=8.0,
    once_sweep_epsilon=(2.0,),
)

# Sized for Fashion-MNIST in under 30 minutes on two (shared) cores: each UnSplit round
# or auxiliary-autoencoder epoch over 1,500 28x28 images costs about 10 s on one thread.
FULL = EvalSettings(
    epochs=5,
    aux_fraction=0.05,
    unsplit_rounds=5,
    aux_epochs=8,
    decoder_epochs=30,
    finetune_epochs=30,
    scratch_epochs=60,
    sweep_noise=(0.5, 1.0, 2.0),
    sweep_gradient_noise=(0.0, 0.3, 1.0),  # 0: the 2-epoch reference of this series
    sweep_epochs=2,
    once_sweep_epsilon=(4.0, 8.0),  # beside the once column at ONCE_TARGET_EPSILON
)
