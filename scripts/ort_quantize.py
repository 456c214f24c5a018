"""Quantizes an ONNX model's MatMul weights to 4 bits with onnxruntime's own
MatMulNBitsQuantizer (the reference Kiln's pre-quantized import is tested against).

usage: ort_quantize.py MODEL.onnx OUT.onnx [BLOCK_SIZE] [--symmetric]
"""
import sys

from onnxruntime.quantization.matmul_nbits_quantizer import (
    DefaultWeightOnlyQuantConfig,
    MatMulNBitsQuantizer,
)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) not in (2, 3):
        sys.exit(__doc__)
    src, dst = args[0], args[1]
    block = int(args[2]) if len(args) == 3 else 128
    cfg = DefaultWeightOnlyQuantConfig(
        block_size=block, is_symmetric="--symmetric" in sys.argv, accuracy_level=None
    )
    q = MatMulNBitsQuantizer(src, algo_config=cfg)
    q.process()
    q.model.save_model_to_file(dst, use_external_data_format=True)


if __name__ == "__main__":
    main()
