"""Whole-folder validation of a dataset (``prepare_data.py --check``): every split through its registry entry's
``validate_split`` (which decodes every file and collects each problem with the file it is in), then one summary."""

import os

from mtl_keras.data.datasets import dataset_entry


def validate_dataset(name, data_dir, splits=None, num_classes=None, tasks=None, workers=4, max_errors=20,
                     depth_target=None):
    """``[SplitReport, ...]`` for ``splits`` (default: the dataset's) of dataset ``name`` in ``data_dir``.

    ``depth_target``: what training will read (CityScapes camera files matter only for ``"metric"``)."""
    entry = dataset_entry(name)
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir} is not a folder (expected the root of the {name} dataset)")
    if num_classes is None:
        num_classes = entry.num_classes[0] if entry.num_classes else None
    elif entry.num_classes and int(num_classes) not in entry.num_classes:
        raise ValueError(f"num_classes must be one of {entry.num_classes} for {name}, got {num_classes}")
    tasks = tuple(entry.tasks if tasks is None else tasks)
    reports = []
    for split in tuple(splits or entry.splits):
        r = entry.validate_split(data_dir, split, num_classes, tasks, workers=workers, max_errors=max_errors,
                                 depth_target=depth_target)
        if not r.missing and r.examples == 0 and not r.errors:
            r.errors.append((data_dir, f"empty split {split!r}"))
        if r.missing and split in ("train", "val"):
            r.errors.append((data_dir, f"split {split!r} is missing (expected by training)"))
        reports.append(r)
    return reports


def format_report(name, data_dir, reports, max_listed=20):
    """The summary printed by ``prepare_data.py --check``."""
    lines = [f"{name} at {data_dir}", "",
             "| split | examples | sizes (WxH) | labelled px | valid depth px | instances | errors |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in reports:
        if r.missing and not r.errors:
            lines.append(f"| {r.split} | - | (absent) | | | | 0 |")
            continue
        sizes = ", ".join(f"{k} x{v}" for k, v in sorted(r.sizes.items(), key=lambda kv: -kv[1])[:3])
        pct = (lambda part, whole: f"{100 * part / whole:.1f}%" if whole else "-")
        lines.append(f"| {r.split} | {r.examples} | {sizes or '-'} | {pct(r.labelled_pixels, r.pixels)} | "
                     f"{pct(r.valid_depth_pixels, r.depth_pixels)} | {r.instances or '-'} | {len(r.errors)} |")
    lines += [f"note ({r.split}): {note}" for r in reports for note in r.notes]
    errors = [(r.split, m) for r in reports for _, m in r.errors]
    if not errors:
        return "\n".join(lines + ["", "OK: no problem found."])
    lines += ["", f"{len(errors)} problem(s):"] + [f"  [{split}] {message}" for split, message in errors[:max_listed]]
    if len(errors) > max_listed:
        lines.append(f"  ... and {len(errors) - max_listed} more")
    return "\n".join(lines)
