"""A simulated accelerator: every op's data stays on the CPU while the model's tensors report another device.

CI has no GPU, yet most users run hired on one, where a tensor made on the CPU and met by a tensor on the
GPU is an error. Inside :class:`SimulatedDevice`, tensors moved to its device (``accel:0``, torch's slot for an out-of-tree
accelerator) report that device; every op runs on the CPU copies and is checked first against the accelerator's rules:

- the tensors an op takes must share one device, except 0-dim CPU tensors (scalars), and except CPU indices
  into a device tensor (``x[cpu_index]``), which CUDA accepts;
- no float64 tensor on the device (Apple's MPS has no float64 kernels);
- every read of a device value by the host (``.item()``, ``int()``, ``bool()``, ``.cpu()``, ``nonzero``) is
  counted in :attr:`SimulatedDevice.syncs`: a GPU waits for its queue at each one.

Scaled dot-product attention is asked to take its math path, whose ops are the ones checked here; the CPU's
fused kernels have other names on an accelerator.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

aten = torch.ops.aten


DEVICE = "accel"


def _register_device() -> None:
    """Give torch an accelerator named :data:`DEVICE` with a no-op device guard, once per process.

    A CPU build has no CUDA device guard, so tensors reporting ``cuda`` cannot even be indexed; torch's
    out-of-tree device slot can be given a Python guard instead, and CUDA's device rules are applied here.
    """
    if torch._C._get_privateuse1_backend_name() != DEVICE:
        from torch.utils.backend_registration import _DummyBackendModule, _setup_privateuseone_for_python_backend

        class Backend(_DummyBackendModule):
            """What torch asks of a device module beyond the dummy's: the dtypes autocast may use there."""

            @staticmethod
            def get_amp_supported_dtype() -> list[torch.dtype]:
                return [torch.float16, torch.bfloat16]

        _setup_privateuseone_for_python_backend(rename=DEVICE, backend_module=Backend())
        # torch.tensor([...]) of device scalars reads them with the Python modes switched off: a kernel of the
        # device itself answers then.
        _KERNELS.impl("_local_scalar_dense", _read_scalar, "PrivateUse1")


_KERNELS = torch.library.Library("aten", "IMPL")


def _read_scalar(tensor):
    for mode in _ACTIVE:
        mode.syncs += 1
    return tensor.payload.item()


class DeviceMixError(RuntimeError):
    """An op met tensors that an accelerator would refuse together."""


_ACTIVE: list["SimulatedDevice"] = []


class OnDevice(torch.Tensor):
    """A CPU tensor (``payload``) that reports the simulated device."""

    payload: torch.Tensor

    @staticmethod
    def __new__(cls, payload: torch.Tensor, device: torch.device):
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls, payload.shape, strides=payload.stride(), storage_offset=payload.storage_offset(),
            dtype=payload.dtype, layout=payload.layout, device=device, requires_grad=payload.requires_grad,
        )
        wrapper.payload = payload
        return wrapper

    def __repr__(self) -> str:  # the default repr would read the data through ops
        return f"OnDevice({self.payload!r}, device={self.device})"

    def tolist(self):  # torch has no dispatch for tolist on a subclass; on a GPU it is a read by the host
        for mode in _ACTIVE:
            mode.syncs += 1
        return self.payload.tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} ran on a simulated-device tensor outside SimulatedDevice")


# Ops whose index tensors may stay on the CPU while the indexed tensor is on the device.
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
# Ops that read device values on the host.
_SYNCS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.is_nonzero.default}


class SimulatedDevice(TorchDispatchMode):
    """Run a block as if the model lived on ``device``: see the module docstring.

    Use :meth:`move` to put a model (its parameters and buffers) or a tensor on the device.
    """

    def __init__(self, device: str = f"{DEVICE}:0", float64: bool = False) -> None:
        super().__init__()
        _register_device()
        self.device = torch.device(device)
        self.float64 = float64
        self.syncs = 0

    def __enter__(self):
        # torch.tensor(data, device=...) is built on the CPU and then moved, a move this mode sees.
        self._lift_cpu_only = torch._C._only_lift_cpu_tensors()
        torch._C._set_only_lift_cpu_tensors(True)
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        torch._C._set_only_lift_cpu_tensors(self._lift_cpu_only)
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    # ---- moving things on and off the device
    def wrap(self, tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, OnDevice):
            return tensor
        self._check_dtype(tensor.dtype, "moving a tensor to the device")
        return OnDevice(tensor, self.device)

    def move(self, model: torch.nn.Module) -> torch.nn.Module:
        """Put every parameter and buffer of ``model`` on the simulated device, in place."""
        for module in model.modules():
            for name, parameter in list(module._parameters.items()):
                if parameter is not None:
                    module._parameters[name] = torch.nn.Parameter(self.wrap(parameter.detach()), requires_grad=False)
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[name] = self.wrap(buffer)
        return model

    def _check_dtype(self, dtype: torch.dtype, what: str) -> None:
        if dtype == torch.float64 and not self.float64:
            raise DeviceMixError(f"{what} made a float64 tensor on {self.device}, which has no float64 kernels")

    # ---- the rules
    def _on_device(self, value: Any) -> bool:
        return isinstance(value, OnDevice)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._fused_sdp_choice.default:
            return 0  # SDPBackend.MATH: the composite path, made of ops checked here
        if func in _SYNCS and any(self._on_device(t) for t in tree_flatten((args, kwargs))[0]):
            self.syncs += 1
        if func is aten._to_copy.default:
            return self._to_copy(args[0], kwargs)
        if func in (aten.copy_.default,):  # copies across devices are allowed
            destination, source = args[0], args[1]
            payload = destination.payload if self._on_device(destination) else destination
            payload.copy_(source.payload if self._on_device(source) else source)
            return destination
        self._check_devices(func, args, kwargs)
        device_kwarg = kwargs.get("device")
        to_device = device_kwarg is not None and torch.device(device_kwarg).type == self.device.type
        if to_device:
            kwargs = {**kwargs, "device": torch.device("cpu")}
        plain_args, plain_kwargs = tree_map(self._unwrap, (args, kwargs))
        result = func(*plain_args, **plain_kwargs)
        wrap = to_device or any(self._on_device(t) for t in tree_flatten((args, kwargs))[0])
        if func is aten._local_scalar_dense.default or not wrap:
            return result
        if func._schema.is_mutable and self._on_device(args[0]) and result is plain_args[0]:
            return args[0]  # an in-place op changed the payload; the caller keeps its tensor
        return tree_map(lambda t: self._rewrap(t, func), result)

    def _rewrap(self, value, func):
        if not isinstance(value, torch.Tensor):
            return value
        self._check_dtype(value.dtype, str(func))
        return OnDevice(value, self.device)

    @staticmethod
    def _unwrap(value):
        return value.payload if isinstance(value, OnDevice) else value

    def _to_copy(self, tensor: torch.Tensor, kwargs: dict) -> torch.Tensor:
        target = kwargs.get("device")
        target_type = None if target is None else torch.device(target).type
        on_device = self._on_device(tensor)
        payload = tensor.payload if on_device else tensor
        copied = aten._to_copy.default(payload, **{**kwargs, "device": torch.device("cpu")})
        if target_type == self.device.type or (target is None and on_device):
            self._check_dtype(copied.dtype, "a copy")
            return OnDevice(copied, self.device)
        if on_device:
            self.syncs += 1  # device -> host
        return copied

    def _check_devices(self, func, args, kwargs) -> None:
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if not any(self._on_device(t) for t in tensors):
            return
        if func in _INDEXING:
            indexed = [args[0], *([args[2]] if func is not aten.index.Tensor and len(args) > 2 else [])]
            tensors = [t for t in indexed if isinstance(t, torch.Tensor)]
        host = [t for t in tensors if not self._on_device(t) and t.dim() > 0]
        if host:
            shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in host)
            raise DeviceMixError(
                f"{func} met tensors on {self.device} and on cpu ({shapes}): an accelerator refuses this mix"
            )
