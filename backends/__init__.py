"""knobgym backends."""
