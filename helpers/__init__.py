"""Thin helpers for the big-model workbook: one idea a module (see helpers/README.md).

They hide boilerplate (fetching the bundled model, reporting hardware,
measuring memory and speed, drawing device maps, checking a map before a
load, launching processes); the notebooks call the library APIs they teach
inline. Import names from the module that defines them, e.g.
``from helpers.checkpoints import resolve_model``.
"""
