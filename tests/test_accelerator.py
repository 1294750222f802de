"""hired on an accelerator: every family x every method through a whole patched forward and ``generate``.

Each test runs twice: on a real CUDA device where there is one (``make test-gpu``; skipped with one line
elsewhere), and on :class:`simulated_device.SimulatedDevice` everywhere, where the model's tensors report
another device and every op is checked against an accelerator's rules (no CPU tensor meets a device tensor,
no float64 on the device) while the data stays on the CPU. Logits and kept tokens must equal the CPU run's.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
from PIL import Image
from simulated_device import DeviceMixError, SimulatedDevice

import hired
from hired.testing import TINY_MODELS

IMAGES = [Image.fromarray(np.random.RandomState(seed).randint(0, 256, size=size, dtype=np.uint8))
          for seed, size in ((5, (500, 800, 3)), (6, (700, 300, 3)))]
METHODS = hired.available_methods()


class Accelerator:
    """Where a test runs its model: a real CUDA device, or the simulated one."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.simulated = SimulatedDevice() if kind == "simulated" else None

    def context(self):
        return self.simulated if self.simulated is not None else contextlib.nullcontext()

    def move(self, model):
        return self.simulated.move(model) if self.simulated is not None else model.to("cuda")


@pytest.fixture(params=["cuda", "simulated"])
def accelerator(request):
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device here: `make test-gpu` runs these on a machine with one")
        # Convolutions (the patch embeddings) would run in TF32 and move scores enough to reorder near ties.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return Accelerator(request.param)


@pytest.fixture(scope="module", params=sorted(TINY_MODELS))
def family(request):
    model, processor = TINY_MODELS[request.param](text_layers=3)  # FastV prunes after layer 2
    return model.eval(), processor


def settings(method: str, budget: float) -> dict:
    return {"method": method} if hired.get_method(method).stage == "none" else {"method": method, "budget": budget}


def encode(processor, images=IMAGES[:1]):
    text = [f"USER: {processor.image_token} hi ASSISTANT:"] * len(images)
    return processor(images=images, text=text, return_tensors="pt", padding=True)


def run(model, processor, accelerator: Accelerator | None, generate: bool = False, patched: bool = True,
        images=IMAGES[:1]):
    """Logits (or generated ids) and the kept indices of one prompt per image (of a ``patched`` model), on the CPU
    or on ``accelerator``."""
    inputs = encode(processor, images)
    context = contextlib.nullcontext() if accelerator is None else accelerator.context()
    with context, torch.no_grad():
        if accelerator is not None:
            accelerator.move(model)
            inputs = {key: value.to(model.device) for key, value in inputs.items()}
        if generate:
            output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        else:
            output = model(**inputs).logits
        output = output.cpu()
    return output, [[k.tolist() for k in record.kept] for record in hired.selections(model)] if patched else None


def patched(family, method: str, budget: float = 0.3):
    model, processor = copy.deepcopy(family[0]), copy.deepcopy(family[1])
    try:
        hired.apply(model, processor, **settings(method, budget))
    except ValueError as error:
        if "has no CLS token" in str(error):
            pytest.skip(f"{method} needs a CLS token; test_contract covers its refusal")
        raise
    return model, processor


@pytest.mark.parametrize("method", METHODS)
def test_a_patched_forward_on_an_accelerator_matches_the_cpu(family, method, accelerator):
    model, processor = patched(family, method)
    logits, kept = run(model, processor, None)
    device_logits, device_kept = run(model, processor, accelerator)
    assert device_kept == kept
    torch.testing.assert_close(device_logits, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_generate_on_an_accelerator(family, method, accelerator):
    """``generate`` checks placeholders against features itself; the kept tokens are the CPU's.

    On the simulated device (every op through Python, slow) for one method per stage: the forward test above
    already crosses every method with every family there."""
    if accelerator.kind == "simulated" and method not in ("hired", "fastv"):
        pytest.skip("on the simulated device, generate runs for hired and fastv; the forward test covers the rest")
    model, processor = patched(family, method)
    ids, kept = run(model, processor, None, generate=True)
    device_ids, device_kept = run(model, processor, accelerator, generate=True)
    assert device_kept == kept
    assert device_ids.shape == ids.shape


def test_full_budget_is_the_stock_model_on_an_accelerator(family, accelerator):
    stock, _ = run(copy.deepcopy(family[0]), family[1], accelerator, patched=False)
    model, processor = patched(family, "hired", 1.0)
    full, _ = run(model, processor, accelerator)
    assert torch.equal(full, stock)


@pytest.mark.parametrize("method", METHODS)
def test_a_method_reads_the_device_a_fixed_number_of_times_whatever_the_budget(family, method):
    """A host read per kept token stalls a GPU once per token (DivPrune's greedy picks did)."""
    if hired.get_method(method).stage == "none":
        pytest.skip("the stock model has no budget")
    syncs = []
    for budget in (0.1, 0.4):
        model, processor = patched(family, method, budget)
        accelerator = Accelerator("simulated")
        run(model, processor, accelerator)
        syncs.append(accelerator.simulated.syncs)
    assert syncs[0] == syncs[1]


def test_the_simulated_device_refuses_what_an_accelerator_refuses():
    """The checks above can fail: a CPU tensor meeting a device tensor, and float64 on the device, are errors."""
    device = SimulatedDevice()
    with device:
        on_device = torch.ones(3, device=device.device)
        with pytest.raises(DeviceMixError, match="on cpu"):
            on_device + torch.arange(3)
        with pytest.raises(DeviceMixError, match="float64"):
            on_device.double()
        with pytest.raises(DeviceMixError, match="on cpu"):
            torch.arange(3)[on_device.long()]
        assert (on_device + torch.tensor(2.0)).device == device.device  # a CPU scalar is allowed, as on CUDA
        assert on_device[torch.tensor([0, 2])].device == device.device  # so are CPU indices into a device tensor
        before = device.syncs
        assert int(on_device.sum()) == 3 and device.syncs == before + 1


def dropping(family, budget: float = 0.3):
    """A copy of the family's model selecting at the earliest tower layer it drops at (``drop_layer``)."""
    model, processor = copy.deepcopy(family[0]), copy.deepcopy(family[1])
    for layer in range(4):
        try:
            hired.apply(model, processor, budget=budget, drop_layer=layer)
            return model, processor
        except ValueError as error:
            if "not offered" in str(error):
                pytest.skip(f"no early drop here: {error}")
    raise AssertionError("no layer among the first four accepted drop_layer")


def test_the_early_drop_on_an_accelerator_matches_the_cpu(family, accelerator):
    model, processor = dropping(family)
    logits, kept = run(model, processor, None)
    device_logits, device_kept = run(model, processor, accelerator)
    assert device_kept == kept
    torch.testing.assert_close(device_logits, logits, rtol=1e-4, atol=1e-4)


def test_the_early_drop_reads_the_device_a_fixed_number_of_times_whatever_the_budget(family):
    syncs = []
    for budget in (0.1, 0.4):
        model, processor = dropping(family, budget)
        accelerator = Accelerator("simulated")
        run(model, processor, accelerator)
        syncs.append(accelerator.simulated.syncs)
    assert syncs[0] == syncs[1]


def test_the_early_drop_of_a_downsampled_onevision_mosaic_on_an_accelerator_matches_the_cpu(accelerator):
    # Its kept tokens interpolate patches of several tiles: the patches read are found through the stock packing.
    model, processor = TINY_MODELS["llava-onevision"](text_layers=3)
    hired.apply(model, processor, budget=0.3, drop_layer=0)
    image = Image.fromarray(np.random.RandomState(7).randint(0, 256, size=(960, 1280, 3), dtype=np.uint8))
    assert processor.hired_geometry((960, 1280)).downsampled is not None
    logits, kept = run(model, processor, None, images=[image])
    device_logits, device_kept = run(model, processor, accelerator, images=[image])
    assert device_kept == kept
    torch.testing.assert_close(device_logits, logits, rtol=1e-4, atol=1e-4)
