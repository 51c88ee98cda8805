"""Release once, how the chain learns (issue 10, point 4): the warm start on the public
split's clean activations, the class-posterior denoising at t1, the lr drop after the warm
start, and the simple readouts of the same releases reported beside the chain.

Every message is captured at delivery (SpyTransport, after the real encode/decode).
"""

from __future__ import annotations

import math

import pytest
import torch
from cc_helpers import SpyTransport, quick_config

from clicooper.cli.progress import summary_table
from clicooper.common.messages import Kind, Message, ProtocolError
from clicooper.parties.releases import OwnerRelease, ReleaseCache
from clicooper.privacy import accounting, readouts
from clicooper.privacy.activation import ActivationNoise
from clicooper.privacy.labels import LabelObfuscator
from clicooper.privacy.secrets import OwnerSecret
from clicooper.runtime import factory
from clicooper.runtime import session as session_mod
from clicooper.runtime.optim import OptimSettings, lr_factor

PUBLIC = 80  # public records carved off the 400 (head.public_split)
BATCH = 32
WARM = 2
CHAIN = {
    "privacy.release": "once",
    "labels.mode": "keyed",
    "head.source": "public",
    "head.public_split": PUBLIC,
    "head.pretrain_epochs": 2,
    "chain.warm_epochs": WARM,
    "chain.denoise": "post-mean",
    "chain.replay": False,  # the warm start alone here (replay: its own test below)
    "privacy.target_epsilon": 8.0,
}


@pytest.fixture(scope="module")
def warm_run(tmp_path_factory, digits):
    """A public head, 2 warm-start epochs, then 2 epochs on the denoised releases, with the
    watermark chain on (run once: the tests below only read it)."""
    cfg = quick_config(epochs=2, batch_size=BATCH, **CHAIN)
    out = tmp_path_factory.mktemp("warm") / "run"
    spies: list[SpyTransport] = []

    def make() -> SpyTransport:
        spies.append(SpyTransport())
        return spies[-1]

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(factory, "InProcessTransport", make)
        sess = session_mod.run(cfg, out, data=digits.limit(400, 200, seed=0))
    return cfg, sess, spies[0].delivered, out


def _by_id(chunks: list[Message]) -> torch.Tensor:
    """The rows of RELEASE chunks, in record-id order."""
    ids = torch.cat([m.tensors["ids"] for m in chunks])
    x = torch.cat([m.tensors["x"] for m in chunks])
    out = torch.empty_like(x)
    out[ids] = x
    return out


def _forwards(delivered, public: bool) -> list[Message]:
    return [
        m
        for m in delivered["t1"]
        if m.kind == Kind.FORWARD and (m.meta.get("set") == "public") == public
    ]


def test_the_chain_warm_starts_on_the_public_set_then_trains_on_the_releases(warm_run):
    cfg, sess, delivered, _ = warm_run
    private = 400 - PUBLIC
    warm, steps = _forwards(delivered, True), _forwards(delivered, False)
    assert len(warm) == WARM * math.ceil(PUBLIC / BATCH)  # every public record, each warm epoch
    assert torch.equal(
        torch.cat([m.tensors["ids"] for m in warm]).sort().values,
        torch.arange(PUBLIC).repeat(WARM).sort().values,
    )
    assert len(steps) == 2 * math.ceil(private / BATCH)
    assert all(set(m.tensors) == {"ids"} for m in warm + steps)  # ids only, never activations
    first_private = delivered["t1"].index(steps[0])
    assert all(delivered["t1"].index(m) < first_private for m in warm)  # the warm start first
    phases = [entry.get("phase") for entry in sess.results["history"]]
    assert phases == ["public"] * WARM + [None] * 2


def test_the_public_set_is_clean_and_the_private_records_are_released_once(warm_run, digits):
    cfg, sess, delivered, _ = warm_run
    owner = sess.owner
    releases = [m for m in delivered["t1"] if m.kind == Kind.RELEASE]
    public = [m for m in releases if m.meta["set"] == "public"]
    private = [m for m in releases if m.meta["set"] == "private"]
    assert public and private and len(public) + len(private) == len(releases)
    x_pub = digits.limit(400, 200, seed=0).train.x[:PUBLIC]
    with torch.no_grad():
        clean = owner.noise.clip(owner.head(x_pub))
    assert torch.equal(_by_id(public), clean)  # public data: no noise
    ids = torch.cat([m.tensors["ids"] for m in private])
    assert torch.equal(ids.sort().values, torch.arange(400 - PUBLIC))  # each record once
    privacy = sess.results["privacy"]
    assert privacy["releases_per_record"] == {"min": 1, "max": 1, "records": 400 - PUBLIC}
    one = accounting.epsilon(privacy["noise_multiplier"], 1, cfg.privacy.delta)
    assert privacy["epsilon"] == pytest.approx(one) and privacy["epsilon"] <= 8.0


def test_t1_trains_on_posterior_means_with_the_pseudo_labels_the_last_trainer_gets(warm_run):
    cfg, sess, delivered, _ = warm_run
    private = [m for m in delivered["t1"] if m.kind == Kind.RELEASE and m.meta["set"] == "private"]
    y = torch.cat([m.tensors["y"] for m in private])
    ids = torch.cat([m.tensors["ids"] for m in private])
    # the same pseudo-labels the last trainer is sent each step
    steps = {m.step: m for m in _forwards(delivered, False) if m.meta["micro"] == 0}
    labels = [m for m in delivered["t2"] if m.kind == Kind.LABELS and m.step in steps]
    by_id = torch.full((400 - PUBLIC,), -1, dtype=torch.long)
    by_id[ids] = y
    assert len(labels) == len(steps)
    for msg in labels:
        assert torch.equal(msg.tensors["y"], by_id[steps[msg.step].tensors["ids"]])
    noise_std = private[0].meta["noise_std"]
    assert noise_std == pytest.approx(sess.owner.noise.noise_multiplier)
    cache = sess.trainers[0].releases
    rows = cache.training_rows(torch.arange(len(ids)))
    raw = cache.lookup(torch.arange(len(ids)))
    assert not torch.allclose(rows, raw) and rows.norm(dim=1).mean() < raw.norm(dim=1).mean()


def test_the_trainers_do_the_warm_start_and_the_owner_only_its_one_forward_pass(warm_run):
    _, sess, _, _ = warm_run
    compute, head = sess.results["compute"], sess.results["privacy"]["head"]
    per_record = head["forward_flops_per_record"]
    assert compute["flops"]["do"] == pytest.approx((400 - PUBLIC) * per_record, rel=1e-6)
    pretrain = compute["head_pretrain"]
    assert pretrain["runner"] == "trainers" and pretrain["credited_to"] == "t1"
    assert pretrain["flops"] == head["pretrain_flops"] + PUBLIC * per_record
    assert compute["flops"]["t1"] > pretrain["flops"]  # and t1 trained its segment too
    assert sess.owner.optimizer is None and not any(
        p.requires_grad for p in sess.owner.head.parameters()
    )
    assert sess.results["watermark"]["verified"]  # the ledger covers the warm start too


def test_results_and_summary_carry_the_readouts_of_the_same_releases(warm_run):
    _, sess, delivered, _ = warm_run
    found = sess.results["readouts"]
    sent = [m for m in delivered["t1"] if m.kind == Kind.RELEASE and m.meta["set"] == "private"]
    r = _by_id(sent)
    data = sess.dataset  # the owner's private records (the public split carved off)
    with torch.no_grad():
        test = sess.owner.head(data.test.x).flatten(1)
    for name, fit in (("ncm", readouts.ncm), ("logistic", readouts.logistic)):
        ours = readouts.accuracy(fit(r, data.train.y, 10)(test), data.test.y)
        assert found[name]["test"] == pytest.approx(ours)  # what t1 received, refitted
    assert set(found) >= {"ncm", "logistic", "chain", "public_only"}
    assert found["chain"]["test"] == sess.results["accuracy"]["test"]
    assert found["public_only"]["test"] == sess.results["history"][WARM - 1]["test_accuracy"]
    assert all(0.0 <= found[k]["test"] <= 1.0 for k in ("ncm", "logistic"))
    rows = {row: None for row in summary_table(sess.results).columns[0].cells}
    assert "readout of the releases: nearest class mean" in rows
    assert "chain after its public warm start" in rows


def test_the_lr_drops_by_the_factor_once_the_warm_start_is_over():
    factor = lr_factor(OptimSettings(total_steps=100, phase_steps=30, phase_factor=0.1))
    assert factor(0) == factor(29) == 1.0
    assert factor(30) == factor(99) == pytest.approx(0.1)
    assert lr_factor(OptimSettings(total_steps=100))(99) == 1.0


def test_posterior_means_move_releases_towards_the_clean_activations():
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(3, 8, generator=gen)
    y = torch.arange(3).repeat(400)
    clean = means[y] + 0.1 * torch.randn(len(y), 8, generator=gen)
    noisy = clean + 1.0 * torch.randn(len(y), 8, generator=gen)
    denoised = readouts.posterior_means(noisy, y, readouts.class_posterior(noisy, y, 3, 1.0))
    assert (denoised - clean).square().mean() < 0.2 * (noisy - clean).square().mean()


def _chunk(y: torch.Tensor | None, noise_std: float = 1.0, **meta: object) -> Message:
    tensors = {"ids": torch.arange(4), "x": torch.zeros(4, 3)}
    if y is not None:
        tensors["y"] = y
    base = {"tag": "ab" * 16, "chunk": 0, "chunks": 2, "records": 8, "noise_std": noise_std}
    return Message(Kind.RELEASE, 0, "do", "t1", tensors, {**base, **meta})


@pytest.mark.parametrize(
    ("y", "match"),
    [
        (torch.zeros(4, dtype=torch.int32), "int64"),
        (torch.zeros(3, dtype=torch.int64), "one label per id"),
        (torch.full((4,), -1, dtype=torch.int64), "must lie in"),
    ],
)
def test_the_cache_refuses_malformed_pseudo_labels(tmp_path, y, match):
    with pytest.raises(ProtocolError, match=match):
        ReleaseCache(tmp_path).add(_chunk(y))


def test_the_cache_refuses_chunks_with_and_without_labels_mixed(tmp_path):
    cache = ReleaseCache(tmp_path)
    cache.add(_chunk(torch.zeros(4, dtype=torch.int64)))
    second = _chunk(None, chunk=1)
    second.tensors["ids"] = torch.arange(4, 8)
    with pytest.raises(ProtocolError, match="all carry pseudo-labels"):
        cache.add(second)
    with pytest.raises(ProtocolError, match="only once it holds all"):
        cache.training_rows(torch.arange(4))


def test_t1_refuses_a_release_set_it_does_not_hold(tmp_path):
    from clicooper.parties import Trainer

    t1 = Trainer(1, 2, torch.nn.Linear(3, 3), 1e-3, releases=ReleaseCache(tmp_path))
    msg = _chunk(None, set="public")
    with pytest.raises(ProtocolError, match="no release set 'public'"):
        t1.handle(msg)
    msg = _chunk(None, set=["private"])
    with pytest.raises(ProtocolError, match="no release set"):
        t1.handle(msg)


def test_public_pseudo_labels_use_their_own_key_and_the_same_permutation():
    labels = LabelObfuscator(OwnerSecret.generate(), 10, 4, mode="keyed")
    y = torch.arange(10).repeat(5)
    labels.fit(torch.empty(50, 0), y)
    public = labels.encode_public(y)
    assert torch.equal(labels.decode_labels(public), y)  # they decode to the true class
    assert torch.equal(labels.encode(y, torch.arange(50)), labels.encode(y, torch.arange(50)))
    assert not torch.equal(public, labels.encode(y, torch.arange(50)))  # another sub-label key


def test_the_owner_release_sends_labels_and_its_noise_std():
    noise = ActivationNoise(1.0, 2.0, "gaussian", seed=1)
    head = torch.nn.Linear(5, 3)
    y = torch.arange(6)
    rel = OwnerRelease(head, noise, OwnerSecret.generate(), torch.randn(6, 5), labels=y)
    tensors, meta = rel.message(0)
    assert torch.equal(tensors["y"], y[tensors["ids"]]) and meta["noise_std"] == 2.0
    assert meta["set"] == "private"
    public = OwnerRelease(head, noise, OwnerSecret.generate(), torch.randn(6, 5), public=True)
    tensors, meta = public.message(0)
    assert "y" not in tensors and meta["set"] == "public"
    with torch.no_grad():
        assert torch.equal(tensors["x"], noise.clip(head(public.x[tensors["ids"]])))


def test_replay_spreads_the_public_set_over_every_epoch_on_the_releases(tmp_path, digits):
    """``chain.replay``: each epoch on the releases also passes over the whole public set,
    its batches spread among the releases' (the epoch ends on a public batch); nothing is
    released again and the optimizer's schedule counts the extra steps."""
    settings = {**CHAIN, "chain.warm_epochs": 1, "chain.denoise": "none", "chain.replay": True}
    cfg = quick_config(epochs=2, batch_size=BATCH, **settings, **{"watermark.enabled": False})
    spies: list[SpyTransport] = []

    def make() -> SpyTransport:
        spies.append(SpyTransport())
        return spies[-1]

    planned: list[int] = []
    real = OptimSettings.from_config

    def from_config(cfg, total_steps, phase_steps=0):
        planned.append(total_steps)
        return real(cfg, total_steps, phase_steps)

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(factory, "InProcessTransport", make)
        monkeypatch.setattr(session_mod.OptimSettings, "from_config", from_config)
        sess = session_mod.run(cfg, tmp_path / "run", data=digits.limit(400, 200, seed=0))
    forwards = [m for m in spies[0].delivered["t1"] if m.kind == Kind.FORWARD]
    public_steps, release_steps = math.ceil(PUBLIC / BATCH), math.ceil((400 - PUBLIC) / BATCH)
    assert sess.results["transport"]["steps"] == public_steps + 2 * (release_steps + public_steps)
    for epoch in (2, 3):  # the epochs after the one warm-start epoch
        sets = [m.meta.get("set") == "public" for m in forwards if m.meta["epoch"] == epoch]
        assert sets.count(True) == public_steps and sets.count(False) == release_steps
        assert sets[-1] and not sets[0]  # spread among the releases, not bunched up front
        assert not any(a and b for a, b in zip(sets, sets[1:], strict=False))
        ids = [m.tensors["ids"] for m in forwards if m.meta["epoch"] == epoch]
        public_ids = torch.cat([i for i, p in zip(ids, sets, strict=True) if p])
        assert torch.equal(public_ids.sort().values, torch.arange(PUBLIC))
    privacy = sess.results["privacy"]
    assert privacy["releases_per_record"] == {"min": 1, "max": 1, "records": 400 - PUBLIC}
    assert privacy["public_set"]["releases_per_record"]["max"] == 1  # sent once, reused
    assert len(sess.results["history"]) == 3
    assert planned == [sess.results["transport"]["steps"]]  # the lr schedule's length


def test_a_fresh_optimizer_drops_the_warm_starts_moments_at_the_switch_only():
    """``chain.fresh_optimizer``: the trainer's Adam state is dropped once, right after the
    warm start's last step, so the releases' first step starts from moments of its own."""
    from clicooper.parties import Trainer

    cfg = quick_config(**{**CHAIN, "chain.fresh_optimizer": True})
    seg = torch.nn.Linear(3, 2)
    trainer = Trainer(2, 2, seg, OptimSettings.from_config(cfg, 10, 4))
    assert trainer.reset_after == 4
    kept = []
    for _ in range(6):
        seg.weight.grad, seg.bias.grad = torch.ones(2, 3), torch.ones(2)
        trainer._apply()
        kept.append(
            int(trainer.optimizer.state[seg.weight]["step"]) if trainer.optimizer.state else 0
        )
    assert kept == [1, 2, 3, 0, 1, 2]  # dropped after step 4, then counting afresh
    plain = quick_config(**CHAIN)
    assert (
        Trainer(2, 2, torch.nn.Linear(3, 2), OptimSettings.from_config(plain, 10, 4)).reset_after
        == 0
    )
