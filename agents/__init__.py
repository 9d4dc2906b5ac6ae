"""knobgym agents."""
