"""Diffusers pipelines built on clear_dit: the built-in tiny model, high-resolution and patch-parallel generation."""
