"""Herding and k-center on hand-worked points, and baselines/coreset.py on the embedded digits."""
import pytest
import torch

from baselines import coreset
from baselines.harness.synset import load_synset
from baselines.methods.coresets import herding, k_center

# 1-D points 0, 1, 2, 3, 10 (mean 3.2), worked by hand:
# herding, target sum (i + 1) * 3.2 after step i:
#   step 0: target 3.2, closest 3 -> index 3          (sum 3)
#   step 1: target 6.4, 3+2=5 (1.4) beats 3+1=4 (2.4), 3+0=3, 3+10=13 -> index 2   (sum 5)
#   step 2: target 9.6, 5+1=6 (3.6) beats 5+0=5 (4.6), 5+10=15 (5.4)   -> index 1   (sum 6)
#   step 3: target 12.8, 6+10=16 (3.2) beats 6+0=6 (6.8)              -> index 4   (sum 16)
#   step 4: only 0 is left                                           -> index 0
# k-center: start at the point closest to the mean (3 -> index 3); the farthest from {3} is 10
#   (index 4); then 0 (distance 3 to its nearest centre); then 1 and 2 tie at distance 1, the
#   lower index (1) first; then 2.
LINE = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])


def test_herding_on_a_line():
    assert herding(LINE, 5).tolist() == [3, 2, 1, 4, 0]
    assert herding(LINE, 2).tolist() == [3, 2]


def test_k_center_on_a_line():
    assert k_center(LINE, 5).tolist() == [3, 4, 0, 1, 2]
    assert k_center(LINE, 3).tolist() == [3, 4, 0]


def test_two_clusters_in_the_plane():
    # four points around (0, 0) and one outlier at (10, 0): mean (2, 0).
    points = torch.tensor([[0.0, 1.0], [0.0, -1.0], [1.0, 0.0], [-1.0, 0.0], [10.0, 0.0]])
    # herding: (1, 0) is closest to the mean; then the running mean ((1, 0) + x) / 2 is
    # (5.5, 0) for the outlier, 3.5 from the mean, but (0.5, +-0.5) for (0, +-1), 1.58 away, and
    # (0, 0) for (-1, 0), 2 away: so (0, 1) (index 0, the lower index of the tie with (0, -1)).
    assert herding(points, 2).tolist() == [2, 0]
    # k-center: the same start, then the outlier, the farthest point.
    assert k_center(points, 2).tolist() == [2, 4]


@pytest.mark.parametrize("select", [herding, k_center])
def test_k_equal_n_is_a_permutation_and_k_above_n_is_refused(select):
    features = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    assert sorted(select(features, 7).tolist()) == list(range(7))
    assert select(features, 0).tolist() == []
    with pytest.raises(ValueError, match="k=8 of 7"):
        select(features, 8)
    with pytest.raises(ValueError, match="k=-1"):
        select(features, -1)
    with pytest.raises(ValueError, match="features must be"):
        select(features[:, 0], 2)


@pytest.mark.parametrize("select", [herding, k_center])
def test_duplicates_are_chosen_once(select):
    features = torch.tensor([[1.0], [1.0], [1.0], [5.0]])
    assert sorted(select(features, 4).tolist()) == [0, 1, 2, 3]


# -- the command line -------------------------------------------------------------------------
def _network_file(tmp_path):
    """A (random) ConvNet for digits saved as a state dict: the embedding network."""
    from baselines.harness.networks import get_network
    torch.manual_seed(0)
    path = tmp_path / "net.pt"
    torch.save(get_network("convnet", 1, 10, 32).state_dict(), path)
    return path


@pytest.mark.parametrize("method", ["herding", "kcenter"])
def test_cli_with_the_expert_pool_writes_a_set(method, tmp_path, random_experts):
    out = tmp_path / method
    assert coreset.main(["--method", method, "--ipc", "2", "--device", "cpu", "--no-progress",
                         "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"synthetic.pt", "grid.png"}
    synset = load_synset(out / "synthetic.pt")
    assert synset.images.shape == (20, 1, 32, 32)
    assert synset.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert synset.meta["method"] == f"coreset-{method}"
    config = synset.meta["config"]
    assert config["expert_index"] == 0 and config["expert_seed"] == 0
    assert config["expert_epochs"] == 15  # dm's embedded default: the pool a dm run uses


def test_cli_with_a_network_file_selects_on_its_embeddings(tmp_path):
    from baselines.harness.datasets import load_dataset
    from baselines.harness.networks import get_network
    net_file = _network_file(tmp_path)
    out = tmp_path / "kc"
    assert coreset.main(["--method", "kcenter", "--ipc", "3", "--network", str(net_file),
                         "--device", "cpu", "--out", str(out)]) == 0
    synset = load_synset(out / "synthetic.pt")
    indices = synset.meta["config"]["indices"]
    data = load_dataset("digits")
    net = get_network("convnet", 1, 10, 32)
    net.load_state_dict(torch.load(net_file, weights_only=True))
    with torch.no_grad():
        features = net.eval().embed(data.train.images)
    labels = data.train.labels
    members = torch.nonzero(labels == 4, as_tuple=True)[0]
    assert indices[12:15] == members[k_center(features[members], 3)].tolist()
    assert labels[indices].tolist() == [c for c in range(10) for _ in range(3)]
    pixels = data.denormalize(data.train.images[indices]).clamp(0, 1)
    assert torch.allclose(synset.images, pixels, atol=1e-6)


def _one_line_error(capsys, argv, *fragments):
    assert coreset.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_cli_bad_input(tmp_path, capsys):
    out = tmp_path / "o"
    net_file = _network_file(tmp_path)
    _one_line_error(capsys, ["--method", "random", "--network", str(net_file), "--out", str(out)],
                    "--network", "herding")
    _one_line_error(capsys, ["--method", "herding", "--network", str(tmp_path / "none.pt"),
                             "--out", str(out)], "not a file")
    _one_line_error(capsys, ["--method", "herding", "--network", str(net_file), "--experts",
                             str(tmp_path), "--out", str(out)], "not both")
    _one_line_error(capsys, ["--method", "kcenter", "--expert-index", "-1", "--out", str(out)],
                    "--expert-index")
    _one_line_error(capsys, ["--method", "kcenter", "--arch", "nonet", "--out", str(out)],
                    "nonet")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    _one_line_error(capsys, ["--method", "herding", "--network", str(tmp_path / "junk.pt"),
                             "--device", "cpu", "--out", str(out)], "unreadable")
    _one_line_error(capsys, ["--method", "herding", "--network", str(net_file), "--arch",
                             "resnet10", "--device", "cpu", "--out", str(out)], "does not fit")
    _one_line_error(capsys, ["--method", "herding", "--network", str(net_file), "--ipc", "500",
                             "--out", str(out)], "--ipc 500")
    assert not out.exists()
    with pytest.raises(SystemExit) as exc:
        coreset.main(["--method", "greedy", "--out", str(out)])
    assert exc.value.code == 2
