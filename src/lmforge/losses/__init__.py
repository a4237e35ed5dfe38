"""Pure loss math: tensors in, loss and metrics out, no models or trainers."""
