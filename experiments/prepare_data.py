"""Check a dataset folder, or write a prepared cache of it at the training resolution.

    # validate every file of every split, print a summary (exit status 1 if anything is wrong)
    python experiments/prepare_data.py --dataset cityscapes --data_dir /data/cityscapes --check

    # decode + resize + map labels once; train from the cache
    python experiments/prepare_data.py --dataset cityscapes --data_dir /data/cityscapes \
        --output data/cityscapes_128x256 --image_size 128,256 --num_classes 19
    python experiments/train.py --dataset prepared --data_dir data/cityscapes_128x256

Datasets: the names of mtl_keras.data.datasets.DATASETS (prepared: --check only). See datasets/*.md.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from data_checks import format_report, validate_dataset  # noqa: E402  (experiments/data_checks.py)
from mtl_keras.data.checks import DataError  # noqa: E402
from mtl_keras.data.datasets import DATASETS, dataset_entry, write_prepared  # noqa: E402


def _csv(text):
    return tuple(v.strip() for v in text.split(",") if v.strip())


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    ap.add_argument("--data_dir", required=True, help="the dataset's root folder")
    ap.add_argument("--check", action="store_true", help="validate every file and print a summary")
    ap.add_argument("--output", help="write a prepared cache to this folder")
    ap.add_argument("--splits", type=_csv, default=None,
                    help="comma-separated splits (default: all of the format's; prepared: train,val)")
    ap.add_argument("--image_size", type=_csv, default=("128", "256"), help="height,width of the cache")
    ap.add_argument("--num_classes", type=int, default=None,
                    help="19 / 7 (CityScapes), 13 / 40 (NYUv2); default: the first of the format's (folder: its "
                         "classes file)")
    ap.add_argument("--tasks", type=_csv, default=None, help="default: every task the format supplies")
    ap.add_argument("--depth_target", choices=("inverse", "metric"), default=None,
                    help="CityScapes: inverse (disparity px, default) or metric (m); NYUv2: metric (default) or "
                         "inverse (1/m)")
    ap.add_argument("--workers", type=int, default=4, help="threads for --check")
    ap.add_argument("--max_errors", type=int, default=50, help="stop a split's check after this many errors")
    args = ap.parse_args(argv)
    if not args.check and not args.output:
        ap.error("give --check, --output DIR, or both")
    if args.output and args.dataset == "prepared":
        ap.error(f"--output needs a raw dataset ({', '.join(n for n in DATASETS if n != 'prepared')})")
    return args


def main(argv=None):
    args = parse_args(argv)
    entry = dataset_entry(args.dataset)
    num_classes = args.num_classes
    if num_classes is None and entry.num_classes:
        num_classes = entry.num_classes[0]
    tasks = args.tasks  # None: every task the dataset supplies
    status = 0
    if args.check:
        t0 = time.perf_counter()
        try:
            reports = validate_dataset(args.dataset, args.data_dir, args.splits, num_classes, tasks,
                                       workers=args.workers, max_errors=args.max_errors,
                                       depth_target=args.depth_target)
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(format_report(args.dataset, args.data_dir, reports))
        print(f"({time.perf_counter() - t0:.1f} s)")
        if any(r.errors for r in reports):
            status = 1
    if args.output and status == 0:
        splits = args.splits or ("train", "val")
        try:
            manifest = write_prepared(args.dataset, args.data_dir, args.output, splits=splits,
                                      image_size=tuple(int(v) for v in args.image_size), num_classes=num_classes,
                                      tasks=tasks, depth_target=args.depth_target, verbose=True)
        except (OSError, ValueError, DataError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except Exception as e:  # noqa: BLE001 - TF reports broken files as InvalidArgumentError
            print(f"error while decoding {args.dataset}: {getattr(e, 'message', e)}\n(run with --check to list every "
                  f"broken file)", file=sys.stderr)
            return 1
        h, w = manifest["image_size"]
        print(f"prepared {args.dataset} ({', '.join(manifest['tasks'])}; {manifest['num_classes']} classes; depth "
              f"{manifest['depth_target']}) at {h}x{w} in {args.output}\n"
              f"train with: python experiments/train.py --dataset prepared --data_dir {args.output} "
              f"--image_size {h},{w} --num_classes {manifest['num_classes']} --tasks {','.join(manifest['tasks'])}")
    return status


if __name__ == "__main__":
    sys.exit(main())
