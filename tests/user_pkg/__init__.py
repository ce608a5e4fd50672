"""A small "user package": LightningModules and DataModules unlike the built-ins, used only by the tests.

They use their own argument names, metric names (``valid/accuracy``, ``valid/mse``), batch layouts (dicts,
3-tuples) and architectures (Transformer encoder over rows, ResNet with BatchNorm/depthwise conv, regression).
"""
