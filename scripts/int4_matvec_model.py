"""Builds the INT4 mat-vec benchmark model of BENCHMARKS.md: one input row x[1, K] multiplied
by COPIES different 4-bit weight matrices [K, N] (com.microsoft MatMulNBits, block 128,
asymmetric, accuracy_level 4), the products summed into one output [1, N]. Every copy has its
own random bytes, so neither onnxruntime (which merges identical initializers) nor any cache
can keep the weights: each run streams COPIES x (K*N/2 + scales + zero points) bytes from
memory. Writes DIR/model.onnx and DIR/test_data_set_0/input_0.pb.

    python scripts/int4_matvec_model.py --k 2048 --n 5632 --copies 24 --out DIR
"""

import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--copies", type=int, required=True)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--accuracy-level", type=int, default=4)
    ap.add_argument("--m", type=int, default=1, help="rows of x (1: a matrix-vector product)")
    ap.add_argument("--bias", action="store_true", help="give each product a bias input")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    k, n, block = a.k, a.n, a.block
    blocks = (k + block - 1) // block
    rng = np.random.default_rng(0)
    inits, nodes, partials = [], [], []
    for c in range(a.copies):
        b = rng.integers(0, 256, size=(n, blocks, block // 2), dtype=np.uint8)
        scales = (rng.random((n * blocks,), dtype=np.float32) * 0.02 + 0.001).astype(np.float32)
        zp = rng.integers(0, 256, size=(n * ((blocks + 1) // 2),), dtype=np.uint8)
        inits += [
            numpy_helper.from_array(b, f"w{c}"),
            numpy_helper.from_array(scales, f"s{c}"),
            numpy_helper.from_array(zp, f"z{c}"),
        ]
        inputs = ["x", f"w{c}", f"s{c}", f"z{c}"]
        if a.bias:
            bias = rng.standard_normal((n,), dtype=np.float32)
            inits.append(numpy_helper.from_array(bias, f"bias{c}"))
            inputs += ["", f"bias{c}"]
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                inputs,
                [f"y{c}"],
                domain="com.microsoft",
                K=k,
                N=n,
                bits=4,
                block_size=block,
                accuracy_level=a.accuracy_level,
            )
        )
        partials.append(f"y{c}")
    nodes.append(helper.make_node("Sum", partials, ["y"]))
    graph = helper.make_graph(
        nodes,
        f"int4_matvec_{k}x{n}x{a.copies}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [a.m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [a.m, n])],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    os.makedirs(os.path.join(a.out, "test_data_set_0"), exist_ok=True)
    onnx.save(model, os.path.join(a.out, "model.onnx"))
    x = rng.standard_normal((a.m, k), dtype=np.float32)
    with open(os.path.join(a.out, "test_data_set_0", "input_0.pb"), "wb") as f:
        f.write(numpy_helper.from_array(x, "x").SerializeToString())
    weight_bytes = a.copies * (b.nbytes + scales.nbytes + zp.nbytes)
    print(f"weight bytes per run: {weight_bytes}")


if __name__ == "__main__":
    main()
