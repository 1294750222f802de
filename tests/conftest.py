import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The lmms-eval plugin's tests need lmms-eval itself, which only the venv of `make test-lmms` has.
collect_ignore_glob = []
if importlib.util.find_spec("lmms_eval") is None:
    collect_ignore_glob.append("engines/lmms/*")
# The vLLM plugin's tests need vLLM, which only the venv of `make test-vllm` has.
if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob.append("engines/vllm/*")

import pytest
import torch
from sample_inputs import noise_image

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def make_image():
    return noise_image
