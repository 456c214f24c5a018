"""onnxruntime side of `kiln bench --onnx` (embedded in the kiln binary and run with the test
venv's Python). Reads input_N.pb files in graph input order, runs the model on the CPU with
intra_op_num_threads = --threads, --warmup untimed runs and --runs timed ones, and prints:

    times_ms: T1 T2 ...        (one wall time per timed run, in milliseconds)
    peak_rss_kib: N            (peak resident memory of this Python process)

kiln computes the statistics from these times with the same code as for its own runs.
`--check` only verifies that numpy, onnx and onnxruntime import (exit status 3 if not).
"""

import argparse
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--inputs-dir", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()

    try:
        import numpy  # noqa: F401
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper
    except ImportError as e:
        print(f"cannot import {e.name or e}: {e}", file=sys.stderr)
        return 3
    if args.check:
        return 0

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(args.model, sess_options=opts, providers=["CPUExecutionProvider"])

    feeds = {}
    for k, inp in enumerate(sess.get_inputs()):
        path = os.path.join(args.inputs_dir, f"input_{k}.pb")
        t = onnx.TensorProto()
        with open(path, "rb") as f:
            t.ParseFromString(f.read())
        feeds[inp.name] = numpy_helper.to_array(t)

    for _ in range(args.warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)

    print("times_ms: " + " ".join(f"{t:.6f}" for t in times))
    try:
        import resource

        print(f"peak_rss_kib: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}")
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
