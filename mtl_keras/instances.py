"""Instance segmentation at test time: cluster the per-pixel centroid votes (Kendall, Gal & Cipolla 2018, Sec. 4).

Each pixel ``(y, x)`` of a class with instances votes ``(y + dy, x + dx)`` for its instance centroid; the votes of
each predicted class are clustered, one cluster per instance (:func:`cluster_instances`). Two methods:

``"histogram"`` (default; numpy + OpenCV, O(N + cells + N K), no per-pixel Python loop)
    Votes are binned (``bin_size`` px cells) and blurred with ``sigma`` into a density. Its local maxima within
    ``peak_radius`` holding at least ``min_size`` votes are centres (the ``max_instances`` strongest, closer ones
    suppressed), refined by one mean-shift step. Votes go to the nearest centre within ``assign_radius``, then
    ``refine_iterations`` hard-EM steps of an isotropic Gaussian mixture let a big spread-out instance keep its far
    votes next to a small tight one; finally clusters closer than ``merge_factor`` times the larger RMS spread are
    merged (one instance whose smeared votes made two peaks).
``"optics"`` (the paper's choice: scikit-learn ``OPTICS``)
    Threshold extraction at ``eps`` (``cluster_method="dbscan"``, as the paper's public TF1 port) or ``xi``
    steepness. It is super-linear, so at most ``max_points`` votes (a seeded subset, ``min_samples`` scaled by the
    fraction) are clustered; the rest take the label of their nearest clustered vote within ``assign_radius``.

Clusters under ``min_size`` pixels are dropped; an instance's score is its mean class probability times
``n / (n + min_size)`` for its ``n`` pixels, so fragments rank below whole objects in AP. Defaults are for 128x256
and scale with ``scale = sqrt(H * W / (128 * 256))`` (lengths times ``scale``, sizes times ``scale^2``); values
passed explicitly are used as given.
"""

import dataclasses
import math

import cv2
import numpy as np

from mtl_keras.labels import instance_train_ids

METHODS = ("histogram", "optics")
REFERENCE_AREA = 128 * 256

# Defaults at 128x256 (lengths in px, sizes in votes). The one source: predict and the serving export read them
# through clustering_parameters, so the served instance ids are predict's.
HISTOGRAM_DEFAULTS = dict(sigma=2.0, peak_radius=4.0, assign_radius=20.0, refine_iterations=2, merge_factor=2.0,
                          max_instances=32)
OPTICS_DEFAULTS = dict(min_samples=20, cluster_method="dbscan", eps=2.0, xi=0.05, max_eps=None, assign_radius=10.0,
                       max_points=4000)
DEFAULT_MIN_SIZE = 8


@dataclasses.dataclass
class Instances:
    """Instances of one image: ``ids`` (H, W) int32 (instance k has id k + 1, 0 = none), and per instance its
    ``classes`` (training ids), ``scores`` in [0, 1], ``sizes`` (pixels) and vote ``centers`` (y, x) in px."""

    ids: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    sizes: np.ndarray
    centers: np.ndarray

    def __len__(self):
        return int(self.classes.shape[0])

    def masks(self):
        """Yields ``(mask (H, W) bool, class, score)`` per instance."""
        for k in range(len(self)):
            yield self.ids == k + 1, int(self.classes[k]), float(self.scores[k])


def _scale(shape):
    return math.sqrt(float(shape[0]) * float(shape[1]) / REFERENCE_AREA)


# ----------------------------------------------------------------------------------------- Clustering of a set of votes

def _sqdist(votes, centers):
    """(N, K) squared distances, as |v|^2 - 2 v.c + |c|^2 (one small matrix product, no (N, K, 2) temporary)."""
    d2 = (votes * votes).sum(axis=1)[:, None] - 2.0 * (votes @ centers.T) + (centers * centers).sum(axis=1)[None, :]
    return np.maximum(d2, 0.0)


def _nearest_assignment(votes, centers, radius):
    """Label of each vote's nearest centre; -1 beyond ``radius``."""
    d2 = _sqdist(votes, centers)  # (N, K)
    labels = np.argmin(d2, axis=1)
    best = d2[np.arange(len(votes)), labels]
    labels[best > radius * radius] = -1
    return labels


def _histogram_peaks(votes, shape, bin_size, sigma, peak_radius, min_votes, max_instances):
    """Vote-density peaks (K, 2) in px, strongest first: the ``max_instances`` strongest candidates after NMS."""
    height, width = int(shape[0]), int(shape[1])
    hc, wc = -(-height // bin_size), -(-width // bin_size)
    cells = np.floor(votes / bin_size).astype(np.int64)
    cy = np.clip(cells[:, 0], 0, hc - 1)
    cx = np.clip(cells[:, 1], 0, wc - 1)
    # Only the window around the votes (plus the filters' reach) is built: same result, less work.
    s_cells = max(sigma / bin_size, 0.3)
    r = max(int(round(peak_radius / bin_size)), 1)
    margin = int(math.ceil(4 * s_cells)) + 2 * r + 1
    y0, x0 = max(int(cy.min()) - margin, 0), max(int(cx.min()) - margin, 0)
    y1, x1 = min(int(cy.max()) + margin + 1, hc), min(int(cx.max()) + margin + 1, wc)
    h, w = y1 - y0, x1 - x0
    hist = np.bincount((cy - y0) * w + (cx - x0), minlength=h * w).reshape(h, w).astype(np.float32)
    density = cv2.GaussianBlur(hist, (0, 0), sigmaX=s_cells, borderType=cv2.BORDER_CONSTANT)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    local_max = density >= cv2.dilate(density, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0.0)
    mass = cv2.boxFilter(hist, -1, (2 * r + 1, 2 * r + 1), normalize=False, borderType=cv2.BORDER_CONSTANT)
    candidates = np.nonzero(local_max & (mass >= min_votes) & (density > 0))
    if not len(candidates[0]):
        return np.zeros((0, 2), np.float64)
    strength = density[candidates]
    order = np.argsort(-strength, kind="stable")[:max_instances]
    points = (np.stack(candidates, axis=1)[order].astype(np.float64) + [y0 + 0.5, x0 + 0.5]) * bin_size
    kept = []
    for p in points:  # greedy NMS over the (few) candidates
        if all(((p - q) ** 2).sum() >= peak_radius * peak_radius for q in kept):
            kept.append(p)
    return np.asarray(kept, np.float64)


def _compact(labels, num):
    """Renumbers labels to drop empty clusters; returns (labels, counts)."""
    counts = np.bincount(labels[labels >= 0], minlength=num)
    alive = counts > 0
    remap = np.cumsum(alive) - 1
    return np.where(labels >= 0, remap[np.maximum(labels, 0)], -1), counts[alive]


def _moments(votes, labels, k):
    """Per-cluster (centres (k, 2), mean squared distance to the centre (k,), counts (k,))."""
    keep = labels >= 0
    lab = labels[keep]
    counts = np.bincount(lab, minlength=k).astype(np.float64)
    safe = np.maximum(counts, 1.0)
    centers = np.stack([np.bincount(lab, weights=votes[keep, i], minlength=k) for i in range(2)], axis=1)
    centers /= safe[:, None]
    d2 = ((votes[keep] - centers[lab]) ** 2).sum(axis=-1)
    return centers, np.bincount(lab, weights=d2, minlength=k) / safe, counts


def _cluster_histogram(votes, shape, min_size, scale, sigma=None, peak_radius=None, assign_radius=None,
                       refine_iterations=None, merge_factor=None, bin_size=None, max_instances=None):
    d = HISTOGRAM_DEFAULTS
    sigma = d["sigma"] * scale if sigma is None else float(sigma)
    peak_radius = d["peak_radius"] * scale if peak_radius is None else float(peak_radius)
    assign_radius = d["assign_radius"] * scale if assign_radius is None else float(assign_radius)
    refine_iterations = d["refine_iterations"] if refine_iterations is None else int(refine_iterations)
    merge_factor = d["merge_factor"] if merge_factor is None else float(merge_factor)
    bin_size = max(int(sigma / 1.5), 1) if bin_size is None else max(int(bin_size), 1)
    max_instances = d["max_instances"] if max_instances is None else int(max_instances)

    centers = _histogram_peaks(votes, shape, bin_size, sigma, peak_radius, min_size, max_instances)
    if not len(centers):
        return np.full(len(votes), -1, np.int64)
    # One mean-shift step: each centre moves to the mean of the votes within peak_radius (sub-cell accuracy).
    labels = _nearest_assignment(votes, centers, peak_radius)
    for k in range(len(centers)):
        member = labels == k
        if member.any():
            centers[k] = votes[member].mean(axis=0)
    labels = _nearest_assignment(votes, centers, assign_radius)
    for _ in range(refine_iterations):
        labels, _ = _compact(labels, len(centers))
        k = int(labels.max()) + 1
        if k == 0:
            break
        centers, msd, _ = _moments(votes, labels, k)
        var = np.maximum(msd / 2.0, sigma * sigma)  # per-axis variance of an isotropic Gaussian
        d2 = _sqdist(votes, centers)  # (N, K)
        labels = np.argmin(d2 / (2.0 * var[None, :]) + np.log(var)[None, :], axis=1)
        radius2 = np.maximum(assign_radius * assign_radius, 9.0 * 2.0 * var)  # 3 s_k with s_k^2 = 2 var
        labels[d2[np.arange(len(votes)), labels] > radius2[labels]] = -1
    if merge_factor > 0:
        labels = _merge_close(votes, labels, merge_factor, sigma)
    return labels


def _merge_close(votes, labels, factor, sigma):
    """Merges clusters whose centres are closer than ``factor`` times the larger RMS spread, closest pair first."""
    labels, _ = _compact(labels, int(labels.max()) + 1 if len(labels) else 0)
    while True:
        k = int(labels.max()) + 1 if len(labels) else 0
        if k < 2:
            return labels
        centers, msd, counts = _moments(votes, labels, k)
        spread = np.sqrt(np.maximum(msd, sigma * sigma))
        dist = np.sqrt(((centers[:, None] - centers[None]) ** 2).sum(axis=-1))
        ratio = dist / (factor * np.maximum(spread[:, None], spread[None, :]))
        np.fill_diagonal(ratio, np.inf)
        i, j = np.unravel_index(np.argmin(ratio), ratio.shape)
        if ratio[i, j] >= 1.0:
            return labels
        labels = np.where(labels == max(i, j), min(i, j), labels)
        labels, _ = _compact(labels, k)


def _cluster_optics(votes, min_size, scale, min_samples=None, cluster_method=None, eps=None, xi=None, max_eps=None,
                    assign_radius=None, max_points=None, seed=0):
    from sklearn.cluster import OPTICS
    from sklearn.neighbors import NearestNeighbors

    d = OPTICS_DEFAULTS
    min_samples = d["min_samples"] * scale * scale if min_samples is None else float(min_samples)
    xi = d["xi"] if xi is None else float(xi)
    cluster_method = d["cluster_method"] if cluster_method is None else str(cluster_method)
    eps = d["eps"] * scale if eps is None else float(eps)
    if max_eps is None:  # reachabilities above eps do not change a threshold ("dbscan") extraction at eps
        max_eps = eps if cluster_method == "dbscan" else 10.0 * scale
    max_eps = float(max_eps)
    assign_radius = d["assign_radius"] * scale if assign_radius is None else float(assign_radius)
    max_points = int(d["max_points"]) if max_points is None else int(max_points)

    n = len(votes)
    labels = np.full(n, -1, np.int64)
    if n > max_points:
        subset = np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))
        fraction = max_points / n
    else:
        subset, fraction = np.arange(n), 1.0
    min_samples = max(int(round(min_samples * fraction)), 2)
    if len(subset) < min_samples:
        return labels
    min_cluster = max(int(math.ceil(min_size * fraction)), 2)
    kwargs = dict(eps=min(eps, max_eps)) if cluster_method == "dbscan" else dict(
        xi=xi, min_cluster_size=min(min_cluster, len(subset)))
    optics = OPTICS(min_samples=min(min_samples, len(subset)), max_eps=max_eps, cluster_method=cluster_method,
                    **kwargs)
    sub_labels = optics.fit(votes[subset]).labels_.astype(np.int64)
    clustered = subset[sub_labels >= 0]
    if not len(clustered):
        return labels
    labels[clustered] = sub_labels[sub_labels >= 0]
    rest = np.nonzero(labels < 0)[0]
    if len(rest):
        nn = NearestNeighbors(n_neighbors=1).fit(votes[clustered])
        dist, idx = nn.kneighbors(votes[rest])
        near = dist[:, 0] <= assign_radius
        labels[rest[near]] = labels[clustered[idx[near, 0]]]
    return labels


def clustering_parameters(image_size=(128, 256), instance_classes=(), scale=None, **overrides):
    """Every parameter of the ``"histogram"`` clustering for ``image_size`` (or ``scale``), ``overrides`` applied:
    the dict the serving export builds its graph from and :func:`mtl_keras.predict` clusters with."""
    scale = _scale(image_size) if scale is None else float(scale)
    d = HISTOGRAM_DEFAULTS
    params = dict(sigma=d["sigma"] * scale, peak_radius=d["peak_radius"] * scale,
                  assign_radius=d["assign_radius"] * scale, refine_iterations=int(d["refine_iterations"]),
                  merge_factor=float(d["merge_factor"]), max_instances=int(d["max_instances"]),
                  min_size=max(int(round(DEFAULT_MIN_SIZE * scale * scale)), 1), bin_size=None,
                  instance_classes=[int(c) for c in instance_classes], image_size=[int(v) for v in image_size])
    params.update(overrides)
    if params["bin_size"] is None:
        params["bin_size"] = max(int(params["sigma"] / 1.5), 1)
    return params


def cluster_votes(votes, shape, method="histogram", min_size=None, scale=None, **params):
    """(N,) labels 0..K-1 (-1 = none, no empty label) of (N, 2) (y, x) votes in an image of ``shape`` (H, W), by
    ``method`` with its ``params`` (module docstring); ``min_size`` in votes."""
    if method not in METHODS:
        raise ValueError(f"Unknown clustering method {method!r}. Valid: {', '.join(METHODS)}.")
    votes = np.asarray(votes, dtype=np.float64).reshape(-1, 2)
    if not len(votes):
        return np.zeros(0, np.int64)
    scale = _scale(shape) if scale is None else float(scale)
    min_size = max(int(round(DEFAULT_MIN_SIZE * scale * scale)), 1) if min_size is None else int(min_size)
    if method == "histogram":
        labels = _cluster_histogram(votes, shape, min_size, scale, **params)
    else:
        labels = _cluster_optics(votes, min_size, scale, **params)
    # Drop clusters below min_size and renumber 0..K-1.
    counts = np.bincount(labels[labels >= 0], minlength=1)
    keep = counts >= min_size
    remap = np.where(keep, np.cumsum(keep) - 1, -1)
    return np.where(labels >= 0, remap[np.maximum(labels, 0)], -1)


# ---------------------------------------------------------------------------------------------------------- Whole image

def _default_instance_classes(num_classes):
    if num_classes not in (7, 19):
        raise ValueError(f"Pass instance_classes for num_classes={num_classes} (defaults exist for 7 and 19).")
    return instance_train_ids(num_classes)


def cluster_instances(semantic, vectors, method="histogram", instance_classes=None, num_classes=None,
                      min_size=None, scale=None, **params):
    """:class:`Instances` of one image, ordered by class then cluster, from ``semantic`` ((H, W, C) logits, whose
    softmax gives the scores, or an (H, W) label map: confidence 1) and ``vectors`` ((H, W, 2) (dy, dx) to the
    centroid, px). ``instance_classes``: default ``instance_train_ids`` of C (logits) or 19. The other arguments are
    :func:`cluster_votes`'."""
    if method not in METHODS:
        raise ValueError(f"Unknown clustering method {method!r}. Valid: {', '.join(METHODS)}.")
    semantic = np.asarray(semantic)
    vectors = np.asarray(vectors)
    if vectors.ndim != 3 or vectors.shape[-1] != 2:
        raise ValueError(f"vectors must be (H, W, 2), got {vectors.shape}.")
    shape = vectors.shape[:2]
    logits = None
    if semantic.ndim == 3 and semantic.shape[-1] > 1:
        logits = semantic
        labels = np.argmax(logits, axis=-1)
        num_classes = semantic.shape[-1] if num_classes is None else num_classes
    else:
        labels = semantic[..., 0] if semantic.ndim == 3 else semantic
    if labels.shape != shape:
        raise ValueError(f"semantic {semantic.shape} and vectors {vectors.shape} must cover the same pixels.")
    if instance_classes is None:
        instance_classes = _default_instance_classes(19 if num_classes is None else int(num_classes))
    scale = _scale(shape) if scale is None else float(scale)
    min_size = max(int(round(DEFAULT_MIN_SIZE * scale * scale)), 1) if min_size is None else int(min_size)

    ids = np.zeros(shape, np.int32)
    classes, scores, sizes, centers = [], [], [], []
    flat_labels = labels.reshape(-1)
    # The pixels of all instance classes in one pass, grouped by class.
    pix = np.nonzero(np.isin(flat_labels, np.asarray(list(instance_classes))))[0]
    pix_labels = flat_labels[pix]
    order = np.argsort(pix_labels, kind="stable")
    pix, pix_labels = pix[order], pix_labels[order]
    flat_vectors = vectors.reshape(-1, 2)
    for c in instance_classes:
        lo = np.searchsorted(pix_labels, c, side="left")
        hi = np.searchsorted(pix_labels, c, side="right")
        if hi - lo < min_size:
            continue
        cpix = pix[lo:hi]
        votes = np.stack([cpix // shape[1], cpix % shape[1]], axis=1).astype(np.float64) + flat_vectors[cpix]
        finite = np.isfinite(votes).all(axis=1)  # non-finite votes go nowhere
        cl = np.full(len(cpix), -1, np.int64)
        cl[finite] = cluster_votes(votes[finite], shape, method=method, min_size=min_size, scale=scale, **params)
        k = int(cl.max()) + 1 if len(cl) else 0
        if k == 0:
            continue
        member = cl >= 0
        lab = cl[member]
        ids.reshape(-1)[cpix[member]] = len(classes) + 1 + lab
        counts = np.bincount(lab, minlength=k)
        if logits is None:
            mean_conf = np.ones(k)
        else:  # softmax probability of class c, only at the pixels that need it
            z = logits.reshape(-1, logits.shape[-1])[cpix[member]].astype(np.float64)
            conf = 1.0 / np.exp(z - z[:, c:c + 1]).sum(axis=1)
            mean_conf = np.bincount(lab, weights=conf, minlength=k) / counts
        cy = np.bincount(lab, weights=votes[member, 0], minlength=k) / counts
        cx = np.bincount(lab, weights=votes[member, 1], minlength=k) / counts
        classes.extend([int(c)] * k)
        sizes.extend(counts.tolist())
        scores.extend((mean_conf * counts / (counts + min_size)).tolist())
        centers.extend(np.stack([cy, cx], axis=1).tolist())
    return Instances(ids=ids, classes=np.asarray(classes, np.int32), scores=np.asarray(scores, np.float32),
                     sizes=np.asarray(sizes, np.int64), centers=np.asarray(centers, np.float32).reshape(-1, 2))


# ------------------------------------------------------------------------------------- Ground truth helpers and quality

def instance_vectors(instance_ids, min_id=1000):
    """Numpy twin of the loader's target: ``(vectors (H, W, 2) float32, mask (H, W) bool)``, (dy, dx) to the
    centroid of each pixel's instance in CityScapes instanceIds (instances are ids >= ``min_id``), 0 elsewhere."""
    ids = np.asarray(instance_ids).astype(np.int64)
    mask = ids >= min_id
    vectors = np.zeros(ids.shape + (2,), np.float32)
    if not mask.any():
        return vectors, mask
    _, seg = np.unique(ids[mask], return_inverse=True)
    yy, xx = np.nonzero(mask)
    counts = np.bincount(seg)
    cy = np.bincount(seg, weights=yy) / counts
    cx = np.bincount(seg, weights=xx) / counts
    vectors[mask] = np.stack([cy[seg] - yy, cx[seg] - xx], axis=1).astype(np.float32)
    return vectors, mask


def instance_ids_from_vectors(vectors, mask, tolerance=0.05):
    """Ground-truth ids (H, W) int32 (0 = none, 1..N in raster order) from *exact* centroid vectors: pixels of
    ``mask`` whose votes agree to ``tolerance`` px (float32 round-off; votes quantised, neighbouring cells merged)
    are one instance, so centroids closer than ``2 * tolerance`` px cannot be told apart."""
    vectors = np.asarray(vectors, dtype=np.float64)
    mask = np.asarray(mask) > 0.5 if np.asarray(mask).dtype != bool else np.asarray(mask)
    if mask.ndim == 3:
        mask = mask[..., 0]
    ids = np.zeros(mask.shape, np.int32)
    if not mask.any():
        return ids
    yy, xx = np.nonzero(mask)
    votes = np.stack([yy, xx], axis=1) + vectors[mask]
    keys = np.round(votes / tolerance).astype(np.int64)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    # Union-find over the unique keys (few) linking keys that differ by at most 1 in both coordinates.
    parent = np.arange(len(uniq))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    order = np.lexsort((uniq[:, 1], uniq[:, 0]))
    for a_pos, a in enumerate(order):
        for b in order[a_pos + 1:]:
            if uniq[b, 0] - uniq[a, 0] > 1:
                break
            if abs(uniq[b, 1] - uniq[a, 1]) <= 1:
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(len(uniq))])[inverse]
    _, first, group = np.unique(roots, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    ids[mask] = rank[group.reshape(-1)] + 1
    return ids


def _comb2(x):
    x = np.asarray(x, dtype=np.float64)
    return float((x * (x - 1) / 2.0).sum())


def pair_counts(true_ids, pred_ids):
    """Pair-counting sums ``(sum_ij C(n_ij, 2), sum_i C(a_i, 2), sum_j C(b_j, 2), n)`` of two labellings."""
    t = np.asarray(true_ids).reshape(-1).astype(np.int64)
    p = np.asarray(pred_ids).reshape(-1).astype(np.int64)
    if t.shape != p.shape:
        raise ValueError(f"true_ids {np.shape(true_ids)} and pred_ids {np.shape(pred_ids)} differ in size.")
    if not t.size:
        return 0.0, 0.0, 0.0, 0
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    ti, pi = ti.reshape(-1), pi.reshape(-1)
    joint = np.bincount(ti * (pi.max() + 1) + pi)
    return _comb2(joint), _comb2(np.bincount(ti)), _comb2(np.bincount(pi)), int(t.size)


def ari_from_pair_counts(sum_nij, sum_a, sum_b, n):
    """Adjusted Rand index (Hubert & Arabie) from :func:`pair_counts` sums; 1.0 for identical trivial labellings."""
    if n < 2:
        return 1.0
    total = n * (n - 1) / 2.0
    expected = sum_a * sum_b / total
    maximum = (sum_a + sum_b) / 2.0
    if maximum == expected:  # both labellings trivial (one cluster, or all singletons): sklearn's convention
        return 1.0
    return float((sum_nij - expected) / (maximum - expected))


def adjusted_rand_index(true_ids, pred_ids, mask=None):
    """ARI between ground-truth and predicted instance id maps over the pixels of ``mask`` (default:
    ``true_ids > 0``, the ground-truth instance pixels). Predicted id 0 (no instance) is one more cluster, so
    instance pixels predicted as background are penalised. Equals ``sklearn.metrics.adjusted_rand_score``."""
    true_ids = np.asarray(true_ids)
    mask = true_ids > 0 if mask is None else np.asarray(mask, dtype=bool)
    return ari_from_pair_counts(*pair_counts(true_ids[mask], np.asarray(pred_ids)[mask]))


class InstanceQuality:
    """Instance-clustering quality over a split, ``update(true_ids, pred_ids)`` per image: ``instance_ari_mean``
    (over images with ground-truth instances), ``instance_ari_split`` (the whole split as one labelling, exact from
    summed pair counts), and the counts of true and predicted instances and of images."""

    def __init__(self):
        self.reset()

    def reset(self):
        self._ari_sum = 0.0
        self._ari_images = 0
        self._sums = np.zeros(3)
        self._n = 0
        self.num_true = 0
        self.num_pred = 0
        self.num_images = 0

    def update(self, true_ids, pred_ids):
        true_ids = np.asarray(true_ids)
        pred_ids = np.asarray(pred_ids)
        if true_ids.shape != pred_ids.shape:
            raise ValueError(f"true_ids {true_ids.shape} and pred_ids {pred_ids.shape} must have the same shape.")
        mask = true_ids > 0
        self.num_images += 1
        self.num_true += int(len(np.unique(true_ids[mask])))
        self.num_pred += int(len(np.unique(pred_ids[pred_ids > 0])))
        if not mask.any():
            return
        counts = pair_counts(true_ids[mask], pred_ids[mask])
        self._ari_sum += ari_from_pair_counts(*counts)
        self._ari_images += 1
        self._sums += np.asarray(counts[:3])
        self._n += counts[3]

    def result(self):
        return {
            "instance_ari_mean": self._ari_sum / self._ari_images if self._ari_images else math.nan,
            "instance_ari_split": (ari_from_pair_counts(*self._sums, self._n) if self._n else math.nan),
            "instance_num_true": float(self.num_true),
            "instance_num_pred": float(self.num_pred),
            "instance_num_images": float(self.num_images),
        }


__all__ = [
    "METHODS", "Instances", "cluster_votes", "cluster_instances", "instance_vectors", "instance_ids_from_vectors",
    "pair_counts", "ari_from_pair_counts", "adjusted_rand_index", "InstanceQuality",
]
