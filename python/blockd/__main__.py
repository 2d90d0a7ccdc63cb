"""``python -m blockd``: the same as the ``blockd-daemon`` command."""

from .daemon import run

run()
