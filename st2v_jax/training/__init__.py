"""Training CAM, APM and the base UNet3D: objective, optimizer, train step, checkpoints, the trainer loop."""
