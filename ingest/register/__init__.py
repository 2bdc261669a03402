"""The device register (make, model, source, attributes, expected interval) and calibrations."""
