"""Typed defaults of a training run; experiments are small overrides of these (TF Model Garden style)."""

import dataclasses
import json
from typing import Optional


def read_json(path):
    """The JSON document in ``path``; malformed JSON is a ValueError naming the file, line and column."""
    with open(path, encoding="utf-8") as f:  # JSON is UTF-8 (RFC 8259), whatever the locale
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.") from None
        except UnicodeDecodeError as e:  # binary or corrupt bytes: the codec's message would not name the file
            raise ValueError(f"{path} is not valid JSON: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                             f"{e.start}).") from None
        except RecursionError:  # json's decoder recurses once per nesting level
            raise ValueError(f"{path} is not valid JSON: nested too deeply.") from None


# Every --weighting name, in weighting.weighting_names() order: a copy for `train.py --help`, which must not import
# TensorFlow; tests compare it with the registries.
WEIGHTING_NAMES = (
    "uncertainty", "equal", "fixed", "dwa", "mtunet",
    "aligned_mtl", "cagrad", "config", "db_mtl", "dualproj", "excess_mtl", "fairgrad", "famo", "gls", "graddrop",
    "gradnorm", "gradvac", "imtl", "mgda", "moco", "modo", "nash_mtl", "pcgrad", "rlw", "sdmgrad", "stch", "upgrad",
)


# The settings with a fixed set of values (each also an enum flag of experiments/train.py).
CHOICES = {
    "optimizer": ("sgd", "adam"),
    "lr_schedule": ("poly", "step"),
    "precision": ("float32", "mixed_float16", "mixed_bfloat16"),
    "depth_target": ("", "inverse", "metric"),
    "cache": ("auto", "memory", "none"),
    "strategy": ("auto", "one_device", "mirrored", "multi_worker"),
    "jacobian_mode": ("loop", "batched"),
}


@dataclasses.dataclass
class TrainConfig:
    # What to train
    model: str = "kendall_deeplabv3_resnet26_cpu"
    model_overrides: dict = dataclasses.field(default_factory=dict)
    # The encoder's starting weights: "" (random), "imagenet" (keras.applications' download) or a local .h5 file of
    # keras.applications.ResNet50/101 (the dilated ResNet-50/101 models; read once, when a run starts).
    backbone_weights: str = ""
    tasks: tuple = ("semantic", "instance", "depth")
    num_classes: int = 19
    # Data
    dataset: str = "synthetic"  # a name of mtl_keras.data.datasets.DATASETS (synthetic, cityscapes, nyuv2, ...)
    data_dir: str = ""  # default for synthetic: data/synthetic (generated when absent)
    image_size: tuple = (128, 256)
    synthetic_num_train: int = 600
    synthetic_num_val: int = 50
    flip: bool = True
    scale_range: tuple = (1.0, 1.0)  # random scaling of training images (Kendall et al.'s full-size run: 0.7-2.0)
    crop_size: tuple = ()  # random training crops (height, width), padded with the ignore label; () = none
    cache: str = "auto"  # decoded training examples in memory: auto (when they fit in 2 GiB) | memory | none
    depth_target: str = ""  # "inverse" | "metric"; "" = the dataset's default (CityScapes inverse, NYUv2 metric)
    # Loss weighting
    weighting: str = "uncertainty"  # a name of WEIGHTING_NAMES
    weighting_options: dict = dataclasses.field(default_factory=dict)  # a gradient method's options, e.g. {"c": 0.4}
    rep_grad: bool = False  # gradient methods: per-task gradients of the shared representation, not the parameters
    jacobian_mode: str = "loop"  # gradient methods: K backward passes (loop) or one vectorised pass (batched, JAX)
    task_weights: tuple = ()  # for "fixed", in task order
    initial_log_variance: float = 0.0  # uncertainty: initial log sigma^2
    dwa_temperature: float = 2.0
    weight_learning_rate: float = 1e-3  # mtunet: the learning rate of its weights W_i (MT-UNet)
    # Optimisation
    # The defaults are the default job's (from scratch, 800 steps; datasets/synthetic.md, "The default job"): Adam at
    # 2e-3 with poly decay learns the synthetic scenes in the budget, where Kendall et al.'s SGD (Nesterov 0.9, poly
    # 0.9, wd 1e-4; lr 2.5e-3 from ImageNet weights over 50k steps) does not. The paper presets set that optimiser.
    optimizer: str = "adam"  # sgd | adam
    learning_rate: float = 2e-3
    # poly: (1 - step/total)^lr_power to 0; step: x lr_step_gamma every lr_step_epochs epochs (torch's StepLR stepped
    # once per epoch, LibMTL's examples: 100 epochs, 0.5)
    lr_schedule: str = "poly"
    lr_power: float = 0.9
    lr_step_epochs: int = 100
    lr_step_gamma: float = 0.5
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # adam: torch.optim.Adam's coupled L2 term (gradient + adam_l2 * variable before the moments, every variable;
    # LibMTL's weight_decay); 0 = Keras' Adam unchanged. (--weight_decay is sgd's decoupled decay.)
    adam_l2: float = 0.0
    batch_size: int = 8  # global batch size (split over replicas)
    steps: int = 0  # total training steps; 0 = use epochs
    epochs: int = 0  # passes over the training split; used when steps == 0
    jit_compile: Optional[bool] = None  # None: the backend's default (XLA on JAX; off on TensorFlow and PyTorch)
    seed: int = 0
    # Distribution
    # auto (mirrored over all GPUs if any, else one device) | one_device | mirrored | multi_worker (TF_CONFIG)
    strategy: str = "auto"
    cpu_replicas: int = 0  # mirrored without GPUs: split the CPU into this many logical devices (tests, debugging)
    sync_batchnorm: bool = True  # batch statistics over all replicas (no effect with one replica)
    precision: str = "float32"  # float32 | mixed_float16 | mixed_bfloat16 (loss weights stay float32)
    deterministic: bool = False  # deterministic TF ops: a resumed run reproduces an uninterrupted one bit for bit
    # Output
    output_dir: str = "runs/default"
    overwrite: bool = False  # replace a finished run in output_dir (without it such a run is refused, untouched)
    val_batches: int = 0  # 0 = the whole validation split
    num_sample_images: int = 4
    export: bool = True

    def __post_init__(self):
        """Every setting checked up front, each error naming its flag: a run never fails on a value minutes later."""
        problems = []

        def check(ok, flag, expected):
            if not ok:
                problems.append(f"--{flag} must be {expected}, got {getattr(self, flag)!r}")

        def is_int(v, low):
            return isinstance(v, int) and not isinstance(v, bool) and v >= low

        def positive_ints(v, n):
            return isinstance(v, (tuple, list)) and len(v) == n and all(is_int(x, 1) for x in v)

        def is_number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < float("inf")

        for flag, low in (("batch_size", 1), ("num_classes", 1), ("steps", 0), ("epochs", 0), ("val_batches", 0),
                          ("num_sample_images", 0), ("cpu_replicas", 0), ("synthetic_num_train", 1),
                          ("synthetic_num_val", 1), ("lr_step_epochs", 1)):
            check(is_int(getattr(self, flag), low), flag, f"an integer >= {low}")
        check(isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < float("inf"),
              "learning_rate", "a positive number")
        check(isinstance(self.lr_power, (int, float)) and self.lr_power >= 0, "lr_power", "a number >= 0")
        check(is_number(self.lr_step_gamma) and self.lr_step_gamma > 0, "lr_step_gamma", "a positive number")
        check(is_number(self.adam_l2) and self.adam_l2 >= 0, "adam_l2", "a number >= 0")
        if is_number(self.adam_l2) and self.adam_l2 > 0 and self.optimizer != "adam":
            problems.append(f"--adam_l2 applies to --optimizer adam (got --optimizer {self.optimizer!r}); sgd's decay "
                            f"is --weight_decay")
        check(positive_ints(self.image_size, 2), "image_size", "height,width (two positive integers)")
        check(self.crop_size in ((), []) or positive_ints(self.crop_size, 2), "crop_size",
              "empty or height,width (two positive integers)")
        check(isinstance(self.scale_range, (tuple, list)) and len(self.scale_range) == 2
              and all(isinstance(x, (int, float)) for x in self.scale_range)
              and 0 < self.scale_range[0] <= self.scale_range[1], "scale_range", "min,max with 0 < min <= max")
        for flag, choices in CHOICES.items():
            check(getattr(self, flag) in choices, flag, "one of " + ", ".join(repr(c) for c in choices))
        check(isinstance(self.output_dir, str) and self.output_dir.strip(), "output_dir", "a folder name")
        # Only the type here: a saved run's config stays readable after its weights file moved; run_training
        # checks the file when a run starts.
        check(isinstance(self.backbone_weights, str), "backbone_weights", "'imagenet', a file name or empty")
        # Every other field by its declared type: a JSON config's "flip": "no" is not taken as true.
        expected = {bool: (bool, "true or false"), str: (str, "a string"), dict: (dict, "a JSON object"),
                    float: ((int, float), "a number"), Optional[bool]: ((bool, type(None)), "true, false or null")}
        for field in dataclasses.fields(self):
            kinds, text = expected.get(field.type, (object, ""))
            value = getattr(self, field.name)
            if not isinstance(value, kinds) or (field.type is float and isinstance(value, bool)):
                problems.append(f"--{field.name} must be {text}, got {value!r}")
        if problems:
            raise ValueError("; ".join(problems) + ".")

    def replace(self, **overrides):
        unknown = [k for k in overrides if k not in {f.name for f in dataclasses.fields(self)}]
        if unknown:
            raise ValueError(f"Unknown config field(s) {unknown}. Valid: {[f.name for f in dataclasses.fields(self)]}.")
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_dict(cls, values):
        """A config from a (JSON) dict: lists become tuples where the default is a tuple."""
        if not isinstance(values, dict):
            raise ValueError(f"A training config is a JSON object of settings, got a JSON {type(values).__name__}.")
        defaults = cls()
        converted = {}
        for key, value in values.items():
            if key in ("name", "description", "paper"):
                continue  # preset metadata
            if isinstance(getattr(defaults, key, None), tuple) and isinstance(value, list):
                value = tuple(value)
            converted[key] = value
        return defaults.replace(**converted)

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def differences(self, saved, ignore=()):
        """Sorted names of the fields, but ``ignore``, that differ from ``saved`` (a :meth:`to_json` dict); a field
        that ``saved`` lacks (added since) is equal when this config has its default."""
        now = json.loads(self.to_json())
        defaults = json.loads(TrainConfig().to_json())
        return [k for k in sorted(set(now) | set(saved))
                if k not in ignore and saved.get(k, defaults.get(k)) != now.get(k)]
