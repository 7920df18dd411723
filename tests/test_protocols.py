"""The published-setting benchmark protocols (benchmarks/protocols/*.json, read by mtl_keras.benchmark): their
schema, that every cell's TrainConfig can be made, and their numbers against the sources' (LibMTL, Kendall et al.)."""

import json
import os

import pytest

import mtl_keras
from mtl_keras.config import WEIGHTING_NAMES, TrainConfig
from mtl_keras.data.datasets import DATASETS
from mtl_keras.experiment import build_loss_weighting
from mtl_keras.presets import build_model
from mtl_keras.tasks import TASKS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOCOLS = ("libmtl_nyuv2", "libmtl_cityscapes", "kendall_cityscapes")
KEYS = {"name", "description", "source", "tasks", "metric_labels", "training", "architectures", "weightings",
        "baseline", "seeds", "notes"}
CELL_FIELDS = {"model", "model_overrides", "weighting", "weighting_options", "seed", "output_dir", "tasks"}
LIBMTL_ARCHITECTURES = {"hps", "cross_stitch", "mtan", "mmoe", "cgc", "ple", "dselect_k", "ltb"}


def load(name):
    with open(os.path.join(ROOT, "benchmarks", "protocols", f"{name}.json")) as f:
        return json.load(f)


def cell_config(protocol, arch, weighting, seed, tasks=None):
    """A grid cell's config, made as the benchmark makes it."""
    spec = protocol["architectures"][arch]
    return TrainConfig(**protocol["training"], tasks=list(tasks or protocol["tasks"]), model=spec["model"],
                       model_overrides=spec.get("model_overrides", {}), **protocol["weightings"][weighting],
                       weighting=weighting, seed=seed)


@pytest.mark.parametrize("name", PROTOCOLS)
def test_protocol_schema_and_names(name):
    protocol = load(name)
    assert set(protocol) == KEYS
    assert protocol["name"] == name
    assert all(isinstance(protocol[k], str) and protocol[k].strip() for k in ("description", "source"))
    assert protocol["notes"] and all(isinstance(n, str) and n.strip() for n in protocol["notes"])
    metrics = set()
    for task, directions in protocol["tasks"].items():
        assert task in TASKS
        assert directions
        for metric, direction in directions.items():
            assert metric in TASKS[task].metrics, (task, metric)
            assert direction in ("higher", "lower")
            metrics.add(metric)
    assert set(protocol["metric_labels"]) == metrics
    training = protocol["training"]
    fields = set(TrainConfig.__dataclass_fields__)
    assert set(training) <= fields - CELL_FIELDS
    assert training["dataset"] in DATASETS
    models = set(mtl_keras.list_models())
    assert all(spec["model"] in models for spec in protocol["architectures"].values())
    assert set(protocol["weightings"]) <= set(WEIGHTING_NAMES)
    for overrides in protocol["weightings"].values():
        assert set(overrides) <= fields - (CELL_FIELDS - {"weighting_options"})
    assert protocol["baseline"]["architecture"] in protocol["architectures"]
    assert protocol["baseline"]["weighting"] in protocol["weightings"]
    assert protocol["seeds"] and all(isinstance(s, int) for s in protocol["seeds"])
    assert len(set(protocol["seeds"])) == len(protocol["seeds"])


@pytest.mark.parametrize("name", PROTOCOLS)
def test_every_cell_config_and_weighting_can_be_made(name):
    protocol = load(name)
    tasks = tuple(protocol["tasks"])
    for arch in protocol["architectures"]:
        for weighting in protocol["weightings"]:
            for seed in protocol["seeds"]:
                config = cell_config(protocol, arch, weighting, seed)
                assert config.tasks == list(tasks) and config.weighting == weighting
    arch = protocol["architectures"][protocol["baseline"]["architecture"]]
    for weighting in protocol["weightings"]:  # the options are each method's own (unknown ones are refused)
        build_loss_weighting(cell_config(protocol, protocol["baseline"]["architecture"], weighting, 0), tasks)
    for task in tasks:  # the single-task baselines
        config = cell_config(protocol, protocol["baseline"]["architecture"], protocol["baseline"]["weighting"], 0,
                             tasks=[task])
        build_loss_weighting(config, (task,))
    assert arch["model"] in mtl_keras.list_models()


@pytest.mark.parametrize("name", ["libmtl_nyuv2", "libmtl_cityscapes"])
def test_libmtl_architectures_are_the_presets_and_build(name):
    """LibMTL's 8 architectures with the arguments of models/libmtl_nyuv2_*.json (but the ImageNet-loadable 'keras'
    layout), each built small with its preset's tiny_arguments."""
    protocol = load(name)
    assert set(protocol["architectures"]) == LIBMTL_ARCHITECTURES
    for arch, spec in protocol["architectures"].items():
        with open(os.path.join(ROOT, "models", f"libmtl_nyuv2_{arch}.json")) as f:
            preset = json.load(f)
        assert spec["model"] == preset["architecture"] == arch
        expected = {k: v for k, v in preset["arguments"].items() if k not in ("tasks", "num_classes", "input_shape")}
        expected["backbone_layout"] = "keras"  # see the protocol's notes: keras.applications' ImageNet weights
        assert spec["model_overrides"] == expected
        model = build_model(arch, tasks=tuple(protocol["tasks"]), num_classes=protocol["training"]["num_classes"],
                            **{**spec["model_overrides"], **preset["tiny_arguments"]})
        assert set(model.output) == set(protocol["tasks"])


def test_libmtl_nyuv2_settings_are_libmtls():
    protocol = load("libmtl_nyuv2")
    t = protocol["training"]
    # LibMTL/config.py:24 optim 'adam', :26 lr 1e-4, :28 weight_decay 1e-5 (torch.optim.Adam's coupled L2,
    # LibMTL/trainer.py:144), :32 step_size 100, :33 gamma 0.5 (StepLR, stepped per epoch: trainer.py:296-300)
    assert (t["optimizer"], t["learning_rate"], t["adam_l2"]) == ("adam", 1e-4, 1e-5)
    assert (t["lr_schedule"], t["lr_step_epochs"], t["lr_step_gamma"]) == ("step", 100, 0.5)
    # examples/nyu/main.py:16 train_bs 8, :18 epochs 200, :15 --aug off by default, :81 img_size (288, 384),
    # :46 SegMetric(num_classes=13)
    assert (t["batch_size"], t["epochs"], t["steps"]) == (8, 200, 0)
    assert (t["flip"], t["scale_range"], t["crop_size"]) == (False, [1.0, 1.0], [])
    assert t["image_size"] == [288, 384] and t["num_classes"] == 13
    assert (t["dataset"], t["depth_target"]) == ("nyuv2_npy", "metric")
    assert t["backbone_weights"] == "imagenet"  # LibMTL/model/resnet_dilated.py:53 pretrained=True
    # examples/nyu/main.py:45-56: mIoU, pixAcc (higher); abs_err, rel_err (lower); mean, median (lower), <11.25,
    # <22.5, <30 (higher)
    assert protocol["tasks"] == {
        "semantic": {"semantic_miou": "higher", "semantic_pixel_accuracy": "higher"},
        "depth": {"depth_mean_error_px": "lower", "depth_rel_error": "lower"},
        "normals": {"normals_mean_angle_deg": "lower", "normals_median_angle_deg": "lower",
                    "normals_within_11_25": "higher", "normals_within_22_5": "higher", "normals_within_30": "higher"}}
    w = protocol["weightings"]
    assert w["cagrad"]["weighting_options"]["c"] == 0.5  # LibMTL/config.py:50 calpha 0.5
    assert w["gradvac"]["weighting_options"]["beta"] == 0.5  # LibMTL/config.py:42 GradVac_beta 0.5
    assert w["dwa"]["dwa_temperature"] == 2.0  # LibMTL/config.py:37 T 2.0
    assert w["uncertainty"]["initial_log_variance"] == -0.5  # LibMTL/weighting/UW.py:19 loss_scale -0.5
    # STCH_warmup_epoch 4 (LibMTL/config.py:67): epochs 0-3 plain, epoch 4 averages the nadir (STCH.py:32-40);
    # 795 images // batch 8 = 99 steps per epoch (drop_last, examples/nyu/main.py:35)
    assert (w["stch"]["weighting_options"]["warmup_steps"], w["stch"]["weighting_options"]["nadir_steps"]) == (495, 99)
    assert len(w) == 23 and {"mgda", "pcgrad", "nash_mtl", "famo", "upgrad"} <= set(w)
    assert protocol["baseline"] == {"architecture": "hps", "weighting": "equal"}
    assert protocol["seeds"] == [0, 1, 2]


def test_libmtl_cityscapes_settings_are_libmtls():
    protocol = load("libmtl_cityscapes")
    t = protocol["training"]
    # LibMTL/config.py:24-33 as NYUv2; examples/cityscapes/main.py:17 train_bs 64, :19 epochs 200, :47
    # SegMetric(num_classes=7), :78 img_size (128, 256); examples/cityscapes/create_dataset.py: no augmentation
    assert (t["optimizer"], t["learning_rate"], t["adam_l2"]) == ("adam", 1e-4, 1e-5)
    assert (t["lr_schedule"], t["lr_step_epochs"], t["lr_step_gamma"]) == ("step", 100, 0.5)
    assert (t["batch_size"], t["epochs"], t["image_size"], t["num_classes"]) == (64, 200, [128, 256], 7)
    assert (t["flip"], t["scale_range"], t["crop_size"]) == (False, [1.0, 1.0], [])
    assert (t["dataset"], t["depth_target"]) == ("cityscapes_npy", "")
    assert set(protocol["tasks"]) == {"semantic", "depth"}
    stch = protocol["weightings"]["stch"]["weighting_options"]
    assert (stch["warmup_steps"], stch["nadir_steps"]) == (230, 46)  # 2975 // 64 = 46 steps per epoch


def test_kendall_cityscapes_is_the_papers_setting():
    protocol = load("kendall_cityscapes")
    with open(os.path.join(ROOT, "experiments", "presets", "kendall_cityscapes.json")) as f:
        preset = json.load(f)
    expected = {k: v for k, v in preset.items() if k not in ("description", "model", "tasks", "weighting")}
    assert protocol["training"] == expected
    t = protocol["training"]
    # Kendall et al. appendix A.1: SGD, Nesterov momentum 0.9, lr 2.5e-3, poly power 0.9, weight decay 1e-4
    assert (t["optimizer"], t["learning_rate"], t["momentum"], t["lr_power"], t["weight_decay"]) == (
        "sgd", 2.5e-3, 0.9, 0.9, 1e-4)
    assert protocol["architectures"] == {"kendall": {"model": "kendall_deeplabv3_resnet101", "model_overrides": {}}}
    # Table 1: uncertainty, the unweighted sum and the approx. optimal weights 0.89 / 0.01 / 0.1
    assert protocol["weightings"] == {"uncertainty": {}, "equal": {},
                                      "fixed": {"task_weights": [0.89, 0.01, 0.1]}}
    assert protocol["tasks"] == {"semantic": {"semantic_miou": "higher"},
                                 "instance": {"instance_mean_error_px": "lower"},
                                 "depth": {"depth_mean_error_px": "lower"}}
    assert protocol["baseline"] == {"architecture": "kendall", "weighting": "equal"}
