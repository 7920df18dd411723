"""Reproduction tables (used by ``reproduce_kendall.py`` and ``reproduce_mtunet.py`` beside it): train a list of
named ``TrainConfig`` variants, collect their validation metrics and write a markdown table with a paper's numbers
beside ours. A script declares its ``Variant`` rows (config overrides plus the paper's numbers, as printed) and its
``Metric`` columns, then calls :func:`main`.

Each variant is one :func:`mtl_keras.experiment.run_training` in ``OUTPUT_DIR/runs/NAME``, one after the other in
this process. A variant whose folder holds a finished run of the same config is reused, and an unfinished one
resumes from its backup (the run's own resume), so a multi-day table can be stopped and started again; ``rerun=True``
starts every selected variant afresh. ``init_robustness.py`` and ``toy_uncertainty.py`` use the report helpers.
"""

import dataclasses
import datetime
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import time

import keras
from absl import flags

from mtl_keras import experiment
from mtl_keras.config import TrainConfig

log = logging.getLogger("mtl_keras")

QUICK_DATA_DIR = os.path.join("data", "synthetic_repro_quick")  # the small synthetic set of every script's --quick

TASK_ABBREVIATIONS = {"semantic": "sem", "instance": "inst", "depth": "depth", "normals": "normals"}


@dataclasses.dataclass(frozen=True)
class Metric:
    """One column pair (paper | ours) of the table: ``key`` in ``run_training``'s ``results["val"]``.

    Ours is shown as ``value * scale`` with ``digits`` decimals and ``suffix``; the paper's number is shown exactly as
    the paper prints it (a string in ``Variant.paper``).
    """

    key: str
    header: str
    higher_is_better: bool
    scale: float = 1.0
    digits: int = 2
    suffix: str = ""

    def format(self, value):
        if not _finite(value):
            return "-"
        return f"{value * self.scale:.{self.digits}f}{self.suffix}"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row: a name (``--variants``, the run folder), a label for the table, ``TrainConfig`` overrides and the
    paper's numbers ``{metric key: "as printed"}`` (absent = the paper does not report it, shown as "-");
    ``rank=False`` keeps a row that is not comparable with the others out of :func:`ranking_remarks`."""

    name: str
    label: str
    overrides: dict
    paper: dict = dataclasses.field(default_factory=dict)
    rank: bool = True  # False: left out of the "best row" remarks (e.g. another number of classes)


def select_variants(variants, names=None):
    """The variants named in ``names`` (in the table's order), or all of them for an empty ``names``."""
    if not names:
        return list(variants)
    known = [v.name for v in variants]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"Unknown variant(s) {unknown}. Valid: {', '.join(known)}.")
    return [v for v in variants if v.name in names]


def variant_config(base, variant, output_dir):
    """``base`` with the variant's overrides, writing to ``output_dir/runs/NAME``. ``model_overrides`` are merged
    into the base's (a variant switching MT-UNet's attention keeps the base's reduced width)."""
    overrides = dict(variant.overrides)
    if "model_overrides" in overrides:
        overrides["model_overrides"] = {**base.model_overrides, **overrides["model_overrides"]}
    return base.replace(**overrides, output_dir=os.path.join(output_dir, "runs", variant.name))


def print_plan(base, variants, output_dir):
    """``--dry_run``: one JSON line per variant, ``{"name", "config"}``, with the config it would train."""
    for variant in variants:
        config = variant_config(base, variant, output_dir)
        print(json.dumps({"name": variant.name, "config": json.loads(config.to_json())}, sort_keys=True))


def _same_config(config):
    """True / False whether the run folder's config.json equals ``config``; None without one."""
    config_path = os.path.join(config.output_dir, "config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path) as f:
        return not config.differences(json.load(f))


def _finished_results(config):
    """The ``metrics.json`` of a finished run of exactly ``config`` in its output folder, else None."""
    metrics_path = os.path.join(config.output_dir, "metrics.json")
    if not (os.path.isfile(metrics_path) and _same_config(config)):
        return None
    with open(metrics_path) as f:
        return json.load(f)


def _clean_floats(value):
    if isinstance(value, dict):
        return {k: _clean_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_floats(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_variants(base, variants, output_dir, rerun=False, verbose=0, on_record=None):
    """Trains every variant (see the module docstring) and returns one record per variant: name, label, tasks,
    weighting, overrides, paper numbers, and from the run: ``val``, ``val_untrained``, ``final_task_weights``,
    ``wall_seconds``, ``fit_seconds``, ``steps``, ``parameters``, ``train_images_per_s`` and ``reused``.

    ``on_record(records)`` is called after each variant (e.g. to save partial results).
    """
    records = []
    for i, variant in enumerate(variants, start=1):
        config = variant_config(base, variant, output_dir)
        results = None
        if os.path.isdir(config.output_dir) and (rerun or _same_config(config) is False):
            # A fresh start, or a folder left by another config: its backup must not be resumed with this one.
            if not rerun:
                log.warning("%s holds a run of another config: starting afresh.", config.output_dir)
            shutil.rmtree(config.output_dir)
        elif not rerun:
            results = _finished_results(config)
        reused = results is not None
        log.info("[%d/%d] %s: %s (tasks %s, %s weighting)%s", i, len(variants), variant.name, variant.label,
                 ",".join(config.tasks), config.weighting, " - reusing the finished run" if reused else "")
        if not reused:
            keras.utils.clear_session(free_memory=True)
            results = experiment.run_training(config, verbose=verbose)
        record = {
            "name": variant.name,
            "label": variant.label,
            "tasks": list(config.tasks),
            "weighting": config.weighting,
            "task_weights": list(config.task_weights),
            "overrides": _clean_floats(dict(variant.overrides)),
            "paper": dict(variant.paper),
            "rank": variant.rank,
            "output_dir": config.output_dir,
            "reused": reused,
        }
        for key in ("val", "val_untrained", "final_task_weights", "wall_seconds", "fit_seconds", "steps",
                    "parameters", "train_images_per_s"):
            record[key] = results.get(key)
        records.append(_clean_floats(record))
        val = record["val"] or {}
        log.info("[%d/%d] %s done in %.0f s: %s", i, len(variants), variant.name, record["wall_seconds"] or 0.0,
                 ", ".join(f"{k}={v:.4g}" for k, v in val.items() if isinstance(v, float)
                           and k in ("semantic_miou", "instance_mean_error_px", "depth_mean_error_px")))
        if on_record is not None:
            on_record(records)
    return records


def _task_weights_cell(record):
    weights = record.get("final_task_weights") or {}
    parts = []
    for task in record["tasks"]:
        value = weights.get(f"{task}_weight")
        if value is not None:
            parts.append(f"{TASK_ABBREVIATIONS.get(task, task)} {value:.3g}")
    return ", ".join(parts) or "-"


def results_table(records, metrics, untrained_row=True):
    """A markdown table: variant, tasks, weighting, then ``paper | ours`` for each metric, final task weights and
    the run's wall time. ``untrained_row`` adds a last row with the untrained network's scores (from the first run
    that evaluates each metric): how much the runs learned at all."""
    header = ["variant", "tasks", "weighting"]
    for metric in metrics:
        header += [f"{metric.header} paper", "ours"]
    header += ["final task weights", "time [s]"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] * 3 + [" ---: "] * (2 * len(metrics))
                                                               + [" --- ", " ---: "]) + "|"]
    for record in records:
        weighting = record["weighting"]
        if weighting == "fixed" and record.get("task_weights"):
            weighting += " " + "/".join(f"{w:g}" for w in record["task_weights"])
        row = [f"{record['label']} (`{record['name']}`)",
               "+".join(TASK_ABBREVIATIONS.get(t, t) for t in record["tasks"]), weighting]
        for metric in metrics:
            row += [record["paper"].get(metric.key, "-"), metric.format((record.get("val") or {}).get(metric.key))]
        row += [_task_weights_cell(record), f"{record['wall_seconds']:.0f}" if record.get("wall_seconds") else "-"]
        lines.append("| " + " | ".join(row) + " |")
    if untrained_row and records:
        row = ["untrained network (step 0, reference)", "", ""]
        for metric in metrics:
            value = next(((r.get("val_untrained") or {}).get(metric.key) for r in records
                          if (r.get("val_untrained") or {}).get(metric.key) is not None), None)
            row += ["-", metric.format(value)]
        row += ["", ""]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


def _best(records, metric, source):
    """(label, value, shown) of the best record for ``metric`` (``source``: "paper" or "ours"), or None."""
    candidates = []
    for record in records:
        if source == "paper":
            shown = record["paper"].get(metric.key)
            try:
                value = float(str(shown).rstrip("%"))
            except (TypeError, ValueError):
                continue
        else:
            value = (record.get("val") or {}).get(metric.key)
            if not _finite(value):
                continue
            shown = metric.format(value)
        candidates.append((value, record["label"], shown))
    if not candidates:
        return None
    value, label, shown = (max if metric.higher_is_better else min)(candidates, key=lambda c: c[0])
    return label, value, shown


def ranking_remarks(records, metrics):
    """One sentence per metric: the best row in the paper and ours, among the rows where both have a number (and
    that are not marked ``rank=False``)."""
    remarks = []
    for metric in metrics:
        both = [r for r in records if r.get("rank", True) and metric.key in r["paper"]
                and _finite((r.get("val") or {}).get(metric.key))]
        if len(both) < 2:
            continue
        paper, ours = _best(both, metric, "paper"), _best(both, metric, "ours")
        if paper is None or ours is None:
            continue
        agree = "the same row" if paper[0] == ours[0] else "a different row"
        remarks.append(f"{metric.header}: among the {len(both)} rows with a paper number, the paper's best is "
                       f"*{paper[0]}* ({paper[2]}); ours is *{ours[0]}* ({ours[2]}), {agree}.")
    return remarks


def untrained_remarks(records, metrics, threshold=0.1):
    """Rows whose metric is less than ``threshold`` (relative) better than the same run's untrained network, or
    worse. One sentence per metric, with each such row's final weight of the task."""
    remarks = []
    for metric in metrics:
        task = metric.key.split("_")[0]
        rows = []
        for record in records:
            trained = (record.get("val") or {}).get(metric.key)
            untrained = (record.get("val_untrained") or {}).get(metric.key)
            if not (_finite(trained) and _finite(untrained)) or untrained == 0:
                continue
            gain = (trained - untrained) / abs(untrained) * (1 if metric.higher_is_better else -1)
            if gain < threshold:
                weight = (record.get("final_task_weights") or {}).get(f"{task}_weight")
                rows.append(f"*{record['label']}* ({metric.format(untrained)} -> {metric.format(trained)}"
                            + (f", final {task} weight {weight:.3g}" if _finite(weight) else "") + ")")
        if rows:
            remarks.append(f"{metric.header}: less than {threshold:.0%} better than the same network untrained (or "
                           f"worse) in {len(rows)} row(s): " + "; ".join(rows) + ".")
    return remarks


def format_duration(seconds):
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def command_line(argv=None):
    """The command as typed, relative to the repository root: ``python experiments/NAME.py --flags``."""
    argv = list(sys.argv if argv is None else argv)
    script = argv[0]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isabs(script) and script.startswith(root + os.sep):
        script = os.path.relpath(script, root)
    return " ".join(["python", shlex.quote(script)] + [shlex.quote(a) for a in argv[1:]])


def git_commit():
    """The short commit hash of the checkout, or None outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_json(path, payload):
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_clean_floats(payload), f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def save_experiment(output_dir, stem, summary, plot, results_md="", write_markdown=None):
    """The outputs of a single experiment script: ``OUTPUT_DIR/STEM.json`` (``summary``) and ``OUTPUT_DIR/STEM.png``
    (drawn by ``plot(path)``); with ``results_md``, the plot is copied next to it (same name, ``.png``) and
    ``write_markdown(results_md, png_file_name)`` writes the fragment."""
    os.makedirs(output_dir, exist_ok=True)
    png = os.path.join(output_dir, stem + ".png")
    plot(png)
    with open(os.path.join(output_dir, stem + ".json"), "w") as f:
        json.dump(summary, f, indent=1)
    if results_md:
        folder = os.path.dirname(results_md)
        if folder:
            os.makedirs(folder, exist_ok=True)
        copy = os.path.splitext(results_md)[0] + ".png"
        shutil.copyfile(png, copy)
        write_markdown(results_md, os.path.basename(copy))


def docs_fragment(name):
    return os.path.join("docs", "results", f"{name}.md")


def fragment_path(name, path="", write_docs=False, default=""):
    """Where a script's markdown fragment goes: ``path`` (the user's), or the tracked ``docs/results/NAME.md`` only
    with ``write_docs``; ``default`` for neither."""
    if write_docs and path:
        raise ValueError(f"--write_docs writes {docs_fragment(name)}; drop --results_md / --markdown {path}.")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(root, docs_fragment(name)) if write_docs else (path or default)


def write_fragment(path, heading, paragraphs, table, remarks):
    """A markdown fragment for docs/results: ``## heading``, paragraphs, the table and a bulleted list of remarks."""
    if not heading.startswith("## "):
        heading = "## " + heading
    parts = [heading, ""]
    for paragraph in paragraphs:
        parts += [paragraph, ""]
    parts += [table, ""]
    if remarks:
        parts += ["Remarks:", ""] + [f"- {r}" for r in remarks] + [""]
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


class Stopwatch:
    """Wall time of the whole invocation, and the machine's load at start and end (a shared CPU slows runs)."""

    def __init__(self):
        self.start = time.time()
        self.load_start = _loadavg()

    def elapsed(self):
        return time.time() - self.start

    def summary(self):
        load_end = _loadavg()
        text = f"{format_duration(self.elapsed())} wall on {os.cpu_count()} CPU core(s)"
        if self.load_start is not None and load_end is not None:
            text += f" (1-min load average {self.load_start:.1f} at the start, {load_end:.1f} at the end)"
        return text


def _loadavg():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def run_and_report(*, name, heading, paper, config, variants, metrics, output_dir, markdown, quick, rerun=False,
                   verbose=0, describe=None, remarks=None, watch=None):
    """The body of a reproduction script: generate / check the data, train ``variants`` on ``config``, write
    ``OUTPUT_DIR/NAME.json`` (after every variant) and the markdown fragment (to ``markdown`` and
    ``OUTPUT_DIR/NAME.md``). ``describe(config, data_dir)`` gives the set-up paragraph, ``remarks(config,
    records)`` the script's own remarks (the ranking remarks are added here). Returns (records, table)."""
    watch = watch or Stopwatch()
    data_dir = experiment.resolve_data_dir(config)  # generates the synthetic set once, before the first variant's clock
    command = command_line()
    results_path = os.path.join(output_dir, f"{name}.json")

    def payload(records):
        return {"script": f"experiments/{name}.py", "command": command, "quick": bool(quick),
                "dataset": config.dataset, "data_dir": data_dir, "base_config": json.loads(config.to_json()),
                "paper": paper, "git_commit": git_commit(), "date": utc_now(), "wall_seconds": watch.elapsed(),
                "variants": records}

    records = run_variants(config, variants, output_dir, rerun=rerun, verbose=verbose,
                           on_record=lambda r: write_json(results_path, payload(r)))
    write_json(results_path, payload(records))

    mode = "quick mode" if quick else "full mode (the paper's schedule)"
    reused = sum(r["reused"] for r in records)
    trained_seconds = sum(r.get("wall_seconds") or 0.0 for r in records)
    timing = (f"This invocation took {watch.summary()}. The {len(records)} "
              f"variant run(s) took {format_duration(trained_seconds)} together (the time column)")
    timing += (f", {reused} of them reused from earlier invocations (their time as measured then)." if reused
               else ".")
    paragraphs = [
        f"Command: `{command}` ({mode}, dataset `{config.dataset}`). {timing} Run {utc_now()} at commit "
        f"{git_commit()}.",
    ]
    if describe is not None:
        paragraphs.append(describe(config, data_dir))
    paragraphs.append(f"Paper: {paper}. Raw results (per-class IoU, sigma^2 and weights, histories): "
                      f"`{results_path}` (the run folder; not in git).")
    table = results_table(records, metrics)
    notes = (list(remarks(config, records) if remarks is not None else []) + ranking_remarks(records, metrics)
             + untrained_remarks(records, metrics))
    for path in (markdown, os.path.join(output_dir, f"{name}.md")):
        if path:
            write_fragment(path, heading, paragraphs, table, notes)
    print("\n" + table + "\n")
    print(f"Markdown: {markdown or os.path.join(output_dir, name + '.md')}; results: {results_path}; "
          f"{watch.summary()}")
    return records, table


# ------------------------------------------------------------------------------------------ the scripts' common parts
def define_flags(name, variant_names, quick_help, datasets, dataset_help):
    """The absl flags every reproduction script takes (``experiments/NAME.py``)."""
    flags.DEFINE_boolean("quick", False, quick_help)
    flags.DEFINE_enum("dataset", "synthetic", list(datasets), dataset_help)
    flags.DEFINE_string("data_dir", "", f"Dataset root. Default: {QUICK_DATA_DIR} with --quick (generated once), "
                        "data/synthetic otherwise; required for the real datasets.")
    flags.DEFINE_list("variants", [], "Variants to run (default all): " + ", ".join(variant_names) + ".")
    flags.DEFINE_integer("steps", 0, "Override the training steps of every variant (0: the mode's).")
    flags.DEFINE_string("backbone_weights", None, "Override the encoder's starting weights of the mode: 'imagenet', "
                        "a local keras.applications ResNet .h5 file, or '' for random.")
    flags.DEFINE_integer("synthetic_num_train", 0,
                         "Synthetic training images when the set is generated (0: the mode's).")
    flags.DEFINE_integer("synthetic_num_val", 0,
                         "Synthetic validation images when the set is generated (0: the mode's).")
    flags.DEFINE_string("output_dir", "", f"Runs and the JSON of results (default runs/{name}[_quick]).")
    flags.DEFINE_string("markdown", "", "Where else to write the markdown fragment (it always goes to "
                        "OUTPUT_DIR/NAME.md).")
    flags.DEFINE_boolean("write_docs", False, f"Also write the fragment to the tracked {docs_fragment(name)} (for "
                         "docs/make_results.py); without it the checkout is left as it was.")
    flags.DEFINE_boolean("rerun", False, "Train every selected variant afresh (default: reuse finished runs of the "
                         "same config, resume unfinished ones).")
    flags.DEFINE_integer("verbose", 0, "Keras fit verbosity (0 silent, 1 progress bar, 2 one line per epoch).")
    flags.DEFINE_boolean("dry_run", False, "Print each selected variant's training config (one JSON line each) and "
                         "stop: no data, no training.")


def base_config(flag_values, quick, preset_path):
    """The config every variant overrides: ``quick`` (TrainConfig fields) with --quick, else the paper's preset;
    plus the data flags."""
    if flag_values.quick:
        config = TrainConfig(**quick)
    else:
        with open(preset_path) as f:
            config = TrainConfig.from_dict(json.load(f))
    data_dir = flag_values.data_dir or (QUICK_DATA_DIR if flag_values.quick and flag_values.dataset == "synthetic"
                                        else "")
    overrides = dict(dataset=flag_values.dataset, data_dir=data_dir, export=False, num_sample_images=0)
    if flag_values.steps:
        overrides.update(steps=flag_values.steps, epochs=0)
    if flag_values.backbone_weights is not None:
        overrides["backbone_weights"] = flag_values.backbone_weights
    if flag_values.synthetic_num_train:
        overrides["synthetic_num_train"] = flag_values.synthetic_num_train
    if flag_values.synthetic_num_val:
        overrides["synthetic_num_val"] = flag_values.synthetic_num_val
    return config.replace(**overrides)


def main(flag_values, *, name, heading, paper, config, variants, metrics, describe=None, remarks=None):
    """A reproduction script's ``main``: ``--dry_run`` prints the plan, otherwise :func:`run_and_report`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    watch = Stopwatch()
    variants = select_variants(variants, flag_values.variants)
    output_dir = flag_values.output_dir or os.path.join("runs", name + ("_quick" if flag_values.quick else ""))
    if flag_values.dry_run:
        print_plan(config, variants, output_dir)
        return None
    return run_and_report(name=name, heading=heading, paper=paper, config=config, variants=variants,
                          metrics=metrics, output_dir=output_dir,
                          markdown=fragment_path(name, flag_values.markdown, flag_values.write_docs),
                          quick=flag_values.quick, rerun=flag_values.rerun, verbose=flag_values.verbose,
                          describe=describe, remarks=remarks, watch=watch)
