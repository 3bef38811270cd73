"""FP8 training in plain PyTorch (no Transformer Engine): scaling recipes, the FP8 linear.

``recipe``   which formats and scaling the config asks for, and what is refused.
``scaling``  per-tensor amax, scales, delayed scaling with an amax history.
``gemm``     the FP8 GEMM: ``torch._scaled_mm`` on GPUs with FP8, an fp32 emulation elsewhere.
``linear``   the autograd Function of an FP8 linear and the per-linear scaling state.
``grouped_linear`` / ``grouped_gemm`` the MoE experts' FP8 grouped linear (per-expert
             scaling state) and its grouped GEMMs (``torch._scaled_grouped_mm`` on Hopper).
``layer_scope`` which transformer layers run in FP8 (--first-last-layers-bf16).
``recompute_replay`` delayed scaling under activation recompute: the rerun uses the
             forward's scales.
"""

from megatron.core.fp8.recipe import Fp8Recipe, check_fp8_config
from megatron.core.fp8.scaling import compute_scale

__all__ = ["Fp8Recipe", "check_fp8_config", "compute_scale"]
