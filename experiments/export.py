"""Export a trained model for serving: a TensorFlow SavedModel (and optionally ONNX) that takes raw images.

    python experiments/export.py runs/default                       # -> runs/default/serving/
    python experiments/export.py runs/default --instances --onnx    # + instance ids, + runs/default/serving.onnx
    python experiments/export.py model.keras --output /srv/models/mtl/1
    python experiments/export.py kendall_deeplabv3_resnet26_slim_synthetic --output exports/slim   # a preset name

SOURCE is a training output folder (its model.keras, else config.json + checkpoints/last.weights.h5), a .keras
file, or a model preset name (mtl_keras.list_presets(); its weights file must be present locally, or --weights).

The SavedModel's signatures (serving_default / serve: float32 images; serve_uint8: uint8 images; any batch, height
and width) return semantic_logits, semantic_labels, instance_vectors, depth (those of the model's tasks) and, with
--instances, instance_ids. Inspect it with `saved_model_cli show --dir OUTPUT --all`; it needs neither Keras nor
mtl_keras to run. See mtl_keras/export.py for the details (padding, instance clustering inside the graph).

A training run writes this same SavedModel to RUN/export (with --instances when its model has the semantic and
instance tasks and CityScapes classes); `python experiments/evaluate.py --model_path OUTPUT` evaluates it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from mtl_keras import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "SavedModel folder (default: RUN/serving, or NAME_serving next to a .keras file, "
                    "or exports/NAME for a preset).")
flags.DEFINE_string("weights", None, "Weights file (.weights.h5 or .keras) to load into the model first.")
flags.DEFINE_boolean("instances", False, "Add an instance_ids output (vote clustering in TensorFlow ops).")
flags.DEFINE_list("instance_image_size", [], "height,width the clustering lengths are set for (default: the model's "
                  "input size).")
flags.DEFINE_integer("max_instances", 32, "--instances: most instances per class and image.")
flags.DEFINE_boolean("onnx", False, "Also write OUTPUT.onnx (tf2onnx; dense outputs, no instance ids).")
flags.DEFINE_integer("opset", 17, "ONNX opset.")
flags.DEFINE_boolean("overwrite", False, "Replace an existing output folder.")


def default_output(source):
    if os.path.isdir(source):
        return os.path.join(source, "serving")
    if source.endswith(".keras"):
        return source[:-len(".keras")] + "_serving"
    return os.path.join("exports", source)


def main(argv):
    if len(argv) != 2:
        raise ValueError("Usage: python experiments/export.py SOURCE [--output DIR] [--instances] [--onnx]")
    source = argv[1]
    output = FLAGS.output or default_output(source)
    if os.path.exists(os.path.join(output, "saved_model.pb")) and not FLAGS.overwrite:
        raise ValueError(f"--output {output} already holds a SavedModel; pass --overwrite to replace it.")

    import mtl_keras
    from mtl_keras.export import export_saved_model
    from onnx_export import export_onnx  # experiments/onnx_export.py

    if os.path.isfile(os.path.join(source, "config.json")):  # a run folder, finished or not
        from mtl_keras.experiment import load_run

        model = load_run(source)
        if FLAGS.weights:
            model.load_weights(FLAGS.weights)
    else:
        model = mtl_keras.load_model(source, weights=FLAGS.weights)
    size = tuple(int(v) for v in FLAGS.instance_image_size) or None
    info = export_saved_model(model, output, instances=FLAGS.instances, instance_image_size=size,
                              max_instances=FLAGS.max_instances)
    print(f"SavedModel: {output}\n  signatures: serving_default, serve (float32 images), serve_uint8 (uint8 images)"
          f"\n  outputs: {', '.join(info['outputs'])}")
    if FLAGS.onnx:
        onnx_path = output.rstrip("/\\") + ".onnx"
        try:
            export_onnx(model, onnx_path, opset=FLAGS.opset)
        except RuntimeError as e:
            print(f"ONNX export failed: {e}", file=sys.stderr)
            sys.exit(2)
        print(f"ONNX: {onnx_path} (input images float32 NHWC; dense outputs)")


if __name__ == "__main__":
    cli.run(main)
