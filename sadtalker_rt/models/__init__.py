"""PyTorch reference modules. Attribute names mirror the official checkpoint keys.

Each sub-network module exposes ``official_template(**cfg)`` (the official key names, shapes and
dtypes), ``checkpoint_filter_fn(state_dict)`` (a pure function from official keys to this module's
keys) and ``build(state_dict, source, **cfg)`` (an eval-mode module loaded strictly).
This package imports torch; the runtime never imports it.
"""
