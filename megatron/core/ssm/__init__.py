"""State-space layers: the Mamba-2 mixer, its SSD (state-space duality) scan and the
depthwise causal conv1d, each with a pure-PyTorch reference."""
