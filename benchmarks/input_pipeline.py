"""Images/s of each input pipeline next to the Kendall model's training images/s.

    python benchmarks/input_pipeline.py                       # about 5 minutes on 2 CPU cores
    python benchmarks/input_pipeline.py --skip_training       # pipelines only

Data (generated once under --work_dir, nothing is downloaded): synthetic street scenes written as full-size
CityScapes files (2048x1024 PNGs: 8-bit RGB, 8-bit labelIds, 16-bit instanceIds and disparity; the RGB PNGs are
about 3.3 MB, larger than real CityScapes' ~2-2.5 MB, so decoding here is if anything slower than on the real
data), a prepared cache of them at 128x256 (``experiments/prepare_data.py``), the same examples in the CityScapes
``.npy`` release format (128x256 float32), and a NYUv2 labeled ``.mat`` (640x480, MATLAB v7.3) at 288x384.

Rows "pipeline": batches of 8 (semantic + instance + depth, or semantic + depth for .npy) from the loader alone,
after one warm-up batch, with shuffling, flips and (for "+ scale/crop") random scale 0.5-2.0 with random crops.
Rows "train": ``MultiTaskTrainer.fit`` steps of ``kendall_deeplabv3_resnet26_slim`` (uncertainty weighting, SGD) at
128x256, batch 8, after a warm-up step, fed by a constant in-memory batch (the model's own speed) or by a
pipeline (training and input share the CPU); the feeds are timed in interleaved rounds and the best round is kept. The pipeline never limits training when its images/s are well above
the model's and training fed by it runs as fast as from memory.
"""

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

TASKS = ("semantic", "instance", "depth")


def _timed_batches(ds, batches):
    it = iter(ds)
    first = next(it)
    batch = int(first[0].shape[0])
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t0)


def make_data(work_dir, num_images, log, height=1024, width=2048, others=True):
    """Raw set (``num_images`` scenes of ``height`` x ``width``) and its prepared cache; with ``others`` also the
    .npy release and the NYUv2 .mat (``None`` for them otherwise)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
    from miniature import write_npy_release, write_nyuv2  # experiments/miniature.py, the miniature writers

    from mtl_keras.data import generate_synthetic_cityscapes
    from mtl_keras.data.datasets import write_prepared

    raw = os.path.join(work_dir, f"cityscapes_{width}x{height}")
    t0 = time.perf_counter()
    generate_synthetic_cityscapes(raw, num_train=num_images, num_val=2, height=height, width=width, seed=0)
    log(f"raw CityScapes-format set: {num_images} scenes at {width}x{height} ({time.perf_counter() - t0:.0f} s)")
    prepared = os.path.join(work_dir, "prepared_128x256")
    if not os.path.isfile(os.path.join(prepared, "prepared_manifest.json")):
        t0 = time.perf_counter()
        write_prepared("cityscapes", raw, prepared, image_size=(128, 256), num_classes=19, tasks=TASKS)
        log(f"prepared cache at 128x256 ({time.perf_counter() - t0:.0f} s)")
    if not others:
        return raw, prepared, None, None
    npy = os.path.join(work_dir, "cityscapes_npy")
    if not os.path.isdir(os.path.join(npy, "val")):
        from mtl_keras.data.datasets import load_prepared

        for split in ("train", "val"):
            ds = load_prepared(prepared, split, batch_size=1, tasks=("semantic", "depth"), shuffle=False, flip=False)
            examples = []
            for image, t in ds:
                lab = t["semantic"][0].numpy().astype(np.float32)
                examples.append({"image": image[0].numpy() / 255.0, "label": np.where(lab == 255, -1.0, lab),
                                 "depth": t["depth"][0].numpy() / 256.0})
            write_npy_release(npy, split, examples, label_folder="label_19")
    nyu = os.path.join(work_dir, "nyuv2")
    if not os.path.isfile(os.path.join(nyu, "nyu_depth_v2_labeled.mat")):
        rng = np.random.default_rng(0)
        n = max(num_images, 8)
        labels = np.repeat(np.repeat(rng.integers(0, 895, (n, 48, 64)), 10, axis=1), 10, axis=2)
        images = np.repeat(np.repeat(rng.integers(0, 256, (n, 48, 64, 3)), 10, axis=1), 10, axis=2)
        write_nyuv2(nyu, images, labels, rng.uniform(0.5, 10, (n, 480, 640)).astype(np.float32),
                    (labels % 7).astype(np.uint8), train=np.arange(n - 2), test=np.arange(n - 2, n))
    return raw, prepared, npy, nyu


def bench_pipelines(raw, prepared, npy, nyu, batches, log, only=None):
    """Images/s of each loader; ``only``: run just the cases with these titles."""
    from mtl_keras.data.datasets import load_dataset

    common = dict(batch_size=8, seed=0, flip=True, repeat=True)
    aug = dict(scale_range=(0.5, 2.0), crop_size=(128, 256))
    raw_size = os.path.basename(os.path.normpath(raw)).replace("cityscapes_", "")  # e.g. 2048x1024
    cases = [
        (f"raw CityScapes PNGs {raw_size} -> 128x256", "cityscapes", raw, dict(num_classes=19, tasks=TASKS), {}),
        (f"raw CityScapes PNGs {raw_size} -> 128x256 + scale/crop", "cityscapes", raw,
         dict(num_classes=19, tasks=TASKS), aug),
        ("prepared cache 128x256", "prepared", prepared, dict(num_classes=19, tasks=TASKS), {}),
        ("prepared cache 128x256 + scale/crop", "prepared", prepared, dict(num_classes=19, tasks=TASKS), aug),
        ("prepared cache 128x256, cached in memory", "prepared", prepared,
         dict(num_classes=19, tasks=TASKS, cache=True), {}),
        (".npy release 128x256 (semantic, depth)", "cityscapes_npy", npy,
         dict(num_classes=19, tasks=("semantic", "depth")), {}),
        ("NYUv2 .mat 640x480 -> 288x384 (h5py)", "nyuv2", nyu,
         dict(num_classes=13, tasks=TASKS, image_size=(288, 384)), {}),
    ]
    if only:
        cases = [c for c in cases if c[0] in only]
    rows = []
    for title, name, data_dir, kwargs, extra in cases:
        kwargs = dict(common, **kwargs, **extra)
        kwargs.setdefault("image_size", (128, 256))
        ds = load_dataset(name, data_dir, "train", **kwargs)
        if kwargs.get("cache"):
            n = max(1, len(os.listdir(os.path.join(data_dir, "train"))) // 8)
            _timed_batches(ds, n)  # fill the cache
        rate = _timed_batches(ds, batches)
        rows.append(("pipeline", title, rate))
        log(f"  {title}: {rate:.1f} images/s")
    return rows


def bench_training(raw, prepared, steps, rounds, log):
    import keras

    from mtl_keras.data.datasets import load_dataset
    from mtl_keras.presets import build_model
    from mtl_keras.training import MultiTaskTrainer, kendall_sgd
    from mtl_keras.weighting import build_weighting

    model = build_model("kendall_deeplabv3_resnet26_slim", tasks=TASKS, num_classes=19, input_shape=(128, 256, 3))
    trainer = MultiTaskTrainer(model, build_weighting("uncertainty", TASKS))
    trainer.compile(optimizer=kendall_sgd(1e-2, 1000))
    loader = dict(image_size=(128, 256), batch_size=8, num_classes=19, tasks=TASKS, seed=0, flip=True, repeat=True)
    one = next(iter(load_dataset("prepared", prepared, "train", **loader)))
    feeds = [("in-memory batch (the model alone)", tf.data.Dataset.from_tensors(one).repeat()),
             ("raw CityScapes PNG pipeline", load_dataset("cityscapes", raw, "train", **loader)),
             ("prepared cache pipeline", load_dataset("prepared", prepared, "train", **loader))]
    trainer.fit(feeds[0][1], steps_per_epoch=2, epochs=1, verbose=0)  # trace
    best = {}
    for round_ in range(rounds):  # interleaved rounds, best of each: less sensitive to other load on the machine
        for title, ds in feeds:
            trainer.fit(ds, steps_per_epoch=1, epochs=1, verbose=0)  # warm the pipeline
            t0 = time.perf_counter()
            trainer.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
            rate = steps * 8 / (time.perf_counter() - t0)
            best[title] = max(best.get(title, 0.0), rate)
            log(f"  train (round {round_ + 1}), {title}: {rate:.2f} images/s")
    del keras
    return [("train", f"kendall_deeplabv3_resnet26_slim fed by {title}", best[title]) for title, _ in feeds]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work_dir", default=os.path.join("data", "benchmark_input"))
    ap.add_argument("--num_images", type=int, default=16, help="full-size scenes to generate (once)")
    ap.add_argument("--batches", type=int, default=12, help="timed batches of 8 per pipeline")
    ap.add_argument("--train_steps", type=int, default=5, help="timed training steps per feed")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds per feed (the best is kept)")
    ap.add_argument("--skip_training", action="store_true")
    ap.add_argument("--output", default=None, help="also write the table (markdown) here")
    args = ap.parse_args()

    def log(msg):
        print(msg, flush=True)

    os.makedirs(args.work_dir, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    log(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), TensorFlow {tf.__version__}, "
        f"load average {load:.1f}")
    raw, prepared, npy, nyu = make_data(args.work_dir, args.num_images, log)
    rows = bench_pipelines(raw, prepared, npy, nyu, args.batches, log)
    if not args.skip_training:
        rows += bench_training(raw, prepared, args.train_steps, args.rounds, log)
    end_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = ["| what | images/s |", "| --- | --- |"]
    lines += [f"| {kind}: {title} | {rate:.1f} |" for kind, title, rate in rows]
    table = "\n".join(lines)
    note = (f"{os.cpu_count()} CPU core(s), TensorFlow {tf.__version__}; load average {load:.1f} at the start, "
            f"{end_load:.1f} at the end (other processes share the cores when it is above the core count); "
            f"batch 8 at 128x256 unless stated")
    print("\n" + table + "\n\n" + note)
    if args.output:
        command = "python " + " ".join(sys.argv)
        how = ("Pipeline rows: the loader alone (both cores), batches of 8 with shuffling and flips; \"+ scale/crop\": "
               "random scale 0.5-2.0 and random 128x256 crops. Train rows: MultiTaskTrainer.fit steps of the Kendall "
               "model, fed from memory (its own speed) or by a pipeline sharing the same cores. Data: synthetic "
               "scenes written as full-size CityScapes files (see the docstring of benchmarks/input_pipeline.py).")
        with open(args.output, "w") as f:
            f.write(f"# Input pipeline benchmark\n\n`{command}`\n\n{table}\n\n{note}\n\n{how}\n")


if __name__ == "__main__":
    main()
