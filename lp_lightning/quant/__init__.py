"""Fake-quant modules, observers and qparams (pure torch), shared by the plugin and the exporter."""

__all__: list[str] = []
