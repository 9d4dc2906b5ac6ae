"""knobgym latency_model."""
