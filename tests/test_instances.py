import cv2
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from mtl_keras.instances import (METHODS, InstanceQuality, adjusted_rand_index, cluster_instances, cluster_votes,
                                 instance_ids_from_vectors, instance_vectors, pair_counts)

PERSON, CAR, ROAD = 11, 13, 0


def scene(height=64, width=128):
    """A label map (train ids) and CityScapes instanceIds with 6 instances: touching, nested in class, varied size."""
    sem = np.full((height, width), ROAD, np.int64)
    inst = np.zeros((height, width), np.int64)
    boxes = [  # (class, y0, y1, x0, x1)
        (CAR, 30, 50, 5, 45),      # big car
        (CAR, 30, 46, 45, 70),     # a car touching it
        (CAR, 8, 18, 90, 110),     # a small car far away
        (PERSON, 20, 40, 75, 81),  # a thin person
        (PERSON, 20, 38, 81, 87),  # a person touching the first one
        (PERSON, 45, 60, 100, 106),
    ]
    for k, (cls, y0, y1, x0, x1) in enumerate(boxes):
        sem[y0:y1, x0:x1] = cls
        inst[y0:y1, x0:x1] = (26 if cls == CAR else 24) * 1000 + k
    # an L-shaped car: its centroid lies outside it
    sem[2:6, 2:30] = CAR
    sem[2:20, 2:6] = CAR
    inst[2:6, 2:30] = 26000 + 10
    inst[2:20, 2:6] = 26000 + 10
    vectors, mask = instance_vectors(inst)
    return sem, inst, vectors, mask


def smooth_noise(shape, rng, sigma=3.0):
    g = cv2.GaussianBlur(rng.standard_normal(shape + (2,)).astype(np.float32), (0, 0), sigma)
    return g / g.std()


def test_instance_vectors_point_to_the_centroid():
    inst = np.zeros((5, 6), np.int64)
    inst[1:3, 1:4] = 26001  # centroid (1.5, 2)
    inst[4, 5] = 24000
    inst[0, 0] = 7  # not an instance (id < 1000)
    vectors, mask = instance_vectors(inst)
    assert mask.sum() == 7 and not mask[0, 0]
    np.testing.assert_allclose(vectors[1, 1], [0.5, 1.0])
    np.testing.assert_allclose(vectors[2, 3], [-0.5, -1.0])
    np.testing.assert_allclose(vectors[4, 5], [0.0, 0.0])
    assert (vectors[~mask] == 0).all()


def test_instance_ids_from_exact_vectors():
    _, inst, vectors, mask = scene()
    ids = instance_ids_from_vectors(vectors, mask[..., None].astype(np.float32))
    assert ids.max() == 7
    assert adjusted_rand_score(inst[mask], ids[mask]) == 1.0
    assert (ids[~mask] == 0).all()


@pytest.mark.parametrize("method", METHODS)
def test_perfect_votes_recover_the_instances_exactly(method):
    sem, inst, vectors, mask = scene()
    result = cluster_instances(sem, vectors, method=method, min_size=4)
    assert len(result) == 7
    assert (result.ids[~mask] == 0).all() and (result.ids[mask] > 0).all()
    # the same partition, up to renumbering: one predicted id per true instance and vice versa
    pairs = set(zip(inst[mask].tolist(), result.ids[mask].tolist()))
    assert len(pairs) == 7
    assert adjusted_rand_index(inst * mask, result.ids) == 1.0
    for k, cls in enumerate(result.classes):
        assert (sem[result.ids == k + 1] == cls).all()
    assert sorted(result.sizes.tolist()) == sorted(np.unique(inst[mask], return_counts=True)[1].tolist())
    assert ((result.scores > 0) & (result.scores <= 1)).all()
    # centres are the true centroids
    for k in range(len(result)):
        yy, xx = np.nonzero(result.ids == k + 1)
        np.testing.assert_allclose(result.centers[k], [yy.mean(), xx.mean()], atol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_noisy_votes_recover_the_instances_nearly(method):
    sem, inst, vectors, mask = scene()
    rng = np.random.default_rng(0)
    aris = []
    for _ in range(3 if method == "histogram" else 1):  # OPTICS takes seconds
        noisy = vectors * (1 + 0.1 * smooth_noise(mask.shape, rng)) + 0.7 * smooth_noise(mask.shape, rng) \
            + 0.5 * rng.standard_normal(vectors.shape)
        result = cluster_instances(sem, noisy, method=method, min_size=4)
        aris.append(adjusted_rand_index(inst * mask, result.ids))
    print(f"{method}: adjusted Rand index over instance pixels with noisy votes: {np.round(aris, 4).tolist()}")
    assert min(aris) > 0.9


def test_logits_restrict_to_instance_classes_and_give_scores():
    sem, inst, vectors, mask = scene()
    logits = np.eye(19, dtype=np.float32)[sem] * 4.0  # confident, softmax ~ 0.84 on the argmax
    result = cluster_instances(logits, vectors, min_size=8)
    assert len(result) == 7
    assert set(result.classes.tolist()) == {PERSON, CAR}
    probs = np.exp(4.0) / (np.exp(4.0) + 18)
    np.testing.assert_allclose(result.scores, probs * result.sizes / (result.sizes + 8), rtol=1e-5)
    # a class without instances (road) is never clustered; an explicit class list limits the classes
    only_people = cluster_instances(logits, vectors, instance_classes=[PERSON])
    assert set(only_people.classes.tolist()) == {PERSON} and len(only_people) == 3
    masks = list(only_people.masks())
    assert len(masks) == 3 and all(m.dtype == bool and c == PERSON for m, c, _ in masks)


def test_bad_arguments():
    sem, _, vectors, _ = scene()
    with pytest.raises(ValueError, match="Unknown clustering method"):
        cluster_instances(sem, vectors, method="kmeans")
    with pytest.raises(ValueError, match="vectors"):
        cluster_instances(sem, vectors[..., :1])
    with pytest.raises(ValueError, match="same pixels"):
        cluster_instances(sem[:10], vectors)
    with pytest.raises(ValueError, match="instance_classes"):
        cluster_instances(np.zeros((8, 8, 5)), np.zeros((8, 8, 2)))


def test_empty_and_non_finite_inputs():
    sem = np.zeros((16, 16), np.int64)
    result = cluster_instances(sem, np.zeros((16, 16, 2)))
    assert len(result) == 0 and result.ids.max() == 0 and result.centers.shape == (0, 2)
    sem[4:12, 4:12] = CAR
    vectors, _ = instance_vectors(np.where(sem == CAR, 26000, 0))
    vectors[4, 4] = np.nan
    for method in METHODS:
        result = cluster_instances(sem, vectors, method=method, min_size=4)
        assert result.ids[4, 4] == 0 and len(result) == 1 and result.sizes[0] == 63, method
    assert cluster_votes(np.zeros((0, 2)), (16, 16)).shape == (0,)


def test_whole_large_image_and_optics_subsampling():
    """One call on a 2x larger image (the defaults scale with the image); OPTICS clusters a subset then assigns."""
    sem, inst, vectors, mask = scene(64, 128)
    big = lambda x: cv2.resize(x, (256, 128), interpolation=cv2.INTER_NEAREST)  # noqa: E731
    sem4, inst4 = big(sem.astype(np.int32)), big(inst.astype(np.int32))
    vec4, mask4 = instance_vectors(inst4)
    for method, kwargs in (("histogram", {}), ("optics", {"max_points": 1000})):
        result = cluster_instances(sem4, vec4, method=method, **kwargs)
        assert adjusted_rand_index(inst4 * mask4, result.ids) == 1.0, method


def test_adjusted_rand_index_matches_sklearn_and_streams_over_a_split():
    rng = np.random.default_rng(1)
    quality = InstanceQuality()
    all_true, all_pred, per_image = [], [], []
    for i in range(4):
        true = rng.integers(0, 4, size=(6, 7))
        pred = np.where(rng.random((6, 7)) < 0.7, true, rng.integers(0, 5, size=(6, 7)))
        if i == 2:
            true[:] = 0  # an image without instances: no ARI of its own
        quality.update(true, pred)
        m = true > 0
        if m.any():
            per_image.append(adjusted_rand_score(true[m], pred[m]))
            assert adjusted_rand_index(true, pred) == pytest.approx(per_image[-1], abs=1e-12)
        all_true.append(true[m] + 100 * i)  # instances never span images
        all_pred.append(pred[m] + 100 * i)
    r = quality.result()
    assert r["instance_ari_mean"] == pytest.approx(np.mean(per_image), abs=1e-12)
    assert r["instance_ari_split"] == pytest.approx(
        adjusted_rand_score(np.concatenate(all_true), np.concatenate(all_pred)), abs=1e-12)
    assert r["instance_num_images"] == 4
    assert adjusted_rand_index(np.ones((3, 3)), np.full((3, 3), 5)) == 1.0  # one cluster each: sklearn's 1.0
    assert pair_counts([], []) == (0.0, 0.0, 0.0, 0)
