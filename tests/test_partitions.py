import numpy as np
import pytest

from fedinf_jax.data import partitions as P


def _assert_disjoint_and_consistent(partition, labels):
    union = np.concatenate(partition.indices)
    assert union.size == np.unique(union).size, "shards overlap"
    for k, idx in enumerate(partition.indices):
        np.testing.assert_array_equal(partition.counts[k], np.bincount(labels[idx], minlength=10))


@pytest.mark.parametrize(
    "name, k",
    [
        ("control", 1),
        ("homogeneous", 10),
        ("heterogeneous", 10),
        ("dirichlet", 10),
        ("pathological", 10),
    ],
)
def test_disjoint_and_deterministic(mnist_train_labels, name, k):
    labels = mnist_train_labels
    a = P.make_partition(name, labels, k, seed=3)
    b = P.make_partition(name, labels, k, seed=3)
    _assert_disjoint_and_consistent(a, labels)
    assert a.num_agents == k and a.counts.shape == (k, 10)
    for x, y in zip(a.indices, b.indices, strict=True):
        np.testing.assert_array_equal(x, y)


def test_control_is_everything(mnist_train_labels):
    p = P.control(mnist_train_labels)
    np.testing.assert_array_equal(p.indices[0], np.arange(60000))


def test_homogeneous_is_one_kth_of_every_class(mnist_train_labels):
    labels = mnist_train_labels
    p = P.homogeneous(labels, 10, seed=0)
    class_counts = np.bincount(labels)
    assert p.counts.sum() == labels.size  # covers the training set
    assert np.all(np.abs(p.counts - class_counts / 10) <= 1)
    c = P.homogeneous(labels, 10, seed=1)
    assert not np.array_equal(p.indices[0], c.indices[0])  # the seed matters


def test_heterogeneous_fractions_and_coverage(mnist_train_labels):
    labels = mnist_train_labels
    p = P.heterogeneous(labels, 10, seed=0)
    sizes = p.counts.sum(axis=1)
    fractions = p.counts / sizes[:, None]
    expected = P.heterogeneous_fractions(10)
    np.testing.assert_allclose(expected.sum(axis=1), 1.0)
    # Exact up to the floor of m_k F[k, c]: under 1 example per class.
    assert np.all(np.abs(fractions - expected) * sizes[:, None] <= 10)
    np.testing.assert_allclose(np.diag(fractions), 0.5, atol=2e-3)
    # K = 10 uses the whole training set but for at most K leftovers per class.
    leftovers = np.bincount(labels, minlength=10) - p.counts.sum(axis=0)
    assert np.all((leftovers >= 0) & (leftovers <= 10))
    # Closed form of the sizes: u_c = (9/4)(n_c - N/18).
    n = np.bincount(labels, minlength=10)
    np.testing.assert_allclose(sizes, 2.25 * (n - labels.size / 18), atol=10)


@pytest.mark.parametrize("k", [3, 20])
def test_heterogeneous_other_agent_counts(mnist_train_labels, k):
    p = P.heterogeneous(mnist_train_labels, k, seed=0)
    _assert_disjoint_and_consistent(p, mnist_train_labels)
    owners = np.arange(k) % 10
    np.testing.assert_allclose(
        p.counts[np.arange(k), owners] / p.counts.sum(axis=1), 0.5, atol=2e-3
    )


def test_heterogeneous_needs_every_class(mnist_train_labels):
    labels = mnist_train_labels[mnist_train_labels != 7]
    with pytest.raises(ValueError, match=r"classes \[7\] have no examples"):
        P.heterogeneous(labels, 10)


def test_dirichlet_min_size_and_skew(mnist_train_labels):
    labels = mnist_train_labels
    p = P.dirichlet(labels, 10, seed=0, alpha=0.1, min_partition_size=50)
    assert p.counts.sum() == labels.size
    assert p.counts.sum(axis=1).min() >= 50
    # Small alpha: most agents are dominated by few classes.
    top_share = p.counts.max(axis=1) / p.counts.sum(axis=1)
    assert np.median(top_share) > 0.4
    with pytest.raises(ValueError, match="alpha must be > 0"):
        P.dirichlet(labels, 10, alpha=0.0)


def test_pathological_classes_per_agent(mnist_train_labels):
    labels = mnist_train_labels
    p = P.pathological(labels, 10, classes_per_agent=2)
    assert np.all((p.counts > 0).sum(axis=1) == 2)
    assert p.counts.sum() == labels.size  # first-deterministic uses every class
    r = P.pathological(labels, 10, seed=4, classes_per_agent=3, class_assignment_mode="random")
    assert np.all((r.counts > 0).sum(axis=1) == 3)
    with pytest.raises(ValueError, match="class_assignment_mode"):
        P.pathological(labels, 10, class_assignment_mode="nope")


@pytest.mark.parametrize("name", sorted(P.PARTITIONS))
def test_num_agents_below_one(mnist_train_labels, name):
    with pytest.raises(ValueError, match="num_agents must be >= 1"):
        P.make_partition(name, mnist_train_labels, 0)


def test_unknown_partition_lists_valid_names(mnist_train_labels):
    with pytest.raises(ValueError, match=r"valid: .*heterogeneous"):
        P.make_partition("iid", mnist_train_labels, 10)


def test_control_refuses_several_agents(mnist_train_labels):
    with pytest.raises(ValueError, match="exactly one agent"):
        P.control(mnist_train_labels, num_agents=10)
