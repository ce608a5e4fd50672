"""FP8 training through torchao's float8 Linear: real kernels on FP8 GPUs, float32 emulation elsewhere."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Generator, Iterator, Sequence
from contextlib import AbstractContextManager
from types import ModuleType
from typing import Any

import torch
from lightning.fabric.plugins.precision.utils import _convert_fp_tensor, _DtypeContextManager
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lp_lightning.precision.fastpath import transformer_fastpath_off
from lp_lightning.quant.swap import matches

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_NAMES = {v: k for k, v in COMPUTE_DTYPES.items()}
LIGHTNING_STRINGS = {torch.bfloat16: "bf16-true", torch.float32: "32-true"}
DEFAULT_SKIP = ("classifier",)
FP8_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) are the first GPUs with FP8 tensor cores
_said: set[str] = set()


class _TorchaoNoise(logging.Filter):
    """Drops the import-time messages torchao causes on machines without its CUDA-only extensions."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if record.name == "torchao":  # "Failed to load .../torchao/_C_mxfp8...so: Could not load this library"
            return not (msg.startswith("Failed to load") and "torchao/_C" in record.getMessage())
        if record.name == "torchao.kernel.intmm":  # triton is a GPU compiler; shown under Hydra's logging
            return not msg.startswith("Warning: Detected no triton")
        if record.name == "torch.utils._pytree":  # torchao registers its Enums as pytree constants
            args = record.args if isinstance(record.args, tuple) else ()
            owner = getattr(args[0], "__module__", "") if args else ""
            return not ("is an Enum subclass" in msg and str(owner).startswith("torchao"))
        return True


@contextlib.contextmanager
def _quiet_torchao_import() -> Iterator[None]:
    """Filter only torchao's known extension-library noise; the extensions are CUDA-only, so without
    CUDA their failure to load is expected and harmless. On a CUDA machine nothing is filtered."""
    if torch.cuda.is_available():
        yield
        return
    noise = _TorchaoNoise()
    loggers = [logging.getLogger(name) for name in ("torchao", "torchao.kernel.intmm", "torch.utils._pytree")]
    for log in loggers:
        log.addFilter(noise)
    try:
        yield
    finally:
        for log in loggers:
            log.removeFilter(noise)


def import_torchao_float8() -> ModuleType:
    """``torchao.float8``, imported quietly; a clear error names the package when torchao is missing."""
    try:
        with _quiet_torchao_import():
            import torchao.float8 as float8
    except ImportError as exc:
        raise ImportError(
            "Float8Precision needs the 'torchao' package (FP8 training kernels and emulation): "
            f"install it with `pip install torchao` ({exc})"
        ) from exc
    return float8


def fp8_hardware_missing() -> str | None:
    """Why real FP8 matmuls cannot run here (``None`` when a CUDA GPU with capability >= 8.9 is present)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    capability = torch.cuda.get_device_capability()
    if capability < FP8_CAPABILITY:
        return (f"the GPU {torch.cuda.get_device_name()!r} has CUDA capability {capability[0]}.{capability[1]}, "
                f"FP8 matmuls need {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} or newer (Ada, Hopper, Blackwell)")
    return None


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        rank_zero_info(message)


class Float8Precision(Precision):
    """FP8 training of ``nn.Linear`` layers via ``torchao.float8`` (E4M3 forward, E5M2 or E4M3 gradients).

    Args:
        recipe: torchao scaling recipe: ``"tensorwise"``, ``"rowwise"`` or ``"rowwise_with_gw_hp"``.
        emulate: ``None`` uses real FP8 kernels on a GPU with CUDA capability >= 8.9, else emulates them
            (FP8 rounding, matmul in float32); ``True`` always emulates; ``False`` requires the hardware.
        skip: fully-qualified names (or trailing parts of them) of Linear layers kept in high precision;
            by default the ``classifier`` head.
        compute_dtype: dtype of the weights and of every op outside the FP8 matmuls: ``"bfloat16"``,
            ``"float32"`` or ``"auto"``: bfloat16 with real FP8 kernels, float32 when emulating (the
            emulated FP8 matmul runs in float32 anyway, and CPUs without native bf16 matmul run the
            remaining ops several times slower in bfloat16; see docs/fp8.md).

    Linear layers whose in/out features are not multiples of 16 (what FP8 kernels need) stay in
    ``compute_dtype``; the converted names are in ``converted_layers``. Checkpoints hold ordinary weights.
    """

    precision: str = "bf16-true"

    def __init__(self, recipe: str = "tensorwise", emulate: bool | None = None,
                 skip: Sequence[str] | None = None, compute_dtype: str = "auto") -> None:
        if recipe not in RECIPES:
            raise ValueError(f"Float8Precision(recipe={recipe!r}) is unknown; allowed: {list(RECIPES)}")
        if emulate is not None and not isinstance(emulate, bool):
            raise ValueError(f"Float8Precision(emulate={emulate!r}) must be True, False or None (auto)")
        if compute_dtype not in (*COMPUTE_DTYPES, "auto"):
            raise ValueError(f"Float8Precision(compute_dtype={compute_dtype!r}) is unknown; "
                             f"allowed: {[*COMPUTE_DTYPES, 'auto']}")
        if isinstance(skip, str) or (skip is not None and not all(isinstance(s, str) for s in skip)):
            raise ValueError(f"Float8Precision(skip={skip!r}) must be a list of module names, e.g. ['classifier']")
        import_torchao_float8()
        missing = fp8_hardware_missing()
        if emulate is False and missing:
            raise RuntimeError(f"Float8Precision(emulate=False) needs real FP8 matmuls, but {missing}. "
                               "Use emulate=True (or emulate=None) to emulate FP8 numerics on this machine.")
        if emulate is None:
            emulate = missing is not None
            _say_once(f"Float8Precision: {missing}; emulating FP8 (FP8 rounding, matmuls in float32)" if emulate
                      else "Float8Precision: using real FP8 kernels (torch._scaled_mm)")
        self.recipe = recipe
        self.emulate: bool = emulate
        self.skip: list[str] = list(DEFAULT_SKIP if skip is None else skip)
        if compute_dtype == "auto":
            compute_dtype = "float32" if emulate else "bfloat16"
        self.compute_dtype: torch.dtype = COMPUTE_DTYPES[compute_dtype]
        self.precision = LIGHTNING_STRINGS[self.compute_dtype]
        self.converted_layers: list[str] = []
        self.skipped_layers: dict[str, str] = {}

    @property
    def num_converted(self) -> int:
        """How many nn.Linear layers run their matmuls in FP8."""
        return len(self.converted_layers)

    def float8_config(self) -> Any:
        """The ``torchao.float8.Float8LinearConfig`` of this recipe, with this plugin's ``emulate``.

        Real kernels pad the matmuls' inner dimension to a multiple of 16 with zeros (``torch._scaled_mm``
        needs it; the weight-gradient matmul's inner dimension is the batch, e.g. the last 41 rows of an epoch).
        """
        config = import_torchao_float8().Float8LinearConfig.from_recipe_name(self.recipe)
        return dataclasses.replace(config, emulate=self.emulate, pad_inner_dim=not self.emulate)

    def _plan(self, module: nn.Module) -> tuple[list[str], dict[str, str]]:
        """Names of the Linear layers to convert, and the others with the reason they stay."""
        convert: list[str] = []
        skipped: dict[str, str] = {}
        attention = {fqn for fqn, child in module.named_modules() if isinstance(child, nn.MultiheadAttention)}
        for fqn, child in module.named_modules():
            if not isinstance(child, nn.Linear):
                continue
            if matches(fqn, self.skip):
                skipped[fqn] = "skip"
            elif fqn.rpartition(".")[0] in attention:
                skipped[fqn] = "inside nn.MultiheadAttention, which reads its weight without calling it"
            elif child.in_features % 16 or child.out_features % 16:
                skipped[fqn] = f"shape {child.in_features}->{child.out_features} not divisible by 16"
            else:
                convert.append(fqn)
        return convert, skipped

    def convert_module(self, module: nn.Module) -> nn.Module:
        convert, skipped = self._plan(module)
        unmatched = [e for e in self.skip if e not in DEFAULT_SKIP
                     and not any(matches(fqn, [e]) for fqn, _ in module.named_modules())]
        if unmatched:
            rank_zero_warn(f"Float8Precision(skip=...): {unmatched} match no module of {type(module).__name__}")
        if not convert:
            raise ValueError(
                f"Float8Precision found no nn.Linear layer to train in FP8 in {type(module).__name__}, so FP8 "
                f"would change nothing (Linear layers: {skipped or 'none'}); torchao converts only nn.Linear "
                "with in/out features divisible by 16. Use another precision or adjust skip=[...].")
        odd = {k: v for k, v in skipped.items() if v != "skip"}
        if odd:
            rank_zero_warn(f"Float8Precision keeps {len(odd)} Linear layer(s) in {DTYPE_NAMES[self.compute_dtype]} "
                           f"because FP8 kernels need in/out features divisible by 16: {odd}")
        from torchao.float8.float8_linear import Float8Linear

        config = self.float8_config()
        for fqn, child in module.named_modules():
            if isinstance(child, Float8Linear) and child.config != config:
                differ = [f.name for f in dataclasses.fields(config)
                          if getattr(config, f.name) != getattr(child.config, f.name)]
                raise ValueError(f"layer {fqn!r} is already an FP8 Linear whose config differs in {differ} from "
                                 f"this Float8Precision(recipe={self.recipe!r}, emulate={self.emulate!r}); "
                                 "convert a plain copy of the model (Float8Precision.reference_module)")
        wanted = set(convert)  # a second fit/test on the same Trainer finds the layers already converted
        module = import_torchao_float8().convert_to_float8_training(
            module, config=config,
            module_filter_fn=lambda m, fqn: fqn in wanted and not isinstance(m, Float8Linear))
        self.converted_layers, self.skipped_layers = convert, skipped
        mode = "emulated" if self.emulate else "real FP8 kernels"
        rank_zero_info(f"Float8Precision: {len(convert)} Linear layer(s) converted to FP8 ({self.recipe}, {mode}); "
                       f"{len(skipped)} kept in {DTYPE_NAMES[self.compute_dtype]}")
        return module.to(dtype=self.compute_dtype)

    def connect(self, model: nn.Module, optimizers: list[Any], lr_schedulers: list[Any]) -> Any:
        """After the model reached its device: real FP8 kernels need it on a CUDA device."""
        if not self.emulate:
            devices = {p.device.type for p in model.parameters()}
            if devices != {"cuda"}:
                raise RuntimeError(f"Float8Precision(emulate=False) runs real FP8 kernels, which need the model "
                                   f"on a CUDA device, found {sorted(devices)}: use Trainer(accelerator='gpu') "
                                   "or Float8Precision(emulate=True)")
        return super().connect(model, optimizers, lr_schedulers)

    def reference_module(self, module: nn.Module, dtype: torch.dtype) -> nn.Module:
        """A new plain copy of ``module`` in ``dtype``: every FP8 Linear becomes an ``nn.Linear`` again."""
        from torchao.float8.float8_linear import Float8Linear
        plain = copy.deepcopy(module)
        for fqn, child in list(plain.named_modules()):
            if not isinstance(child, Float8Linear):
                continue
            linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                               device=child.weight.device, dtype=child.weight.dtype)
            linear.load_state_dict(child.state_dict())
            linear.train(child.training)
            if fqn:
                plain.set_submodule(fqn, linear)
            else:
                plain = linear
        return plain.to(dtype)

    def tensor_init_context(self) -> AbstractContextManager:
        return _DtypeContextManager(self.compute_dtype)

    def module_init_context(self) -> AbstractContextManager:
        return self.tensor_init_context()

    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        """Default dtype ``compute_dtype`` for tensors created in the step; restored even if it raises.

        torchao's rowwise (axiswise) FP8 tensors cannot be reshaped under ``torch.inference_mode`` (which
        Lightning uses for validation), so for those recipes the step runs under ``no_grad`` instead. torch's
        fused Transformer fast path is off during the step (it would bypass the FP8 layers in eval steps).
        """
        with contextlib.ExitStack() as stack:
            stack.enter_context(_DtypeContextManager(self.compute_dtype))
            stack.enter_context(transformer_fastpath_off())  # else eval steps bypass the FP8 layers
            if self.recipe != "tensorwise" and torch.is_inference_mode_enabled():
                stack.enter_context(torch.inference_mode(False))
                stack.enter_context(torch.no_grad())
            yield

    def convert_input(self, data: Any) -> Any:
        return apply_to_collection(data, function=_convert_fp_tensor, dtype=Tensor, dst_type=self.compute_dtype)

    def convert_output(self, data: Any) -> Any:
        return apply_to_collection(data, function=_convert_fp_tensor, dtype=Tensor,
                                   dst_type=torch.get_default_dtype())

    def state_dict(self) -> dict[str, Any]:
        """Plain config of the run (torchao's dynamic scaling keeps no state between steps)."""
        return {"recipe": self.recipe, "emulate": self.emulate, "compute_dtype": DTYPE_NAMES[self.compute_dtype],
                "skip": list(self.skip), "converted_layers": list(self.converted_layers)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn when resuming a checkpoint trained with another recipe or compute dtype."""
        for key in ("recipe", "compute_dtype"):
            now = self.state_dict()[key]
            if key in state_dict and state_dict[key] != now:
                rank_zero_warn(f"Float8Precision: resuming a checkpoint trained with {key}={state_dict[key]!r} "
                               f"using {key}={now!r}")
