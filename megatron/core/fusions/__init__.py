"""Fused kernels for the hot elementwise and loss regions of the transformer.

Each op here has an eager reference (plain PyTorch, the yardstick its tests compare
against) and a fused path built by ``torch.compile`` on first use with CUDA tensors. On
CPU the reference runs (compiling would only slow small CPU runs down) unless a test
forces the compiled path with ``compiled_region.force_compiled_on_cpu()``.

Switches (TransformerConfig field <- flag): ``bias_activation_fusion`` <-
--no-bias-gelu-fusion / --no-bias-swiglu-fusion, ``bias_dropout_fusion`` <-
--no-bias-dropout-fusion, ``apply_rope_fusion`` <- --no-rope-fusion, ``persist_layer_norm``
<- --no-persist-layer-norm (the norms), ``cross_entropy_loss_fusion`` <-
--cross-entropy-loss-fusion.
"""
