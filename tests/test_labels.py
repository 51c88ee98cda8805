import pytest
import torch

from clicooper.privacy.labels import LabelObfuscator
from clicooper.privacy.secrets import OwnerSecret


def _fit(mode, expansion=4, decoys=3, n=600, secret=None):
    ob = LabelObfuscator(secret or OwnerSecret.generate(), 10, expansion, decoys, mode)
    y = torch.arange(n) % 10
    features = torch.randn(n, 12) + y.unsqueeze(1).float()
    ob.fit(features, y)
    return ob, y


@pytest.mark.parametrize("mode", ["keyed", "feature"])
def test_round_trip_is_exact(mode):
    ob, y = _fit(mode)
    pseudo = ob.encode(y, torch.arange(len(y)))
    assert ob.pseudo_classes == 43
    assert int(pseudo.min()) >= 0 and int(pseudo.max()) < 43
    assert torch.equal(ob.decode_labels(pseudo), y)
    # decoys are never used
    decoys = ob.permutation[40:]
    assert not torch.isin(pseudo, decoys).any()


@pytest.mark.parametrize("mode", ["keyed", "feature"])
def test_every_class_uses_several_sub_classes(mode):
    ob, y = _fit(mode)
    pseudo = ob.encode(y, torch.arange(len(y)))
    for c in range(10):
        assert len(set(pseudo[y == c].tolist())) == 4


def test_decoding_logits_puts_mass_on_the_owning_class():
    ob, _ = _fit("keyed")
    logits = torch.full((43, 43), -20.0)
    logits[torch.arange(43), torch.arange(43)] = 20.0  # each row is sure of one pseudo-class
    scores = ob.decode_logits(logits)
    real = ob.class_of_pseudo >= 0
    assert torch.equal(scores.argmax(1)[real], ob.class_of_pseudo[real])
    assert torch.allclose(scores.exp().sum(1)[real], torch.ones(int(real.sum())), atol=1e-4)


def test_keyed_sub_labels_are_stable_and_secret_dependent():
    s = OwnerSecret.generate()
    a, y = _fit("keyed", secret=s)
    b, _ = _fit("keyed", secret=s)
    c, _ = _fit("keyed")
    ids = torch.arange(len(y))
    assert torch.equal(a.encode(y, ids), b.encode(y, ids))
    assert not torch.equal(a.encode(y, ids), c.encode(y, ids))


def test_two_owner_secrets_give_different_permutations():
    perms = {tuple(_fit("keyed")[0].permutation.tolist()) for _ in range(5)}
    assert len(perms) == 5


def test_feature_sub_classes_follow_the_features():
    ob = LabelObfuscator(OwnerSecret.generate(), 2, 2, 0, "feature")
    y = torch.zeros(200, dtype=torch.long)
    y[100:] = 1
    side = (torch.arange(200) % 2).float()  # two well separated groups within each class
    features = torch.randn(200, 8) * 0.1 + side.unsqueeze(1) * 5
    ob.fit(features, y)
    subs = ob.sub_labels
    for c in (0, 1):
        grp = subs[y == c]
        agree = (grp == side[y == c].long()).float().mean()
        assert agree in (0.0, 1.0)  # clusters match the groups up to their naming


def test_encode_before_fit_is_an_error():
    ob = LabelObfuscator(OwnerSecret.generate(), 10, 2)
    with pytest.raises(RuntimeError, match="fit"):
        ob.encode(torch.tensor([1]), torch.tensor([0]))
