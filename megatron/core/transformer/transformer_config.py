"""``TransformerConfig``: the shape and numerics of a transformer stack."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from megatron.core.fp8.recipe import check_fp8_config
from megatron.core.model_parallel_config import ModelParallelConfig


def default_ffn_hidden_size(hidden_size: int, swiglu: bool = False) -> int:
    """The MLP hidden size when none is given: 4h, or with SwiGLU (two fc1 halves) 2/3 of
    that, rounded down to a multiple of 64 (Megatron's rule: close to the plain MLP's
    parameter count, shards aligned). The config, which has no SwiGLU switch of its own,
    uses the 4h rule; the command line passes --swiglu."""
    if swiglu:
        return int((4 * hidden_size * 2 / 3) / 64) * 64
    return 4 * hidden_size


def init_method_normal(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Initializer drawing from N(0, std^2)."""

    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.init.normal_(tensor, mean=0.0, std=std)

    return init_


def scaled_init_method_normal(std: float, num_layers: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """N(0, (std / sqrt(2 * num_layers))^2), Megatron's init for output projections."""
    return init_method_normal(std / math.sqrt(2.0 * num_layers))


@dataclass
class TransformerConfig(ModelParallelConfig):
    """Transformer shape and numerics; field names follow Megatron-Core.

    Derived fields (``ffn_hidden_size``, ``kv_channels``, ``num_query_groups``, the init
    methods) are filled in by ``__post_init__`` when left as None.
    """

    num_layers: int = 0
    """Number of transformer layers (--num-layers)."""

    hidden_size: int = 0
    """Transformer hidden size (--hidden-size)."""

    num_attention_heads: int = 0
    """Number of attention heads (--num-attention-heads)."""

    num_query_groups: Optional[int] = None
    """Key/value head groups for grouped-query attention (--num-query-groups); default:
    one per head (plain multi-head attention)."""

    ffn_hidden_size: Optional[int] = None
    """MLP hidden size (--ffn-hidden-size); default 4 * hidden size."""

    kv_channels: Optional[int] = None
    """Size of each attention head (--kv-channels); default hidden size / heads."""

    hidden_dropout: float = 0.1
    """Dropout after attention and MLP outputs (--hidden-dropout)."""

    attention_dropout: float = 0.1
    """Dropout on attention probabilities (--attention-dropout)."""

    fp32_residual_connection: bool = False
    """Keep the residual stream in fp32 (--fp32-residual-connection)."""

    apply_residual_connection_post_layernorm: bool = False
    """Take the residual after the norm instead of before it."""

    transformer_block_type: str = "pre_ln"
    """Where each layer's norms sit (NeMo's name): ``pre_ln`` (Megatron's, the default)
    normalizes the input of attention and MLP and ends the stack with a final norm;
    ``post_ln`` (the original BERT, Hugging Face's ``BertModel``) normalizes the embeddings
    (``initial_layernorm``) and each sub-layer's output after its residual add
    (``post_att_layernorm``, ``post_mlp_layernorm``), with no final norm."""

    layernorm_epsilon: float = 1e-5
    """Epsilon of the norms (--norm-epsilon)."""

    layernorm_zero_centered_gamma: bool = False
    """Norm weight stored as (gamma - 1) (--apply-layernorm-1p)."""

    normalization: str = "LayerNorm"
    """LayerNorm or RMSNorm (--normalization)."""

    qk_layernorm: bool = False
    """Normalize queries and keys per head before attention (--qk-layernorm)."""

    qk_l2_norm: bool = False
    """Scale queries and keys per head to a unit root-mean-square, without a weight
    (Llama 4's L2 norm): x * rsqrt(mean(x^2) + layernorm_epsilon) (--qk-l2-norm)."""

    softmax_type: str = "vanilla"
    """Softmax of the attention scores: ``vanilla``; ``off-by-one`` adds a virtual key of
    logit 0 and value 0 to every row; ``learnable`` makes that logit a per-head parameter
    (``core_attention.softmax_offset``, attention sinks) (--softmax-type)."""

    multi_latent_attention: bool = False
    """DeepSeek multi-latent attention: low-rank q/kv projections, RoPE on a separate
    per-head sub-dimension (--multi-latent-attention)."""

    q_lora_rank: Optional[int] = None
    """Rank of the query down projection; None projects queries directly (--q-lora-rank)."""

    kv_lora_rank: int = 32
    """Rank of the key/value latent (--kv-lora-rank)."""

    qk_head_dim: int = 128
    """Per-head query/key dims without position embedding (--qk-head-dim)."""

    qk_pos_emb_head_dim: int = 64
    """Per-head query/key dims that RoPE rotates; the key part is shared by all heads
    (--qk-pos-emb-head-dim)."""

    v_head_dim: int = 128
    """Per-head value dims (--v-head-dim)."""

    rope_type: Optional[str] = None
    """RoPE of multi-latent attention: rope or yarn (None: yarn, as Megatron-LM's MLA);
    YaRN with --rotary-scaling-factor 1 is plain RoPE (--rope-type)."""

    rotary_scaling_factor: float = 1.0
    """YaRN context-extension factor of multi-latent attention (--rotary-scaling-factor)."""

    mscale: float = 1.0
    """YaRN attention-scale coefficient, used when --rotary-scaling-factor > 1 (--mscale)."""

    mscale_all_dim: float = 0.0
    """YaRN attention-scale coefficient of all dims, used when --rotary-scaling-factor > 1
    (--mscale-all-dim)."""

    yarn_original_max_position_embeddings: int = 4096
    """The context length YaRN extends from (--yarn-original-max-position-embeddings)."""

    yarn_beta_fast: float = 32.0
    """YaRN keeps the frequencies of dims turning more often than this (--yarn-beta-fast)."""

    yarn_beta_slow: float = 1.0
    """YaRN interpolates the dims turning less often than this (--yarn-beta-slow)."""

    mtp_num_layers: Optional[int] = None
    """Number of multi-token prediction depths after the decoder; None turns MTP off
    (--mtp-num-layers)."""

    mtp_loss_scaling_factor: float = 0.1
    """The mean of the MTP depths' losses, times this, is added to the LM loss
    (--mtp-loss-scaling-factor)."""

    yarn_correction_range_round_to_int: bool = True
    """Round YaRN's ramp bounds to whole dims (--no-yarn-correction-range-round-to-int turns it off)."""

    add_bias_linear: bool = True
    """Biases in all linear layers (off with --disable-bias-linear)."""

    add_qkv_bias: bool = False
    """Bias in the QKV projection even when other biases are off (--add-qkv-bias)."""

    gated_linear_unit: bool = False
    """Gated MLP: fc1 is [gate; up] and the activation multiplies (--swiglu)."""

    activation_func: Callable = F.gelu
    """MLP activation (silu with --swiglu)."""

    glu_linear_offset: float = 0.0
    """Added to the linear half of a gated unit: act(gate) * (up + offset); gpt-oss uses 1
    (--glu-linear-offset)."""

    activation_func_clamp_value: Optional[float] = None
    """Clamp of a gated unit's inputs before the activation: the gate to at most the value,
    the linear half to [-value, value]; gpt-oss uses 7 (--activation-func-clamp-value)."""

    openai_gelu: bool = False
    """Use the tanh approximation of GeLU, as OpenAI's GPT-2 did (--openai-gelu); replaces
    an exact-GeLU activation_func."""

    init_method_std: float = 0.02
    """Std of the normal initializer (--init-method-std)."""

    init_method: Optional[Callable] = None
    """Initializer of input-side weights; default N(0, init_method_std^2)."""

    output_layer_init_method: Optional[Callable] = None
    """Initializer of output projections; default scaled by 1/sqrt(2 num_layers)."""

    embedding_init_method_std: Optional[float] = None
    """Std of the embeddings' normal initializer (--embedding-init-method-std); None: the
    embeddings use ``init_method`` (from the command line: --init-method-std)."""

    embedding_init_method: Optional[Callable] = None
    """Initializer of the word, position and token-type embeddings; default
    N(0, embedding_init_method_std^2), or ``init_method`` without that std."""

    apply_query_key_layer_scaling: bool = False
    """Scale attention scores by 1/layer_number, softmax in fp32."""

    attention_softmax_in_fp32: bool = True
    """Compute the attention softmax in fp32 (--attention-softmax-in-fp32)."""

    window_size: Optional[Tuple[int, int]] = None
    """Sliding attention window (left, right); (W, 0) for Mistral (--window-size)."""

    window_attn_skip_freq: Optional[Union[int, List[int]]] = None
    """Which layers skip the sliding window (--window-attn-skip-freq): an int N makes every
    N-th layer (1-based numbers divisible by N) full attention; a list gives one entry per
    layer, 1 for sliding window and 0 for full attention. None: every layer slides."""

    no_rope_freq: Optional[Union[int, List[int]]] = None
    """Which attention layers skip the rotary embedding (--no-rope-freq; Llama 4's NoPE
    layers): an int N skips it in every N-th layer (1-based numbers divisible by N; the
    layer count must be a multiple of N); a list gives one entry per layer, 1 for no RoPE.
    None: every layer applies it."""

    cp_comm_type: Optional[Union[str, List[str]]] = None
    """Context-parallel communication: p2p (default), all_gather, a2a or a2a+p2p; one value
    for all layers or one per layer (--cp-comm-type)."""

    hierarchical_context_parallel_sizes: Optional[List[int]] = None
    """Sizes of the hierarchical context-parallel levels, e.g. 2 4: a2a inside groups of 2
    adjacent CP ranks, p2p across the 4 groups; needed by a2a+p2p
    (--hierarchical-context-parallel-sizes)."""

    attention_backend: str = "auto"
    """Core attention: auto, sdpa (torch scaled_dot_product_attention), unfused
    (reference math), flash, fused or local (--attention-backend)."""

    bias_activation_fusion: bool = True
    """Add the fc1 bias and apply GeLU / SwiGLU in one fused kernel on CUDA (off with
    --no-bias-gelu-fusion / --no-bias-swiglu-fusion). Megatron-Core's dataclass defaults
    the fusions to False and its flags to on; here both default on, because every fused
    path is pure PyTorch (torch.compile) with the same math as its reference."""

    bias_dropout_fusion: bool = True
    """Fuse bias add, dropout and residual add into one kernel on CUDA (off with
    --no-bias-dropout-fusion)."""

    apply_rope_fusion: bool = True
    """Apply rotary position embedding with one fused kernel on CUDA (off with --no-rope-fusion)."""

    persist_layer_norm: bool = True
    """Compute LayerNorm / RMSNorm with one fused kernel on CUDA (off with
    --no-persist-layer-norm)."""

    cross_entropy_loss_fusion: bool = False
    """Compute the LM loss with the chunked vocab-parallel cross entropy, which never holds
    fp32 logits for the whole micro-batch (--cross-entropy-loss-fusion). Off in the config,
    as in Megatron; the training scripts turn it on for runs on a GPU (faster, smaller)
    unless --no-cross-entropy-loss-fusion or --deterministic-mode is given."""

    cross_entropy_fusion_impl: str = "native"
    """Implementation of --cross-entropy-loss-fusion: native; te (Transformer Engine's
    kernel in Megatron) also runs the native one here (--cross-entropy-fusion-impl)."""

    recompute_granularity: Optional[str] = None
    """None, 'selective' or 'full' (--recompute-granularity)."""

    recompute_method: Optional[str] = None
    """'uniform' or 'block' with full recompute (--recompute-method)."""

    recompute_num_layers: Optional[int] = None
    """Layers per recompute group (--recompute-num-layers)."""

    cpu_offloading_num_layers: int = 0
    """Keep the activations the first N transformer layers save for backward in CPU memory
    (no pipeline parallelism, no recompute; megatron.core.transformer.activation_offload)."""

    distribute_saved_activations: bool = False
    """Shard recompute checkpoints over tensor-parallel ranks."""

    rotary_interleaved: bool = False
    """Rotate adjacent pairs instead of halves (--rotary-interleaved)."""

    calculate_per_token_loss: bool = False
    """Average the loss over all tokens of the global batch (--calculate-per-token-loss)."""

    num_layers_in_first_pipeline_stage: Optional[int] = None
    """Number of transformer layers on the first pipeline stage (--decoder-first-pipeline-num-layers)."""

    num_layers_in_last_pipeline_stage: Optional[int] = None
    """Number of transformer layers on the last pipeline stage (--decoder-last-pipeline-num-layers)."""

    account_for_embedding_in_pipeline_split: bool = False
    """Count the embedding as a layer of the first pipeline stage when splitting layers
    (--account-for-embedding-in-pipeline-split)."""

    account_for_loss_in_pipeline_split: bool = False
    """Count the loss as a layer of the last pipeline stage when splitting layers
    (--account-for-loss-in-pipeline-split)."""

    num_moe_experts: Optional[int] = None
    """Number of experts in each MoE layer (--num-experts); None: dense MLPs only."""

    moe_layer_freq: Union[int, List[int]] = 1
    """Which layers are MoE (--moe-layer-freq): every N-th layer, or a 0/1 list per layer
    (on the command line a pattern such as ([1]*3+[0])*2, 1 = MoE)."""

    moe_ffn_hidden_size: Optional[int] = None
    """Hidden size of each routed expert's MLP (--moe-ffn-hidden-size); default --ffn-hidden-size."""

    moe_shared_expert_intermediate_size: Optional[int] = None
    """Hidden size of the shared expert(s) (--moe-shared-expert-intermediate-size); none when None."""

    moe_shared_expert_gate: bool = False
    """Scale the shared expert's output per token by sigmoid(x @ gate_weight^T), a [1, h]
    gate (--moe-shared-expert-gate); needs moe_shared_expert_intermediate_size."""

    moe_router_topk: int = 2
    """Experts each token is routed to (--moe-router-topk)."""

    moe_router_score_function: str = "softmax"
    """Router score function, softmax or sigmoid (--moe-router-score-function)."""

    moe_router_pre_softmax: bool = False
    """Softmax over all experts before the top-k selection (--moe-router-pre-softmax)."""

    moe_router_num_groups: Optional[int] = None
    """Expert groups for group-limited routing (--moe-router-num-groups)."""

    moe_router_group_topk: Optional[int] = None
    """Groups each token may use with group-limited routing (--moe-router-group-topk)."""

    moe_router_topk_scaling_factor: Optional[float] = None
    """Scale of the top-k routing probabilities (--moe-router-topk-scaling-factor)."""

    moe_router_enable_expert_bias: bool = False
    """Aux-loss-free balancing: a per-expert bias added to the scores for selection only,
    updated after each step from the token counts (--moe-router-enable-expert-bias)."""

    moe_router_bias_update_rate: float = 1e-3
    """Step of the expert-bias update (--moe-router-bias-update-rate)."""

    moe_router_dtype: Optional[str] = None
    """Router compute dtype, fp32 or fp64; None: the params dtype (--moe-router-dtype)."""

    moe_router_load_balancing_type: str = "aux_loss"
    """Load balancing: aux_loss, seq_aux_loss, sinkhorn or none (--moe-router-load-balancing-type)."""

    moe_aux_loss_coeff: float = 0.0
    """Scale of the load-balancing auxiliary loss (--moe-aux-loss-coeff)."""

    moe_z_loss_coeff: Optional[float] = None
    """Scale of the router z-loss (--moe-z-loss-coeff); None: no z-loss."""

    moe_input_jitter_eps: Optional[float] = None
    """Multiplicative uniform jitter of the router input in training (--moe-input-jitter-eps)."""

    moe_router_force_load_balancing: bool = False
    """Route by random logits instead of the router's (the gradient passes straight through
    to the router): experts get evenly spread tokens whatever the weights, for benchmarking
    a balanced MoE (--moe-router-force-load-balancing). Not for real training."""

    moe_token_dispatcher_type: str = "allgather"
    """How tokens reach their experts: allgather or alltoall (--moe-token-dispatcher-type)."""

    moe_expert_capacity_factor: Optional[float] = None
    """Expert capacity factor (--moe-expert-capacity-factor); None: dropless."""

    moe_pad_expert_input_to_capacity: bool = False
    """Pad every expert's input to its capacity (--moe-pad-expert-input-to-capacity)."""

    moe_token_drop_policy: str = "probs"
    """Which tokens an over-full expert drops: lowest probs or latest position (--moe-token-drop-policy)."""

    moe_apply_probs_on_input: bool = False
    """Multiply each token by its routing prob before the experts instead of weighting the
    experts' outputs at the combine (--moe-apply-probs-on-input); top-1 routing only."""

    moe_grouped_gemm: bool = False
    """Run the local experts as one grouped GEMM instead of a loop (--moe-grouped-gemm)."""

    moe_per_layer_logging: bool = False
    """Write the MoE balancing losses and token counts of every layer to TensorBoard
    (--moe-per-layer-logging)."""

    fp8: Optional[str] = None
    """FP8 format of the transformer layers' GEMMs (--fp8-format): e4m3, or hybrid (e4m3
    forward, e5m2 gradients); None trains without FP8. See docs/fp8.md."""

    fp8_recipe: str = "delayed"
    """FP8 scaling recipe (--fp8-recipe): delayed (amax history) or tensorwise (current scaling);
    mxfp8, blockwise and custom are refused."""

    fp8_margin: int = 0
    """FP8 scales are backed off by 2^margin (--fp8-margin)."""

    fp8_amax_history_len: int = 1
    """Amaxes kept per tensor for delayed scaling (--fp8-amax-history-len)."""

    fp8_amax_compute_algo: str = "most_recent"
    """Amax the delayed scale is computed from: most_recent or max over the history (--fp8-amax-compute-algo)."""

    fp8_wgrad: bool = True
    """Weight-gradient GEMMs in FP8; False keeps them in high precision (--no-fp8-wgrad)."""

    fp8_emulation: bool = False
    """Emulate the FP8 GEMMs in fp32 where the device has none (CPU, pre-Hopper GPUs): slow, for
    debugging FP8 numerics (--fp8-emulation). Not a Megatron flag."""

    fp8_param: bool = False
    """The FP8 linears' weights are all-gathered in FP8 by the distributed optimizer
    (--fp8-param-gather; the gather itself is ``DistributedDataParallelConfig.fp8_param_gather``).
    Needs ``fp8``. See docs/fp8.md."""

    first_last_layers_bf16: bool = False
    """Keep the first and last transformer layers out of FP8 (--first-last-layers-bf16)."""

    num_layers_at_start_in_bf16: int = 1
    """Layers at the start kept out of FP8 with --first-last-layers-bf16 (--num-layers-at-start-in-bf16)."""

    num_layers_at_end_in_bf16: int = 1
    """Layers at the end kept out of FP8 with --first-last-layers-bf16 (--num-layers-at-end-in-bf16)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_shape()
        check_fp8_config(self)
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = default_ffn_hidden_size(self.hidden_size)
        if self.kv_channels is None:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        self._check_parallel_shape()
        self._check_attention_options()
        if self.init_method is None:
            self.init_method = init_method_normal(self.init_method_std)
        if self.output_layer_init_method is None:
            self.output_layer_init_method = scaled_init_method_normal(self.init_method_std, self.num_layers)
        if self.embedding_init_method is None:
            self.embedding_init_method = (self.init_method if self.embedding_init_method_std is None
                                          else init_method_normal(self.embedding_init_method_std))
        if self.apply_query_key_layer_scaling:
            self.attention_softmax_in_fp32 = True
        from megatron.core.transformer.mla_config_checks import check_mla_config

        check_mla_config(self)
        if self.num_moe_experts is not None:
            from megatron.core.transformer.moe.moe_config_checks import check_moe_config

            check_moe_config(self)

    def _check_shape(self) -> None:
        for flag, value in (
            ("--num-layers", self.num_layers),
            ("--hidden-size", self.hidden_size),
            ("--num-attention-heads", self.num_attention_heads),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{flag} must be a positive integer, got {value!r}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                f"{self.num_attention_heads}: change one, or give --kv-channels explicitly"
            )
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"--normalization must be LayerNorm or RMSNorm, got {self.normalization!r}")
        if self.transformer_block_type not in ("pre_ln", "post_ln"):
            raise ValueError(
                f"transformer_block_type must be pre_ln or post_ln, got {self.transformer_block_type!r}"
            )
        if self.cross_entropy_fusion_impl not in ("native", "te"):
            raise ValueError(
                f"--cross-entropy-fusion-impl must be native or te, got {self.cross_entropy_fusion_impl!r}"
            )
        if self.window_size is not None and (len(self.window_size) != 2 or self.window_size[0] < 0):
            raise ValueError(f"--window-size must be two non-negative integers (left, right), got {self.window_size}")
        self._check_gated_unit_options()
        self._check_window_skip()
        self._check_no_rope()

    def _check_gated_unit_options(self) -> None:
        clamp = self.activation_func_clamp_value
        if (clamp is not None or self.glu_linear_offset != 0.0) and not self.gated_linear_unit:
            raise ValueError(
                "--activation-func-clamp-value and --glu-linear-offset act on a gated MLP: add --swiglu "
                "or --quick-geglu, or drop them"
            )
        if clamp is not None and clamp <= 0:
            raise ValueError(f"--activation-func-clamp-value must be positive, got {clamp}")

    def _check_window_skip(self) -> None:
        freq = self.window_attn_skip_freq
        if freq is None:
            return
        if self.window_size is None:
            raise ValueError("--window-attn-skip-freq chooses the layers that use --window-size: give --window-size too")
        if isinstance(freq, int):
            if freq < 1:
                raise ValueError(f"--window-attn-skip-freq must be a positive integer or a list, got {freq}")
        elif len(freq) != self.num_layers or any(v not in (0, 1) for v in freq):
            raise ValueError(
                f"--window-attn-skip-freq as a list needs one 0 or 1 per layer ({self.num_layers}), got {freq}"
            )

    def _check_no_rope(self) -> None:
        freq = self.no_rope_freq
        if freq is None:
            return
        if isinstance(freq, int):
            if freq < 1 or self.num_layers % freq:
                raise ValueError(
                    f"--no-rope-freq {freq}: must be a positive divisor of --num-layers {self.num_layers} "
                    "(every N-th layer skips RoPE), or a list with one 0 or 1 per layer"
                )
        elif len(freq) != self.num_layers or any(v not in (0, 1) for v in freq):
            raise ValueError(
                f"--no-rope-freq as a list needs one 0 or 1 per layer ({self.num_layers}), got {freq}"
            )
        if self.multi_latent_attention:
            raise ValueError("--no-rope-freq is not supported with --multi-latent-attention: drop one of them")

    def _check_attention_options(self) -> None:
        if self.softmax_type not in ("vanilla", "off-by-one", "learnable"):
            raise ValueError(
                f"--softmax-type must be vanilla, off-by-one or learnable, got {self.softmax_type!r}"
            )
        if self.qk_l2_norm and self.qk_layernorm:
            # Megatron's layer spec silently lets the L2 norm replace the q/k layernorm.
            raise ValueError(
                "--qk-l2-norm replaces the q/k norm, so --qk-layernorm would have no effect: drop one of them"
            )

    def _check_parallel_shape(self) -> None:
        tp = self.tensor_model_parallel_size
        if self.num_attention_heads % tp:
            raise ValueError(
                f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                f"--tensor-model-parallel-size {tp}: each tensor-parallel rank needs whole heads"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                f"--num-query-groups {self.num_query_groups}"
            )
        if self.num_query_groups % tp:
            raise ValueError(
                f"--num-query-groups {self.num_query_groups} is not divisible by "
                f"--tensor-model-parallel-size {tp}: use a tensor-parallel size that divides "
                "the number of query groups"
            )
        if self.ffn_hidden_size % tp:
            raise ValueError(
                f"--ffn-hidden-size {self.ffn_hidden_size} is not divisible by "
                f"--tensor-model-parallel-size {tp}"
            )
