"""Trainable parameters of LibMTL's NYUv2 example models next to the ``libmtl_nyuv2_*`` presets of the zoo.

LibMTL's count is made by LibMTL's own code: its ``examples/nyu/main.py`` configuration (``resnet_dilated('resnet50')``
encoder, ``DeepLabHead(2048, {13, 1, 3})`` decoders, 3x288x384 images) built with PyTorch and counted as
``sum(p.numel() for p in model.parameters() if p.requires_grad)``. It needs a LibMTL checkout (``--libmtl``) and torch;
torchvision is not needed (LibMTL carries its own ResNet). ``--write`` records the counts in the presets' ``reference``
field, which ``tests/test_libmtl_parity.py`` compares with the zoo's models.

    python benchmarks/libmtl_parity.py --libmtl /path/to/LibMTL [--write]
"""

import argparse
import importlib
import json
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# LibMTL's architecture name and arguments (its examples/nyu README and config.py) for each preset's scheme
LIBMTL_ARCHITECTURES = {
    "hps": ("HPS", {}),
    "cross_stitch": ("Cross_stitch", {}),
    "mtan": ("MTAN", {}),
    "mmoe": ("MMoE", {"img_size": [3, 288, 384], "num_experts": [2]}),
    "cgc": ("CGC", {"img_size": [3, 288, 384], "num_experts": [1, 1, 1, 1]}),
    "ple": ("PLE", {"img_size": [3, 288, 384], "num_experts": [1, 1, 1, 1]}),
    "dselect_k": ("DSelect_k", {"img_size": [3, 288, 384], "num_experts": [2], "num_nonzeros": 2, "kgamma": 1.0}),
    "ltb": ("LTB", {}),
}
TASK_CHANNELS = {"segmentation": 13, "depth": 1, "normal": 3}  # examples/nyu/main.py's num_out_channels


def libmtl_counts(libmtl_dir):
    """{architecture: trainable parameters} of LibMTL's NYUv2 models, built by LibMTL's code on the CPU."""
    import torch

    package = os.path.join(libmtl_dir, "LibMTL")
    # LibMTL/__init__.py imports its trainer and weightings (and their dependencies); the architectures and the
    # ResNet need only torch, so the package is entered without running its __init__.
    stub = types.ModuleType("LibMTL")
    stub.__path__ = [package]
    sys.modules["LibMTL"] = stub
    arch = importlib.import_module("LibMTL.architecture")
    resnet_dilated = importlib.import_module("LibMTL.model.resnet_dilated").resnet_dilated
    sys.path.insert(0, os.path.join(libmtl_dir, "examples", "nyu"))
    deeplab_head = importlib.import_module("aspp").DeepLabHead

    counts = {}
    for name, (class_name, kwargs) in LIBMTL_ARCHITECTURES.items():
        torch.manual_seed(0)
        decoders = torch.nn.ModuleDict({t: deeplab_head(2048, c) for t, c in TASK_CHANNELS.items()})
        model = getattr(arch, class_name)(
            task_name=list(TASK_CHANNELS), encoder_class=lambda: resnet_dilated("resnet50", pretrained=False),
            decoders=decoders, rep_grad=False, multi_input=False, device=torch.device("cpu"), **kwargs)
        counts[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts


def zoo_counts():
    """{architecture: trainable parameters} of the ``libmtl_nyuv2_*`` presets built by mtl_keras."""
    import math

    from mtl_keras import presets

    counts = {}
    for name in LIBMTL_ARCHITECTURES:
        model = presets.build_from_preset(f"libmtl_nyuv2_{name}")
        counts[name] = sum(math.prod(v.shape) for v in model.trainable_weights)
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--libmtl", required=True, help="a LibMTL checkout (the folder holding LibMTL/ and examples/)")
    parser.add_argument("--write", action="store_true", help="record LibMTL's counts in models/libmtl_nyuv2_*.json")
    args = parser.parse_args()
    if not os.path.isdir(os.path.join(args.libmtl, "LibMTL", "architecture")):
        sys.exit(f"--libmtl {args.libmtl}: no LibMTL/architecture/ there (expected a LibMTL checkout)")
    theirs = libmtl_counts(args.libmtl)
    ours = zoo_counts()
    print(f"{'architecture':14} {'LibMTL (PyTorch)':>18} {'mtl_keras':>14}  equal")
    for name in LIBMTL_ARCHITECTURES:
        print(f"{name:14} {theirs[name]:>18,} {ours[name]:>14,}  {theirs[name] == ours[name]}")
    if args.write:
        from mtl_keras import presets

        for name, count in theirs.items():
            path = os.path.join(ROOT, "models", f"libmtl_nyuv2_{name}.json")
            preset = json.load(open(path))
            preset["reference"] = {
                "libmtl_trainable_parameters": count,
                "counted_by": "benchmarks/libmtl_parity.py: LibMTL's examples/nyu/main.py model (resnet_dilated "
                              "resnet50, DeepLabHead per task, 3x288x384) built by LibMTL's own code with PyTorch, "
                              "sum(p.numel() for p in model.parameters() if p.requires_grad)"}
            with open(path, "w") as f:
                f.write(presets.dumps_preset(preset))
        print("recorded in models/libmtl_nyuv2_*.json")


if __name__ == "__main__":
    main()
