"""The task names the engine, the CLI and the plugin share (no torch: the plugin imports it).

A task names what the output is, given the input: ``he2ihc:ki67`` is a Ki-67 IHC image of
an H&E section. The part before ``:`` says which kind of model runs; the part after picks a
marker or domain within it.
"""

from __future__ import annotations

# Image-to-image tasks the whole-slide engine runs, in the order the plugin lists them.
SLIDE_TASKS = ("he2he", "he2ihc", "he2ihc:ki67", "he2ihc:her2", "he2mif", "ff2ffpe", "identity")
# Tasks whose output lives in the source's own latent space: a partial-strength start
# (the source noised part of the way) is meaningful for them.
SAME_DOMAIN_TASKS = ("he2he", "ff2ffpe")


def task_family(task: str) -> str:
    """``he2ihc:ki67`` -> ``he2ihc``."""
    return task.split(":", 1)[0].strip()


def supports_strength(task: str) -> bool:
    return task_family(task) in SAME_DOMAIN_TASKS
