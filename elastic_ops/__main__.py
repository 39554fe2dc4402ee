"""``python -m elastic_ops``: which backends this machine can run, and why not."""
from . import backends

for name, status in backends().items():
    print(f"{name:10s} {status}")
