"""Diffusion in continuous time: `schedules` (noise schedules, prediction types, the training
objective and its weighting) and `samplers` (DDPM, DDIM, DPM-Solver++ as x0-only steps with
guidance as a wrapper)."""
