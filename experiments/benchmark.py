"""Every weighting x architecture of a protocol, over seeds, with single-task baselines: a table of each task's
metrics (mean +- std over seeds), Delta_m and the cost relative to equal weighting.

    python experiments/benchmark.py --protocol quick --jobs 2          # synthetic scenes, 2 CPU cores, < 90 min
    python experiments/benchmark.py --protocol libmtl_nyuv2 --data_dir /data/nyuv2 --weightings equal,pcgrad
    python experiments/benchmark.py --protocol quick --shard $SLURM_ARRAY_TASK_ID/8   # one part of the grid
    python experiments/benchmark.py --protocol quick --merge            # the table from every finished cell

Protocols are benchmarks/protocols/NAME.json (or a JSON file of your own). Each cell is a run folder under
OUTPUT_DIR/cells/: a finished cell is never trained again, an interrupted one resumes from its last backup, and the
table (OUTPUT_DIR/table.md, table.csv, delta_m_vs_cost.png) is rebuilt from the folders after every run, so shards on
several machines that share OUTPUT_DIR need only a final --merge.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from mtl_keras import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("protocol", "quick", "A protocol name (benchmarks/protocols/NAME.json) or a protocol JSON file.")
flags.DEFINE_list("weightings", [], "Weightings to run (default: the protocol's); equal (EW, the cost reference) is "
                  "always added.")
flags.DEFINE_list("architectures", [], "Architectures to run (default: the protocol's).")
flags.DEFINE_integer("seeds", None, "Number of seeds: the protocol's first ones (continued 0, 1, ... past its list); "
                     "default: the protocol's.")
flags.DEFINE_string("output_dir", None, "Grid folder (default: runs/benchmark/PROTOCOL).")
flags.DEFINE_string("data_dir", None, "The dataset's root, replacing the protocol's data_dir (its data_dir is "
                    "part of no cell's identity: moving the data does not retrain).")
flags.DEFINE_string("shard", None, "I/N: run only every N-th cell starting at I (0 <= I < N), for array jobs.")
flags.DEFINE_integer("jobs", 1, "Cells trained at once, each in its own process (on a CPU each gets its share of "
                     "the cores); 0: in this process (no per-cell memory figure).")
flags.DEFINE_boolean("merge", False, "Only rebuild the table from the finished cell folders; train nothing.")
flags.DEFINE_boolean("dry_run", False, "List the cells, their state and their command; train nothing.")


def main(argv):
    del argv
    from mtl_keras import benchmark

    protocol = benchmark.load_protocol(FLAGS.protocol)
    if FLAGS.data_dir:
        protocol = dataclasses.replace(protocol, training={**protocol.training, "data_dir": FLAGS.data_dir})
    root = FLAGS.output_dir or os.path.join("runs", "benchmark", protocol.name)
    cells = benchmark.grid(protocol, FLAGS.weightings or None, FLAGS.architectures or None, FLAGS.seeds)
    everything = cells
    if FLAGS.shard:
        cells = benchmark.shard(cells, *benchmark.parse_shard(FLAGS.shard))
    if FLAGS.jobs < 0:
        raise ValueError(f"--jobs must be >= 0, got {FLAGS.jobs}.")
    if FLAGS.dry_run:
        for cell in cells:
            config = benchmark.cell_config(protocol, cell, root)
            print(f"{benchmark.cell_state(config):8s} {cell.name}  ({config.output_dir})")
        return
    failed = [] if FLAGS.merge else benchmark.run_grid(protocol, cells, root, jobs=FLAGS.jobs)
    rows, missing = benchmark.build_table(protocol, root, expected=everything)
    print(f"\n{os.path.join(root, 'table.md')}: {len(rows)} rows; "
          f"{len(everything) - len(missing)} of {len(everything)} cells finished")
    with open(os.path.join(root, "table.md")) as f:
        print(f.read())
    if failed:
        raise SystemExit(f"{len(failed)} cell(s) failed: {', '.join(failed)}; run the same command again to resume "
                         f"them (each cell's train.log says why).")


if __name__ == "__main__":
    cli.run(main)
