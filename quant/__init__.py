"""INT8/INT4/FP16 schemes, drift gate and precision search (imported as ``agevlm_edge.quant``)."""
