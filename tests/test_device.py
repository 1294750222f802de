"""hired on an accelerator, checked without one: every family x every method through a whole patched forward.

The model runs under :class:`simulated_device.SimulatedDevice`, where its tensors report another device and
every op is checked against an accelerator's rules (no CPU tensor meets a device tensor, no float64 on the
device); the data stays on the CPU, so the logits and kept tokens must equal the CPU run's.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from simulated_device import DeviceMixError, SimulatedDevice

import hired
from hired.testing import TINY_MODELS

IMAGE = Image.fromarray(np.random.RandomState(5).randint(0, 256, size=(500, 800, 3), dtype=np.uint8))
METHODS = hired.available_methods()


@pytest.fixture(scope="module", params=sorted(TINY_MODELS))
def family(request):
    model, processor = TINY_MODELS[request.param](text_layers=3)  # FastV prunes after layer 2
    return model.eval(), processor


def settings(method: str, budget: float) -> dict:
    return {"method": method} if hired.get_method(method).stage == "none" else {"method": method, "budget": budget}


def run(model, processor, device: SimulatedDevice | None):
    """Logits and the kept indices of one prompt, on the CPU or on the simulated device."""
    inputs = processor(images=[IMAGE], text=[f"USER: {processor.image_token} hi ASSISTANT:"], return_tensors="pt")
    if device is None:
        with torch.no_grad():
            logits = model(**inputs).logits
    else:
        with device, torch.no_grad():
            device.move(model)
            logits = model(**{key: value.to(model.device) for key, value in inputs.items()}).logits.cpu()
    return logits, [[k.tolist() for k in record.kept] for record in hired.selections(model)]


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
def test_a_patched_forward_on_an_accelerator_matches_the_cpu(family, method):
    model, processor = patched(family, method)
    logits, kept = run(model, processor, None)
    device_logits, device_kept = run(model, processor, SimulatedDevice())
    assert device_kept == kept
    torch.testing.assert_close(device_logits, logits, rtol=1e-4, atol=1e-4)


def test_divprune_reads_the_device_a_fixed_number_of_times_whatever_the_budget(family):
    """A host read per kept token stalls a GPU once per token: DivPrune's picks stay on the device."""
    syncs = []
    for budget in (0.1, 0.4):
        model, processor = patched(family, "divprune", budget)
        device = SimulatedDevice()
        run(model, processor, device)
        syncs.append(device.syncs)
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
