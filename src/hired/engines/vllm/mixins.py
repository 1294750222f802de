"""The classes mixed into vLLM's processing info, processor and model of every family the plugin serves.

Each served family's vLLM classes live in its folder (``hired/families/<family>/vllm.py``), each one of
vLLM's classes with one of these mixed in; vLLM imports them when it loads such a model.

The processor side gives every image its token count before the model runs: the engine's
configuration, or the request's own budget, applied to the image's geometry. The count travels
with the image as one more field (``settings.KEPT_FIELD``), so requests with different budgets
share a batch. The model side (:class:`HiredEncoderModel`) diverts the images that carry a count
from vLLM's image path; for the LLaVA families (:class:`HiredVisionModel`) it reads the queries and
keys of two layers of vLLM's own CLIP or SigLIP tower (its fused ``qkv_proj``, gathered across
tensor-parallel ranks, which hold a share of the heads each) into a :class:`hired.signals.TowerRun`
per image, and hands the runs to the selection path transformers runs too
(:func:`hired.selecting.select_images`, with the family adapter's packing): the registered method
chooses, vLLM's projector projects, and each image leaves a :class:`hired.SelectionRecord` in
``hired_selections``. The native-resolution families' model is in :mod:`hired.engines.vllm.native`.
An image that keeps every token is encoded exactly as stock vLLM encodes it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
from typing import Any, Callable, ClassVar, Iterable, Mapping

import torch
from vllm.distributed import tensor_model_parallel_all_gather
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import PromptReplacement

from ... import FamilyAdapter, HiredConfig
from ...selecting import EarlyDrop, all_fed_whole, choose_images, name_drop_layer, runs_per_image, select_images
from ...signals import TowerRun, resume_layers, run_from_attention, split_fused
from ...state import SelectionRecord
from . import internals
from .internals import Internal
from .settings import (
    KEPT_FIELD,
    ProcessorKeys,
    TowerPlan,
    UnservableConfig,
    check_request_keys,
    engine_config,
    field_count,
    kept_field,
    kept_tokens,
    processor_keys,
    request_config,
    split_request_kwargs,
    tower_plan,
)

# What the plugin's overrides and calls are for, as an IncompatibleVllm error names it.
COUNTING = "giving each image its kept count"
ENCODING = "encoding the kept tokens"
# Records (hired.SelectionRecord) of the last images encoded, per worker, for inspection (LLM.apply_model) and tests.
SELECTIONS_KEPT = 256


class HiredProcessingInfo:
    """Mixed into vLLM's processing info: the engine's configuration, validated when the engine starts."""

    family: ClassVar[FamilyAdapter]
    vllm_internals: ClassVar[tuple[Internal, ...]]
    # (configuration, hf_config) -> what the model reads from its tower; raises ValueError where it cannot.
    tower_plan: ClassVar[Callable[[HiredConfig, Any], TowerPlan]] = staticmethod(tower_plan)

    @staticmethod
    def internals_of(info: type) -> tuple[Internal, ...]:
        """What this mixin overrides or calls on ``info``, the vLLM processing info class under it."""
        return (Internal.of(info, "get_hf_config", "reading the model's 'hired' entry"),
                Internal.of(info, "get_hf_processor", "checking request keys", ("kwargs",)))

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        hf_config = self.get_hf_config()
        self.hired_refusal: str | None = None  # why this model cannot prune, when it has no configuration
        try:
            self.hired_config = engine_config(hf_config)
        except ValueError as error:
            raise UnservableConfig(str(error)) from None
        try:
            self.tower_plan(self.hired_config or HiredConfig(), hf_config)
            self.check_engine()
        except ValueError as error:
            if self.hired_config is not None:
                raise UnservableConfig(str(error)) from None
            self.hired_refusal = str(error)

    def check_engine(self) -> None:
        """Refuse engine settings under which this family cannot prune (none by default).

        Raises:
            ValueError: why not, and what to change.
        """

    def get_hf_processor(self, **kwargs: object):
        _, rest = split_request_kwargs(kwargs)
        return super().get_hf_processor(**rest)

    @functools.cached_property
    def hired_processor_keys(self) -> ProcessorKeys:
        """The keys the model's Hugging Face processor declares (read once, from the engine's processor)."""
        return processor_keys(self.get_hf_processor())

    def hired_config_for(self, request: Mapping[str, Any]) -> HiredConfig | None:
        """The configuration of a request whose hired keys are ``request``."""
        config = request_config(self.hired_config, request)
        if config is not None and self.hired_refusal is not None:
            raise ValueError(f"mm_processor_kwargs {dict(request)}: {self.hired_refusal}")
        return config


class HiredMultiModalProcessor:
    """Mixed into vLLM's multimodal processor: each request's keys checked, each image's kept count, as a field
    and as its placeholders."""

    # guard.GUARD_MARK: checks its requests itself, so the guard leaves it alone.
    hired_guard: ClassVar[bool] = True
    vllm_internals: ClassVar[tuple[Internal, ...]]

    @staticmethod
    def internals_of(processor: type) -> tuple[Internal, ...]:
        """What this mixin overrides or calls on ``processor``, the vLLM multimodal processor class under it,
        and on the classes it builds the kept count's field and placeholders with."""
        return (
            Internal.of(processor, "_call_hf_processor", COUNTING, ("hf_data", "hf_kwargs")),
            Internal.of(processor, "_get_mm_fields_config", COUNTING, ("hf_inputs", "hf_processor_mm_kwargs")),
            Internal.of(processor, "_get_prompt_updates", COUNTING,
                        ("mm_items", "hf_processor_mm_kwargs", "out_mm_kwargs")),
            Internal.of(PromptReplacement, "replacement", COUNTING),
            Internal.of(MultiModalFieldConfig, "batched", "carrying each image's kept count",
                        ("modality", "keep_on_cpu")),
        )

    def apply(self, inputs, *args, **kwargs):
        # Every request passes here, also when its images' processing comes from vLLM's cache.
        check_request_keys(inputs.hf_processor_mm_kwargs, self.info.hired_processor_keys)
        return super().apply(inputs, *args, **kwargs)

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]):
        request, rest = split_request_kwargs(hf_kwargs)
        return self.hired_count(super()._call_hf_processor(hf_data, rest), request)

    def hired_count(self, outputs, request: Mapping[str, Any]):
        """The Hugging Face processor's ``outputs`` with each image's kept count (:data:`KEPT_FIELD`) under the
        request's hired keys ``request``."""
        if "pixel_values" in outputs:
            config = self.info.hired_config_for(request)
            outputs[KEPT_FIELD] = torch.tensor([kept_field(kept_tokens(config, geometry))
                                                for geometry in self.hired_geometries(outputs)])
        return outputs

    def hired_geometries(self, outputs: Mapping[str, Any]) -> list:
        """Each image's geometry, from the Hugging Face processor's ``outputs`` (LLaVA: its ``image_sizes``)."""
        family, hf_config = self.info.family, self.info.get_hf_config()
        sizes = outputs.get("image_sizes")
        sizes = [None] * len(outputs["pixel_values"]) if sizes is None else [tuple(map(int, s)) for s in sizes]
        return [family.geometry(hf_config, size) for size in sizes]

    def hired_image_token(self) -> int:
        """The id of the image placeholder token."""
        return self.info.get_hf_config().image_token_index

    def hired_replacement(self, count: int) -> Any:
        """The placeholders of an image that keeps ``count`` tokens, as a prompt replacement (by default ``count``
        image tokens, all of them embedded)."""
        return [self.hired_image_token()] * count

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[KEPT_FIELD] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        items = out_mm_kwargs.get("image", [])

        def kept(index: int) -> int | None:
            element = items[index].get(KEPT_FIELD) if index < len(items) and items[index] is not None else None
            return field_count(None if element is None else int(element.data))

        return [PromptReplacement(modality=update.modality, target=update.target,
                                  replacement=_kept_replacement(update.replacement, kept, self.hired_replacement))
                if update.modality == "image" else update for update in updates]


def _kept_replacement(stock: Callable[[int], Any], kept: Callable[[int], int | None],
                      placeholders: Callable[[int], Any]) -> Callable[[int], Any]:
    def replacement(index: int):
        count = kept(index)
        return stock(index) if count is None else placeholders(count)

    return replacement


class HiredEncoderModel:
    """Mixed into the vLLM model of every served family: the engine's plan, and images with a kept count diverted
    from vLLM's image path to :meth:`_hired_encode` (each family's kind of tower implements it)."""

    hired_family: ClassVar[FamilyAdapter]
    vllm_internals: ClassVar[tuple[Internal, ...]]
    # (configuration, hf_config) -> what the model reads from its tower; raises ValueError where it cannot.
    tower_plan: ClassVar[Callable[[HiredConfig, Any], TowerPlan]] = staticmethod(tower_plan)

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        hf_config = vllm_config.model_config.hf_config
        config = engine_config(hf_config)
        self.hired_config = config or HiredConfig()  # a request's budget on an engine without one runs HiRED
        self.hired_refusal: str | None = None  # why this engine cannot prune, when it has no configuration
        try:
            self.check_model(vllm_config)
            self.hired_plan: TowerPlan | None = self.tower_plan(self.hired_config, hf_config)
        except ValueError as error:
            if config is not None:
                raise UnservableConfig(str(error)) from None
            self.hired_plan = None
            self.hired_refusal = str(error)  # the processor checks what it can see; these settings it cannot
        self.hired_selections: collections.deque[SelectionRecord] = collections.deque(maxlen=SELECTIONS_KEPT)
        self.hired_counts: list[int | None] | None = None  # the kept counts of the images being encoded

    def check_model(self, vllm_config) -> None:
        """Refuse engine settings under which this model cannot prune (none by default).

        Raises:
            ValueError: why not, and what to change.
        """

    def embed_multimodal(self, **kwargs: object):
        kept = kwargs.pop(KEPT_FIELD, None)
        self.hired_counts = None if kept is None else [field_count(int(value)) for value in kept]
        try:
            return super().embed_multimodal(**kwargs)
        finally:
            self.hired_counts = None

    def _hired_divert(self, image_input) -> tuple[torch.Tensor, ...] | None:
        """The embeddings of the images of ``image_input`` when some carry a kept count; ``None`` when vLLM's own
        image path serves them (stock: pixels fed whole, embeddings, videos). A family calls it first in the
        vLLM method that encodes images."""
        counts = self.hired_counts
        if image_input["type"] != "pixel_values" or not counts or all_fed_whole(counts):
            return None
        if self.hired_plan is None:
            raise RuntimeError(f"a request asked for a budget, but this engine cannot prune: {self.hired_refusal}")
        return tuple(self._hired_encode(image_input, counts))

    def _hired_encode(self, image_input, counts: list[int | None]) -> list[torch.Tensor]:
        """Each image's LLM embeddings: its kept tokens, or every token where its count is ``None``."""
        raise NotImplementedError


class HiredVisionModel(HiredEncoderModel):
    """Mixed into the vLLM model of a LLaVA family (a CLIP or SigLIP tower over tiles): images with a kept count are
    encoded through the method."""

    @staticmethod
    def internals_of(model: type, image_inputs: type, image_fields: tuple[str, ...]) -> tuple[Internal, ...]:
        """What this mixin overrides or calls on ``model``, the vLLM model class under it, reads of its
        ``image_inputs`` (the fields ``image_fields``), and uses of vLLM's tensor parallelism."""
        return (
            Internal.of(model, "__init__", ENCODING, ("vllm_config", "prefix")),
            Internal.of(model, "embed_multimodal", ENCODING),
            Internal.of(model, "_process_image_input", ENCODING, ("image_input",)),
            Internal.of(model, "_image_pixels_to_features", ENCODING, ("vision_tower", "pixel_values")),
            Internal.of(model, "load_weights", "loading checkpoints saved by transformers 5", ("weights",)),
            *(Internal.of(image_inputs, field, ENCODING) for field in image_fields),
            Internal("vllm.distributed", "tensor_model_parallel_all_gather", "gathering the heads of tensor-parallel "
                     "ranks", ("input_", "dim")),
            Internal("vllm.multimodal:MULTIMODAL_REGISTRY", "register_processor", "binding the plugin's processors",
                     ("processor", "info", "dummy_inputs")),
        )

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        internals.check_tower(self, internals.TOWER)

    def _process_image_input(self, image_input):
        diverted = self._hired_divert(image_input)
        return super()._process_image_input(image_input) if diverted is None else diverted

    def _hired_encode(self, image_input, counts: list[int | None]) -> list[torch.Tensor]:
        family, config = self.hired_family, self.hired_config
        tiles, sizes = self._hired_tiles(image_input)
        geometries = [family.geometry(self.config, size) for size in sizes]
        pixels = torch.cat([tiles[: geometry.num_partitions] for tiles, geometry in zip(tiles, geometries)])
        candidate_tokens = functools.partial(family.candidate_tokens, self)
        drop = None
        if self.hired_plan.drop is None:
            with self._hired_capture() as captured:
                features = self._image_pixels_to_features(self.vision_tower, pixels)
            runs = runs_per_image(self._hired_run(features, captured), geometries)
        else:
            drop = EarlyDrop(self.hired_plan.drop, functools.partial(
                choose_images, geometries=geometries, image_sizes=sizes, counts=counts, config=config,
                candidate_tokens=candidate_tokens))
            runs = self._hired_dropped_runs(pixels, geometries, drop)
        selected = select_images(runs, geometries, sizes, counts, config,
                                 pack_stock=self._hired_pack_stock,
                                 project=None if family.selects_projected else self.multi_modal_projector,
                                 candidate_tokens=candidate_tokens, drop=drop)
        if config.drop_layer is not None:
            name_drop_layer(selected.records, self.hired_plan.feature if drop is None else drop.layer)
        self.hired_selections.extend(selected.records)
        return selected.features

    def _hired_dropped_runs(self, pixels: torch.Tensor, geometries: list, drop: EarlyDrop) -> list[TowerRun]:
        """Each image's run with the early drop: the tower up to ``drop.layer``, the method's choice there, then the
        later layers over the kept patches only (those :meth:`FamilyAdapter.kept_patches` names) and vLLM's post-norm
        where the built tower has one, as transformers runs it (:meth:`FamilyAdapter.tower_runs`)."""
        plan, vision = self.hired_plan, self.vision_tower.vision_model
        layers = self._hired_layers()
        captured_hidden: list[torch.Tensor] = []
        handle = layers[drop.layer].register_forward_hook(
            lambda module, inputs, output: captured_hidden.append(output[0] if isinstance(output, tuple) else output))
        full = vision.encoder.layers
        vision.encoder.layers = full[: drop.layer + 1]  # vLLM's tower call, stopped at the drop layer
        try:
            with self._hired_capture() as captured:
                self._image_pixels_to_features(self.vision_tower, pixels)
        finally:
            vision.encoder.layers = full
            handle.remove()
        hidden = captured_hidden[0]
        run = self._hired_run(hidden[:, plan.skip:], captured)
        drop.choices = drop.choose(runs_per_image(run, geometries))
        keep = self.hired_family.kept_patches(self, hidden.shape[1] - plan.skip, geometries, drop.choices)
        features = resume_layers(layers[drop.layer + 1: plan.feature + 1], hidden, keep, has_cls=bool(plan.skip))
        if vision.post_layernorm is not None:
            features = vision.post_layernorm(features)
        return runs_per_image(dataclasses.replace(run, features=features, hidden=features), geometries)

    def _hired_tiles(self, image_input) -> tuple[list[torch.Tensor], list]:
        """Each image's tiles (padding tiles included) and its ``(height, width)``, ``None`` where vLLM has none."""
        raise NotImplementedError

    def _hired_pack_stock(self, run: TowerRun, geometry, size) -> torch.Tensor:
        """An image that keeps every token, as stock vLLM feeds it (by default as the family's adapter packs it)."""
        return self.hired_family.pack_stock(self, run, geometry, size)

    def _hired_layers(self):
        return self.vision_tower.vision_model.encoder.layers

    @contextlib.contextmanager
    def _hired_capture(self):
        """Keep the fused q/k/v projections of the two layers the method reads, during one tower call."""
        captured: dict[str, torch.Tensor] = {}
        layers = self._hired_layers()
        handles = []
        for name, index in (("distribution", self.hired_plan.distribution), ("selection", self.hired_plan.selection)):
            def keep(module, inputs, output, name=name):
                captured[name] = output[0] if isinstance(output, tuple) else output

            handles.append(layers[index].self_attn.qkv_proj.register_forward_hook(keep))
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    def _hired_run(self, features: torch.Tensor, captured: dict[str, torch.Tensor]) -> TowerRun:
        """The tower run of one call: its patch features, and the scores and keys of the captured layers."""
        attention = self._hired_layers()[0].self_attn
        heads, plan = attention.num_heads, self.hired_plan
        layers = {}
        for name in ("distribution", "selection"):
            query, key = split_fused(captured[name])
            if attention.num_heads_per_partition != heads:  # this rank holds a share of the heads
                query = tensor_model_parallel_all_gather(query.contiguous(), dim=-1)
                key = tensor_model_parallel_all_gather(key.contiguous(), dim=-1)
            layers[name] = query, key
        # vLLM's tower call returns the feature layer's patch tokens alone (a CLIP tower's 'default' strategy
        # drops CLS), while the captured queries and keys still hold its CLS token first.
        return run_from_attention(features, features, layers["distribution"], layers["selection"], score=plan.score,
                                  num_heads=heads, aggregation=plan.aggregation, skip=plan.skip)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # transformers 5 saves a CLIP or SigLIP tower without its `vision_model.` level; vLLM's modules keep it.
        return super().load_weights((_tower_weight_name(name), value) for name, value in weights)


def _tower_weight_name(name: str) -> str:
    for prefix in ("model.vision_tower.", "vision_tower."):
        if name.startswith(prefix) and not name.startswith(prefix + "vision_model."):
            return prefix + "vision_model." + name[len(prefix):]
    return name
