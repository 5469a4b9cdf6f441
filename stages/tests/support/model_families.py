"""Makes one small ONNX model per model family, with that family's input and
output signature, and the masks rembg's own sessions make with them.

    model_families.py OUT_DIR IMAGE.png [IMAGE.png ...]

writes OUT_DIR/tiny-<family>.onnx and OUT_DIR/<family>-<i>.png (the mask of
the i-th image). The families and rembg's sessions for them:
  u2net     320x320, probabilities out: rembg's `u2net_custom` session
  isnet     1024x1024, probabilities out: rembg's `dis_custom` session
  birefnet  1024x1024, logits out: rembg's BiRefNet session (it has no
            custom session, so its class is given the model's path)
The model is one 3x3 convolution (with a sigmoid for the families whose
output is probabilities): enough to make a mask that depends on every
pre- and post-processing step, small enough to run in a moment.
"""

import os
import sys
from pathlib import Path

# rembg opens custom models only from under its models directory.
os.environ["U2NET_HOME"] = os.path.abspath(sys.argv[1])

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from rembg import new_session
from rembg.sessions.birefnet_general import BiRefNetSessionGeneral

FAMILIES = {"u2net": 320, "isnet": 1024, "birefnet": 1024}


def tiny_model(family: str, side: int, path: Path) -> None:
    rng = np.random.default_rng(7)
    weights = rng.normal(0.0, 0.6, size=(1, 3, 3, 3)).astype(np.float32)
    bias = np.array([0.1], dtype=np.float32)
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["conv"], pads=[1, 1, 1, 1])]
    if family == "birefnet":
        nodes.append(helper.make_node("Identity", ["conv"], ["output"]))
    else:
        nodes.append(helper.make_node("Sigmoid", ["conv"], ["output"]))
    graph = helper.make_graph(
        nodes,
        f"tiny-{family}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, side, side])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, side, side])],
        initializer=[numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def session(family: str, path: Path):
    if family == "u2net":
        return new_session("u2net_custom", model_path=str(path))
    if family == "isnet":
        return new_session("dis_custom", model_path=str(path))

    class Custom(BiRefNetSessionGeneral):
        @classmethod
        def download_models(cls, *args, **kwargs):
            return str(path)

    import onnxruntime as ort

    return Custom("birefnet-general", ort.SessionOptions())


def main() -> None:
    out = Path(sys.argv[1])
    images = [Image.open(p) for p in sys.argv[2:]]
    for family, side in FAMILIES.items():
        path = out / f"tiny-{family}.onnx"
        tiny_model(family, side, path)
        s = session(family, path)
        for i, img in enumerate(images):
            s.predict(img)[0].save(out / f"{family}-{i}.png")


if __name__ == "__main__":
    main()
