"""Integrations with packages that build ``pyro.infer.Predictive`` themselves.

Each module imports without the package it serves:

- :mod:`devicemem.integrations.bayesdream`: ``bayesdream_routing(model_obj, **options)``.
"""
