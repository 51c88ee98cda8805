"""Attackers see only what their party received, plus auxiliary data disjoint from training."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from clicooper.config import RunConfig
from clicooper.data import Dataset
from clicooper.evaluation import adapters
from clicooper.evaluation.columns import mode_config, prepare_data
from clicooper.evaluation.settings import QUICK
from clicooper.evaluation.truth import row_sample_ids
from clicooper.evaluation.views import (
    RECEIVED_KEYS,
    PartyView,
    assert_disjoint,
    query_activations,
    view_of,
)
from clicooper.parties.trainer import Trainer
from clicooper.runtime.session import Session, run, warm_epochs

FORBIDDEN = {"owner", "session", "dataset", "head", "secret", "labels_secret", "data"}


def _session(tmp: Path, data: Dataset, mode: str) -> Session:
    cfg = RunConfig.load(None, mode=mode, model="mlp", epochs=2, batch_size=32, record=64)
    cfg.watermark.enabled = False
    return run(cfg, tmp / mode, data=data)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, digits: Dataset) -> dict[str, Session]:
    torch.set_num_threads(1)
    data = digits.limit(300, 100, seed=0)
    tmp = tmp_path_factory.mktemp("runs")
    return {mode: _session(tmp, data, mode) for mode in ("vanilla", "clicooper")}


def test_auxiliary_split_is_disjoint_from_owner_training_data() -> None:
    cfg = RunConfig.load(None, dataset="digits")
    owner_data, aux, aux_split = prepare_data(cfg, QUICK)
    owner_rows = {r.tobytes() for r in owner_data.train.x.flatten(1).numpy()}
    assert len(aux_split) > 300
    assert not any(r.tobytes() in owner_rows for r in aux_split.x.flatten(1).numpy())
    assert len(aux.images) + len(aux.pool_labels) == len(aux_split)
    assert aux.max_m() >= 10


def test_assert_disjoint_rejects_a_leaked_training_image(digits: Dataset) -> None:
    leaked = torch.cat([digits.test.x[:5], digits.train.x[7:8]])
    with pytest.raises(ValueError, match="1 auxiliary images are owner training images"):
        assert_disjoint(leaked, digits.train.x)


def test_view_holds_only_received_records_and_a_copy_of_the_segment(runs) -> None:
    trainer = runs["clicooper"].trainers[0]
    view = view_of(trainer)
    assert set(view.records) <= set(RECEIVED_KEYS)
    assert {f for f in PartyView.__dataclass_fields__} == {
        "name",
        "index",
        "is_last",
        "records",
        "segment",
    }
    first = next(view.segment.parameters())
    with torch.no_grad():
        next(trainer.segment.parameters()).add_(1.0)
    assert not torch.equal(first, next(trainer.segment.parameters()))
    with torch.no_grad():
        next(trainer.segment.parameters()).sub_(1.0)


def test_adapters_take_no_owner_data_or_parameters() -> None:
    for name in ("clustering", "inversion", "extraction", "naming_accuracy"):
        params = set(inspect.signature(getattr(adapters, name)).parameters)
        assert not params & FORBIDDEN, (name, params & FORBIDDEN)


def test_head_factory_is_architecture_only(runs) -> None:
    """The shadow head the attackers build shares the owner's shapes, never its weights."""
    from clicooper.models.assembly import preset_factory

    session = runs["vanilla"]
    cfg = RunConfig.load(None, model="mlp")
    fresh = preset_factory(cfg, session.dataset)(10).head
    owner_head = session.owner.head
    for a, b in zip(fresh.parameters(), owner_head.parameters(), strict=True):
        assert a.shape == b.shape and not torch.equal(a, b)


@pytest.mark.parametrize("mode", ["vanilla", "clicooper"])
def test_truth_join_recovers_each_rows_label(runs, mode: str) -> None:
    """Joined to the owner's log, Tn's received labels decode to the true labels of the rows."""
    session = runs[mode]
    view = view_of(session.trainers[-1])
    log = session.owner.log
    ids = row_sample_ids(view, log.steps, log.sample_ids, 1)
    received = view.records["pseudo_labels"]
    if session.owner.labels is not None:
        received = session.owner.labels.decode_labels(received)
    assert torch.equal(received, session.dataset.train.y[ids])


def test_truth_join_rejects_records_that_do_not_match_the_log(runs) -> None:
    session = runs["vanilla"]
    view = view_of(session.trainers[0])
    log = session.owner.log
    short = [ids[:-1] for ids in log.sample_ids]
    with pytest.raises(ValueError, match="do not match the owner's log"):
        row_sample_ids(view, log.steps, short, 1)


def test_query_capture_sees_what_t1_receives(runs) -> None:
    vanilla, defended = runs["vanilla"], runs["clicooper"]
    x = vanilla.dataset.test.x[:20]
    got = query_activations(vanilla.owner, vanilla.trainers[0], x, noisy=True)
    with torch.no_grad():
        vanilla.owner.head.eval()
        expected = vanilla.owner.head(x)
        vanilla.owner.head.train()
    assert torch.allclose(got, expected, atol=1e-6)  # vanilla: no noise to add
    assert vanilla.trainers[0].handle.__func__ is Trainer.handle  # observer removed

    clean = query_activations(defended.owner, defended.trainers[0], x, noisy=False)
    noisy = query_activations(defended.owner, defended.trainers[0], x, noisy=True)
    noise = (noisy - defended.owner.noise.clip(clean)).std()
    nm = defended.owner.noise.noise_multiplier * defended.owner.noise.clip_norm
    assert abs(float(noise) - nm) < 0.25 * nm
    assert defended.owner.noise_at_inference is False  # setting restored


def test_inversion_targets_come_from_t1s_last_epoch(runs) -> None:
    view = view_of(runs["clicooper"].trainers[0])
    rows = adapters.inversion_targets(view, 32)
    assert bool((view.records["epoch"][rows] == view.epochs[-1]).all())
    with pytest.raises(ValueError, match="raise record"):
        adapters.inversion_targets(view, 10_000)


def test_mode_config_keeps_everything_but_the_mode() -> None:
    cfg = RunConfig.load(None, dataset="digits", model="mlp", trainers=3)
    a, b = (mode_config(cfg, QUICK, m) for m in ("vanilla", "clicooper"))
    da, db = a.model_dump(), b.model_dump()
    assert da.pop("mode") == "vanilla" and db.pop("mode") == "clicooper"
    assert da == db and a.record == QUICK.record and a.train_subset is None


@pytest.fixture(scope="module")
def once(tmp_path_factory: pytest.TempPathFactory, digits: Dataset) -> tuple[Session, Path]:
    """A small release-once run (the default public head) and its directory."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("once") / "run"
    cfg = RunConfig.load(
        None,
        mode="clicooper",
        model="mlp",
        epochs=2,
        batch_size=32,
        record=64,
        **{"privacy.release": "once", "privacy.target_epsilon": 8.0, "head.pretrain_epochs": 2},
    )
    cfg.watermark.enabled = False
    return run(cfg, out, data=digits.limit(300, 100, seed=0)), out


def test_release_once_view_is_t1s_cache_on_disk(once) -> None:
    """The release-once T1's attack material is its cache read back from its files, and every
    input it recorded in training is the cached release of that record."""
    from clicooper.evaluation.suite import check_recorded_releases
    from clicooper.evaluation.views import cached_releases, release_targets

    session, out = once
    cache = cached_releases(out)
    held = session.trainers[0].releases
    assert torch.equal(cache.ids, torch.arange(len(session.dataset.train)))
    assert torch.equal(cache.x, held.x)
    warm = warm_epochs(session_cfg(out))
    view = view_of(session.trainers[0], warm + 1)
    assert warm > 0 and view.epochs[0] == warm + 1
    # the public set's steps (warm start, replay) are not recorded: not the owner's records
    assert view_of(session.trainers[0]).epochs == view.epochs
    assert session_cfg(out).chain.replay  # public steps among the recorded epochs' too
    check_recorded_releases(session, view_of(session.trainers[0]), cache, session_cfg(out))
    check_recorded_releases(session, view, cache, session_cfg(out))
    ids = release_targets(cache, 32, seed=0)
    assert len(ids.unique()) == 32 and torch.equal(ids, release_targets(cache, 32, seed=0))
    assert not torch.equal(ids, release_targets(cache, 32, seed=1))
    with pytest.raises(ValueError, match="holds no release"):
        cache.rows(torch.tensor([len(cache.ids)]))
    with pytest.raises(ValueError, match="lower n_invert"):
        release_targets(cache, len(cache.ids) + 1, seed=0)


def test_a_recorded_input_that_is_not_the_cached_release_is_caught(once) -> None:
    from dataclasses import replace

    from clicooper.evaluation.suite import check_recorded_releases
    from clicooper.evaluation.views import cached_releases

    session, out = once
    view = view_of(session.trainers[0], warm_epochs(session_cfg(out)) + 1)
    records = dict(view.records)
    records["activation"] = records["activation"].clone()
    records["activation"][3, 0] += 1e-3
    with pytest.raises(RuntimeError, match="differ from its cached releases"):
        check_recorded_releases(
            session, replace(view, records=records), cached_releases(out), session_cfg(out)
        )


def test_release_cache_missing_is_a_one_line_error(tmp_path: Path) -> None:
    from clicooper.evaluation.views import cached_releases

    with pytest.raises(ValueError, match="holds no t1 release cache"):
        cached_releases(tmp_path)


def test_release_once_attackers_get_the_head_the_trainers_hold(once) -> None:
    """A public head the trainers pretrained is known exactly (a copy, never the owner's
    module); one the owner pretrained is known by architecture only."""
    from clicooper.evaluation.columns import head_known
    from clicooper.evaluation.suite import architecture

    session, out = once
    cfg = session_cfg(out)
    assert head_known(cfg)
    head_factory, _ = architecture(session, cfg)
    copy = head_factory()
    assert copy is not session.owner.head
    x = session.dataset.test.x[:8]
    assert torch.equal(copy(x), session.owner.head(x))
    owner_made = cfg.model_copy(
        update={"head": cfg.head.model_copy(update={"pretrain_by": "owner"})}
    )
    assert not head_known(owner_made)
    fresh = architecture(session, owner_made)[0]()
    assert fresh(x).shape == copy(x).shape and not torch.allclose(fresh(x), copy(x))
    assert torch.allclose(fresh(x).flatten(1).norm(dim=1), torch.ones(8))  # unit norm, as h


def test_column_config_sets_release_head_and_epsilon() -> None:
    from dataclasses import replace

    from clicooper.evaluation.columns import column_config

    cfg = RunConfig.load(None, dataset="digits", **{"privacy.release": "once"})
    s = replace(QUICK, once_head_source="random", once_target_epsilon=4.0)
    every, once_cfg = column_config(cfg, s, "clicooper"), column_config(cfg, s, "once")
    assert every.mode == "clicooper" and every.privacy.release == "every-epoch"
    assert once_cfg.privacy.release == "once" and once_cfg.privacy.target_epsilon == 4.0
    assert once_cfg.head.source == "random" and every.record == once_cfg.record == QUICK.record
    with pytest.raises(ValueError, match="unknown column"):
        column_config(cfg, s, "nope")


def test_the_default_column_and_the_once_model_follow_run() -> None:
    """The column `clicooper run` makes by default is once from RELEASE_BY_SIZE's threshold
    on; there, with no model chosen, the once column takes the preset run gives release
    once (cnn-light), every other column the evaluation's model; a model chosen for it wins."""
    from dataclasses import replace

    from clicooper.evaluation.columns import column_config, default_column, with_run_defaults

    assert default_column(29_999) == "clicooper" and default_column(57_000) == "once"
    cfg = RunConfig.load(None, dataset="fashion-mnist", model="cnn")
    small, large = with_run_defaults(cfg, QUICK, 1_000), with_run_defaults(cfg, QUICK, 57_000)
    assert small == QUICK  # digits-sized: every column as before
    assert column_config(cfg, small, "once").model == "cnn"
    assert large.once_model == "cnn-light"
    assert column_config(cfg, large, "once").model == "cnn-light"
    for column in ("vanilla", "clicooper"):
        assert column_config(cfg, large, column).model == "cnn"
    chosen = with_run_defaults(cfg, replace(QUICK, once_model="cnn"), 57_000)
    assert column_config(cfg, chosen, "once").model == "cnn"


def session_cfg(out: Path) -> RunConfig:
    return RunConfig.load(out / "config.toml")


def test_the_report_names_each_column_preset_and_marks_runs_default() -> None:
    from clicooper.evaluation.report import _default_mark, run_line

    def column(preset: str, cut: str) -> dict:
        return {
            "model": {"preset": preset, "cut": cut, "trainers": 2},
            "privacy": {"noise_multiplier": 1.3, "clip_norm": 1.0},
            "labels": {"mode": "keyed", "expansion": 2, "pseudo_classes": 20},
            "watermark": {"enabled": True, "verified": True},
        }

    r = {
        "seed": 0,
        "settings": {"epochs": 5, "batch_size": 128},
        "columns": ["vanilla", "once"],
        "default_column": "once",
        "runs": {"vanilla": column("cnn", "bottleneck"), "once": column("cnn-light", "squeeze")},
    }
    line = run_line(r)
    assert "preset cnn cut at bottleneck (once: preset cnn-light cut at squeeze)" in line
    assert _default_mark(r, "once") and not _default_mark(r, "vanilla")
    r["runs"]["once"] = column("cnn", "bottleneck")
    assert "preset cnn cut at bottleneck, 2 trainers" in run_line(r)
