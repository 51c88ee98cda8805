"""Release once (issue 10, points 2 and 10): a frozen owner head, one noisy release of
each training record, the chain training every epoch on t1's cached copy.

Every message is captured at delivery (SpyTransport, after the real encode/decode), so
the counts below are what t1 really received.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat

import pytest
import torch
from cc_helpers import SpyTransport, quick_config
from safetensors.torch import load_file

from clicooper import heads
from clicooper.common.checks import Unauthorized
from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.config import ConfigError, RunConfig
from clicooper.data import DataError, Split
from clicooper.models.assembly import preset_split
from clicooper.parties import DataOwner, Trainer
from clicooper.parties.releases import OwnerRelease, ReleaseCache, rows_per_chunk
from clicooper.privacy import accounting, release
from clicooper.privacy.activation import ActivationNoise
from clicooper.privacy.report import noise_multiplier
from clicooper.privacy.secrets import OwnerSecret
from clicooper.runtime import factory
from clicooper.runtime import session as session_mod
from clicooper.runtime.transport.inprocess import InProcessTransport
from clicooper.runtime.verification import verify_run
from clicooper.watermark import Ledger

ONCE = {"privacy.release": "once", "labels.mode": "keyed", "head.source": "random"}


def _one_error_line(err: str) -> bool:
    """The CLI ended with exactly one error line and printed no traceback."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    return len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err


def _spied_run(monkeypatch, cfg: RunConfig, out, data):
    spies: list[SpyTransport] = []

    def make() -> SpyTransport:
        spies.append(SpyTransport())
        return spies[-1]

    monkeypatch.setattr(factory, "InProcessTransport", make)
    return session_mod.run(cfg, out, data=data), spies[0].delivered


@pytest.fixture(scope="module")
def once_run(tmp_path_factory, digits):
    """3 epochs, 2 trainers, 2 micro-batches, epsilon 8 for the whole run (run once: the
    tests below only read it)."""
    cfg = quick_config(
        epochs=3,
        micro_batches=2,
        **ONCE,
        **{"privacy.target_epsilon": 8.0, "watermark.enabled": False},
    )
    out = tmp_path_factory.mktemp("once") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        sess, delivered = _spied_run(monkeypatch, cfg, out, digits.limit(400, 200, seed=0))
    return cfg, sess, delivered, out


def test_each_training_record_is_released_exactly_once_over_a_multi_epoch_run(once_run):
    cfg, sess, delivered, out = once_run
    to_t1 = delivered["t1"]
    releases = [m for m in to_t1 if m.kind == Kind.RELEASE]
    ids = torch.cat([m.tensors["ids"] for m in releases])
    assert torch.equal(ids.sort().values, torch.arange(400))  # every record, each once
    forwards = [m for m in to_t1 if m.kind == Kind.FORWARD]
    assert len(forwards) == 3 * 13 * 2  # 3 epochs of 13 steps, 2 micro-batches each
    assert all(set(m.tensors) == {"ids"} for m in forwards)  # no activation after the release
    assert torch.equal(
        torch.cat([m.tensors["ids"] for m in forwards]).sort().values,
        torch.arange(400).repeat(3).sort().values,
    )  # every record every epoch
    assert all(m.step == 0 for m in releases)  # all of them before the first training step
    # the owner counted the same: one release per record, whole run
    privacy = sess.results["privacy"]
    assert privacy["release"] == "once" and privacy["releases"] == 1
    assert privacy["releases_per_record"] == {"min": 1, "max": 1, "records": 400}
    assert privacy["resent_chunks"] == 0
    counts = load_file(str(out / "owner" / "releases.safetensors"))["counts"]
    assert torch.equal(counts, torch.ones(400, dtype=torch.int32))


def test_the_head_is_frozen_and_the_owner_gets_no_gradient(once_run, small_digits):
    cfg, sess, delivered, _ = once_run
    owner = sess.owner
    fresh_head = preset_split(cfg, small_digits.image_shape, 40).head
    initial = heads.build_head(cfg, small_digits, fresh_head).module.state_dict()  # as built
    assert all(torch.equal(v, initial[k]) for k, v in owner.head.state_dict().items())
    assert not any(p.requires_grad for p in owner.head.parameters())
    assert not owner.head.training and owner.optimizer is None
    backs = [m for m in delivered["do"] if m.kind == Kind.BACKWARD]
    assert len(backs) == 3 * 13 * 2 and all(not m.tensors for m in backs)  # acks only
    assert {m.sender for m in backs} == {"t1"}
    # the chain did train: both segments moved away from their initial weights
    fresh = preset_split(cfg, small_digits.image_shape, 40)
    for trained, init in zip(sess.trainers, fresh.segments, strict=True):
        changed = [
            not torch.equal(v, init.state_dict()[k])
            for k, v in trained.segment.state_dict().items()
        ]
        assert all(changed)


def test_releases_are_clipped_and_noised_and_t1_caches_them_on_disk(once_run, small_digits):
    cfg, sess, delivered, out = once_run
    owner = sess.owner
    releases = [m for m in delivered["t1"] if m.kind == Kind.RELEASE]
    x = torch.cat([m.tensors["x"] for m in releases])
    ids = torch.cat([m.tensors["ids"] for m in releases])
    with torch.no_grad():
        clean = owner.noise.clip(owner.head(small_digits.train.x[ids]))
    sigma = owner.noise.noise_multiplier * owner.noise.clip_norm
    assert owner.noise.noise_multiplier == pytest.approx(
        accounting.noise_for_epsilon(8.0, 1, cfg.privacy.delta)
    )
    assert float((x - clean).std()) == pytest.approx(sigma, rel=0.05)  # noise of the mechanism
    cache_dir = out / "parties" / "t1" / "releases"
    files = sorted(cache_dir.iterdir())
    assert files and all(stat.S_IMODE(os.stat(f).st_mode) == 0o600 for f in files)
    assert stat.S_IMODE(os.stat(cache_dir).st_mode) == 0o700
    cached = [load_file(str(f)) for f in files]
    cached_ids = torch.cat([c["ids"] for c in cached])
    assert torch.equal(cached_ids.sort().values, torch.arange(400))
    assert torch.equal(torch.cat([c["x"] for c in cached])[cached_ids.argsort()], x[ids.argsort()])


def test_epsilon_is_one_release_for_the_whole_run(once_run):
    cfg, sess, _, out = once_run
    privacy = sess.results["privacy"]
    one = accounting.epsilon(privacy["noise_multiplier"], 1, cfg.privacy.delta)
    assert privacy["epsilon"] == pytest.approx(one) and 7.9 < privacy["epsilon"] <= 8.0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epsilon"] for h in history] == [pytest.approx(one)] * 3  # spent before epoch 1
    every = noise_multiplier(
        cfg.model_copy(
            update={"privacy": cfg.privacy.model_copy(update={"release": "every-epoch"})}
        )
    )
    assert every > privacy["noise_multiplier"]  # every-epoch needs more noise for 8 over 3
    words = privacy["covers"]
    for phrase in (
        "replace-one adjacency",
        "sensitivity 2C",
        "every training record",
        "given the head",
        "exactly once",
        "head source",
    ):
        assert phrase in words
    assert privacy["head"]["source"] == "random" and privacy["head"]["privacy"]["epsilon"] is None
    assert json.loads((out / "results.json").read_text())["privacy"] == privacy


def test_inference_is_clean_unless_noise_at_inference(
    once_run, tmp_path, small_digits, monkeypatch
):
    _, sess, delivered, _ = once_run
    infer = [m for m in delivered["t1"] if m.kind == Kind.INFER]
    with torch.no_grad():
        clean = sess.owner.head(small_digits.test.x)
    assert infer and torch.equal(infer[-1].tensors["x"], clean)  # the last epoch's test pass
    cfg = quick_config(
        epochs=1,
        **ONCE,
        **{
            "privacy.noise_at_inference": True,
            "privacy.noise_multiplier": 1.0,
            "watermark.enabled": False,
        },
    )
    noisy, seen = _spied_run(monkeypatch, cfg, tmp_path / "noisy", small_digits)
    sent = [m for m in seen["t1"] if m.kind == Kind.INFER][-1].tensors["x"]
    with torch.no_grad():
        clipped = noisy.owner.noise.clip(noisy.owner.head(small_digits.test.x))
    assert float((sent - clipped).std()) == pytest.approx(1.0, rel=0.1)
    privacy = noisy.results["privacy"]
    assert privacy["releases"] == 2 and "queried at inference" in privacy["covers"]
    assert privacy["epsilon"] == pytest.approx(accounting.epsilon(1.0, 2, cfg.privacy.delta))


def test_watermark_chain_verifies_in_release_once_mode(tmp_path, small_digits):
    cfg = quick_config(
        epochs=2, **ONCE, **{"watermark.strength": 0.01, "privacy.noise_multiplier": 0.1}
    )
    sess = session_mod.run(cfg, tmp_path, data=small_digits)
    wm = sess.results["watermark"]
    assert wm["verified"] and wm["stages"] == 2 and wm["attestations_failed"] == 0
    assert verify_run(tmp_path, cfg.watermark).ok
    with Ledger.open(tmp_path / "ledger.sqlite", readonly=True) as ledger:
        heads = {r.body["head_hash"] for r in ledger.records() if r.kind == "do"}
    assert len(heads) == 1  # the frozen head: the same hash at every stage


def test_one_trainer_chain_trains_on_the_cache(tmp_path, small_digits):
    """One trainer, feature sub-labels (fitted on the frozen head's features), recording."""
    cfg = quick_config(
        trainers=1,
        epochs=2,
        record=64,
        **{**ONCE, "labels.mode": "feature"},
        **{"privacy.noise_multiplier": 0.0, "watermark.enabled": False},
    )
    sess = session_mod.run(cfg, tmp_path, data=small_digits)
    history = sess.results["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert sess.results["privacy"]["epsilon"] is None  # no noise: no finite guarantee
    records = load_file(str(tmp_path / "records" / "t1.safetensors"))
    assert records["activation"].shape[1] == 64 and "gradient" in records  # t1's own view


# -- the parts, adversarially ------------------------------------------------------------------


def _release(head=None, records=300):
    torch.manual_seed(0)
    head = head or torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8)).eval()
    noise = ActivationNoise(1.0, 0.5)
    return OwnerRelease(head, noise, OwnerSecret(bytes(32)), torch.rand(records, 1, 8, 8))


def _chunk_msg(rel: OwnerRelease, chunk: int, sender: str = "do", **meta) -> Message:
    ids, x = rel.payload(chunk)
    fields = {"tag": rel.tag, "chunk": chunk, "chunks": rel.chunks, "records": rel.records}
    return Message(Kind.RELEASE, 0, sender, "t1", {"ids": ids, "x": x}, {**fields, **meta})


def test_a_resent_chunk_is_the_same_bytes_and_not_another_release(monkeypatch):
    monkeypatch.setattr("clicooper.parties.releases.CHUNK_ROWS", 128)
    rel = _release()
    assert rel.chunks == 3 and rows_per_chunk(10**6, 4) == 245  # at most MAX_CHUNKS chunks
    first = rel.payload(1)
    again = rel.payload(1)
    assert torch.equal(first[1], again[1]) and rel.resent == 1
    assert rel.counts.tolist() == [0] * 128 + [1] * 128 + [0] * 44
    other = rel.payload(0)[1]
    assert not torch.equal(other[: len(first[1])], first[1][: len(other)])  # fresh noise per chunk
    with torch.no_grad():  # a head that changed cannot release its records again
        rel.head[1].weight.add_(0.1)
    with pytest.raises(RuntimeError, match="refusing to release"):
        rel.payload(1)
    assert rel.counts.max() == 1


def test_the_cache_reads_back_after_a_restart_and_drops_a_bad_file(tmp_path, monkeypatch):
    monkeypatch.setattr("clicooper.parties.releases.CHUNK_ROWS", 128)
    rel = _release()
    cache = ReleaseCache(tmp_path / "releases")
    for chunk in range(3):
        assert cache.add(_chunk_msg(rel, chunk)) == chunk
    ids = torch.tensor([5, 299, 130])
    expected = cache.lookup(ids)
    (tmp_path / "releases" / "chunk-1.safetensors").write_bytes(b"not a chunk")
    restarted = ReleaseCache(tmp_path / "releases")
    assert restarted.load() == 2 and not (tmp_path / "releases" / "chunk-1.safetensors").exists()
    ask = Message(Kind.CONTROL, 0, "do", "t1", {}, {"op": "releases", "tag": rel.tag})
    assert restarted.held_chunks(ask) == {"chunks": [0, 2]}  # the owner resends chunk 1
    with pytest.raises(ProtocolError, match="no release of 1 record"):
        restarted.lookup(ids)
    restarted.add(_chunk_msg(rel, 1))
    assert torch.equal(restarted.lookup(ids), expected)
    other = Message(Kind.CONTROL, 0, "do", "t1", {}, {"op": "releases", "tag": "ab" * 16})
    assert restarted.held_chunks(other) == {"chunks": []}  # another session's: dropped
    assert not list((tmp_path / "releases").iterdir())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: m.tensors.update(ids=m.tensors["ids"] + 1000), "record ids in"),
        (lambda m: m.tensors.update(ids=torch.zeros_like(m.tensors["ids"])), "distinct"),
        (lambda m: m.tensors.update(ids=m.tensors["ids"].int()), "int64"),
        (lambda m: m.tensors.update(x=m.tensors["x"][:-1]), "one row per id"),
        (lambda m: m.tensors.update(x=m.tensors["x"][:, :4]), "differ from the rows held"),
        (lambda m: m.meta.update(tag="cd" * 16), "another release"),
        (lambda m: m.meta.update(records=10**9), "records"),
        (lambda m: m.meta.update(chunk=7), "chunk"),
        (lambda m: m.tensors.pop("x"), "no tensor 'x'"),
    ],
)
def test_the_cache_refuses_a_malformed_chunk(tmp_path, monkeypatch, change, match):
    monkeypatch.setattr("clicooper.parties.releases.CHUNK_ROWS", 128)
    rel = _release()
    cache = ReleaseCache(tmp_path / "r")
    cache.add(_chunk_msg(rel, 0))
    bad = _chunk_msg(rel, 1)
    change(bad)
    with pytest.raises(ProtocolError, match=match):
        cache.add(bad)
    assert cache.chunks == {0} and [p.name for p in (tmp_path / "r").iterdir()] == [
        "chunk-0.safetensors"
    ]


def test_the_cache_bounds_its_memory(tmp_path):
    cache = ReleaseCache(tmp_path / "r", max_bytes=1000)
    with pytest.raises(ProtocolError, match="release cache limit"):
        cache.add(_chunk_msg(_release(), 0))


def _t1(tmp_path, releases=True, n_trainers=1):
    segment = torch.nn.Sequential(torch.nn.Linear(8, 4))
    cache = ReleaseCache(tmp_path / "t1") if releases else None
    t1 = Trainer(1, n_trainers, segment, 1e-3, releases=cache)
    transport = InProcessTransport()
    transport.attach(t1)
    transport.add_mailbox("do")
    return t1, transport


def test_t1_takes_releases_only_from_the_owner_and_only_in_once_mode(tmp_path):
    rel = _release()
    t1, transport = _t1(tmp_path)
    with pytest.raises(Unauthorized):
        t1.handle(_chunk_msg(rel, 0, sender="t2"))
    assert not t1.releases.chunks
    t1.handle(_chunk_msg(rel, 0))
    assert transport.recv("do").meta == {"op": "release", "chunk": 0}
    every, _ = _t1(tmp_path / "e", releases=False)
    with pytest.raises(ProtocolError, match="takes no releases"):
        every.handle(_chunk_msg(rel, 0))
    with pytest.raises(ValueError, match="only t1"):
        Trainer(2, 2, torch.nn.Linear(8, 4), 1e-3, releases=ReleaseCache(tmp_path / "x"))


def test_t1_refuses_fresh_activations_and_unreleased_records_in_once_mode(tmp_path):
    rel = _release(records=300)
    t1, _ = _t1(tmp_path, n_trainers=2)
    meta = {"micro": 0, "micros": 1, "weight": 1.0, "epoch": 1}
    fresh = Message(Kind.FORWARD, 1, "do", "t1", {"x": torch.zeros(4, 8)}, meta)
    with pytest.raises(ProtocolError, match="carries no activations"):
        t1.handle(fresh)
    named = Message(Kind.FORWARD, 1, "do", "t1", {"ids": torch.arange(4)}, meta)
    with pytest.raises(ProtocolError, match="no release"):
        t1.handle(named)  # nothing released yet
    t1.handle(_chunk_msg(rel, 0))
    late = Message(Kind.FORWARD, 1, "do", "t1", {"ids": torch.tensor([299, 300])}, meta)
    with pytest.raises(ProtocolError, match="no release"):
        t1.handle(late)


def test_the_owner_refuses_a_gradient_in_once_mode():
    rel = _release()
    transport = InProcessTransport()
    transport.add_mailbox("do")
    owner = DataOwner(transport, rel.head, 1, 1e-3, rel.noise, release=rel)
    owner.step = 1
    meta = {"micro": 0, "micros": 1}
    transport.send(Message(Kind.BACKWARD, 1, "t1", "do", {"g": torch.zeros(4, 8)}, meta))
    with pytest.raises(ProtocolError, match="release once takes none"):
        owner._collect([4])
    with pytest.raises(ProtocolError, match="before every record was released"):
        owner.cached_step(torch.zeros(4, dtype=torch.long), torch.arange(4), 1)
    with pytest.raises(ValueError, match="own head"):
        DataOwner(transport, torch.nn.Linear(2, 2), 1, 1e-3, rel.noise, release=rel)


# -- bad input -----------------------------------------------------------------------------------


def test_release_once_refuses_settings_that_train_the_head():
    with pytest.raises(ConfigError, match="release once needs a split mode"):
        quick_config(mode="centralized", **ONCE)
    with pytest.raises(ConfigError, match="mode vanilla adds none"):
        quick_config(mode="vanilla", **ONCE, **{"chain.denoise": "post-mean"})
    assert quick_config(mode="vanilla", **ONCE).privacy.release == "once"  # the baseline
    with pytest.raises(ConfigError, match="no gradient leaves the trainer"):
        quick_config(trainers=1, **ONCE, **{"privacy.gradient_noise_multiplier": 0.5})
    cfg = quick_config(trainers=2, **ONCE, **{"privacy.gradient_noise_multiplier": 0.5})
    assert cfg.privacy.release == "once"  # t2 -> t1 gradients still exist: protected
    quick_config(**{**ONCE, "labels.mode": "feature"})  # fitted on the frozen head's features
    assert accounting.planned_releases("once", 9, False) == 1
    assert accounting.planned_releases("every-epoch", 9, True) == 10


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mode", "centralized"], "release once needs a split mode"),
        (["--mode", "vanilla", "--denoise", "post-mean"], "mode vanilla adds none"),
        (["--head-source", "nope"], "unknown head source 'nope'"),
        (["--trainers", "1", "--gradient-noise", "0.5"], "no gradient leaves the trainer"),
    ],
)
def test_cli_bad_release_settings_fail_with_one_line(tmp_path, cli_inprocess, flags, message):
    out = tmp_path / "run"
    code, err, _ = cli_inprocess(
        "run", "--dataset", "digits", "--release", "once", *flags, "--out", str(out)
    )
    assert code == 2 and message in err and "Traceback" not in err
    assert _one_error_line(err)
    assert not out.exists()


def test_cli_unknown_release_mode_fails_with_one_line(tmp_path, cli_inprocess):
    code, err, _ = cli_inprocess("run", "--release", "sometimes", "--out", str(tmp_path / "r"))
    assert code == 2 and "privacy.release" in err and _one_error_line(err)


class _Source:
    """A head source registered for a test: ``build`` is its behaviour."""

    def __init__(self, name, build):
        self.name, self.build = name, build


def _head_with_public(cfg, data, split_head, public_x):
    """The preset's head as built by ``random``, claiming it was fitted on ``public_x``."""
    built = heads.get_source("random").build(cfg, data, split_head)
    public = Split(public_x, torch.zeros(len(public_x), dtype=torch.int64))
    return dataclasses.replace(built, source="test", public_split=public, public={"n": 1})


def test_a_head_source_that_cannot_be_had_fails_with_one_line(tmp_path, cli_inprocess, monkeypatch):
    def missing(cfg, data, split_head):
        raise DataError(f"no public data at {tmp_path / 'nope'}: give an existing path")

    monkeypatch.setitem(heads.HEAD_SOURCES, "public-path", _Source("public-path", missing))
    out = tmp_path / "run"
    code, err, _ = cli_inprocess(
        "run",
        "--dataset",
        "digits",
        "--release",
        "once",
        "--head-source",
        "public-path",
        "--out",
        str(out),
    )
    assert code == 2 and "no public data at" in err and _one_error_line(err)
    assert not out.exists()


def test_a_head_fitted_on_training_images_is_refused(tmp_path, cli_inprocess, monkeypatch, digits):
    """Whatever a source does, build_head checks its public data against the training set."""

    def overlapping(cfg, data, split_head):  # a "public" split that holds three training images
        return _head_with_public(cfg, data, split_head, data.train.x[[0, 5, 9]])

    def disjoint(cfg, data, split_head):
        return _head_with_public(cfg, data, split_head, data.train.x[:50] + 1e-3)

    monkeypatch.setitem(heads.HEAD_SOURCES, "leaky", _Source("leaky", overlapping))
    monkeypatch.setitem(heads.HEAD_SOURCES, "clean", _Source("clean", disjoint))
    args = ["run", "--dataset", "digits", "--release", "once", "--train-subset", "200"]
    code, err, _ = cli_inprocess(*args, "--head-source", "leaky", "--out", str(tmp_path / "a"))
    assert code == 2 and "shares 3 image(s) byte for byte" in err
    assert _one_error_line(err) and not (tmp_path / "a").exists()
    cfg = quick_config(**{**ONCE, "head.source": "clean"})
    head = release.frozen_head(cfg, digits, preset_split(cfg, digits.image_shape, 10))
    assert head.privacy["source"] == "test" and not head.module.training
    assert len(head.public) == 50


def test_one_registry_one_error_for_an_unknown_head_source(tmp_path, cli_inprocess):
    """The config, ``run`` and ``evaluate`` all look sources up in heads.HEAD_SOURCES."""
    assert not hasattr(release, "HEAD_SOURCES") and not hasattr(release, "head_source")
    with pytest.raises(ConfigError, match="unknown head source 'nope': use one of public"):
        RunConfig.load(**{"head.source": "nope"})
    for argv in (
        ["run", "--dataset", "digits", "--release", "once", "--head-source", "nope"],
        ["evaluate", "--once-head-source", "nope"],
    ):
        code, err, _ = cli_inprocess(*argv, "--out", str(tmp_path / "r"))
        assert code == 2 and "unknown head source 'nope'" in err and _one_error_line(err)


# -- recovery: a release is never rolled back ---------------------------------------------------


class _InProcessRecovery:
    """Parties live in this process: reconnecting is a no-op, rollback does the work."""

    def reconnect(self) -> None:
        pass


@pytest.fixture
def recovering(monkeypatch):
    """Sessions whose driver recovers from failures in-process (as tests/deploy does)."""
    real = session_mod.Driver

    def driver(*args, **kwargs):
        return real(*args, **{**kwargs, "recovery": _InProcessRecovery()})

    monkeypatch.setattr(session_mod, "Driver", driver)
    monkeypatch.setattr("clicooper.parties.releases.CHUNK_ROWS", 128)  # 400 records: 4 chunks


def _fail_once(monkeypatch, cls, name, when, before=None):
    """``cls.name`` raises once (after its work, or ``before`` it, which runs first)."""
    real, fired = getattr(cls, name), []

    def flaky(self, *args, **kwargs):
        if not fired and when(self, *args, **kwargs):
            fired.append(True)
            if before is not None:
                before(self)
                raise ProtocolError("injected failure")
            real(self, *args, **kwargs)
            raise ConnectionError("injected failure")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, flaky)
    return fired


def _weights(sess) -> list[torch.Tensor]:
    return [p.detach().clone() for p in sess.model.parameters()]


@pytest.fixture
def clean_once(tmp_path, small_digits, recovering):
    """A run without failure, and the config that repeats it (its owner secret)."""
    cfg = quick_config(epochs=2, checkpoint_steps=5, **ONCE, **{"watermark.enabled": False})
    clean = session_mod.run(cfg, tmp_path / "clean", data=small_digits)
    secret = tmp_path / "clean" / "owner" / "owner.secret"
    return cfg.model_copy(update={"owner_secret": secret}), clean


def test_a_failure_in_the_release_phase_sends_only_the_missing_chunks(
    tmp_path, small_digits, monkeypatch, clean_once
):
    cfg, clean = clean_once
    calls = []
    fired = _fail_once(  # t1 holds chunks 0 and 1 when the owner loses it
        monkeypatch, DataOwner, "release_next", lambda self: calls.append(1) or len(calls) == 3
    )
    broken, delivered = _spied_run(monkeypatch, cfg, tmp_path / "broken", small_digits)
    assert fired
    chunks = [m.meta["chunk"] for m in delivered["t1"] if m.kind == Kind.RELEASE]
    assert chunks == [0, 1, 2, 3]  # after the recovery only 2 and 3: none twice
    privacy = broken.results["privacy"]
    assert privacy["resent_chunks"] == 0 and privacy["chunks"] == 4
    assert privacy["releases_per_record"] == {"min": 1, "max": 1, "records": 400}
    assert privacy["epsilon"] == clean.results["privacy"]["epsilon"]
    rec = broken.results["transport"]["recoveries"]
    assert [(r["failed_at_step"], r["resumed_from_step"]) for r in rec] == [(0, 0)]
    assert all(torch.equal(a, b) for a, b in zip(_weights(clean), _weights(broken), strict=True))


def test_a_t1_that_lost_its_cache_gets_the_same_bytes_again_not_a_new_release(
    tmp_path, small_digits, monkeypatch, clean_once
):
    cfg, clean = clean_once
    calls = []
    fired = _fail_once(  # mid-epoch 1, t1's cache is gone (memory and disk)
        monkeypatch,
        ReleaseCache,
        "lookup",
        lambda self, ids: calls.append(1) or len(calls) == 9,
        before=ReleaseCache.clear,
    )
    broken, delivered = _spied_run(monkeypatch, cfg, tmp_path / "broken", small_digits)
    assert fired
    sent = [m for m in delivered["t1"] if m.kind == Kind.RELEASE]
    assert [m.meta["chunk"] for m in sent] == [0, 1, 2, 3, 0, 1, 2, 3]
    for first, again in zip(sent[:4], sent[4:], strict=True):
        assert torch.equal(first.tensors["x"], again.tensors["x"])  # the very same values
    privacy = broken.results["privacy"]
    assert privacy["resent_chunks"] == 4
    assert privacy["releases_per_record"] == {"min": 1, "max": 1, "records": 400}
    assert privacy["epsilon"] == clean.results["privacy"]["epsilon"]
    (rec,) = broken.results["transport"]["recoveries"]
    assert rec["resumed_from_step"] == 5 and "injected failure" in rec["error"]
    assert all(torch.equal(a, b) for a, b in zip(_weights(clean), _weights(broken), strict=True))
