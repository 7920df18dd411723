"""Instance clustering: time and quality of both methods on the same votes.

    python benchmarks/clustering.py                      # synthetic val split, 128x256 and 1024x2048, + official AP
    python benchmarks/clustering.py --num_images 10 --large_images 2 --noofficial   # quick look

Votes. The synthetic validation split (``data/synthetic``, generated when absent) gives the ground truth: semantic
training ids and CityScapes instanceIds, resized (nearest) to the evaluation size. The ground-truth centroid vectors
are perturbed the way a trained network errs (``perturb_vectors``), and both methods cluster exactly the same
votes with the ground-truth semantics (``--votes perfect`` uses the exact vectors; ``--model RUN`` uses a trained
model's predicted semantics and vectors instead). The noise, at 128x256 (lengths scale with the image):

* boundary blur: vectors averaged down 4x and bilinearly upsampled (a network predicts at a low output stride, so
  near the border between two instances votes fall in between);
* 10 % shrinkage (regression to the mean) times a smooth relative error of 15 % (std), plus a smooth absolute error
  of 1.5 px and 0.7 px of per-pixel noise (smooth = Gaussian-filtered with a 4 px sigma).

This gives a mean vector error of about 4 px, like the trained models of Kendall et al. (3.5-4.6 px in Mehta's report).

Quality: adjusted Rand index over the ground-truth instance pixels (predicted "no instance" is one more cluster),
as the mean over images (``ARI/img``; degenerate for an image with one instance: any split gives 0) and over the
whole split (``ARI split``: exact from summed pair counts, instances never span images); with ``--official`` also
the official CityScapes instance AP / AP50 (masks upsampled to the ground truth's resolution, nearest).

Speed: wall time of one ``cluster_instances`` call per image (everything: grouping by class, clustering,
scores), median and 90th percentile of the wall time and the median process CPU time (less sensitive to a busy
machine), at 128x256 (the whole split) and at 1024x2048 (``--large_images``
images upsampled 8x from the ground truth, with the noise scaled by 8). The machine's load average is printed with
the table: timings on a busy machine are slower.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))  # experiments/cityscapes_eval.py and evaluate.py

import cv2  # noqa: E402
import numpy as np  # noqa: E402

import cityscapes_eval as ce  # noqa: E402

from mtl_keras.labels import label_lookup_table  # noqa: E402
from mtl_keras.instances import (METHODS, InstanceQuality, adjusted_rand_index, cluster_instances,  # noqa: E402
                                 instance_vectors)


def smooth_noise(shape, rng, sigma):
    """Unit-std 2-channel Gaussian noise filtered with a ``sigma``-px Gaussian."""
    g = cv2.GaussianBlur(rng.standard_normal(tuple(shape) + (2,)).astype(np.float32), (0, 0), sigma)
    return g / max(float(g.std()), 1e-9)


def perturb_vectors(vectors, rng, scale=1.0, down=4, shrink=0.10, relative=0.15, absolute=1.5, white=0.7,
                    smooth_sigma=4.0):
    """Centroid vectors (H, W, 2) with network-like errors (see the module docstring); lengths in px at 128x256,
    multiplied by ``scale``."""
    h, w = vectors.shape[:2]
    low = cv2.resize(vectors, (max(w // down, 1), max(h // down, 1)), interpolation=cv2.INTER_AREA)
    blurred = cv2.resize(low, (w, h), interpolation=cv2.INTER_LINEAR)
    sigma = smooth_sigma * scale
    out = blurred * (1.0 - shrink) * (1.0 + relative * smooth_noise((h, w), rng, sigma)) \
        + absolute * scale * smooth_noise((h, w), rng, sigma) + white * scale * rng.standard_normal(vectors.shape)
    return out.astype(np.float32)


def load_ground_truth(label_file, size, num_classes=19):
    """(semantic train ids, instanceIds) of one image resized (nearest) to ``size`` (H, W)."""
    labels = cv2.imread(label_file, cv2.IMREAD_UNCHANGED)
    inst = cv2.imread(label_file.replace("_gtFine_labelIds.png", "_gtFine_instanceIds.png"), cv2.IMREAD_UNCHANGED)
    labels = cv2.resize(labels, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    inst = cv2.resize(inst, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    return label_lookup_table(num_classes)[labels].astype(np.int64), inst.astype(np.int64)


def true_instance_ids(inst, semantic, num_classes=19):
    """Ground-truth instance map: CityScapes instances (id >= 1000) of evaluated instance classes, else 0."""
    from mtl_keras.labels import instance_train_ids

    keep = (inst >= 1000) & np.isin(semantic, instance_train_ids(num_classes))
    return np.where(keep, inst, 0)


def _load_model_predictor(path):
    from evaluate import load_predictor  # experiments/evaluate.py

    predict, info = load_predictor(path)
    return predict, info


def run(args):
    from mtl_keras.config import TrainConfig
    from mtl_keras.experiment import resolve_data_dir

    data_dir = args.data_dir
    if not data_dir:
        data_dir = resolve_data_dir(TrainConfig(dataset="synthetic"))
    gt_files = ce.ground_truth_files(data_dir, args.split)[: args.num_images or None]
    size = tuple(int(v) for v in args.size.split("x"))
    predict = None
    if args.model:
        predict, info = _load_model_predictor(args.model)
        size = info["input_size"] or size

    rows = []
    official_dirs = {m: tempfile.mkdtemp(prefix=f"bench_{m}_") for m in args.methods}
    per_method = {m: {"ari": [], "times": [], "cpu": [], "quality": InstanceQuality(), "num_pred": 0}
                  for m in args.methods}
    vector_errors = []
    for index, label_file in enumerate(gt_files):
        semantic, inst = load_ground_truth(label_file, size)
        true_ids = true_instance_ids(inst, semantic)
        vectors, mask = instance_vectors(inst)
        rng = np.random.default_rng(1000 + index)  # the same votes for every method
        if predict is not None:
            image = cv2.cvtColor(cv2.imread(label_file.replace("gtFine", "leftImg8bit", 1).replace(
                "_gtFine_labelIds.png", "_leftImg8bit.png")), cv2.COLOR_BGR2RGB)
            image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA).astype(np.float32)
            out = predict(image[None])
            sem_in, votes_in = out["semantic"][0], out["instance"][0]
        else:
            votes_in = vectors if args.votes == "perfect" else perturb_vectors(vectors, rng)
            sem_in = semantic
        vector_errors.append(np.linalg.norm(votes_in - vectors, axis=-1)[mask])
        gt_shape = cv2.imread(label_file, cv2.IMREAD_UNCHANGED).shape[:2]
        for method in args.methods:
            t0, c0 = time.perf_counter(), time.process_time()
            result = cluster_instances(sem_in, votes_in, method=method)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            stats = per_method[method]
            stats["times"].append(elapsed)
            stats["cpu"].append(cpu)
            stats["quality"].update(true_ids, result.ids)
            stats["num_pred"] += len(result)
            if (true_ids > 0).any():
                stats["ari"].append(adjusted_rand_index(true_ids, result.ids))
            if args.official:
                ce.write_instance_prediction(official_dirs[method], ce.cityscapes_stem(label_file), result.ids,
                                             result.classes, result.scores, size=gt_shape)
        if args.verbose:
            print(f"{index:3d} " + "  ".join(f"{m} ARI {per_method[m]['ari'][-1]:.3f} "
                                             f"{1000 * per_method[m]['times'][-1]:.1f} ms"
                                             for m in args.methods if per_method[m]['ari']), flush=True)

    mean_error = float(np.concatenate(vector_errors).mean()) if vector_errors else math.nan
    for method in args.methods:
        stats = per_method[method]
        q = stats["quality"].result()
        row = {"method": method, "size": f"{size[0]}x{size[1]}", "images": len(gt_files),
               "ari_mean": float(np.mean(stats["ari"])), "ari_split": q["instance_ari_split"],
               "ms_median": 1000 * float(np.median(stats["times"])),
               "ms_p90": 1000 * float(np.percentile(stats["times"], 90)),
               "cpu_ms_median": 1000 * float(np.median(stats["cpu"])),
               "instances_true": q["instance_num_true"], "instances_pred": stats["num_pred"]}
        if args.official:
            inst_files = [f.replace("_gtFine_labelIds.png", "_gtFine_instanceIds.png") for f in gt_files]
            res = ce.run_official_instance(official_dirs[method], data_dir, args.split, gt_files=inst_files)
            row["ap"] = res["averages"]["allAp"]
            row["ap50"] = res["averages"]["allAp50%"]
        rows.append(row)

    large_rows = []
    if args.large_images:
        large = (1024, 2048)
        scale = math.sqrt(large[0] * large[1] / (size[0] * size[1])) if predict is None else 8.0
        timings = {m: [] for m in args.methods}
        cpu_times = {m: [] for m in args.methods}
        aris = {m: [] for m in args.methods}
        for index, label_file in enumerate(gt_files[: args.large_images]):
            semantic, inst = load_ground_truth(label_file, large)
            true_ids = true_instance_ids(inst, semantic)
            vectors, _ = instance_vectors(inst)
            votes = perturb_vectors(vectors, np.random.default_rng(2000 + index), scale=scale)
            for method in args.methods:
                t0, c0 = time.perf_counter(), time.process_time()
                result = cluster_instances(semantic, votes, method=method)
                timings[method].append(time.perf_counter() - t0)
                cpu_times[method].append(time.process_time() - c0)
                if (true_ids > 0).any():
                    aris[method].append(adjusted_rand_index(true_ids, result.ids))
        for method in args.methods:
            large_rows.append({"method": method, "size": f"{large[0]}x{large[1]}", "images": args.large_images,
                               "ari_mean": float(np.mean(aris[method])) if aris[method] else math.nan,
                               "ms_median": 1000 * float(np.median(timings[method])),
                               "ms_p90": 1000 * float(np.percentile(timings[method], 90)),
                               "cpu_ms_median": 1000 * float(np.median(cpu_times[method]))})
    return {"data_dir": data_dir, "split": args.split, "votes": "model " + args.model if args.model else args.votes,
            "mean_vector_error_px": mean_error, "rows": rows, "large_rows": large_rows,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "cpu_count": os.cpu_count()}


def format_table(report):
    lines = [f"votes: {report['votes']} (mean vector error {report['mean_vector_error_px']:.2f} px at "
             f"{report['rows'][0]['size']}); {report['split']} split of {report['data_dir']}; "
             f"{report['cpu_count']} CPUs, load average {', '.join(f'{x:.1f}' for x in report['load_average'])}",
             "",
             "| method | image | images | wall ms / image (median) | p90 | CPU ms (median) | ARI/img | ARI split "
             "| AP | AP50 | instances (pred / true) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def f(v, digits=3):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"

    for r in report["rows"]:
        lines.append(f"| {r['method']} | {r['size']} | {r['images']} | {f(r['ms_median'], 1)} | {f(r['ms_p90'], 1)} "
                     f"| {f(r['cpu_ms_median'], 1)} | {f(r['ari_mean'])} | {f(r['ari_split'])} | {f(r.get('ap'))} "
                     f"| {f(r.get('ap50'))} "
                     f"| {r['instances_pred']} / {r['instances_true']:.0f} |")
    for r in report["large_rows"]:
        lines.append(f"| {r['method']} | {r['size']} | {r['images']} | {f(r['ms_median'], 1)} | {f(r['ms_p90'], 1)} "
                     f"| {f(r['cpu_ms_median'], 1)} | {f(r['ari_mean'])} | - | - | - | - |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="", help="CityScapes-layout root (default: data/synthetic).")
    parser.add_argument("--split", default="val")
    parser.add_argument("--num_images", type=int, default=0, help="Images of the split (0: all).")
    parser.add_argument("--size", default="128x256", help="Evaluation size HxW.")
    parser.add_argument("--votes", choices=("realistic", "perfect"), default="realistic")
    parser.add_argument("--model", default="", help="Use a trained model's predictions (run folder / file).")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--large_images", type=int, default=3, help="Images timed at 1024x2048 (0: none).")
    parser.add_argument("--official", action=argparse.BooleanOptionalAction, default=True,
                        help="Official CityScapes instance AP (--noofficial / --no-official to skip).")
    parser.add_argument("--noofficial", dest="official", action="store_false")
    parser.add_argument("--output", default="", help="Also write the report as JSON here.")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    warnings.filterwarnings("ignore", module="sklearn")
    report = run(args)
    table = format_table(report)
    print(table)
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(dict(report, table=table), fh, indent=2)
    return report


if __name__ == "__main__":
    main()
