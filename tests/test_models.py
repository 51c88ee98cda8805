import pytest
import torch
from torch import nn

from clicooper.models import build_preset, split_blocks, split_sequential


@pytest.mark.parametrize("preset", ["mlp", "cnn"])
@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_head_and_segments_compose_to_the_full_model(preset, n):
    torch.manual_seed(0)
    split = split_blocks(build_preset(preset, (1, 28, 28), 40, n), "bottleneck", n)
    assert len(split.segments) == n
    x = torch.rand(5, 1, 28, 28)
    z = split.head(x)
    assert z.shape == (5, 64)  # the default cut ends in a small bottleneck
    out = z
    for seg in split.segments:
        out = seg(out)
    assert out.shape == (5, 40)
    assert torch.equal(out, split.full()(x))
    # the last trainer holds the classifier
    assert isinstance(list(split.segments[-1].modules())[-1], nn.Linear)


def test_cnn_named_cut_points_change_the_cut_dimension():
    shapes = {}
    for cut in ("conv1", "conv2", "bottleneck"):
        split = split_blocks(build_preset("cnn", (1, 28, 28), 10, 2), cut, 2)
        shapes[cut] = split.head(torch.rand(2, 1, 28, 28))[0].numel()
    assert shapes == {"conv1": 16 * 14 * 14, "conv2": 32 * 7 * 7, "bottleneck": 64}


def test_unknown_cut_lists_the_valid_ones():
    with pytest.raises(ValueError, match="conv1"):
        split_blocks(build_preset("cnn", (1, 8, 8), 10, 2), "conv9", 2)


def test_too_many_trainers_is_refused():
    with pytest.raises(ValueError, match="1 to 8"):
        build_preset("mlp", (1, 8, 8), 10, 9)


def test_user_sequential_split_at_indices():
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10)
    )
    split = split_sequential(model, [2, 4])
    assert len(split.segments) == 2
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(split.full()(x), model(x))
    with pytest.raises(ValueError, match="increase"):
        split_sequential(model, [4, 2])
    with pytest.raises(ValueError):
        split_sequential(model, [0])
