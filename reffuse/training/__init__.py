"""Training: backpropagation through the decoder (forward/backward pairs), the losses, AdamW, and the trainer that
heals a fused model by knowledge distillation."""
