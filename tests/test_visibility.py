"""DESIGN §2: a party that never receives a value cannot leak it.

Every message is captured at delivery (after the real encode/decode) and the
visibility table is checked against what each party actually received.
"""

import pytest
import torch
from cc_helpers import SpyTransport, quick_config

from clicooper.common.serde import encode_message
from clicooper.runtime import factory
from clicooper.runtime import session as session_mod


@pytest.fixture
def captured(tmp_path, small_digits, monkeypatch):
    spies = []

    def make():
        spies.append(SpyTransport())
        return spies[-1]

    monkeypatch.setattr(factory, "InProcessTransport", make)
    tmp_path.mkdir(exist_ok=True)
    cfg = quick_config(trainers=3, epochs=1, **{"labels.decoys": 2})
    sess = session_mod.run(cfg, tmp_path, data=small_digits)
    return sess, spies[0].delivered, small_digits


def test_trainers_never_receive_inputs_or_true_labels(captured):
    sess, delivered, data = captured
    images = torch.cat([data.train.x, data.test.x]).flatten(1)
    image_rows = {row.numpy().tobytes() for row in images}
    labels = data.train.y
    seen = 0
    for name in ("t1", "t2", "t3"):
        for msg in delivered[name]:
            for value in msg.tensors.values():
                assert value.ndim != 4  # no image-shaped tensor reaches a trainer
                if value.ndim == 2 and value.shape[1] == images.shape[1]:
                    rows = value.to(images.dtype)
                    assert not any(r.numpy().tobytes() in image_rows for r in rows)
                    seen += 1
                if value.dtype == torch.int64 and value.ndim == 1 and len(value) == 32:
                    assert not any(
                        torch.equal(value, labels[i : i + 32]) for i in range(0, 400, 32)
                    )
    assert seen > 0  # the check above really looked at activations of the image's size


def test_only_the_last_trainer_gets_pseudo_labels_and_never_true_ones(captured):
    sess, delivered, data = captured
    label_msgs = {name: [m for m in msgs if m.kind == "labels"] for name, msgs in delivered.items()}
    assert label_msgs["t3"] and not label_msgs.get("t1") and not label_msgs.get("t2")
    pseudo = torch.cat([m.tensors["y"] for m in label_msgs["t3"]])
    ids = torch.cat(sess.owner.log.sample_ids)
    true = data.train.y[ids]
    assert not torch.equal(pseudo, true)
    assert torch.equal(sess.owner.labels.decode_labels(pseudo), true)  # only the owner can map
    assert int(pseudo.max()) < sess.owner.labels.pseudo_classes


def test_middle_trainer_sees_only_its_neighbours(captured):
    _, delivered, _ = captured
    senders = {m.sender for m in delivered["t2"] if m.kind in ("forward", "backward", "infer")}
    assert senders == {"t1", "t3"}
    assert {m.sender for m in delivered["t1"] if m.kind == "forward"} == {"do"}


def test_first_trainer_receives_noisy_clipped_activations(captured):
    sess, delivered, data = captured
    acts = torch.cat([m.tensors["x"] for m in delivered["t1"] if m.kind == "forward"])
    assert acts.shape[1] == 64
    with torch.no_grad():  # the released values are not the head's clean output
        clean = sess.owner.noise.clip(sess.owner.head(data.train.x[:64]))
    assert float(clean.norm(dim=1).max()) <= 1.0 + 1e-5
    sigma = sess.owner.noise.noise_multiplier * sess.owner.noise.clip_norm
    # noisy activations: per-coordinate spread at least the noise std
    assert float(acts.std(0).min()) > 0.8 * sigma


def test_secrets_never_cross_the_boundary(captured, tmp_path):
    sess, delivered, _ = captured
    labels = sess.owner.labels
    secrets = [
        (tmp_path / "owner" / "owner.secret").read_bytes(),
        labels._sub_key,
        labels.permutation.numpy().astype("<i8").tobytes(),
        labels.permutation.numpy().astype("<i4").tobytes(),
        labels.class_of_pseudo.numpy().astype("<i8").tobytes(),
    ]
    blobs = [encode_message(m) for msgs in delivered.values() for m in msgs]
    assert len(blobs) > 50
    for secret in secrets:
        assert len(secret) >= 32
        assert not any(secret in blob for blob in blobs)
        assert not any(secret.hex() in blob.decode("latin-1") for blob in blobs)


def test_verifier_sees_keys_records_and_trainer_segments_only(captured):
    sess, delivered, _ = captured
    msgs = delivered["verifier"]
    assert {m.kind for m in msgs} == {"register", "control", "record", "audit"}
    for msg in msgs:
        if msg.sender == "do":  # the owner sends its key, the open request and its records
            assert not msg.tensors
            assert "watermark_secret" not in msg.meta
        if msg.kind == "audit":  # a trainer's own segment, nothing else
            trainer = sess.trainers[int(msg.sender[1:]) - 1]
            assert set(msg.tensors) == set(trainer.segment.state_dict())
    registered = {m.sender for m in msgs if m.kind == "register"}
    assert registered == {"do", "t1", "t2", "t3"}
