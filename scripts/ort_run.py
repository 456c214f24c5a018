#!/usr/bin/env python3
"""Runs an ONNX model with onnxruntime (CPU) on input_N.pb files and writes output_N.pb files.

Test tooling: the tests check that the ONNX Kiln writes (`kiln compile --emit-onnx`) runs in
onnxruntime and agrees with Kiln's own artifact.

usage: ort_run.py MODEL.onnx INPUTS_DIR OUTPUT_DIR
"""
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper


def main():
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    model, inputs_dir, output_dir = sys.argv[1:]
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    feeds = {}
    for k, inp in enumerate(sess.get_inputs()):
        t = onnx.load_tensor(os.path.join(inputs_dir, f"input_{k}.pb"))
        feeds[inp.name] = numpy_helper.to_array(t)
    outs = sess.run(None, feeds)
    os.makedirs(output_dir, exist_ok=True)
    for k, (o, info) in enumerate(zip(outs, sess.get_outputs())):
        t = numpy_helper.from_array(np.asarray(o), info.name)
        with open(os.path.join(output_dir, f"output_{k}.pb"), "wb") as f:
            f.write(t.SerializeToString())
    return 0


if __name__ == "__main__":
    sys.exit(main())
