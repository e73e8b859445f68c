import numpy as np
import onnx
from onnx import TensorProto, helper

from ts_qat_pytorch.onnx.verify import ort_session, run_in_batches


def test_run_in_batches_feeds_the_static_batch_and_cuts_the_padding(tmp_path):
    """A file exported with a fixed batch of 2 scores 5 rows: chunks of 2, the last zero-padded and cut."""
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"]), helper.make_node("ReduceSum", ["x", "axis"], ["s"])],
        "g", [x_info], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
                        helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 1])],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]), helper.make_tensor("axis", TensorProto.INT64, [1], [1])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    x = np.arange(15, dtype=np.float32).reshape(5, 3)
    y, s = run_in_batches(ort_session(str(path)), x)
    np.testing.assert_array_equal(y, x * 2)
    np.testing.assert_array_equal(s, x.sum(1, keepdims=True))  # every output is cut back to 5 rows
