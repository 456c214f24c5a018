"""onnxruntime side of `kiln bench --onnx` (embedded in the kiln binary and run with the test
venv's Python). Reads input_N.pb files in graph input order, runs the model on the CPU with
intra_op_num_threads = --threads, --warmup untimed runs and --runs timed ones, and prints:

    times_ms: T1 T2 ...        (one wall time per timed run, in milliseconds)
    peak_rss_kib: N            (peak resident memory of this Python process)

kiln computes the statistics from these times with the same code as for its own runs.
`--check` only verifies that numpy, onnx and onnxruntime import (exit status 3 if not) and
that the model's inputs match the input files in count, element type and fixed dims (exit
status 4 if not), so that kiln can refuse before timing anything.
"""

import argparse
import os
import sys
import time


def check_inputs(onnx, numpy_helper, model_path: str, inputs_dir: str) -> int:
    """Exit status 4 with one line on stderr if the model's inputs do not match the files."""
    graph = onnx.load(model_path, load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    for k, inp in enumerate(inputs):
        path = os.path.join(inputs_dir, f"input_{k}.pb")
        if not os.path.exists(path):
            names = ", ".join(i.name for i in inputs)
            print(f"the model has {len(inputs)} inputs ({names}) but there is no {path}", file=sys.stderr)
            return 4
        t = onnx.TensorProto()
        with open(path, "rb") as f:
            t.ParseFromString(f.read())
        tt = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        shape_ok = len(dims) == len(t.dims) and all(d is None or d == v for d, v in zip(dims, t.dims))
        if tt.elem_type != t.data_type or not shape_ok:
            want = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
            got = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            print(
                f"input {k} '{inp.name}' of the model is {want}{[d if d is not None else '?' for d in dims]}, "
                f"{path} holds {got}{list(t.dims)}",
                file=sys.stderr,
            )
            return 4
    n = sum(1 for f in os.listdir(inputs_dir) if f.startswith("input_") and f.endswith(".pb"))
    if n > len(inputs):
        print(f"the model has {len(inputs)} inputs but {inputs_dir} holds {n} input files", file=sys.stderr)
        return 4
    return 0


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
        return check_inputs(onnx, numpy_helper, args.model, args.inputs_dir)

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
    # VmHWM of this process's own address space; getrusage's ru_maxrss would also count the
    # memory of the process that started Python (Linux carries it across exec).
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    print(f"peak_rss_kib: {line.split()[1]}")
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
