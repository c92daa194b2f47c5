"""Distillation of CLEAR students from full-attention teachers: self-generated data, losses, trainer."""
